"""Re-write a cache through kd's own writer: N copies of its rows, another record-batch size, or a smaller k.

Benchmarks use it to make 16x and 128x caches without rerunning a teacher, and tests to get caches
of many small record batches from a small corpus. Copy c's rows are numbered ``row + c x (last row
+ 1)``, so every row stays unique. Reads and writes one record batch at a time.

    from kd.cache.replicate import replicate_cache
    replicate_cache("cache/", "cache-x16/", copies=16)
    replicate_cache("cache-top64/", "cache-top16/", keep_top=16)  # one teacher pass, several k

`keep_top=K` keeps each target's K most probable cached ids and moves the mass of the others into the
tail: the distribution a `--top-k K` pass stores, without rerunning the teacher (up to the value
encoding's rounding of the moved probabilities, which stage one rounds too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kd.cache import format as fmt
from kd.cache.manifest import open_or_create, record_rank_done
from kd.cache.reader import CachedSequence, CacheReader
from kd.cache.writer import BackgroundShardWriter
from kd.errors import KdError


def replicate_cache(
    src: str | Path,
    dst: str | Path,
    copies: int = 1,
    batch_targets: int = fmt.BATCH_TARGETS,
    keep_top: int | None = None,
) -> dict[str, Any]:
    """Write `copies` copies of cache `src` into the new cache `dst`; returns dst's manifest settings."""
    reader = CacheReader(src)
    if reader.mode not in ("topk", "rs"):
        raise KdError(f"{src}: only top-k and rs teacher caches can be replicated")
    settings = dict(reader.settings)
    if keep_top is not None:
        if reader.mode != "topk" or not 1 <= keep_top <= settings["k"] or reader.tempered:
            raise KdError(f"{src}: keep_top needs a top-k cache with k >= {keep_top} and no tempered tails")
        settings["k"] = keep_top
    settings["format_version"] = fmt.FORMAT_VERSION
    settings["world_size"] = 1
    settings["replicated"] = {"from": str(src), "copies": copies, "batch_targets": batch_targets}
    if keep_top is not None:
        settings["replicated"]["keep_top"] = keep_top
    dst = Path(dst)
    open_or_create(dst, settings)
    schema = fmt.schema(
        reader.mode,
        reader.vocab_size,
        settings["k"] or 1,
        reader.value_encoding or "q64",
        settings.get("num_samples") or 1,
    )
    stride = max(int(s["last_row"]) for s in reader.shards) + 1 if "last_row" in reader.shards[0] else reader.num_rows
    writer = BackgroundShardWriter(dst, schema)
    encoding = reader.value_encoding or "q64"
    try:
        index = 0
        for copy in range(copies):
            for position in range(len(reader.shards)):
                pending: list[CachedSequence] = []
                targets = 0
                stats = {"rows": 0, "tokens": 0, "targets": 0, "first_row": None, "last_row": None}
                for unit in (u for u in reader.units() if u.shard == position):
                    for seq in reader.decode(reader.read_unit(unit)):
                        seq.row += copy * stride
                        if keep_top is not None:
                            seq.teacher = _keep_top(seq.teacher, keep_top)
                        pending.append(seq)
                        n = int(seq.loss_mask[1:].sum())
                        targets += n
                        stats["rows"] += 1
                        stats["tokens"] += len(seq.input_ids)
                        stats["targets"] += n
                        stats["first_row"] = seq.row if stats["first_row"] is None else stats["first_row"]
                        stats["last_row"] = seq.row
                        if targets >= batch_targets:
                            writer.submit_batch(0, index, _batch(schema, pending, encoding))
                            pending, targets = [], 0
                if pending:
                    writer.submit_batch(0, index, _batch(schema, pending, encoding))
                writer.finish_shard(0, index, stats)
                index += 1
    finally:
        writer.close()
        reader.close()
    record_rank_done(dst, 0, {"replicated_from": str(src)})
    return settings


def _batch(schema, seqs: list[CachedSequence], encoding: str):
    return fmt.build_batch(
        schema,
        [s.row for s in seqs],
        [s.input_ids for s in seqs],
        [s.loss_mask for s in seqs],
        [s.teacher for s in seqs],
        encoding,
    )


def _keep_top(targets: fmt.TopKTargets, k: int) -> fmt.TopKTargets:
    """The k most probable ids of each target; the others' probability joins the tail (in float64)."""
    logprobs = targets.logprobs.astype(np.float64)
    order = np.argsort(-logprobs, axis=1, kind="stable")  # -inf (empty slots) last
    kept, dropped = order[:, :k], order[:, k:]
    moved = np.take_along_axis(logprobs, dropped, axis=1)
    with np.errstate(divide="ignore"):
        tail = np.logaddexp(targets.tail.astype(np.float64), np.logaddexp.reduce(moved, axis=1, initial=-np.inf))
    return fmt.TopKTargets(
        ids=np.take_along_axis(targets.ids, kept, axis=1),
        logprobs=np.take_along_axis(targets.logprobs, kept, axis=1),
        tail=tail.astype(targets.tail.dtype),
    )
