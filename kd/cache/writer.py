"""Writing shards off the critical path.

The teacher's forward pass is the only real cost of stage one, so compression, checksumming and
fsync happen on a background thread while the next batch runs. A shard is written to a hidden temp
name, fsynced, renamed, and only then recorded in the manifest: a kill -9 at any moment leaves
either a complete, listed shard or nothing that a reader would pick up.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

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


@dataclass
class PendingShard:
    """A shard whose record batches are ready to be written."""

    rank: int
    index: int
    batches: list[pa.RecordBatch]
    stats: dict[str, Any]


def write_shard(cache_dir: Path, schema: pa.Schema, shard: PendingShard) -> dict[str, Any]:
    """Write one shard atomically and return its manifest entry."""
    name = shard_name(shard.rank, shard.index)
    final = cache_dir / name
    tmp = cache_dir / f".{name}.tmp"
    options = pa.ipc.IpcWriteOptions(compression=pa.Codec(*IPC_COMPRESSION))
    with open(tmp, "wb") as sink:
        with pa.ipc.new_file(sink, schema, options=options) as writer:
            for batch in shard.batches:
                writer.write_batch(batch)
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(tmp, final)
    _fsync_dir(cache_dir)
    return {
        "file": name,
        "rank": shard.rank,
        "index": shard.index,
        "bytes": final.stat().st_size,
        "sha256": sha256_file(final),
        **shard.stats,
    }


class BackgroundShardWriter:
    """Writes shards on a worker thread; `submit` blocks only when `max_pending` shards are queued."""

    def __init__(self, cache_dir: Path, schema: pa.Schema, max_pending: int = 2) -> None:
        self.cache_dir = cache_dir
        self.schema = schema
        self._queue: queue.Queue[PendingShard | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.written: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._run, name="kd-shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            try:
                entry = write_shard(self.cache_dir, self.schema, item)
                record_shard(self.cache_dir, entry)
                self.written.append(entry)
            except BaseException as exc:  # surfaced to the main thread on the next submit/close
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, shard: PendingShard) -> None:
        self._raise_if_failed()
        self._queue.put(shard)

    def close(self) -> None:
        """Wait for every queued shard to be on disk and in the manifest."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()
