"""The streaming loader: decode only this rank's share of each step, on a background thread.

Stage two never holds the cache. A producer thread walks the `EpochPlan`, memory-maps shards,
decompresses the record batches ("units") the next step needs, decodes only the rows that belong
to this rank's micro-batches, collates them, and puts the step on a queue `prefetch` steps deep.
The training loop takes steps from the queue; the time it waits there is measured.

Memory held by the data path, whatever the cache size (both checked by tests through `stats`):

* Arrow record batches, in their stored widths: the units of at most two shuffle windows (the
  current one and, at a window boundary, the previous one), i.e. ``<= 2 x (window + 2 x largest
  record batch)`` sequences;
* decoded sequences: at most ``prefetch + 2`` steps of this rank's micro-batches (queued, being
  built, being trained on).

Errors met by the producer (a shard missing or corrupted mid-run) are re-raised in the training
loop at the step that needed the data, so every earlier step, and its checkpoint, stands.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from kd.cache.reader import CachedSequence, CacheReader, CacheUnit
from kd.pipeline.training.batches import Batch, collate
from kd.pipeline.training.order import EpochPlan, Identity


@dataclass
class StepData:
    """This rank's share of one optimizer step."""

    epoch: int
    step_in_epoch: int
    micro_batches: list[Batch]
    targets: int
    """Target tokens in this rank's micro-batches."""
    weight_sum: float
    """Sum of the CE token weights over those targets (equals targets without --tag-weight)."""
    real_tokens: int
    padded_tokens: int
    sequences: int


@dataclass
class StreamStats:
    """Instrumentation of the loader (read by tests and the metrics)."""

    held_rows: int = 0
    max_held_rows: int = 0
    decoded: int = 0
    max_decoded: int = 0
    units_read: int = 0
    wait_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_decoded(self, n: int) -> None:
        with self._lock:
            self.decoded += n
            self.max_decoded = max(self.max_decoded, self.decoded)

    def set_held(self, rows: int) -> None:
        with self._lock:
            self.held_rows = rows
            self.max_held_rows = max(self.max_held_rows, rows)


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def padding_of(batch: Batch) -> tuple[int, int]:
    """(real tokens, padded tokens) of a micro-batch."""
    return int(batch.attention_mask.sum()), int(batch.attention_mask.numel())


class StepLoader:
    """Produces `StepData` for steps [start, stop) of a plan, `prefetch` steps ahead.

    Args:
        reader: the cache (or prepared corpus) to read.
        plan: the data order; every rank builds the same one.
        rank, world_size, accumulation_steps: which micro-batches of a step are this rank's.
        units: the reader's units the plan indexes (possibly cut by --limit).
        prefetch: steps decoded ahead of the training loop.
        align: cross-tokenizer hook (crosstok.Aligner): turns decoded teacher sequences into the
            student's, and collates them; None for a same-tokenizer student.
    """

    def __init__(
        self,
        reader: CacheReader,
        plan: EpochPlan,
        units: list[CacheUnit],
        rank: int = 0,
        world_size: int = 1,
        accumulation_steps: int = 1,
        prefetch: int = 2,
        align=None,
    ) -> None:
        self.align = align
        self.reader = reader
        self.plan = plan
        self.units = units
        self.rank, self.world_size = rank, world_size
        self.accumulation_steps = accumulation_steps
        self.prefetch = prefetch
        self.stats = StreamStats()
        self._loaded: dict[tuple[int, int], dict[int, pa.RecordBatch]] = {}

    # ------------------------------------------------------------------ producer side

    def _plan_steps(self, start: int, stop: int) -> Iterator[tuple[int, int, list[Identity]]]:
        if start >= stop:
            return
        epoch, step = self.plan.locate(start)
        remaining = stop - start
        while remaining > 0:
            for offset, micro in enumerate(self.plan.steps(epoch, step)):
                yield epoch, step + offset, micro
                remaining -= 1
                if remaining == 0:
                    return
            epoch, step = epoch + 1, 0

    def _unit_batch(self, epoch: int, window: int, unit: int) -> pa.RecordBatch:
        """The record batch of `unit`, held while its window is in use."""
        held = self._loaded.setdefault((epoch, window), {})
        if unit not in held:
            held[unit] = self.reader.read_unit(self.units[unit])
            self.stats.units_read += 1
            self.stats.set_held(sum(b.num_rows for w in self._loaded.values() for b in w.values()))
        return held[unit]

    def _release_windows_before(self, epoch: int, window: int) -> None:
        for key in [k for k in self._loaded if k < (epoch, window)]:
            del self._loaded[key]
        self.stats.set_held(sum(b.num_rows for w in self._loaded.values() for b in w.values()))

    def _decode(self, epoch: int, identities: np.ndarray) -> list[CachedSequence]:
        """Decode the sequences named by identities [n, 3] (window, unit, row), in that order."""
        out: list[CachedSequence | None] = [None] * len(identities)
        keys = identities[:, 0] * len(self.units) + identities[:, 1]
        for key in np.unique(keys):
            at = np.flatnonzero(keys == key)
            window, unit = int(identities[at[0], 0]), int(identities[at[0], 1])
            decoded = self.reader.decode(self._unit_batch(epoch, window, unit), identities[at, 2])
            for i, seq in zip(at, decoded, strict=True):
                out[i] = seq
        return out  # type: ignore[return-value]

    def _build(self, epoch: int, step: int, micro: list[Identity]) -> StepData:
        mine = [micro[m * self.world_size + self.rank] for m in range(self.accumulation_steps)]
        first_window = min(int(ids[:, 0].min()) for ids in micro)
        self._release_windows_before(epoch, first_window)
        flat = np.concatenate(mine)
        seqs = self._decode(epoch, flat)
        if self.align is not None:
            seqs = self.align(seqs)
        self.stats.add_decoded(len(seqs))
        batches, targets, weight_sum, real, padded, at = [], 0, 0.0, 0, 0, 0
        for ids in mine:
            part = seqs[at : at + len(ids)]
            at += len(ids)
            batch = collate(part) if self.align is None else self.align.collate(part)
            batches.append(batch)
            targets += batch.num_targets
            weight_sum += float(batch.token_weights.sum()) if batch.token_weights is not None else batch.num_targets
            r, p = padding_of(batch)
            real, padded = real + r, padded + p
        return StepData(epoch, step, batches, targets, weight_sum, real, padded, len(seqs))

    def _produce(self, start: int, stop: int, out: queue.Queue, stop_event: threading.Event) -> None:
        try:
            for epoch, step, micro in self._plan_steps(start, stop):
                item = self._build(epoch, step, micro)
                while not stop_event.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop_event.is_set():
                    return
            out.put(_DONE)
        except BaseException as exc:  # handed to the training loop, which raises it at that step
            out.put(_Failure(exc))

    # ------------------------------------------------------------------ consumer side

    def iterate(self, start: int, stop: int) -> Iterator[StepData]:
        """Steps [start, stop) in order; blocks only when the producer is behind (time counted)."""
        out: queue.Queue = queue.Queue(maxsize=max(self.prefetch, 1))
        stop_event = threading.Event()
        thread = threading.Thread(
            target=self._produce, args=(start, stop, out, stop_event), name="kd-data", daemon=True
        )
        thread.start()
        previous: StepData | None = None
        try:
            while True:
                waited = time.perf_counter()
                item = out.get()
                self.stats.wait_seconds += time.perf_counter() - waited
                if previous is not None:
                    self.stats.add_decoded(-previous.sequences)
                    previous = None
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                previous = item
                yield item
        finally:
            stop_event.set()
            thread.join(timeout=5)
            self._loaded.clear()
