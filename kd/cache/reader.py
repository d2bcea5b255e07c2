"""Reading a teacher-logit cache back: manifest checks, record batches, checksums on first open.

The unit of reading is a shard's record batch (a `CacheUnit`, listed in the manifest): a reader
memory-maps the shard, decompresses one record batch, and decodes only the rows it was asked for.
Nothing here holds more than the batches its caller holds; a shard's sha256 is checked the first
time this process opens it, not in a pre-pass over the whole cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kd.cache import coding
from kd.cache.format import (
    READABLE_VERSIONS,
    TEMPERED_TAIL_COLUMN,
    HiddenTargets,
    SampledTargets,
    TopKTargets,
    decode_hidden,
    decode_tail,
    decode_topk_values,
    hidden_encoding_of,
    layer_column,
    probability_order,
    stored_layers,
)
from kd.cache.manifest import read_manifest
from kd.cache.writer import sha256_file
from kd.errors import KdError

OPEN_SHARDS = 8
"""Memory-mapped shard files kept open at once (least recently used closed first)."""


@dataclass
class CachedSequence:
    """One cached training sequence with its teacher data (one entry per target position).

    Ids keep their stored width (uint16/uint32) until a batch is collated for the loss.
    """

    row: int
    input_ids: np.ndarray
    loss_mask: np.ndarray
    teacher: TopKTargets | SampledTargets | HiddenTargets | None
    token_weights: np.ndarray | None = None
    """Per-position CE weights (prepared corpora with --tag-weight); None means 1."""


@dataclass(frozen=True)
class CacheUnit:
    """One record batch of one shard: what a reader decodes at a time."""

    shard: int
    """Position of the shard in the manifest's shard list."""
    batch: int
    """Record batch index inside the shard file."""
    rows: int
    targets: int
    stored_rows: int | None = None
    """Rows the record batch holds when `rows` uses only its first ones (kd train --limit)."""


def shard_problem(cache_dir: Path, shard: dict[str, Any], full: bool = True) -> str | None:
    """What is wrong with a listed shard's file (missing, other size, other sha256 if `full`), or None."""
    path = cache_dir / shard["file"]
    if not path.is_file():
        return f"{path}: shard listed in the manifest is missing"
    if path.stat().st_size != shard["bytes"]:
        return f"{path}: shard is corrupted or truncated ({path.stat().st_size} bytes, manifest says {shard['bytes']})"
    if full and sha256_file(path) != shard["sha256"]:
        return f"{path}: shard is corrupted or truncated (sha256 mismatch)"
    return None


class CacheReader:
    """A cache directory opened for reading.

    Args:
        cache_dir: the directory `kd cache-logits --out` wrote.
        require_complete: refuse a cache whose writer has not finished (an interrupted stage one
            must be resumed first; its shards are valid but the corpus is not fully covered).
        flag: the command-line flag that named the cache, for error messages.
    """

    def __init__(self, cache_dir: str | Path, require_complete: bool = True, flag: str = "--from-cache") -> None:
        self.dir = Path(cache_dir)
        self.flag = flag
        if not self.dir.is_dir():
            raise KdError(f"{flag} {self.dir}: no such cache directory")
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise KdError(f"{flag} {self.dir}: not a kd cache (no manifest.json)")
        self.manifest: dict[str, Any] = manifest
        self.settings: dict[str, Any] = manifest["settings"]
        version = self.settings.get("format_version")
        if version not in READABLE_VERSIONS:
            raise KdError(
                f"{flag} {self.dir}: cache format version {version} is not one this kd reads "
                f"({', '.join(map(str, READABLE_VERSIONS))}); re-create it with this kd's `kd cache-logits`"
            )
        if require_complete and not manifest.get("complete"):
            done = sorted(int(r) for r, v in manifest.get("ranks", {}).items() if v.get("complete"))
            raise KdError(
                f"{flag} {self.dir}: cache is incomplete (ranks finished: {done or 'none'} of "
                f"{self.settings['world_size']}); rerun the same `kd cache-logits` command to resume it"
            )
        if not manifest["shards"]:
            raise KdError(f"{flag} {self.dir}: cache has no shards (empty corpus?)")
        self._open: OrderedDict[int, tuple[pa.MemoryMappedFile, pa.ipc.RecordBatchFileReader]] = OrderedDict()
        self.verified: set[int] = set()
        """Shards (manifest positions) whose checksum this process has checked."""
        self.verify_on_open = True

    @property
    def mode(self) -> str:
        """topk, rs, hidden, or prepared (a tokenized corpus without teacher data)."""
        return self.settings["mode"]

    @property
    def vocab_size(self) -> int:
        return self.settings["vocab_size"]

    @property
    def value_encoding(self) -> str:
        return self.settings["value_encoding"]

    @property
    def temperatures(self) -> tuple[float, ...]:
        """Temperatures the cache is exact at: 1, and each T whose tempered tails stage one recorded."""
        return tuple(float(t) for t in self.settings.get("temperatures") or [1.0])

    @property
    def tempered(self) -> tuple[float, ...]:
        """The recorded T != 1, in the order of the shards' tempered-tail column."""
        return tuple(t for t in self.temperatures if t != 1.0)

    def require_temperature(self, temperature: float, flag: str = "--temperature") -> None:
        """Refuse a loss temperature the cache cannot serve exactly (top-k caches; RS has its own check)."""
        if self.mode != "topk" or temperature == 1.0:
            return
        if not any(abs(t - temperature) <= 1e-9 * t for t in self.tempered):
            held = ",".join(f"{t:g}" for t in self.temperatures)
            raise KdError(
                f"{flag} {temperature:g} vs the cache's temperatures {held} ({self.flag} {self.dir}): a top-k "
                f"cache is exact only at the temperatures it recorded; re-create it with "
                f"`kd cache-logits --temperatures {held},{temperature:g}` or train at one of {held}"
            )

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """Intermediate teacher layers a hidden cache holds (``kd cache-logits --hidden-layers``); () if none."""
        return tuple(int(i) for i in self.settings.get("hidden_layers") or ())

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def num_rows(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    def units(self) -> list[CacheUnit]:
        """Every record batch of every shard, in manifest order (v1 shards are one unit each)."""
        units = []
        for position, shard in enumerate(self.shards):
            batches = shard.get("batches") or [[shard["rows"], shard["targets"]]]
            units += [CacheUnit(position, i, int(rows), int(targets)) for i, (rows, targets) in enumerate(batches)]
        return units

    def verify(self) -> list[str]:
        """Check every shard's size and sha256 against the manifest; return the problems found."""
        return [problem for shard in self.shards if (problem := self._check(shard, full=True))]

    def _check(self, shard: dict[str, Any], full: bool) -> str | None:
        return shard_problem(self.dir, shard, full)

    def _file(self, position: int) -> pa.ipc.RecordBatchFileReader:
        """The shard's IPC reader, memory-mapped; checked (size + sha256) the first time it is opened."""
        if position in self._open:
            self._open.move_to_end(position)
            return self._open[position][1]
        shard = self.shards[position]
        problem = self._check(shard, full=self.verify_on_open and position not in self.verified)
        if problem:
            raise KdError(f"{problem}; rerun the same `kd cache-logits` command: it re-creates that shard")
        self.verified.add(position)
        path = self.dir / shard["file"]
        try:
            source = pa.memory_map(str(path))
            reader = pa.ipc.open_file(source)
        except (pa.ArrowInvalid, OSError) as exc:
            raise KdError(f"{path}: unreadable shard ({exc})") from exc
        self._open[position] = (source, reader)
        while len(self._open) > OPEN_SHARDS:
            _, (old_source, _) = self._open.popitem(last=False)
            old_source.close()
        return reader

    def read_unit(self, unit: CacheUnit) -> pa.RecordBatch:
        """Decompress one record batch (still in stored widths)."""
        reader = self._file(unit.shard)
        path = self.dir / self.shards[unit.shard]["file"]
        try:
            batch = reader.get_batch(unit.batch)
        except (pa.ArrowInvalid, OSError, IndexError) as exc:
            raise KdError(f"{path}: unreadable record batch {unit.batch} ({exc})") from exc
        expected = unit.stored_rows or unit.rows
        if batch.num_rows != expected:
            raise KdError(f"{path}: record batch {unit.batch} has {batch.num_rows} rows, manifest says {expected}")
        return batch

    def sequence_lengths(self, units: list[CacheUnit]) -> list[np.ndarray]:
        """Token length of each sequence of each unit, from the `input_ids` offsets alone.

        Reads only that column (Arrow decompresses nothing else), opening each shard once, and does
        not count as the shard's first open: its checksum is still checked when training reads it.
        """
        return self._one_column(
            units, "input_ids", lambda column, rows: np.diff(column.offsets.to_numpy())[:rows].astype(np.int32)
        )

    def row_numbers(self, units: list[CacheUnit]) -> list[np.ndarray]:
        """Corpus row number of each sequence of each unit, from the `row` column alone (as `sequence_lengths`)."""
        return self._one_column(units, "row", lambda column, rows: column.to_numpy()[:rows].astype(np.int64))

    def _one_column(self, units: list[CacheUnit], name: str, take) -> list[np.ndarray]:
        by_shard: dict[int, list[int]] = {}
        for i, unit in enumerate(units):
            by_shard.setdefault(unit.shard, []).append(i)
        out: list[np.ndarray] = [np.zeros(0, dtype=np.int32)] * len(units)
        for position, indices in by_shard.items():
            shard = self.shards[position]
            problem = self._check(shard, full=False)
            if problem:
                raise KdError(f"{problem}; re-create the cache")
            with pa.memory_map(str(self.dir / shard["file"])) as source:
                field = pa.ipc.open_file(source).schema.get_field_index(name)
                reader = pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(included_fields=[field]))
                for i in indices:
                    out[i] = take(reader.get_batch(units[i].batch).column(0), units[i].rows)
        return out

    def read_table(self, shard: dict[str, Any], verify: bool = True) -> pa.Table:
        """A whole shard as an Arrow table (benchmarks and small tools; training reads units)."""
        position = self.shards.index(shard)
        if not verify:
            self.verified.add(position)
        reader = self._file(position)
        return pa.Table.from_batches([reader.get_batch(i) for i in range(reader.num_record_batches)])

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray | None = None) -> list[CachedSequence]:
        """Decode the given rows (all if None) of a record batch into CachedSequence objects."""
        if rows is not None:
            batch = batch.take(pa.array(np.asarray(rows, dtype=np.int64)))
        mode = None if self.mode == "prepared" else self.mode
        return list(decode_table(batch, mode, self.value_encoding, self.tempered))

    def iter_sequences(self, verify: bool = True) -> Iterator[CachedSequence]:
        """Decode every sequence, unit by unit in manifest order (memory: one record batch)."""
        self.verify_on_open = verify
        for unit in self.units():
            yield from self.decode(self.read_unit(unit))

    def close(self) -> None:
        for source, _ in self._open.values():
            source.close()
        self._open.clear()


def _narrowest(ids_type: pa.DataType) -> np.dtype:
    return np.dtype(np.uint16) if ids_type == pa.uint16() else np.dtype(np.uint32)


def _split(values: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def _list_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    return offsets - offsets[0], array.values.slice(offsets[0], offsets[-1] - offsets[0])


def decode_table(
    table: pa.Table | pa.RecordBatch,
    mode: str | None,
    value_encoding: str | None,
    temperatures: tuple[float, ...] = (),
) -> Iterator[CachedSequence]:
    """Turn shard rows into CachedSequence objects (vectorised per column; ids keep their stored width).

    mode None: a prepared corpus without teacher columns (kd.pipeline.training.prepared).
    temperatures: the T != 1 whose tempered tails the shards hold, in column order (the manifest's).
    """
    # Sorted coding: values are stored absolute (rows were permuted); ids are rank deltas once the
    # writer has fixed the shard's rank (ID_ORDER_KEY), raw ids in a batch that never went through it.
    sorted_coding = coding.coding_of(table.schema) == coding.SORTED
    packed = (table.schema.metadata or {}).get(coding.ID_ORDER_KEY) if sorted_coding else None
    rows = table.column("row").to_numpy()
    ids_off, ids_val = _list_parts(table.column("input_ids"))
    mask_off, mask_val = _list_parts(table.column("loss_mask"))
    input_ids = _split(ids_val.to_numpy(zero_copy_only=False), ids_off)
    masks = _split(mask_val.to_numpy(zero_copy_only=False), mask_off)
    if mode is None:
        weights: list[np.ndarray | None] = [None] * len(rows)
        if "token_weights" in table.schema.names:
            w_off, w_val = _list_parts(table.column("token_weights"))
            weights = _split(w_val.to_numpy(zero_copy_only=False), w_off)
        for i in range(len(rows)):
            yield CachedSequence(int(rows[i]), input_ids[i], masks[i], None, weights[i])
    elif mode == "hidden":
        h_off, hidden = _hidden_rows(table, "teacher_hidden")
        layers = {layer: _hidden_rows(table, layer_column(layer))[1] for layer in stored_layers(table.schema)}
        for i in range(len(rows)):
            a, b = h_off[i], h_off[i + 1]
            teacher = HiddenTargets(hidden[a:b], {j: v[a:b] for j, v in layers.items()} if layers else None)
            yield CachedSequence(int(rows[i]), input_ids[i], masks[i], teacher)
    elif mode == "topk":
        t_off, t_val = _list_parts(table.column("teacher_ids"))
        k = t_val.type.list_size
        teacher_ids = t_val.flatten().to_numpy().reshape(-1, k)  # flatten() honours slice offsets; .values does not
        _, v_val = _list_parts(table.column("teacher_values"))
        stored = v_val.flatten().to_numpy().reshape(-1, k)
        tail_off, tail_val = _list_parts(table.column("teacher_tail"))
        tails = decode_tail(tail_val.to_numpy(), value_encoding)
        if packed is not None:
            # Back to probability order (ties by stored position), the order every reader expects;
            # sorted on the stored codes, before decoding, where sorting is cheapest.
            order = probability_order(stored, value_encoding)
            ranks = np.take_along_axis(np.cumsum(teacher_ids, axis=1, dtype=np.int32), order, axis=1)
            teacher_ids = coding.ids_of(ranks, packed)
            stored = np.take_along_axis(stored, order, axis=1)
        values = decode_topk_values(stored, value_encoding, delta=not sorted_coding, tail_logprobs=tails)
        teacher_ids = teacher_ids.astype(_narrowest(table.column("input_ids").type.value_type))
        tempered = None
        if temperatures and TEMPERED_TAIL_COLUMN in table.schema.names:
            _, tt_val = _list_parts(table.column(TEMPERED_TAIL_COLUMN))
            tempered = tt_val.flatten().to_numpy().astype(np.float32).reshape(-1, tt_val.type.list_size)
            if tempered.shape[1] != len(temperatures):
                raise KdError(
                    f"shard stores {tempered.shape[1]} tempered tails per target, the manifest {len(temperatures)}"
                )
        for i in range(len(rows)):
            a, b = t_off[i], t_off[i + 1]
            yield CachedSequence(
                int(rows[i]),
                input_ids[i],
                masks[i],
                TopKTargets(
                    teacher_ids[a:b],
                    values[a:b],
                    tails[a:b],
                    None if tempered is None else tempered[a:b],
                    temperatures if tempered is not None else (),
                ),
            )
    elif "teacher_sizes" in table.schema.names:
        seq_off, flat_ids = _list_parts(table.column("teacher_ids"))
        _, flat_counts = _list_parts(table.column("teacher_counts"))
        size_off, sizes = _list_parts(table.column("teacher_sizes"))
        sizes = sizes.to_numpy().astype(np.int64)
        token_off = np.concatenate([[0], np.cumsum(sizes)])
        flat_ids = flat_ids.to_numpy()
        if packed is not None:
            flat_ids = coding.decode_rs_ids(flat_ids, token_off, packed).astype(flat_ids.dtype)
        flat_counts = flat_counts.to_numpy().astype(np.int64)
        ids_per_token = _split(flat_ids, token_off)
        counts_per_token = _split(flat_counts, token_off)
        for i in range(len(rows)):
            lo, hi = size_off[i], size_off[i + 1]
            yield CachedSequence(
                int(rows[i]), input_ids[i], masks[i], SampledTargets(ids_per_token[lo:hi], counts_per_token[lo:hi])
            )
    else:
        outer_off, inner = _list_parts(table.column("teacher_ids"))
        inner_off = inner.offsets.to_numpy()
        flat_ids = inner.values.to_numpy()
        _, c_inner = _list_parts(table.column("teacher_counts"))
        count_off = c_inner.offsets.to_numpy()
        flat_counts = c_inner.values.to_numpy().astype(np.int64)
        if packed is not None:
            flat_ids = coding.decode_rs_ids(flat_ids, inner_off, packed).astype(flat_ids.dtype)
        for i in range(len(rows)):
            lo, hi = outer_off[i], outer_off[i + 1]
            # inner.offsets index the unsliced .values arrays, so they are used as they are.
            ids = [flat_ids[inner_off[j] : inner_off[j + 1]] for j in range(lo, hi)]
            counts = [flat_counts[count_off[j] : count_off[j + 1]] for j in range(lo, hi)]
            yield CachedSequence(int(rows[i]), input_ids[i], masks[i], SampledTargets(ids, counts))


def _hidden_rows(table: pa.Table | pa.RecordBatch, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A hidden column (the final state's or a layer's) decoded: (per-sequence offsets, rows[N, d] float32)."""
    offsets, values = _list_parts(table.column(column))
    d = values.type.list_size
    stored = values.flatten().to_numpy().reshape(-1, d)
    scale = None
    if f"{column}_scale" in table.schema.names:
        scale = _list_parts(table.column(f"{column}_scale"))[1].to_numpy()
    return offsets, decode_hidden(stored, hidden_encoding_of(values.type.value_type), scale)
