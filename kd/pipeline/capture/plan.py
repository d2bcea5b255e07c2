"""Where stage one cuts: teacher batches inside a window, record batches inside a shard.

Shard boundaries (after the row whose running target count reaches --shard-tokens) and record-batch
boundaries (after the row whose running count reaches BATCH_TARGETS) are pure functions of the
rows' target counts, decided row by row as the corpus streams past, so a streamed run cuts exactly
where `kd.cache.format.cut_points` would cut the whole shard. Teacher batches only change how the
teacher is fed, never what is stored.
"""

from __future__ import annotations

from kd.pipeline.engines.teacher import SequenceToScore


def length_sorted_batches(
    seqs: list[SequenceToScore], batch_size: int, batch_tokens: int | None = None
) -> list[list[int]]:
    """Positions of `seqs` grouped into teacher batches, shortest sequences first (less padding).

    With `batch_tokens`, a batch takes sequences while (count x longest length) stays within the
    budget, so a batch of long sequences holds few of them and a batch of short ones many: the
    padded [batch, length] activations stay the same size whatever the corpus. Otherwise fixed
    `batch_size`. The sort is stable, so the batches are a pure function of the window.
    """
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids))
    if batch_tokens is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        length = len(seqs[i].input_ids)  # ascending: the newest sequence is the longest so far
        if current and (len(current) + 1) * length > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class RunningCut:
    """Cuts a stream of per-row counts after the row whose running count reaches `limit`, then restarts."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def add(self, n: int) -> bool:
        """Count a row; True when a cut falls right after it."""
        self.count += n
        if self.count >= self.limit:
            self.count = 0
            return True
        return False

    def reset(self) -> None:
        self.count = 0
