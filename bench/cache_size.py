"""Stage one: bytes per target token of the cache, by mode and k (issue 2).

    .venv/bin/python bench/cache_size.py [--rows 60]

Caches the embedded SmolLM2-135M-Instruct teacher over the first --rows GSM8K train problems
(loss mask: the answers) with top-k 16/64/128 (sqrt8 values, sorted id coding), top-64 with q64
and with float32 values, and RS-KD (64 draws). Reports, per target token: the whole shard on disk
(input ids and loss mask included),
the teacher columns alone (re-encoded with the same zstd IPC settings), the top-k mass covered and,
for RS, the unique ids per token. DistillKit's sizes are its own published figures (128K vocab),
quoted for comparison, not measured here.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
from common import REPO, WORK, kd_env, require_gsm8k, run_step, write_results

from kd.cache.format import IPC_COMPRESSION
from kd.cache.reader import CacheReader, decode_table
from kd.cache.writer import PendingShard, write_shard

DISTILLKIT = {50: 121.0, 128: 328.0}
"""DistillKit's published bytes/token: 'budget' k=50 and 'recommended' k=128 at a 128K vocab."""

CONFIGS = {
    "top16": ["--top-k", "16", "--value-encoding", "sqrt8"],
    "top64": ["--top-k", "64", "--value-encoding", "sqrt8"],
    "top64-q64": ["--top-k", "64", "--value-encoding", "q64"],
    "top64-float32": ["--top-k", "64", "--value-encoding", "float32"],
    "top128": ["--top-k", "128", "--value-encoding", "sqrt8"],
    "rs": ["--sampling", "rs", "--samples", "64"],
}


def ipc_bytes(table: pa.Table) -> int:
    """Size of `table` as a shard: Arrow IPC file with kd's zstd settings (kd.cache.writer.write_shard)."""
    sink = io.BytesIO()
    options = pa.ipc.IpcWriteOptions(compression=pa.Codec(*IPC_COMPRESSION))
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.tell()


def teacher_column_bytes(reader: CacheReader) -> int:
    total = 0
    for shard in reader.shards:
        table = reader.read_table(shard)
        total += ipc_bytes(table.select([n for n in table.column_names if n.startswith("teacher_")]))
    return total


def adaptive_bytes(reader: CacheReader, epsilon: float) -> tuple[float, float, float]:
    """The top-64 cache re-written with `--mass-epsilon epsilon` (the function stage one applies after
    scoring): shard bytes per target token, ids kept per token, and the mean teacher mass moved from
    explicit ids into the tail bucket (at most epsilon per token)."""
    from kd.cache import format as fmt

    schema = fmt.schema("topk", reader.vocab_size, reader.settings["k"], reader.value_encoding)
    total_bytes, kept, moved, tokens = 0, 0, 0.0, 0
    for shard in reader.shards:
        seqs = list(decode_table(reader.read_table(shard), "topk", reader.value_encoding))
        cut = [fmt.truncate_to_mass(s.teacher, epsilon) for s in seqs]
        batch = fmt.build_batch(
            schema,
            [s.row for s in seqs],
            [s.input_ids for s in seqs],
            [s.loss_mask for s in seqs],
            cut,
            reader.value_encoding,
        )
        with tempfile.TemporaryDirectory() as tmp:  # through kd's own writer: the sorted id coding applies
            entry = write_shard(Path(tmp), schema, PendingShard(0, 0, [batch]))
        total_bytes += entry["bytes"]
        for full, small in zip(seqs, cut, strict=True):
            kept += int(np.isfinite(small.logprobs).sum())
            tokens += len(small.ids)
            moved += float((np.exp(small.tail.astype(np.float64)) - np.exp(full.teacher.tail.astype(np.float64))).sum())
    return total_bytes / tokens, kept / tokens, moved / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60)
    args = parser.parse_args()
    gsm8k = require_gsm8k()
    work = WORK / f"cache-size-{args.rows}"
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, flags in CONFIGS.items():
        cache = work / f"cache-{name}"
        seconds = run_step(
            [
                "cache-logits",
                "--data",
                str(gsm8k / "train.jsonl"),
                "--limit",
                str(args.rows),
                "--out",
                str(cache),
                *flags,
            ],
            cache / "manifest.json",
            work / f"cache-{name}.log",
        )
        report = json.loads(
            subprocess.run(
                [sys.executable, "-m", "kd.cli", "inspect", str(cache), "--verify", "--json"],
                capture_output=True,
                text=True,
                check=True,
                env=kd_env(),
                cwd=REPO,
            ).stdout
        )
        reader = CacheReader(cache)
        row = {
            "targets": report["targets"],
            "bytes_per_target_token": report["bytes_per_target_token"],
            "teacher_bytes_per_target_token": teacher_column_bytes(reader) / report["targets"],
            "topk_mass_mean": report.get("topk_mass_mean"),
            "seconds": seconds or None,
        }
        if name == "rs":
            unique = [len(ids) for s in reader.iter_sequences() for ids in s.teacher.ids]
            row["unique_ids_per_token"] = float(np.mean(unique))
        rows[name] = row
    top64 = CacheReader(work / "cache-top64")
    for epsilon in (1e-3, 1e-2):
        per_token, ids, kl = adaptive_bytes(top64, epsilon)
        rows[f"top64-adaptive-{epsilon:g}"] = {
            "bytes_per_target_token": per_token,
            "ids_kept_per_token": ids,
            "kl_to_top64_nats": kl,
            "mass_epsilon": epsilon,
        }
    write_results("cache_size", {"rows": args.rows, "distillkit_reported": DISTILLKIT, "caches": rows})
    print(f"{'cache':15} {'B/token (disk)':>15} {'B/token (teacher)':>18} {'top-k mass':>11}")
    for name, row in rows.items():
        mass = row.get("topk_mass_mean")
        teacher = row.get("teacher_bytes_per_target_token", float("nan"))
        print(
            f"{name:15} {row['bytes_per_target_token']:15.1f} {teacher:18.1f} "
            f"{mass if mass is None else round(mass, 4)!s:>11}"
        )


if __name__ == "__main__":
    main()
