"""Where a cache's bytes go: bytes per target token split into ids, values, tail and tokens.

Arrow does not report compressed sizes per column, so each column group of a sample of shards is
written again with the shards' own IPC settings (same record batches, same schema metadata) and
the shard's real size is split in those proportions. `kd inspect` shows the result, so a user can
see what `--top-k`, `--value-encoding` or `--sampling rs` would buy.
"""

from __future__ import annotations

import io

import pyarrow as pa

from kd.cache.format import IPC_COMPRESSION
from kd.cache.reader import CacheReader

GROUPS = {
    "ids": ("teacher_ids", "teacher_sizes"),
    "values": ("teacher_values", "teacher_counts"),
    "tail": ("teacher_tail",),
    "tempered tails": ("teacher_tempered_tail",),
    "tokens": ("row", "input_ids", "loss_mask", "token_weights"),
    "hidden": ("teacher_hidden", "teacher_hidden_scale"),
    "hidden layers": (),  # every teacher_layer_<i> column (--hidden-layers), matched by prefix
}
LAYER_PREFIX = "teacher_layer_"


def _ipc_size(batches: list[pa.RecordBatch], schema: pa.Schema) -> int:
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression=pa.Codec(*IPC_COMPRESSION))) as w:
        for batch in batches:
            w.write_batch(batch)
    return sink.tell()


def bytes_breakdown(reader: CacheReader, sample_shards: int | None = 4) -> dict[str, float]:
    """Bytes per target token by column group, from up to `sample_shards` shards (evenly spread)."""
    shards = reader.shards
    step = max(1, len(shards) // sample_shards) if sample_shards else 1
    totals = dict.fromkeys(GROUPS, 0.0)
    targets = 0
    for shard in shards[::step][: sample_shards or None]:
        table = reader.read_table(shard, verify=False)
        sizes = {}
        for group, names in GROUPS.items():
            present = [
                n for n in table.schema.names if n in names or (group == "hidden layers" and n.startswith(LAYER_PREFIX))
            ]
            if not present:
                sizes[group] = 0
                continue
            part = table.select(present)
            # The id rank (sorted coding) lives in the schema metadata: it belongs to the ids' bytes.
            schema = part.schema.with_metadata((table.schema.metadata or {}) if group == "ids" else {})
            sizes[group] = _ipc_size([b.replace_schema_metadata(schema.metadata) for b in part.to_batches()], schema)
        scale = shard["bytes"] / max(sum(sizes.values()), 1)
        for group, size in sizes.items():
            totals[group] += size * scale
        targets += shard["targets"]
    # Only the groups this cache has: tempered tails need --temperatures, hidden states --store hidden,
    # and a hidden cache has no ids, values or tail.
    return {group: total / max(targets, 1) for group, total in totals.items() if total}
