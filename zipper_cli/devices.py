"""Where and how a stage computes: the device (--device), the training precision (bf16 autocast, and whether
this CPU multiplies bf16 natively) and torchrun's process group (Dist, all_sum, broadcast)."""

from __future__ import annotations

import contextlib
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import ZipperError

if TYPE_CHECKING:
    from .trainer import TrainConfig


@dataclass(frozen=True)
class Dist:
    """This process's place in torchrun's group; rank 0 of 1 without torchrun."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join torchrun's process group when launched by it (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and local_rank >= torch.cuda.device_count():
        raise ZipperError(f"--device cuda under torchrun: local rank {local_rank} has no GPU of its own "
                          f"({torch.cuda.device_count()} visible); use --nproc-per-node <= "
                          f"{torch.cuda.device_count()}, or --device cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    d = Dist(dist.get_rank(), dist.get_world_size(), local_rank)
    if device == "cuda":
        torch.cuda.set_device(d.local_rank)
    return d


def pick_device(name: str) -> str:
    """--device auto|cpu|cuda -> cpu or cuda: auto takes CUDA when present.

    On CUDA this also turns cuDNN's attention kernel off: it builds an execution plan for every new input
    shape, and our batches change shape every step (padded to their longest example). With it, bf16 fusion
    steps on an H100 ran at 1/8 the speed of float32 ones; the flash and memory-efficient kernels remain."""
    if name not in ("auto", "cpu", "cuda"):
        raise ZipperError(f"--device must be auto, cpu or cuda (got {name!r})")
    if name == "cuda" and not torch.cuda.is_available():
        raise ZipperError("--device cuda: no CUDA device is available")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device


def cpu_multiplies_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16), read from the
    flags in /proc/cpuinfo (or the given text); None where that file is missing (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def slow_bf16_warning(cfg: TrainConfig, device: str, cpuinfo: str | None = None) -> str | None:
    """The line to warn with when --precision bf16 asks for autocast on a CPU that emulates bf16
    (`cpuinfo`: /proc/cpuinfo's text; default this machine's). No warning where that is unknown."""
    if cfg.precision != "bf16" or device != "cpu" or cpu_multiplies_bf16(cpuinfo) is not False:
        return None
    # measured on an AVX2-only AMD EPYC: autocast linear layers 6x slower than fp32, plain bf16 matmul 80x
    return ("warning: --precision bf16 on a CPU without native bf16 (no avx512_bf16 / amx_bf16 / bf16 in /proc/cpuinfo): "
            "its matrix products are emulated and train several times slower than fp32; use --precision auto or fp32")


@contextlib.contextmanager
def autocast_for(cfg: TrainConfig, device: str):
    """The forward pass's precision: bf16 autocast for --precision bf16, and for auto on CUDA."""
    if not (cfg.precision == "bf16" or (cfg.precision == "auto" and device == "cuda")):
        yield
        return
    # On a CPU, flash attention's bf16 backward was the slowest op of a demo tower's step (26% of it): the
    # math path (matmul, softmax) trains it 1.2-1.6x faster (scripts/bench.py pretrain).
    attention = sdpa_kernel([SDPBackend.MATH]) if device == "cpu" else nullcontext()
    with torch.autocast(device, dtype=torch.bfloat16), attention:
        yield


def all_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast(obj, d: Dist):
    """Rank 0's `obj` on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
