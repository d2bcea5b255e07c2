"""The order in which training sees its sequences: a pure function of (seed, epoch, layout, settings).

Every rank computes the same plan from the cache manifest alone (rows per record batch, and token
lengths when batches are filled by tokens), so ranks agree on every global batch without talking,
and a resumed run skips to its step by replaying integers, never data.

One epoch:

1. the record batches ("units") of the cache are permuted with ``rng(seed, epoch)``;
2. the resulting stream of sequences is cut into **windows** of ``shuffle_window`` sequences
   (``--shuffle-window``; with ``--batch-size`` rounded up to a whole number of global batches),
   and each window is permuted with ``rng(seed, epoch, window)``;
3. micro-batches are cut from each window: ``batch_size`` consecutive sequences, or, with
   ``--batch-tokens``, sequences sorted by length inside the window and packed greedily while
   ``longest × count ≤ batch_tokens`` (little padding), those micro-batches then shuffled inside
   the window;
4. every ``micro_per_step`` (accumulation steps × ranks) consecutive micro-batches form one
   optimizer step; micro-batch ``m · world + rank`` of a step belongs to ``rank``. The last
   incomplete step of an epoch is dropped.

Trade-off against a full permutation: two sequences can only meet in one global batch if they are
in the same window, and sequences of one record batch (consecutive corpus rows, a few thousand
target tokens) always share a window. With a window of a few thousand sequences drawn from dozens
of random record batches, batches are as mixed as a full shuffle for SGD purposes; a window as
large as the dataset *is* a full permutation, at the memory cost of holding it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

Identity = np.ndarray
"""[n, 3] int64: (window, unit, row in unit) of each sequence of a micro-batch."""


@dataclass(frozen=True)
class OrderSettings:
    """How sequences are grouped; everything that decides which sequence lands in which step."""

    seed: int
    shuffle_window: int
    """Sequences per shuffle window (before rounding to whole global batches)."""
    micro_per_step: int
    """Micro-batches per optimizer step: accumulation steps x ranks."""
    batch_size: int | None = None
    """Sequences per micro-batch; None when batch_tokens is set."""
    batch_tokens: int | None = None
    """Padded tokens per micro-batch (longest x count); None when batch_size is set."""


class EpochPlan:
    """Steps of every epoch over units with `unit_rows[u]` sequences each.

    Args:
        unit_rows: sequences in each unit (record batch), in manifest order.
        settings: grouping settings.
        unit_lengths: per unit, the token length of each of its sequences (needed for batch_tokens).
    """

    def __init__(
        self, unit_rows: list[int], settings: OrderSettings, unit_lengths: list[np.ndarray] | None = None
    ) -> None:
        if (settings.batch_size is None) == (settings.batch_tokens is None):
            raise ValueError("exactly one of batch_size and batch_tokens")
        if settings.batch_tokens is not None and unit_lengths is None:
            raise ValueError("batch_tokens needs unit_lengths")
        self.unit_rows = np.asarray(unit_rows, dtype=np.int64)
        self.settings = settings
        # Lengths flattened, indexed by unit_start[unit] + row: 4 bytes per sequence, no Python objects.
        self.unit_start = np.concatenate([[0], np.cumsum(self.unit_rows)[:-1]]).astype(np.int64)
        self.lengths = None if unit_lengths is None else np.concatenate(unit_lengths).astype(np.int32)
        self.window = settings.shuffle_window
        if settings.batch_size is not None:
            global_batch = settings.batch_size * settings.micro_per_step
            self.window = -(-settings.shuffle_window // global_batch) * global_batch
        self._steps: dict[int, int] = {}

    @property
    def num_sequences(self) -> int:
        return int(self.unit_rows.sum())

    def fingerprint(self) -> str:
        """Identifies the plan (settings + layout): a resumed run must replay the same one."""
        payload = json.dumps({"settings": asdict(self.settings), "rows": self.unit_rows.tolist()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def windows(self, epoch: int) -> Iterator[np.ndarray]:
        """[n, 2] (unit, row) of each window's sequences, permuted inside the window."""
        seed = self.settings.seed
        units = np.random.default_rng([seed, epoch]).permutation(len(self.unit_rows))
        pending: list[np.ndarray] = []
        count = 0
        index = 0
        for unit in units:
            rows = int(self.unit_rows[unit])
            ids = np.stack([np.full(rows, unit, dtype=np.int64), np.arange(rows, dtype=np.int64)], axis=1)
            while len(ids):
                take = min(self.window - count, len(ids))
                pending.append(ids[:take])
                ids = ids[take:]
                count += take
                if count == self.window:
                    yield self._permute(np.concatenate(pending), epoch, index)
                    pending, count, index = [], 0, index + 1
        if pending:
            yield self._permute(np.concatenate(pending), epoch, index)

    def _permute(self, ids: np.ndarray, epoch: int, window: int) -> np.ndarray:
        return ids[np.random.default_rng([self.settings.seed, epoch, window, 0]).permutation(len(ids))]

    def micro_batches(self, epoch: int) -> Iterator[Identity]:
        """Every micro-batch of the epoch in order, as (window, unit, row) identities."""
        for w, ids in enumerate(self.windows(epoch)):
            tagged = np.concatenate([np.full((len(ids), 1), w, dtype=np.int64), ids], axis=1)
            if self.settings.batch_size is not None:
                # Windows hold whole global batches (rounded above), except possibly the last.
                size = self.settings.batch_size
                for start in range(0, len(tagged) - size + 1, size):
                    yield tagged[start : start + size]
                continue
            yield from self._pack_by_tokens(tagged, epoch, w)

    def _pack_by_tokens(self, tagged: np.ndarray, epoch: int, window: int) -> Iterator[Identity]:
        assert self.lengths is not None and self.settings.batch_tokens is not None
        lengths = self.lengths[self.unit_start[tagged[:, 1]] + tagged[:, 2]].astype(np.int64)
        order = np.argsort(lengths, kind="stable")  # stable: ties keep the window's random order
        batches, start = [], 0
        budget = self.settings.batch_tokens
        while start < len(order):
            end = start + 1
            # Sorted ascending, so the newest sequence is the longest: fits while length * count <= budget.
            while end < len(order) and lengths[order[end]] * (end + 1 - start) <= budget:
                end += 1
            batches.append(tagged[order[start:end]])
            start = end
        for i in np.random.default_rng([self.settings.seed, epoch, window, 1]).permutation(len(batches)):
            yield batches[i]

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps of an epoch (with --batch-tokens the packing, so the count, varies by epoch)."""
        if epoch not in self._steps:
            if self.settings.batch_size is not None:
                global_batch = self.settings.batch_size * self.settings.micro_per_step
                self._steps[epoch] = self.num_sequences // global_batch
            else:
                self._steps[epoch] = sum(1 for _ in self.micro_batches(epoch)) // self.settings.micro_per_step
        return self._steps[epoch]

    def total_steps(self, epochs: float) -> int:
        """Steps in `epochs` passes (a fractional last epoch takes that share of its steps)."""
        whole = int(epochs)
        total = sum(self.steps_in_epoch(e) for e in range(whole))
        return total + int((epochs - whole) * self.steps_in_epoch(whole)) if epochs > whole else total

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step inside it) of a global step index."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            if self.steps_in_epoch(epoch) == 0:
                raise ValueError("an epoch with no step")
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def steps(self, epoch: int, start: int = 0) -> Iterator[list[Identity]]:
        """The epoch's steps from `start` on, each a list of micro_per_step micro-batches."""
        per_step = self.settings.micro_per_step
        total = self.steps_in_epoch(epoch)
        step, current = 0, []
        for micro in self.micro_batches(epoch):
            current.append(micro)
            if len(current) == per_step:
                if step >= start:
                    yield current
                step, current = step + 1, []
                if step >= total:
                    return
