"""The one progress bar every lab command shows (rich, on stderr, gone when done)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn


def progress_bar(console: Console, label: str = "{task.description}", count: str | None = None) -> Progress:
    """label | bar | done/total (``count``: a format of its own, e.g. seconds) | elapsed."""
    counter: ProgressColumn = MofNCompleteColumn() if count is None else TextColumn(count)
    return Progress(TextColumn(label), BarColumn(), counter, TimeElapsedColumn(), console=console, transient=True)
