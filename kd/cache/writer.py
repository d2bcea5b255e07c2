"""Writing shards off the critical path, one record batch at a time.

The teacher's forward pass is the only real cost of stage one, so compression, checksumming and
fsync happen on a background thread while the next batch runs. A shard is written to a hidden temp
name record batch by record batch (stage one never holds a whole shard's teacher data), fsynced,
renamed, and only then recorded in the manifest: a kill -9 at any moment leaves either a complete,
listed shard or nothing that a reader would pick up.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from kd.cache import coding
from kd.cache.format import IPC_COMPRESSION
from kd.cache.manifest import _fsync_dir, record_shard


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:03d}-{index:05d}.arrow"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flat_teacher_ids(batch: pa.RecordBatch) -> np.ndarray:
    column = batch.column("teacher_ids").values  # top-k: fixed-size lists; rs: flat ids (or nested lists)
    if pa.types.is_fixed_size_list(column.type):
        return column.flatten().to_numpy()
    return column.values.to_numpy() if pa.types.is_list(column.type) else column.to_numpy()


def batch_targets(batch: pa.RecordBatch) -> int:
    """Target tokens in a record batch: the length of its flattened teacher lists (or of the masks)."""
    if "teacher_hidden" in batch.schema.names:
        return len(batch.column("teacher_hidden").values)
    if "teacher_sizes" in batch.schema.names:
        return int(pa.compute.list_value_length(batch.column("teacher_sizes")).to_numpy().sum())
    if "teacher_ids" in batch.schema.names:
        column = batch.column("teacher_ids")
        offsets = column.offsets
        return int(offsets[-1].as_py() - offsets[0].as_py())
    masks = batch.column("loss_mask")
    offsets = masks.offsets.to_numpy()
    values = masks.values.to_numpy(zero_copy_only=False)
    firsts = offsets[:-1][offsets[1:] > offsets[:-1]]  # position 0 of each non-empty row is never a target
    return int(values[offsets[0] : offsets[-1]].sum() - values[firsts].sum())


class ShardFileWriter:
    """One shard being written: record batches appended to a temp file, then `finish` publishes it."""

    def __init__(self, cache_dir: Path, schema: pa.Schema, rank: int, index: int) -> None:
        self.cache_dir = cache_dir
        self.schema = schema
        self.rank, self.index = rank, index
        self.name = shard_name(rank, index)
        self.tmp = cache_dir / f".{self.name}.tmp"
        self._sink = open(self.tmp, "wb")
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._packed: bytes | None = None
        self.batches: list[list[int]] = []
        """[rows, targets] of every record batch written, in order (goes into the manifest)."""

    def _open(self, first: pa.RecordBatch) -> None:
        """Start the IPC file; with the sorted id coding, fix the shard's id rank from its first batch."""
        schema = self.schema
        if coding.coding_of(schema) == coding.SORTED and "teacher_ids" in schema.names:
            self._packed = coding.pack_order(coding.id_order_from(_flat_teacher_ids(first)))
            schema = schema.with_metadata({**(schema.metadata or {}), coding.ID_ORDER_KEY: self._packed})
        options = pa.ipc.IpcWriteOptions(compression=pa.Codec(*IPC_COMPRESSION))
        self._writer = pa.ipc.new_file(self._sink, schema, options=options)
        self._file_schema = schema

    def write(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            self._open(batch)
        targets = batch_targets(batch)
        if self._packed is not None:
            batch = coding.encode_sorted(batch, self._packed)
        self._writer.write_batch(batch.replace_schema_metadata(self._file_schema.metadata))
        self.batches.append([batch.num_rows, targets])

    def finish(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Close, fsync and rename the shard into place; return its manifest entry."""
        if self._writer is None:  # a shard with no record batch: still a valid (empty) file
            self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._writer.close()
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()
        final = self.cache_dir / self.name
        os.replace(self.tmp, final)
        _fsync_dir(self.cache_dir)
        return {
            "file": self.name,
            "rank": self.rank,
            "index": self.index,
            "bytes": final.stat().st_size,
            "sha256": sha256_file(final),
            "batches": self.batches,
            **stats,
        }

    def abort(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
        except Exception:  # a half-written IPC stream may refuse to close cleanly; it is deleted anyway
            pass
        self._sink.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class PendingShard:
    """A shard whose record batches are all ready (benchmarks and small writers)."""

    rank: int
    index: int
    batches: list[pa.RecordBatch]
    stats: dict[str, Any] = field(default_factory=dict)


def write_shard(cache_dir: Path, schema: pa.Schema, shard: PendingShard) -> dict[str, Any]:
    """Write one shard atomically and return its manifest entry."""
    writer = ShardFileWriter(cache_dir, schema, shard.rank, shard.index)
    try:
        for batch in shard.batches:
            writer.write(batch)
    except BaseException:
        writer.abort()
        raise
    return writer.finish(shard.stats)


@dataclass
class _Batch:
    rank: int
    index: int
    batch: pa.RecordBatch


@dataclass
class _Finish:
    rank: int
    index: int
    stats: dict[str, Any]


class BackgroundShardWriter:
    """Writes record batches on a worker thread; shards are published by `finish_shard`.

    Stage one calls `submit_batch` for every record batch of a shard, in order, then `finish_shard`
    with the shard's stats. Only `max_pending` record batches wait in the queue, so memory stays
    bounded by the batch size, not by the shard size. One shard is open at a time.
    """

    def __init__(self, cache_dir: Path, schema: pa.Schema, max_pending: int = 4) -> None:
        self.cache_dir = cache_dir
        self.schema = schema
        self._queue: queue.Queue[_Batch | _Finish | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._open: ShardFileWriter | None = None
        self.written: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._run, name="kd-shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                if self._open is not None:  # an unfinished shard at close: never publish it
                    self._open.abort()
                return
            if self._error is not None:
                continue
            try:
                if isinstance(item, _Batch):
                    if self._open is None:
                        self._open = ShardFileWriter(self.cache_dir, self.schema, item.rank, item.index)
                    self._open.write(item.batch)
                else:
                    if self._open is None:
                        self._open = ShardFileWriter(self.cache_dir, self.schema, item.rank, item.index)
                    entry = self._open.finish(item.stats)
                    self._open = None
                    record_shard(self.cache_dir, entry)
                    self.written.append(entry)
            except BaseException as exc:  # surfaced to the main thread on the next submit/close
                self._error = exc
                if self._open is not None:
                    self._open.abort()
                    self._open = None

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit_batch(self, rank: int, index: int, batch: pa.RecordBatch) -> None:
        self._raise_if_failed()
        self._queue.put(_Batch(rank, index, batch))

    def finish_shard(self, rank: int, index: int, stats: dict[str, Any]) -> None:
        self._raise_if_failed()
        self._queue.put(_Finish(rank, index, stats))

    def submit(self, shard: PendingShard) -> None:
        """A whole shard at once (its batches, then its stats)."""
        for batch in shard.batches:
            self.submit_batch(shard.rank, shard.index, batch)
        self.finish_shard(shard.rank, shard.index, shard.stats)

    def close(self) -> None:
        """Wait for every finished shard to be on disk and in the manifest (an unfinished one is dropped)."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()
