"""What stage one reports while it runs and in its summary: tokens/s, targets/s, ETA, teacher share.

The rates count only what the teacher scored in this run (shards reused from an earlier run are
skipped in a blink and would inflate them); the ETA extrapolates the corpus position reached by
scoring at the rate measured since the first teacher forward.
"""

from __future__ import annotations

import time

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kd.pipeline.progress import console


class Meter:
    """Running counters of one stage-one run."""

    def __init__(self, total_records=None) -> None:
        self.started = time.perf_counter()
        self.total_records = total_records
        """Callable returning the corpus's record count once known (else None)."""
        self.tokens = self.targets = 0
        self.teacher_seconds = 0.0
        self.first_forward: float | None = None
        self.position = 0
        """Corpus row index reached (scored or reused)."""
        self._scoring_from: tuple[float, int] | None = None

    def teacher_starts(self) -> None:
        now = time.perf_counter()
        if self.first_forward is None:
            self.first_forward = now
        if self._scoring_from is None:
            self._scoring_from = (now, self.position)

    def scored(self, seconds: float, tokens: int, targets: int) -> None:
        self.teacher_seconds += seconds
        self.tokens += tokens
        self.targets += targets

    def reached(self, row: int) -> None:
        self.position = max(self.position, row)

    def eta(self) -> float | None:
        total = self.total_records() if self.total_records else None
        if total is None or self._scoring_from is None:
            return None
        since, row0 = self._scoring_from
        rate = (self.position - row0) / max(time.perf_counter() - since, 1e-9)
        return max(total - self.position, 0) / rate if rate > 0 else None

    def summary(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self.started
        return {
            "seconds": wall,
            "teacher_seconds": self.teacher_seconds,
            "teacher_share": self.teacher_seconds / wall if wall > 0 else 0.0,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens / wall if wall > 0 else 0.0,
            "targets_per_second": self.targets / wall if wall > 0 else 0.0,
            "teacher_tokens_per_second": self.tokens / self.teacher_seconds if self.teacher_seconds else 0.0,
            "first_forward_seconds": None if self.first_forward is None else self.first_forward - self.started,
        }

    def line(self) -> str:
        s = self.summary()
        eta = self.eta()
        eta_text = "-" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
        return (
            f"{s['tokens_per_second']:,.0f} tok/s  {s['targets_per_second']:,.0f} targets/s  "
            f"teacher {100 * s['teacher_share']:.0f}% of wall  eta {eta_text}"
        )


def make_stage_one_progress() -> Progress:
    """Corpus position (records) as the bar, the meter's line beside it; on stderr like every log."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.fields[total_text]} records"),
        TextColumn("{task.fields[meter]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
