"""Several teachers from several caches: `kd train --from-cache A --from-cache B --teacher-weights 0.7,0.3`.

The caches must hold the same sequences: they were made by `kd cache-logits` over the same corpus
(the corpus settings their manifests record: file fingerprint, format, limit, max length, overflow)
with the student's tokenizer. Their layouts may differ (other --shard-tokens, another number of
ranks): `CacheSet` stands in for the one cache reader of `StepLoader`, led by the first cache (the
plan is a pure function of seed, epoch and its layout, so resume is exact as for one cache), and
each other cache follows it by corpus row through a `RowIndex` (one column of every record batch,
read once). Every decoded record is checked to carry the same token ids and loss mask in every cache.

Memory: for each record batch of the first cache the loader holds, it holds the record batches of
each other cache that contain its rows: with equal layouts the same one (J caches: J times one
cache's rows); with other boundaries one or two more per cache (a batch straddling two of the
first's is held for each); with another number of ranks (rank r takes rows r, r+W, ...), up to
about W_other / W_first batches per batch of the first cache. `stats.max_held_rows` counts them all.

`TeacherCollator` is the loader's collation hook (as crosstok.Aligner is for one cross-tokenizer
cache): it collates each cache's teacher rows and hands the loss a `kd.losses.TeacherSet`.

Not supported yet, each refused in one line: caches whose tokenizer is not the student's (several
teachers with --cross-tokenizer), hidden-state caches, and --teacher-mix mixture of RS caches or
at --temperature != 1.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from kd.cache.reader import CachedSequence, CacheReader, CacheUnit
from kd.errors import KdError
from kd.losses import TeacherSet
from kd.pipeline.training.batches import Batch, collate, collate_teacher


def parse_teacher_weights(text: str | None, count: int) -> tuple[float, ...]:
    """--teacher-weights "0.7,0.3" -> normalised weights, one per cache (equal when not given)."""
    if text is None:
        return tuple(1.0 / count for _ in range(count))
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise KdError(f"--teacher-weights {text}: expected comma-separated numbers, e.g. 0.7,0.3") from exc
    if len(weights) != count:
        raise KdError(f"--teacher-weights {text}: {len(weights)} weights for {count} --from-cache caches")
    if not all(w > 0 and np.isfinite(w) for w in weights):
        raise KdError(f"--teacher-weights {text}: every weight must be a finite number > 0")
    total = sum(weights)
    return tuple(w / total for w in weights)


def check_same_corpus(readers: list[CacheReader], names: list[str]) -> None:
    """Refuse caches of other corpora (the manifests' corpus settings) or of different tokenizers."""
    first, first_name = readers[0], names[0]
    for reader, name in zip(readers[1:], names[1:], strict=True):
        a, b = first.settings.get("corpus") or {}, reader.settings.get("corpus") or {}
        if a != b:
            key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise KdError(
                f"--from-cache {first_name} and --from-cache {name} cover different corpora (corpus {key}: "
                f"{a.get(key)!r} vs {b.get(key)!r}); several teachers need caches of the same corpus"
            )
        if first.settings["tokenizer_fingerprint"] != reader.settings["tokenizer_fingerprint"]:
            raise KdError(
                f"--from-cache {first_name} and --from-cache {name} use different tokenizers; several "
                "teachers need caches made with the student's tokenizer (with --cross-tokenizer: not supported yet)"
            )


class RowIndex:
    """Where each corpus row lies in one cache: (unit, position in it), from the caches' `row` column.

    Built once per run from one column of every record batch (16 bytes per sequence); it lets a
    cache of another layout (other --shard-tokens, other number of ranks) follow the first cache's.
    """

    def __init__(self, reader: CacheReader) -> None:
        self.units = reader.units()
        rows = reader.row_numbers(self.units)
        flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        self.unit_of = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
        self.position = np.concatenate([np.arange(len(r)) for r in rows]) if rows else flat
        self.order = np.argsort(flat, kind="stable")
        self.sorted_rows = flat[self.order]

    def missing(self, rows: np.ndarray) -> np.ndarray:
        """The rows this cache does not hold."""
        at = np.minimum(np.searchsorted(self.sorted_rows, rows), max(len(self.sorted_rows) - 1, 0))
        return rows[(len(self.sorted_rows) == 0) | (self.sorted_rows[at] != rows)]

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unit index, position in the unit) of each corpus row (all must be held: see `missing`)."""
        found = self.order[np.searchsorted(self.sorted_rows, rows)]
        return self.unit_of[found], self.position[found]


@dataclass
class UnitSet:
    """A record batch of the first cache and, per other cache, the record batches that hold its rows."""

    first: pa.RecordBatch
    others: list[dict[int, pa.RecordBatch]]

    @property
    def num_rows(self) -> int:
        """Rows held in memory: every cache's batches (what the loader's memory bound counts)."""
        return self.first.num_rows + sum(b.num_rows for held in self.others for b in held.values())


class CacheSet:
    """Several caches of the same sequences read side by side, in the shape of one `CacheReader`.

    The first cache leads: `units()`, `sequence_lengths()`, `settings`, `dir` and `flag` are its own,
    so the plan is one cache's. Each other cache follows by corpus row (`RowIndex`): `read_unit`
    reads the first cache's record batch and, from each other cache, the record batches that hold
    its rows (the same one when the layouts are equal; two or a few when their boundaries differ);
    `decode` returns the first cache's sequences whose `teacher` is the tuple of every cache's rows,
    after checking that every cache holds the same token ids and loss mask for each.
    """

    def __init__(self, readers: list[CacheReader], names: list[str] | None = None) -> None:
        self.readers = readers
        self.names = names or [str(r.dir) for r in readers]
        self.first = readers[0]
        self.dir, self.flag = self.first.dir, self.first.flag
        self.settings, self.manifest = self.first.settings, self.first.manifest
        units = self.first.units()
        self._first_rows = dict(zip(((u.shard, u.batch) for u in units), self.first.row_numbers(units), strict=True))
        self.indexes = [RowIndex(reader) for reader in readers[1:]]
        every = np.concatenate(list(self._first_rows.values()))
        for index, name in zip(self.indexes, self.names[1:], strict=True):
            lacking = index.missing(every)
            if len(lacking):
                raise KdError(
                    f"--from-cache {name} lacks {len(lacking)} corpus rows that --from-cache {self.names[0]} "
                    f"holds (first: {int(lacking[0])}); several teachers need caches of the same rows"
                )

    @property
    def mode(self) -> str:
        return self.first.mode

    def units(self) -> list[CacheUnit]:
        return self.first.units()

    def sequence_lengths(self, units: list[CacheUnit]) -> list[np.ndarray]:
        return self.first.sequence_lengths(units)

    def read_unit(self, unit: CacheUnit) -> UnitSet:
        rows = self._first_rows[(unit.shard, unit.batch)][: unit.rows]
        others = []
        for reader, index in zip(self.readers[1:], self.indexes, strict=True):
            needed = np.unique(index.locate(rows)[0])
            others.append({int(u): reader.read_unit(index.units[u]) for u in needed})
        return UnitSet(self.first.read_unit(unit), others)

    def decode(self, batch: UnitSet, rows: np.ndarray | None = None) -> list[CachedSequence]:
        seqs = self.first.decode(batch.first, rows)
        corpus_rows = np.array([s.row for s in seqs], dtype=np.int64)
        teachers = [[s.teacher] for s in seqs]
        for reader, index, held, name in zip(self.readers[1:], self.indexes, batch.others, self.names[1:], strict=True):
            units, positions = index.locate(corpus_rows)
            for u in np.unique(units):
                at = np.flatnonzero(units == u)
                for i, other in zip(at, reader.decode(held[int(u)], positions[at]), strict=True):
                    if not (
                        np.array_equal(other.input_ids, seqs[i].input_ids)
                        and np.array_equal(other.loss_mask, seqs[i].loss_mask)
                    ):
                        raise KdError(
                            f"--from-cache {name}: corpus row {other.row} holds other tokens than in "
                            f"--from-cache {self.names[0]}; several teachers need caches of the same sequences"
                        )
                    teachers[i].append(other.teacher)
        return [CachedSequence(s.row, s.input_ids, s.loss_mask, tuple(t)) for s, t in zip(seqs, teachers, strict=True)]

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


class TeacherStats:
    """Each teacher's divergence (sum mode), summed by the training step and read by the metrics.

    `metrics()` gives ``divergence_teacher_J`` (J = 1, 2... in --from-cache order): this rank's
    Σ w·D_J / Σ w since the previous call, the weighted mean of that teacher's divergence over the
    steps between two log lines (it is not all-reduced: under DDP it is rank 0's share).
    """

    def __init__(self, count: int) -> None:
        self._sums = np.zeros(count)
        self._weight = 0.0
        self._lock = threading.Lock()

    def tally(self, per_teacher: list, weight_sum: float) -> None:
        if not per_teacher:  # mixture mode: one divergence, logged as `divergence`
            return
        with self._lock:
            self._sums += [float(d) for d in per_teacher]
            self._weight += float(weight_sum)

    def metrics(self) -> dict[str, float]:
        with self._lock:
            if self._weight == 0.0:
                return {}
            out = {f"divergence_teacher_{j + 1}": float(d) / self._weight for j, d in enumerate(self._sums)}
            self._sums[:] = 0.0
            self._weight = 0.0
        return out


class TeacherCollator:
    """The loader's hook for several caches: sequences pass through; collation builds a TeacherSet."""

    def __init__(self, weights: tuple[float, ...], mix: str) -> None:
        self.weights = weights
        self.mix = mix
        self.stats = TeacherStats(len(weights))

    def __call__(self, seqs: list[CachedSequence]) -> list[CachedSequence]:
        return seqs

    def collate(self, seqs: list[CachedSequence], pad_id: int = 0) -> Batch:
        batch = collate([dataclasses.replace(s, teacher=None) for s in seqs], pad_id)  # tokens and targets once
        teachers = [collate_teacher([s.teacher[j] for s in seqs]) for j in range(len(self.weights))]
        batch.teacher = TeacherSet(teachers, self.weights, self.mix, self.stats.tally)  # type: ignore[arg-type]
        return batch


def open_caches(cfg) -> CacheSet:
    """The caches of several --from-cache, checked to hold the same sequences (`check_same_corpus`)."""
    readers = [CacheReader(path) for path in cfg.caches]
    for reader, path in zip(readers, cfg.caches, strict=True):
        if reader.mode not in ("topk", "rs"):
            raise KdError(f"--from-cache {path}: several teachers need top-k or rs caches, not a {reader.mode} cache")
        if cfg.teacher_mix == "mixture" and reader.mode != "topk":
            raise KdError(
                f"--from-cache {path}: --teacher-mix mixture needs top-k caches, this one is {reader.mode}; "
                "use --teacher-mix sum"
            )
    check_same_corpus(readers, cfg.caches)
    return CacheSet(readers, cfg.caches)


def check_student_tokenizer(cfg, caches: CacheSet, fingerprint: str) -> None:
    """Every cache must be in the student's tokenization (several teachers do not cross tokenizers yet)."""
    for reader, path in zip(caches.readers, cfg.caches, strict=True):
        theirs = reader.settings["tokenizer_fingerprint"]
        if theirs == fingerprint:
            continue
        if cfg.cross_tokenizer:
            raise KdError(
                f"--from-cache {path}: made with another tokenizer than the student's; --cross-tokenizer "
                "takes one cache (several teachers with --cross-tokenizer are not supported yet)"
            )
        raise KdError(
            f"--from-cache {path}: the cache was made with another tokenizer ({theirs}) than the "
            f"student's ({fingerprint}); pass --cross-tokenizer to align the two by text (one cache)"
        )


def collator_for(cfg) -> TeacherCollator:
    """The loader's hook for several caches, with the normalised --teacher-weights."""
    return TeacherCollator(parse_teacher_weights(cfg.teacher_weights, len(cfg.caches)), cfg.teacher_mix)
