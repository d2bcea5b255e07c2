"""Several teachers from several caches: `kd train --from-cache A --from-cache B --teacher-weights 0.7,0.3`.

The caches must hold the same sequences: they were made by `kd cache-logits` over the same corpus
(the corpus settings their manifests record: file fingerprint, format, limit, max length, overflow)
in the student's tokenizer (with --cross-tokenizer, in any). Their layouts may differ (other
--shard-tokens, another number of ranks): `CacheSet` stands in for the one cache reader of
`StepLoader`, led by the first cache (the plan is a pure function of seed, epoch and its layout, so
resume is exact as for one cache), and each other cache follows it by corpus row through a
`RowIndex` (one column of every record batch, read once).

Memory: for each record batch of the first cache the loader holds, it holds the record batches of
each other cache that contain its rows: with equal layouts the same one (J caches: J times one
cache's rows); with other boundaries one or two more per cache (a batch straddling two of the
first's is held for each); with another number of ranks (rank r takes rows r, r+W, ...), up to
about W_other / W_first batches per batch of the first cache. `stats.max_held_rows` counts them all.

`TeacherCollator` is the loader's hook (in the place of crosstok.Aligner for one cache): each
cache's record becomes the student's sequence (as it is, or aligned by text with --cross-tokenizer
when the cache's tokenizer is another, crosstok.Aligner), every cache must give the same student
tokens for the row (else a one-line error at that step: other text, e.g. another chat template),
and collation hands the loss a `kd.losses.TeacherSet`: each teacher's rows, and for an aligned
teacher the targets they cover (the divergence to it is taken there, as for one cross-tokenizer
cache; the CE on every target).

--teacher-mix mixture works on every path the sum does (top-k and RS caches, same or cross
tokenizer, any --temperature a top-k cache recorded; the rules: kd/losses/mixture.py). Refused in
one line: hidden-state caches (several teachers need top-k or rs caches), and an RS cache with
another --divergence than forward_kl or at --temperature != 1, as for one RS cache.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from kd.cache.format import SampledTargets, TopKTargets, target_positions
from kd.cache.reader import CachedSequence, CacheReader, CacheUnit
from kd.errors import KdError
from kd.losses import SampledTeacher, TeacherSet
from kd.pipeline.training.batches import Batch, TrainSequence, collate, collate_teacher
from kd.pipeline.training.distributed import DistEnv, sum_over_ranks


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


def check_same_corpus(readers: list[CacheReader], names: list[str], cross_tokenizer: bool = False) -> None:
    """Refuse caches of other corpora (the manifests' corpus settings), or of different tokenizers
    unless --cross-tokenizer aligns each to the student's."""
    first, first_name = readers[0], names[0]
    for reader, name in zip(readers[1:], names[1:], strict=True):
        a, b = first.settings.get("corpus") or {}, reader.settings.get("corpus") or {}
        if a != b:
            key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise KdError(
                f"--from-cache {first_name} and --from-cache {name} cover different corpora (corpus {key}: "
                f"{a.get(key)!r} vs {b.get(key)!r}); several teachers need caches of the same corpus"
            )
        if not cross_tokenizer and first.settings["tokenizer_fingerprint"] != reader.settings["tokenizer_fingerprint"]:
            raise KdError(
                f"--from-cache {first_name} and --from-cache {name} use different tokenizers; several "
                "teachers need caches made with the student's tokenizer, or --cross-tokenizer"
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
    `decode` returns the first cache's sequences whose `teacher` is the tuple of every cache's record
    of that corpus row (`TeacherCollator` turns them into the student's sequence and checks that
    they agree).
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
        """The first cache's sequences; each one's `teacher` is the tuple of every cache's record of that row."""
        seqs = self.first.decode(batch.first, rows)
        corpus_rows = np.array([s.row for s in seqs], dtype=np.int64)
        records: list[list[CachedSequence]] = [[s] for s in seqs]
        for reader, index, held in zip(self.readers[1:], self.indexes, batch.others, strict=True):
            units, positions = index.locate(corpus_rows)
            for u in np.unique(units):
                at = np.flatnonzero(units == u)
                for i, other in zip(at, reader.decode(held[int(u)], positions[at]), strict=True):
                    records[i].append(other)
        return [CachedSequence(s.row, s.input_ids, s.loss_mask, tuple(r)) for s, r in zip(seqs, records, strict=True)]

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


class TeacherStats:
    """Each teacher's divergence (sum mode), summed by the training step and read by the metrics.

    `metrics()` gives ``divergence_teacher_J`` (J = 1, 2... in --from-cache order): Σ w·D_J / Σ w
    since the previous call, over every rank (the sums and weights are added over ranks as the step's
    `divergence` is, `sum_over_ranks`), the weighted mean of that teacher's divergence over the steps
    between two log lines; and for a cache aligned across tokenizers its coverage,
    ``crosstok_*_teacher_J`` (crosstok.AlignStats, this rank's records).
    """

    def __init__(self, count: int, aligners: list | None = None, env: DistEnv | None = None) -> None:
        self._sums = np.zeros(count)
        self._weight = 0.0
        self._lock = threading.Lock()
        self.aligners = aligners or [None] * count
        self.env = env
        """The ranks the sums are added over (None: one process)."""

    def tally(self, per_teacher: list, weight_sum: float) -> None:
        if not per_teacher:  # mixture mode: one divergence, logged as `divergence`
            return
        with self._lock:
            self._sums += [float(d) for d in per_teacher]
            self._weight += float(weight_sum)

    def metrics(self) -> dict[str, float]:
        """Collective under DDP: every rank calls it at the same steps (the loop's log steps)."""
        out = {
            f"{key}_teacher_{j + 1}": value
            for j, aligner in enumerate(self.aligners)
            if aligner is not None
            for key, value in aligner.stats.metrics().items()
        }
        with self._lock:
            sums = torch.tensor([*self._sums, self._weight], dtype=torch.float64)
            self._sums[:] = 0.0
            self._weight = 0.0
        if self.env is not None:
            # Every rank takes part whatever its own weight (a rank with none still adds its zeros).
            sums = sum_over_ranks(sums, self.env)
        weight = float(sums[-1])
        if weight > 0.0:
            out.update({f"divergence_teacher_{j + 1}": float(d) / weight for j, d in enumerate(sums[:-1])})
        return out


@dataclass
class MultiSequence(TrainSequence):
    """A student sequence with every teacher's rows: teachers[j] holds rows for the targets where rows[j]
    is True (None: every target), in target order."""

    teachers: tuple = ()
    rows: tuple = ()


def take_rows(teacher: TopKTargets | SampledTargets, index: np.ndarray) -> TopKTargets | SampledTargets:
    """The rows `index` of one sequence's teacher data."""
    if isinstance(teacher, TopKTargets):
        tempered = None if teacher.tempered_tails is None else teacher.tempered_tails[index]
        return TopKTargets(
            teacher.ids[index], teacher.logprobs[index], teacher.tail[index], tempered, teacher.temperatures
        )
    return SampledTargets([teacher.ids[i] for i in index], [teacher.counts[i] for i in index])


def onto_targets(teacher, rows: np.ndarray | None, loss_mask: np.ndarray, reference_mask: np.ndarray):
    """Teacher rows over the targets of `loss_mask` -> (rows, bool mask) over the targets of `reference_mask`.

    Two alignments of one text can mark slightly different student targets (each teacher's target
    spans decide them): a reference target keeps this teacher's row only where it is a target here too.
    """
    reference, own = target_positions(reference_mask), target_positions(loss_mask)
    covered = np.ones(len(own), dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    if len(own) == 0:
        return take_rows(teacher, np.zeros(0, dtype=np.int64)), np.zeros(len(reference), dtype=bool)
    at = np.minimum(np.searchsorted(own, reference), len(own) - 1)
    has = (own[at] == reference) & covered[at]
    return take_rows(teacher, (np.cumsum(covered) - 1)[at[has]]), has


class TeacherCollator:
    """The loader's hook for several caches: each cache's record becomes the student's sequence (aligned
    by text where its tokenizer differs: crosstok.Aligner), the sequences are checked to agree, and
    collation builds a TeacherSet."""

    def __init__(
        self, weights: tuple[float, ...], mix: str, aligners: list | None = None, env: DistEnv | None = None
    ) -> None:
        self.weights = weights
        self.mix = mix
        self.aligners = aligners or [None] * len(weights)
        self.stats = TeacherStats(len(weights), self.aligners, env)

    def __call__(self, seqs: list[CachedSequence]) -> list[MultiSequence]:
        per_cache = []  # [cache][record] -> (ids, loss mask, teacher rows, covered targets | None)
        for j, aligner in enumerate(self.aligners):
            records = [s.teacher[j] for s in seqs]
            if aligner is None:
                per_cache.append([(r.input_ids, r.loss_mask, r.teacher, None) for r in records])
            else:  # a cache in another tokenizer: the whole record batch aligned at once (Aligner.align_many)
                aligned = aligner.align_many([(r.input_ids, r.loss_mask, r.teacher) for r in records])
                per_cache.append([(a.input_ids, a.loss_mask, a.teacher, a.teacher_rows) for a in aligned])
        return [self.student_sequence(s, [views[i] for views in per_cache]) for i, s in enumerate(seqs)]

    def student_sequence(self, record: CachedSequence, views: list[tuple]) -> MultiSequence:
        """One corpus row from every cache's view of it (the student's tokens, each teacher's rows)."""
        ids, mask = views[0][0], views[0][1]
        teachers, rows = [], []
        for j, (own_ids, own_mask, teacher, covered) in enumerate(views):
            if not np.array_equal(own_ids, ids):
                raise KdError(
                    f"--from-cache: corpus row {record.row} is another token sequence for the student from cache "
                    f"{j + 1} than from cache 1 (other text: another chat template, or truncation); several "
                    "teachers need caches of the same text"
                )
            if not np.array_equal(own_mask, mask):
                teacher, covered = onto_targets(teacher, covered, own_mask, mask)
            teachers.append(teacher)
            rows.append(covered)
        return MultiSequence(ids, mask, None, None, tuple(teachers), tuple(rows))

    def collate(self, seqs: list[MultiSequence], pad_id: int = 0) -> Batch:
        batch = collate(seqs, pad_id)  # tokens and targets once (the sequences' own `teacher` is None)
        teachers, rows = [], []
        for j, aligner in enumerate(self.aligners):
            teacher = collate_teacher([s.teachers[j] for s in seqs])
            if aligner is not None and aligner.num_samples and isinstance(teacher, SampledTeacher):
                teacher.num_samples = aligner.num_samples  # draws that map nowhere were dropped, not renormalised
            teachers.append(teacher)
            if all(s.rows[j] is None for s in seqs):
                rows.append(None)
            else:
                parts = [np.ones(s.num_targets, dtype=bool) if s.rows[j] is None else s.rows[j] for s in seqs]
                rows.append(torch.from_numpy(np.concatenate(parts)))
        partial = None if all(r is None for r in rows) else rows
        batch.teacher = TeacherSet(teachers, self.weights, self.mix, self.stats.tally, partial)  # type: ignore[arg-type]
        return batch


def open_caches(cfg) -> CacheSet:
    """The caches of several --from-cache, checked to hold the same sequences (`check_same_corpus`)."""
    readers = [CacheReader(path) for path in cfg.caches]
    for reader, path in zip(readers, cfg.caches, strict=True):
        if reader.mode not in ("topk", "rs"):
            raise KdError(f"--from-cache {path}: several teachers need top-k or rs caches, not a {reader.mode} cache")
    check_same_corpus(readers, cfg.caches, cfg.cross_tokenizer)
    return CacheSet(readers, cfg.caches)


def check_student_tokenizer(cfg, caches: CacheSet, fingerprint: str) -> None:
    """A cache in another tokenization than the student's needs --cross-tokenizer."""
    for reader, path in zip(caches.readers, cfg.caches, strict=True):
        theirs = reader.settings["tokenizer_fingerprint"]
        if theirs == fingerprint:
            continue
        if not cfg.cross_tokenizer:
            raise KdError(
                f"--from-cache {path}: the cache was made with another tokenizer ({theirs}) than the "
                f"student's ({fingerprint}); pass --cross-tokenizer to align the two by text"
            )


def collator_for(cfg, aligners: list | None = None, env: DistEnv | None = None) -> TeacherCollator:
    """The loader's hook for several caches, with the normalised --teacher-weights, each cache's aligner and
    the ranks whose per-teacher divergences the metrics add up."""
    weights = parse_teacher_weights(cfg.teacher_weights, len(cfg.caches))
    return TeacherCollator(weights, cfg.teacher_mix, aligners, env)
