"""Dense id coding: each row's teacher ids sorted by a per-shard frequency rank and delta-coded.

Ids are most of a top-k cache's bytes: 64 uint16 ids per target token took 105 B after zstd on
GSM8K with SmolLM2 (bench/cache_size.py). The order of a top-k row carries no information once the
values travel with their ids, so the writer re-orders each row by a rank in which the ids the
teacher proposes most often come first, and stores the differences between consecutive ranks:
small numbers, mostly one byte of information, which zstd packs to 55 B per token on the same
cache (measured; 65 B when sorting by the raw id, 48 B with separate byte planes). The values are
permuted with their ids and stored absolute; the decoder restores probability order, so readers
see the same rows as before.

The rank is a pure function of the shard's first record batch (ids it proposes, by descending
frequency, ties by id; every other id after them in id order), so a streaming writer can fix it
before writing anything. The "seen" list is stored in the shard file's schema metadata (a few KB),
never a vocabulary-sized table. RS rows (unique sampled ids and their counts) are coded the same way.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyarrow as pa
import zstandard

ID_CODING_KEY = b"kd.id_coding"
ID_ORDER_KEY = b"kd.id_order"
SORTED = b"sorted"


def coding_of(schema: pa.Schema) -> bytes:
    """b"sorted" for the dense coding, b"raw" for ids stored as they are (every cache before it)."""
    return (schema.metadata or {}).get(ID_CODING_KEY, b"raw")


# ----------------------------------------------------------------------------- the rank


def id_order_from(ids: np.ndarray) -> np.ndarray:
    """Ids seen in `ids` by descending frequency (ties: smaller id first), as uint32."""
    values, counts = np.unique(np.asarray(ids).reshape(-1), return_counts=True)
    return values[np.lexsort((values, -counts))].astype(np.uint32)


def pack_order(order: np.ndarray) -> bytes:
    return zstandard.ZstdCompressor(level=19).compress(np.asarray(order, dtype="<u4").tobytes())


@lru_cache(maxsize=64)
def _unpack(packed: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.frombuffer(zstandard.ZstdDecompressor().decompress(packed), dtype="<u4").astype(np.int64)
    sorted_seen = np.sort(order)
    rank_of_sorted = np.argsort(order, kind="stable")  # rank of sorted_seen[i]: where it sits in `order`
    return order, sorted_seen, rank_of_sorted


def ranks_of(ids: np.ndarray, packed: bytes) -> np.ndarray:
    """Rank of each id: seen ids 0..n-1 by frequency, unseen ids n, n+1, ... in id order."""
    order, sorted_seen, rank_of_sorted = _unpack(packed)
    ids = np.asarray(ids, dtype=np.int64)
    n = len(order)
    pos = np.searchsorted(sorted_seen, ids)
    seen = (pos < n) & (sorted_seen[np.minimum(pos, n - 1)] == ids) if n else np.zeros(ids.shape, bool)
    return np.where(seen, rank_of_sorted[np.minimum(pos, max(n - 1, 0))], n + ids - pos)


def ids_of(ranks: np.ndarray, packed: bytes) -> np.ndarray:
    """Inverse of ranks_of: one table lookup per rank (the table covers the ranks seen so far)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    top = int(ranks.max()) + 1 if ranks.size else 1
    size = 1 << max(top - 1, 1).bit_length()  # power of two: few rebuilds as larger ranks turn up
    return _inverse_table(packed, size)[ranks]


@lru_cache(maxsize=64)
def _inverse_table(packed: bytes, size: int) -> np.ndarray:
    return _ids_of(np.arange(size, dtype=np.int64), packed)


def _ids_of(ranks: np.ndarray, packed: bytes) -> np.ndarray:
    order, sorted_seen, _ = _unpack(packed)
    n = len(order)
    k = ranks - n  # position among the unseen ids, for ranks >= n
    # The k-th id not in the seen set: k + (number of seen ids at or below it).
    gaps = sorted_seen - np.arange(n)  # unseen ids below each seen id (non-decreasing)
    unseen = k + np.searchsorted(gaps, k, side="right")
    return np.where(ranks < n, order[np.clip(ranks, 0, max(n - 1, 0))] if n else 0, unseen)


# ----------------------------------------------------------------------------- rows


def _fixed_parts(column: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(offsets, [T, K] values) of a list<fixed_size_list> column that starts at offset 0."""
    inner = column.values
    k = inner.type.list_size
    return column.offsets.to_numpy(), inner.flatten().to_numpy().reshape(-1, k)


def _fixed_column(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    k = values.shape[1]
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=value_type), k)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), inner)


def encode_sorted(batch: pa.RecordBatch, packed: bytes) -> pa.RecordBatch:
    """A batch with raw ids (values absolute, as build_batch makes them for this coding) -> sorted coding."""
    names = batch.schema.names
    columns = {name: batch.column(name) for name in names}
    if "teacher_values" in names:  # top-k
        offsets, ids = _fixed_parts(columns["teacher_ids"])
        _, values = _fixed_parts(columns["teacher_values"])
        ranks = ranks_of(ids, packed)
        order = np.argsort(ranks, axis=1, kind="stable")
        ranks = np.take_along_axis(ranks, order, axis=1)
        deltas = np.diff(ranks, axis=1, prepend=0)
        id_type = columns["teacher_ids"].type.value_type.value_type
        columns["teacher_ids"] = _fixed_column(offsets, deltas, id_type)
        value_type = columns["teacher_values"].type.value_type.value_type
        columns["teacher_values"] = _fixed_column(offsets, np.take_along_axis(values, order, axis=1), value_type)
    elif "teacher_sizes" in names:  # rs: each sequence's ids flat, targets delimited by their sizes
        ids_col, counts_col = columns["teacher_ids"], columns["teacher_counts"]
        flat = ids_col.values.to_numpy()
        counts = counts_col.values.to_numpy()
        sizes = columns["teacher_sizes"].values.to_numpy().astype(np.int64)
        token_offsets = np.concatenate([[0], np.cumsum(sizes)])
        token = np.repeat(np.arange(len(sizes)), sizes)
        ranks = ranks_of(flat, packed)
        order = np.lexsort((ranks, token))
        ranks, counts = ranks[order], counts[order]
        starts = np.zeros(len(ranks), dtype=bool)
        starts[token_offsets[:-1][sizes > 0]] = True
        deltas = np.where(starts, ranks, ranks - np.concatenate([[0], ranks[:-1]]))
        id_type, count_type = ids_col.type.value_type, counts_col.type.value_type
        columns["teacher_ids"] = pa.ListArray.from_arrays(ids_col.offsets, pa.array(deltas, type=id_type))
        columns["teacher_counts"] = pa.ListArray.from_arrays(counts_col.offsets, pa.array(counts, type=count_type))
    return pa.RecordBatch.from_arrays([columns[n] for n in names], schema=batch.schema)


def decode_topk_ids(deltas: np.ndarray, packed: bytes) -> np.ndarray:
    """[T, K] stored rank deltas -> [T, K] token ids (in stored order)."""
    return ids_of(np.cumsum(deltas.astype(np.int64), axis=1), packed)


def decode_rs_ids(deltas: np.ndarray, token_offsets: np.ndarray, packed: bytes) -> np.ndarray:
    """Flat stored rank deltas of ragged RS rows (a row starts with its absolute rank) -> flat token ids."""
    deltas = deltas.astype(np.int64)
    lengths = np.diff(token_offsets)
    running = np.cumsum(deltas)
    token = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.minimum(token_offsets[:-1] - token_offsets[0], max(len(deltas) - 1, 0))
    base = running[starts] - deltas[starts] if len(deltas) else np.zeros(len(lengths), dtype=np.int64)
    return ids_of(running - base[token], packed)
