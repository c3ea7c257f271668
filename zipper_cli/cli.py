"""The `zipper` command: thin Typer verbs that parse options into a stage config and call the stage."""

from __future__ import annotations

import dataclasses
import errno
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .errors import Interrupted, ZipperError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="zipper: speech-text models from unimodal towers zipped with gated cross-attention "
                       "(arXiv 2405.18669). Stages: tokenize -> pretrain -> fuse -> decode -> eval.")

RunDir = typer.Option(Path("runs/demo"), "--run-dir", help="The run directory every stage reads and writes.")
Force = typer.Option(False, "--force", help="Redo a finished stage even when its config differs.")


def _version(value: bool):
    if value:
        typer.echo(f"zipper {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


@app.command()
def tokenize(
    run_dir: Path = RunDir,
    corpus: List[str] = typer.Option(["demo"], "--corpus", help="demo | english | librispeech:DIR | kaldi:DIR@ROLE | "
                                     "manifest:FILE.jsonl[@ROLE]; repeat to combine."),
    n_text: Optional[int] = typer.Option(None, help="Built-in corpora: text-only sentences."),
    n_speech: Optional[int] = typer.Option(None, help="Built-in corpora: audio-only utterances."),
    n_aligned: Optional[int] = typer.Option(None, help="Built-in corpora: aligned (audio, transcript) pairs."),
    n_dev: Optional[int] = typer.Option(None, help="Built-in corpora: dev pairs."),
    n_test: Optional[int] = typer.Option(None, help="Built-in corpora: test pairs."),
    corpus_seed: int = typer.Option(0, help="Built-in corpora: seed for sentences and voices."),
    voices: str = typer.Option("default", help="Built-in corpora: voice mix, e.g. 'kal,slt,kal@0.9,espeak:en-us'."),
    subset_role: List[str] = typer.Option([], "--subset-role", help="LibriSpeech subset to role, NAME=ROLE; repeatable."),
    text_file: List[str] = typer.Option([], "--text-file", help="Extra text-only data, one sentence a line."),
    min_seconds: float = typer.Option(0.3, help="Reject shorter audio."),
    max_seconds: float = typer.Option(30.0, help="Reject longer audio."),
    max_text_words: int = typer.Option(100, help="Reject longer transcripts."),
    text_vocab: int = typer.Option(1000, help="Sentencepiece vocabulary size (upper bound)."),
    text_model: str = typer.Option("unigram", help="Sentencepiece model: unigram | bpe | char | word."),
    speech_tokenizer: str = typer.Option("mel-kmeans", help="mel-kmeans | ssl-kmeans | ctc-kmeans | encodec."),
    units: int = typer.Option(512, help="Number of k-means speech units."),
    frame_rate: int = typer.Option(25, help="mel-kmeans and ctc-kmeans unit rate in Hz: 25, 50 or 100."),
    dedup: bool = typer.Option(False, "--dedup", help="Collapse repeated units (loses durations)."),
    ssl_arch: str = typer.Option("hubert_base", help="ssl-kmeans: torchaudio model, e.g. hubert_base, wavlm_base."),
    ssl_layer: int = typer.Option(6, help="ssl-kmeans: transformer layer whose output is clustered."),
    ssl_checkpoint: Optional[Path] = typer.Option(None, help="ssl-kmeans: local state_dict of that model."),
    ctc_encoder_steps: int = typer.Option(800, help="ctc-kmeans: training steps of its encoder (a CTC "
                                          "recogniser trained on the aligned role)."),
    codec_checkpoint: Optional[Path] = typer.Option(None, help="encodec: local state_dict of the 24 kHz model."),
    codec_bandwidth: float = typer.Option(1.5, help="encodec: target bandwidth in kbps (units are codebook 0)."),
    seed: int = typer.Option(0, help="Seed for the tokenizers (k-means, sentencepiece)."),
    max_fit_frames: int = typer.Option(200_000, help="Frames sampled to fit k-means."),
    shard_size: int = typer.Option(2000, help="Utterances per token shard."),
    workers: int = typer.Option(1, help="Worker processes for audio."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache of built-in corpora (default $ZIPPER_CACHE or ~/.cache/zipper)."),
    force: bool = Force,
):
    """Audio -> speech units, text -> sentencepiece; manifests, token shards and a rejects list."""
    from .audio import AudioLimits
    from .speech_tokenizer import SpeechTokenizerConfig
    from .stages.tokenize import TokenizeConfig, tokenize as run
    from .text_tokenizer import TextTokenizerConfig

    cfg = TokenizeConfig(
        corpus=tuple(corpus), n_text=n_text, n_speech=n_speech, n_aligned=n_aligned, n_dev=n_dev, n_test=n_test,
        corpus_seed=corpus_seed, voices=voices, subset_roles=tuple(subset_role), text_files=tuple(text_file),
        limits=AudioLimits(min_seconds=min_seconds, max_seconds=max_seconds), max_text_words=max_text_words,
        text=TextTokenizerConfig(vocab_size=text_vocab, model_type=text_model, seed=seed),
        speech=SpeechTokenizerConfig(kind=speech_tokenizer, k=units, frame_rate=frame_rate, dedup=dedup, seed=seed,
                                     max_fit_frames=max_fit_frames, ssl_arch=ssl_arch, ssl_layer=ssl_layer,
                                     ssl_checkpoint=str(ssl_checkpoint) if ssl_checkpoint else None,
                                     codec_checkpoint=str(codec_checkpoint) if codec_checkpoint else None,
                                     codec_bandwidth=codec_bandwidth, ctc_encoder_steps=ctc_encoder_steps),
        shard_size=shard_size, workers=workers, cache_dir=str(cache_dir) if cache_dir else None)
    run(run_dir, cfg, force=force)


# Optimisation options shared by pretrain and fuse.
Steps = typer.Option(1000, "--steps", help="Optimizer steps.")
Lr = typer.Option(1e-3, "--lr", help="Peak learning rate (warmup, then cosine decay to 10%).")
Warmup = typer.Option(50, "--warmup", help="Warmup steps.")
GradClip = typer.Option(1.0, "--grad-clip", help="Gradient-norm clip (0 disables).")
GradAccum = typer.Option(1, "--grad-accum", help="Batches per optimizer step.")
MaxTokens = typer.Option(4096, "--max-tokens", help="Padded tokens per batch, across all processes.")
EvalEvery = typer.Option(100, "--eval-every", help="Steps between dev-loss evaluations.")
CkptEvery = typer.Option(100, "--ckpt-every", help="Steps between checkpoints.")
KeepLast = typer.Option(2, "--keep-last", help="Checkpoints kept besides the best.")
Seed = typer.Option(0, "--seed", help="Seed for initialisation, data order and dropout.")
Precision = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16.")
Device = typer.Option("auto", "--device", help="auto | cpu | cuda.")


def _train_config(steps, lr, warmup, grad_clip, grad_accum, max_tokens, eval_every, ckpt_every, keep_last, seed,
                  precision, device):
    from .trainer import TrainConfig

    return TrainConfig(max_steps=steps, lr=lr, warmup_steps=warmup, grad_clip=grad_clip, grad_accum=grad_accum,
                       max_tokens=max_tokens, eval_every=eval_every, ckpt_every=ckpt_every, keep_last=keep_last,
                       seed=seed, precision=precision, device=device)


@app.command()
def pretrain(
    run_dir: Path = RunDir,
    tower: str = typer.Option(..., "--tower", help="text | speech."),
    size: str = typer.Option("demo", "--size", help="Tower preset: tiny | demo | S | L."),
    n_layer: Optional[int] = typer.Option(None, help="Override the preset's depth."),
    n_embd: Optional[int] = typer.Option(None, help="Override the preset's width."),
    n_head: Optional[int] = typer.Option(None, help="Override the preset's heads."),
    max_seq_len: Optional[int] = typer.Option(None, help="Longer sequences are cut into windows."),
    dropout: float = typer.Option(0.0, help="Dropout."),
    pool_aligned: bool = typer.Option(True, "--pool-aligned/--no-pool-aligned",
                                      help="Also train on the aligned role's text (or audio) alone."),
    steps: int = Steps, lr: float = Lr, warmup: int = Warmup, grad_clip: float = GradClip, grad_accum: int = GradAccum,
    max_tokens: int = MaxTokens, eval_every: int = EvalEvery, ckpt_every: int = CkptEvery, keep_last: int = KeepLast,
    seed: int = Seed, precision: str = Precision, device: str = Device,
    force: bool = Force,
):
    """Pretrain a unimodal tower (text or speech) on its token shards; rerun to resume."""
    from .stages.pretrain import PretrainConfig, pretrain as run

    cfg = PretrainConfig(tower=tower, size=size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, max_seq_len=max_seq_len,
                         dropout=dropout, pool_aligned=pool_aligned,
                         train=_train_config(steps, lr, warmup, grad_clip, grad_accum, max_tokens, eval_every,
                                             ckpt_every, keep_last, seed, precision, device))
    run(run_dir, cfg, force=force)


@app.command()
def fuse(
    run_dir: Path = RunDir,
    arch: str = typer.Option("zipper", "--arch", help="zipper | single-decoder (the paper's baseline)."),
    tag: Optional[str] = typer.Option(None, "--tag", help="Name under fused/ (default from arch, freeze, data size)."),
    freeze: str = typer.Option("text", "--freeze", help="text | speech | text,speech | none (zipper only)."),
    aligned_fraction: Optional[float] = typer.Option(None, help="Fraction of the aligned role (nested subsets)."),
    aligned_count: Optional[int] = typer.Option(None, help="Or this many aligned utterances."),
    subset_seed: int = typer.Option(0, help="Seed of the aligned subsets' ranking."),
    task_mix: str = typer.Option("1:1.26", help="ASR:TTS examples."),
    n_cross: Optional[int] = typer.Option(None, help="Cross-attention points per tower (default 4)."),
    input_proj: str = typer.Option("text,speech", help="Towers with input projections, or 'none'."),
    proj_layers: int = typer.Option(3, help="Depth of the ReLU MLPs."),
    dropout: float = typer.Option(0.0, help="Dropout in the fusion blocks (zipper) or the whole single decoder."),
    ctc_weight: float = typer.Option(0.0, "--ctc-weight", help="Auxiliary CTC loss on ASR examples (0 = the paper)."),
    ctc_tts_weight: float = typer.Option(0.0, "--ctc-tts-weight",
                                         help="The same CTC loss on TTS examples: an alignment signal (0 = off)."),
    gate_lr_mult: float = typer.Option(1.0, "--gate-lr-mult", help="LR multiplier of the tanh gates (start at 0)."),
    tower_lr_mult: float = typer.Option(1.0, "--tower-lr-mult", help="LR multiplier of the towers' own trained "
                                        "parameters (zipper; the fusion modules keep --lr)."),
    xattn_pos: str = typer.Option("none", "--xattn-pos", help="auto: rotary positions in cross-attention on a "
                                  "shared time axis (not in the paper); learned: the same, speech placed by a "
                                  "learned clock; none."),
    xattn_prior: float = typer.Option(0.0, "--xattn-prior", help="With --xattn-pos auto|learned: start cross-attention "
                                      "as a soft diagonal of this many logits."),
    clock_weight: float = typer.Option(0.0, "--clock-weight", help="With --xattn-pos learned: weight of the loss "
                                       "that makes the speech clock end at the transcript's length."),
    gate_init: float = typer.Option(0.0, "--gate-init", help="0: closed tanh gates (the paper's); else open gates "
                                    "over zero-initialised branch outputs (still the identity at step 0)."),
    clock_align_weight: float = typer.Option(0.0, "--clock-align-weight", help="With --xattn-pos learned and "
                                             "--ctc-weight: teach the clock each speech token's place in the "
                                             "transcript from the CTC head's forced alignment (0 = off)."),
    rehearsal: float = typer.Option(0.0, "--rehearsal", help="Speech-LM examples on the unlabeled speech per TTS "
                                    "example: keeps the trained speech tower's language model (0 = the paper)."),
    speech_input_noise: float = typer.Option(0.0, "--speech-input-noise", help="Replace each input unit of a TTS "
                                             "training example by a random unit with this probability, so the "
                                             "speech tower leans on the text (0 = the paper)."),
    steps: int = Steps, lr: float = Lr, warmup: int = Warmup, grad_clip: float = GradClip, grad_accum: int = GradAccum,
    max_tokens: int = MaxTokens, eval_every: int = EvalEvery, ckpt_every: int = CkptEvery, keep_last: int = KeepLast,
    seed: int = Seed, precision: str = Precision, device: str = Device,
    force: bool = Force,
):
    """Zip two towers with gated cross-attention (or train the single-decoder baseline) on aligned data."""
    from .stages.fuse import FuseConfig, fuse as run

    cfg = FuseConfig(arch=arch, tag=tag, freeze=freeze, aligned_fraction=aligned_fraction, aligned_count=aligned_count,
                     subset_seed=subset_seed, task_mix=task_mix, n_cross=n_cross, input_proj=input_proj,
                     proj_layers=proj_layers, dropout=dropout, ctc_weight=ctc_weight,
                     ctc_tts_weight=ctc_tts_weight, xattn_pos=xattn_pos,
                     xattn_prior=xattn_prior, gate_init=gate_init, clock_weight=clock_weight, rehearsal=rehearsal,
                     clock_align_weight=clock_align_weight, speech_input_noise=speech_input_noise,
                     train=dataclasses.replace(_train_config(steps, lr, warmup, grad_clip, grad_accum, max_tokens,
                                                             eval_every, ckpt_every, keep_last, seed, precision, device),
                                               scalar_lr_mult=gate_lr_mult, tower_lr_mult=tower_lr_mult))
    run(run_dir, cfg, force=force)


@app.command()
def decode(
    run_dir: Path = RunDir,
    model: str = typer.Option("", "--model", help="fused/TAG or towers/text|speech (default: the only fused model)."),
    outputs: str = typer.Option("text", "--outputs", help="text (ASR) | speech (TTS) | text,speech ..."),
    split: Optional[str] = typer.Option(None, "--split", help="dev | test (default test unless --wav/--text)."),
    wav: List[Path] = typer.Option([], "--wav", help="Your own audio file(s): speech in."),
    text: List[str] = typer.Option([], "--text", help="Your own sentence(s): text in."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="One sentence per line: text in."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N utterances of the split."),
    tag: Optional[str] = typer.Option(None, "--tag", help="Name under decode/."),
    strategy: str = typer.Option("greedy", "--strategy", help="greedy | sample | beam."),
    beam: int = typer.Option(4, "--beam", help="Beams for --strategy beam (1 == greedy)."),
    length_penalty: float = typer.Option(0.6, "--length-penalty", help="GNMT length penalty alpha."),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_k: int = typer.Option(0, "--top-k", help="0 = all tokens."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    max_len_ratio: str = typer.Option("text=0.5,speech=10", "--max-len-ratio",
                                      help="Max output tokens per input token, per output modality; speech "
                                      "counted in 25 Hz units (40 ms), scaled to the run's unit rate."),
    max_len_min: str = typer.Option("text=10,speech=75", "--max-len-min",
                                    help="Floor of the maximum lengths (speech in 25 Hz units, like the ratio)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Fixed maximum per output."),
    batch_size: int = typer.Option(16, "--batch-size", help="Inputs decoded together (rows: x --beam, x --best-of)."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="KV caches (off: recompute every step)."),
    ctc_weight: float = typer.Option(0.0, "--ctc-weight", help="ASR: joint CTC/attention decoding with the "
                                     "Zipper's CTC head (0 = attention only)."),
    best_of: int = typer.Option(1, "--best-of", help="TTS with a Zipper's CTC head: sample N outputs per input, "
                                "keep the one its CTC head reads as the text most likely (--strategy sample)."),
    guidance: float = typer.Option(0.0, "--guidance", help="TTS with a Zipper: classifier-free guidance against "
                                   "the speech tower alone (0 = off)."),
    vocoder_steps: Optional[int] = typer.Option(None, "--vocoder-steps",
                                                help="Unit vocoder training steps, if the run has no vocoder yet."),
    voice: Optional[str] = typer.Option(None, "--voice", help="Speaker label (from the run's manifests) whose voice "
                                        "speech outputs are vocoded in (default: the most frequent)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (the vocoder runs on CPU)."),
    force: bool = Force,
):
    """Generate modality sequences: [text] for ASR, [speech] for TTS, [text, speech] ..."""
    from .generate import GenerationConfig, parse_modality_map
    from .stages.decode import DecodeConfig, decode as run

    texts = list(text)
    if text_file is not None:
        try:
            texts += [line.strip() for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ZipperError(f"--text-file {text_file}: cannot read it ({e})") from None
    gen = GenerationConfig(strategy=strategy, beam=beam, length_penalty=length_penalty, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed,
                           max_len_ratio=parse_modality_map(max_len_ratio, "--max-len-ratio"),
                           max_len_min=parse_modality_map(max_len_min, "--max-len-min", cast=int),
                           max_new_tokens=max_new_tokens, batch_size=batch_size, use_cache=cache,
                           ctc_weight=ctc_weight, guidance=guidance, best_of=best_of)
    cfg = DecodeConfig(model=model, outputs=outputs, split=split, wavs=tuple(str(w) for w in wav), texts=tuple(texts),
                       limit=limit, tag=tag, vocoder_steps=vocoder_steps, voice=voice, device=device, gen=gen)
    run(run_dir, cfg, force=force)


@app.command(name="eval")
def eval_(
    run_dir: Path = RunDir,
    decode_tags: List[str] = typer.Option([], "--decode", help="decode/TAG outputs to score; repeatable."),
    compare: List[str] = typer.Option([], "--compare", help="Instead of scoring: put finished evals side by side. "
                                      "Eval tags under eval/ (TAG:DECODE for one decode of a tag), comma list or "
                                      "repeated; the first is the reference every other is tested against (Wilcoxon "
                                      "signed-rank and paired bootstrap on per-utterance errors of the common "
                                      "utterances). Writes eval/TAG/compare.json, compare.md and plots."),
    judges: Optional[str] = typer.Option(None, "--judges", help="ASR judges for TTS audio: ctc,pocketsphinx (default "
                                         "both); with --compare, the judges to compare (default all)."),
    tag: Optional[str] = typer.Option(None, "--tag", help="Name under eval/."),
    perplexity: bool = typer.Option(True, "--perplexity/--no-perplexity", help="Text perplexity rows."),
    judge_steps: Optional[int] = typer.Option(None, "--judge-steps", help="CTC judge training steps, if none is trained yet."),
    resamples: int = typer.Option(10_000, "--resamples", help="--compare: paired bootstrap resamples."),
    seed: int = typer.Option(0, "--seed", help="--compare: paired bootstrap seed."),
    force: bool = Force,
):
    """ASR WER/CER, TTS WER through the vocoder and ASR judges, text perplexity; report.json/.md + plots.
    With --compare A,B: those evals side by side with paired significance tests against A."""
    judge_list = tuple(j.strip() for j in judges.split(",") if j.strip()) if judges is not None else None
    if compare:
        if decode_tags:
            raise ZipperError("--compare takes finished eval tags and --decode scores decode outputs: give one of them")
        from .stages.compare import CompareConfig, compare_evals

        systems = tuple(s.strip() for c in compare for s in c.split(",") if s.strip())
        compare_evals(run_dir, CompareConfig(systems=systems, judges=judge_list, tag=tag, resamples=resamples,
                                             seed=seed), force=force)
        return
    from .stages.evaluate import JUDGES, EvalConfig, evaluate_run

    cfg = EvalConfig(decode=tuple(decode_tags), judges=judge_list if judge_list is not None else JUDGES,
                     tag=tag, perplexity=perplexity, judge_steps=judge_steps)
    evaluate_run(run_dir, cfg, force=force)


def main() -> None:
    try:
        app()
    except ZipperError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Interrupted as e:
        typer.echo(f"interrupted: {e}", err=True)
        sys.exit(130)
    except OSError as e:  # a full disk anywhere the stages do not name the file themselves: still one line
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        typer.echo(f"error: {e.filename or 'writing'}: no space left on device; free some space and rerun the same "
                   "command (finished stages and checkpoints are kept)", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
