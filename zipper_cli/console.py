"""Terminal output: one rich console for logs, progress bars with ETA, and summary tables."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(highlight=False)


def log(msg: str) -> None:
    console.print(msg, markup=False)


def progress() -> Progress:
    """A progress display: description, bar, done/total, elapsed, ETA. Quiet when not a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
                    disable=not console.is_terminal)
