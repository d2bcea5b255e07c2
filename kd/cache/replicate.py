"""Re-write a cache through kd's own writer: N copies of its rows, and/or another record-batch size.

Benchmarks use it to make 16x and 128x caches without rerunning a teacher, and tests to get caches
of many small record batches from a small corpus. Copy c's rows are numbered ``row + c x (last row
+ 1)``, so every row stays unique. Reads and writes one record batch at a time.

    from kd.cache.replicate import replicate_cache
    replicate_cache("cache/", "cache-x16/", copies=16)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd.cache import format as fmt
from kd.cache.manifest import open_or_create, record_rank_done
from kd.cache.reader import CachedSequence, CacheReader
from kd.cache.writer import BackgroundShardWriter
from kd.errors import KdError


def replicate_cache(
    src: str | Path, dst: str | Path, copies: int = 1, batch_targets: int = fmt.BATCH_TARGETS
) -> dict[str, Any]:
    """Write `copies` copies of cache `src` into the new cache `dst`; returns dst's manifest settings."""
    reader = CacheReader(src)
    if reader.mode not in ("topk", "rs"):
        raise KdError(f"{src}: only top-k and rs teacher caches can be replicated")
    settings = dict(reader.settings)
    settings["format_version"] = fmt.FORMAT_VERSION
    settings["world_size"] = 1
    settings["replicated"] = {"from": str(src), "copies": copies, "batch_targets": batch_targets}
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
