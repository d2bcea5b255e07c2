"""Reading a teacher-logit cache back: manifest checks, checksums and decoded sequences."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kd.cache.format import SampledTargets, TopKTargets, decode_tail, decode_topk_values
from kd.cache.manifest import read_manifest
from kd.cache.writer import sha256_file
from kd.pipeline.errors import KdError


@dataclass
class CachedSequence:
    """One cached training sequence with its teacher data (one entry per target position)."""

    row: int
    input_ids: np.ndarray
    loss_mask: np.ndarray
    teacher: TopKTargets | SampledTargets


class CacheReader:
    """A cache directory opened for reading.

    Args:
        cache_dir: the directory `kd cache-logits --out` wrote.
        require_complete: refuse a cache whose writer has not finished (an interrupted stage one
            must be resumed first; its shards are valid but the corpus is not fully covered).
    """

    def __init__(self, cache_dir: str | Path, require_complete: bool = True) -> None:
        self.dir = Path(cache_dir)
        if not self.dir.is_dir():
            raise KdError(f"{self.dir}: no such cache directory")
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise KdError(f"{self.dir}: not a kd cache (no manifest.json)")
        self.manifest: dict[str, Any] = manifest
        self.settings: dict[str, Any] = manifest["settings"]
        if require_complete and not manifest.get("complete"):
            done = sorted(int(r) for r, v in manifest.get("ranks", {}).items() if v.get("complete"))
            raise KdError(
                f"{self.dir}: cache is incomplete (ranks finished: {done or 'none'} of "
                f"{self.settings['world_size']}); rerun the same `kd cache-logits` command to resume it"
            )
        if not manifest["shards"]:
            raise KdError(f"{self.dir}: cache has no shards (empty corpus?)")

    @property
    def mode(self) -> str:
        return self.settings["mode"]

    @property
    def vocab_size(self) -> int:
        return self.settings["vocab_size"]

    @property
    def value_encoding(self) -> str:
        return self.settings["value_encoding"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    def verify(self) -> list[str]:
        """Check every shard's size and sha256 against the manifest; return the problems found."""
        problems = []
        for shard in self.shards:
            path = self.dir / shard["file"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.stat().st_size != shard["bytes"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['bytes']} (truncated?)")
            elif sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 mismatch (corrupted)")
        return problems

    def read_table(self, shard: dict[str, Any], verify: bool = True) -> pa.Table:
        """Read one shard as an Arrow table, checking its checksum first if `verify`."""
        path = self.dir / shard["file"]
        if verify:
            if not path.is_file():
                raise KdError(f"{path}: shard listed in the manifest is missing")
            if path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
                raise KdError(f"{path}: shard is corrupted or truncated (checksum mismatch); re-create the cache")
        try:
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_file(source).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            raise KdError(f"{path}: unreadable shard ({exc})") from exc

    def iter_sequences(self, verify: bool = True) -> Iterator[CachedSequence]:
        """Decode every sequence of every shard, in manifest order."""
        for shard in self.shards:
            yield from decode_table(self.read_table(shard, verify), self.mode, self.value_encoding)


def _split(values: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def _list_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    return offsets - offsets[0], array.values.slice(offsets[0], offsets[-1] - offsets[0])


def decode_table(table: pa.Table, mode: str, value_encoding: str) -> Iterator[CachedSequence]:
    """Turn a shard table into CachedSequence objects (vectorised per column)."""
    rows = table.column("row").to_numpy()
    ids_off, ids_val = _list_parts(table.column("input_ids"))
    mask_off, mask_val = _list_parts(table.column("loss_mask"))
    input_ids = _split(ids_val.to_numpy(zero_copy_only=False).astype(np.int64), ids_off)
    masks = _split(mask_val.to_numpy(zero_copy_only=False), mask_off)
    if mode == "topk":
        t_off, t_val = _list_parts(table.column("teacher_ids"))
        k = t_val.type.list_size
        teacher_ids = t_val.values.to_numpy().reshape(-1, k).astype(np.int64)
        _, v_val = _list_parts(table.column("teacher_values"))
        values = decode_topk_values(v_val.values.to_numpy().reshape(-1, k), value_encoding)
        tail_off, tail_val = _list_parts(table.column("teacher_tail"))
        tails = decode_tail(tail_val.to_numpy(), value_encoding)
        for i in range(len(rows)):
            a, b = t_off[i], t_off[i + 1]
            yield CachedSequence(
                int(rows[i]), input_ids[i], masks[i], TopKTargets(teacher_ids[a:b], values[a:b], tails[a:b])
            )
    else:
        outer_off, inner = _list_parts(table.column("teacher_ids"))
        inner_off = inner.offsets.to_numpy()
        flat_ids = inner.values.to_numpy().astype(np.int64)
        _, c_inner = _list_parts(table.column("teacher_counts"))
        flat_counts = c_inner.values.to_numpy().astype(np.int64)
        for i in range(len(rows)):
            lo, hi = outer_off[i], outer_off[i + 1]
            ids = [flat_ids[inner_off[j] - inner_off[0] : inner_off[j + 1] - inner_off[0]] for j in range(lo, hi)]
            counts = [flat_counts[inner_off[j] - inner_off[0] : inner_off[j + 1] - inner_off[0]] for j in range(lo, hi)]
            yield CachedSequence(int(rows[i]), input_ids[i], masks[i], SampledTargets(ids, counts))
