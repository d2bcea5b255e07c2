"""Several teachers from several caches: `kd train --from-cache A --from-cache B --teacher-weights 0.7,0.3`.

The caches must hold the same sequences: they were made by `kd cache-logits` over the same corpus
(the corpus settings their manifests record: file fingerprint, format, limit, max length, overflow)
with the student's tokenizer, and in the same layout (the same shards of the same record batches,
which holds when they were written with the same --shard-tokens and number of ranks; each shard's
rows_sha256 then proves that its rows, token ids and loss masks are the same). That check is one
pass over the manifests, and it is what lets the loader read the caches side by side with no
index: `CacheSet` stands in for the one cache reader of `StepLoader`, so the plan (a pure function
of seed, epoch and the layout), resume and the memory bound are those of one cache; the loader
holds each cache's copy of the record batches it holds today (J caches: J times the rows).

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
from typing import Any

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


def _layout(reader: CacheReader) -> list[tuple[Any, ...]]:
    """Each shard's place, rows and record batch sizes (and its rows' hash when the manifest has one)."""
    return [
        (s.get("rank"), s.get("index"), s["rows"], [b[0] for b in s.get("batches") or [[s["rows"]]]])
        for s in reader.shards
    ]


def check_same_corpus(readers: list[CacheReader], names: list[str]) -> None:
    """Refuse caches that do not hold the same sequences in the same layout (module docstring)."""
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
        hashes_differ = any(
            x.get("rows_sha256") and y.get("rows_sha256") and x["rows_sha256"] != y["rows_sha256"]
            for x, y in zip(first.shards, reader.shards, strict=False)
        )
        if _layout(first) != _layout(reader) or hashes_differ:
            raise KdError(
                f"--from-cache {first_name} and --from-cache {name} hold the corpus in different layouts "
                f"(shard_tokens {first.settings.get('shard_tokens')} vs {reader.settings.get('shard_tokens')}, "
                f"world_size {first.settings.get('world_size')} vs {reader.settings.get('world_size')}); "
                "re-create one with the other's --shard-tokens and number of ranks"
            )


@dataclass
class UnitSet:
    """One record batch of every cache (the same rows of the corpus)."""

    batches: list[pa.RecordBatch]

    @property
    def num_rows(self) -> int:
        """Rows held in memory: every cache's copy (what the loader's memory bound counts)."""
        return sum(b.num_rows for b in self.batches)


class CacheSet:
    """Several caches of the same sequences read side by side, in the shape of one `CacheReader`.

    `units()`, `sequence_lengths()`, `settings`, `dir` and `flag` are the first cache's (the
    layouts are equal); `read_unit` reads the unit from every cache and `decode` returns the first
    cache's sequences whose `teacher` is the tuple of every cache's teacher rows.
    """

    def __init__(self, readers: list[CacheReader]) -> None:
        self.readers = readers
        self.first = readers[0]
        self.dir, self.flag = self.first.dir, self.first.flag
        self.settings, self.manifest = self.first.settings, self.first.manifest

    @property
    def mode(self) -> str:
        return self.first.mode

    def units(self) -> list[CacheUnit]:
        return self.first.units()

    def sequence_lengths(self, units: list[CacheUnit]) -> list[np.ndarray]:
        return self.first.sequence_lengths(units)

    def read_unit(self, unit: CacheUnit) -> UnitSet:
        return UnitSet([reader.read_unit(unit) for reader in self.readers])

    def decode(self, batch: UnitSet, rows: np.ndarray | None = None) -> list[CachedSequence]:
        decoded = [reader.decode(b, rows) for reader, b in zip(self.readers, batch.batches, strict=True)]
        out = []
        for seqs in zip(*decoded, strict=True):
            head = seqs[0]
            if any(s.row != head.row or len(s.input_ids) != len(head.input_ids) for s in seqs[1:]):
                raise KdError(
                    f"--from-cache: corpus row {head.row} differs between the caches; "
                    "they do not hold the same sequences"
                )
            out.append(CachedSequence(head.row, head.input_ids, head.loss_mask, tuple(s.teacher for s in seqs)))
        return out

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
    return CacheSet(readers)


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
