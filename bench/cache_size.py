"""Stage one: bytes per target token of the cache, by mode and k (issue 2).

    .venv/bin/python bench/cache_size.py [--rows 160]

Caches the embedded SmolLM2-135M-Instruct teacher over the first --rows GSM8K train problems
(loss mask: the answers) with top-k 16/64/128 (q64 values), top-64 with float32 values, and RS-KD
(64 draws). Reports, per target token: the whole shard on disk (input ids and loss mask included),
the teacher columns alone (re-encoded with the same zstd IPC settings), the top-k mass covered and,
for RS, the unique ids per token. DistillKit's sizes are its own published figures (128K vocab),
quoted for comparison, not measured here. Caches are shared with bench/quality.py.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
from common import REPO, WORK, kd_env, require_gsm8k, run_step, write_results

from kd.cache.format import IPC_COMPRESSION
from kd.cache.reader import CacheReader

DISTILLKIT = {50: 121.0, 128: 328.0}
"""DistillKit's published bytes/token: 'budget' k=50 and 'recommended' k=128 at a 128K vocab."""

CONFIGS = {
    "top16": ["--top-k", "16"],
    "top64": ["--top-k", "64"],
    "top64-float32": ["--top-k", "64", "--value-encoding", "float32"],
    "top128": ["--top-k", "128"],
    "rs": ["--sampling", "rs", "--samples", "64"],
}


def teacher_column_bytes(reader: CacheReader) -> int:
    total = 0
    for shard in reader.shards:
        table = reader.read_table(shard)
        teacher = table.select([n for n in table.column_names if n.startswith("teacher_")])
        sink = io.BytesIO()
        options = pa.ipc.IpcWriteOptions(compression=pa.Codec(*IPC_COMPRESSION))
        with pa.ipc.new_file(sink, teacher.schema, options=options) as writer:
            writer.write_table(teacher)
        total += sink.tell()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=160)
    args = parser.parse_args()
    gsm8k = require_gsm8k()
    work = WORK / "quality" if args.rows == 160 else WORK / f"cache-size-{args.rows}"
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
    write_results("cache_size", {"rows": args.rows, "distillkit_reported": DISTILLKIT, "caches": rows})
    print(f"{'cache':15} {'B/token (disk)':>15} {'B/token (teacher)':>18} {'top-k mass':>11}")
    for name, row in rows.items():
        mass = row["topk_mass_mean"]
        print(
            f"{name:15} {row['bytes_per_target_token']:15.1f} {row['teacher_bytes_per_target_token']:18.1f} "
            f"{mass if mass is None else round(mass, 4)!s:>11}"
        )


if __name__ == "__main__":
    main()
