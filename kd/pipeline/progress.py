"""Rich progress bars with rate and ETA for every long step."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# Progress and logs go to stderr so that `--json` output on stdout stays machine-readable.
console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second with the unit the caller names (tok/s, rows/s, steps/s)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"- {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


def make_progress(unit: str = "it") -> Progress:
    """A progress bar showing count, rate (in `unit`/s), elapsed time and ETA."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def log(message: str) -> None:
    """A status line on stderr (never stdout, which belongs to --json output)."""
    console.print(message, highlight=False)
