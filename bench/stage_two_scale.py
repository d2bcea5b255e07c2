"""Stage two at corpus scale (issue 9): memory and start-up against cache size, reader speed, data waits.

    .venv/bin/python bench/stage_two_scale.py                 # everything below, ~25 min on 2 cores
    .venv/bin/python bench/stage_two_scale.py --parts rss     # only one part (rss, tiny, reader, wait, padding)

Parts (results in bench/results/stage_two_scale.json):

- ``rss``: `kd train --from-cache C --student-from-teacher --layers 0,10,20,29 --max-steps 1
  --batch-size 4` on the top-64 cache of the first 200 GSM8K train problems (embedded SmolLM2
  teacher) and on 16x and 128x copies of it (made through kd's own writer, kd.cache.replicate).
  Peak RSS of each child (os.wait4) and its seconds to the first optimizer step; runs interleaved.
- ``tiny``: the same with a tiny random 2-layer teacher and a 1-layer student (so the data path
  dominates), on caches of 1/16 of GSM8K train and of all of it.
- ``reader``: decoded + collated target tokens per second of the streaming loader alone, on one
  thread, over the 16x cache (batch 8, window 1024).
- ``wait``: share of a real CPU training run's wall time spent waiting for data (20 steps).
- ``padding``: padding share of GSM8K micro-batches with --batch-size 8 and with --batch-tokens of
  the same mean padded size, and the training tokens/s of each (interleaved rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import GSM8K, REPO, WORK, child_run, require_gsm8k, run_step, write_results

SCALE = WORK / "scale"


def build_real_caches(rows: int, copies: list[int]) -> dict[int, Path]:
    from kd.cache.replicate import replicate_cache

    base = SCALE / f"top64-r{rows}-x1"
    run_step(
        [
            "cache-logits",
            "--data",
            str(GSM8K / "train.jsonl"),
            "--limit",
            str(rows),
            "--top-k",
            "64",
            "--out",
            str(base),
            "--json",
        ],
        base / "manifest.json",
    )
    caches = {}
    for n in copies:
        if n == 1:
            caches[n] = base
            continue
        target = SCALE / f"top64-r{rows}-x{n}"
        if (
            not (target / "manifest.json").is_file()
            or not json.loads((target / "manifest.json").read_text())["complete"]
        ):
            print(f"replicate x{n} -> {target}", flush=True)
            if target.exists():
                import shutil

                shutil.rmtree(target)
            replicate_cache(base, target, copies=n)
        caches[n] = target
    return caches


def cache_stats(cache: Path) -> dict:
    manifest = json.loads((cache / "manifest.json").read_text())
    return {
        "targets": sum(s["targets"] for s in manifest["shards"]),
        "rows": sum(s["rows"] for s in manifest["shards"]),
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
    }


def scale_runs(caches: dict, train_args: list[str], rounds: int, label: str) -> dict:
    results: dict = {str(n): [] for n in caches}
    for r in range(rounds):
        for n, cache in caches.items():
            with tempfile.TemporaryDirectory(dir=WORK) as out:
                run = child_run(["train", "--from-cache", str(cache), "--out", out, *train_args])
            print(
                f"{label} round {r} x{n}: {run['peak_rss_mb']:.0f} MB, first step {run['seconds_to_first_step']:.1f}s"
            )
            results[str(n)].append(run)
    small, large = str(min(caches)), str(max(caches))
    rss = {n: statistics.median(x["peak_rss_mb"] for x in runs) for n, runs in results.items()}
    ttfs = {n: statistics.median(x["seconds_to_first_step"] for x in runs) for n, runs in results.items()}
    return {
        "caches": {n: cache_stats(c) for n, c in caches.items()},
        "peak_rss_mb": rss,
        "seconds_to_first_step": ttfs,
        "rss_ratio": rss[large] / rss[small],
        "first_step_ratio": ttfs[large] / ttfs[small],
        "runs": {
            n: [{k: x[k] for k in ("peak_rss_mb", "wall_seconds", "seconds_to_first_step")} for x in runs]
            for n, runs in results.items()
        },
    }


def tiny_models() -> tuple[Path, Path]:
    """A tiny random 2-layer teacher with the real SmolLM2 tokenizer and a 1-layer student config."""
    sys.path.insert(0, str(REPO))
    from kd.pipeline.models import embedded_gguf_path, gguf_to_hf_dir
    from tests.conftest import build_tiny_model_dir

    teacher = SCALE / "tiny-teacher"
    if not (teacher / "config.json").is_file():
        build_tiny_model_dir(teacher, gguf_to_hf_dir(embedded_gguf_path()))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(teacher))
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 1, 64, 128
    config.num_attention_heads = config.num_key_value_heads = 1
    student = SCALE / "tiny-student" / "config.json"
    student.parent.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(student))
    return teacher, student


def part_tiny(rounds: int) -> dict:
    teacher, student = tiny_models()
    total = sum(1 for line in open(GSM8K / "train.jsonl") if line.strip())
    caches = {}
    for name, limit in (("1", total // 16), ("16", total)):
        out = SCALE / f"tiny-gsm8k-{limit}"
        run_step(
            [
                "cache-logits",
                "--teacher",
                str(teacher),
                "--data",
                str(GSM8K / "train.jsonl"),
                "--limit",
                str(limit),
                "--top-k",
                "64",
                "--out",
                str(out),
                "--json",
            ],
            out / "manifest.json",
        )
        caches[int(name)] = out
    return scale_runs(caches, ["--student", str(student), "--max-steps", "1", "--batch-size", "4"], rounds, "tiny")


def part_reader(cache: Path) -> dict:
    import torch

    from kd.cache.reader import CacheReader
    from kd.pipeline.training.order import EpochPlan, OrderSettings
    from kd.pipeline.training.stream import StepLoader

    torch.set_num_threads(1)
    reader = CacheReader(cache)
    units = reader.units()
    plan = EpochPlan([u.rows for u in units], OrderSettings(0, 1024, 1, batch_size=8))
    steps = min(plan.steps_in_epoch(0), 1500)
    loader = StepLoader(reader, plan, units, prefetch=4)
    targets = 0
    started = time.perf_counter()
    for data in loader.iterate(0, steps):
        targets += data.targets
    seconds = time.perf_counter() - started
    return {
        "steps": steps,
        "targets": targets,
        "seconds": seconds,
        "targets_per_second": targets / seconds,
        "max_held_rows": loader.stats.max_held_rows,
        "max_decoded": loader.stats.max_decoded,
    }


def part_wait(cache: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=WORK) as out:
        run = child_run(
            [
                "train",
                "--from-cache",
                str(cache),
                "--out",
                out,
                "--student-from-teacher",
                "--layers",
                "0,10,20,29",
                "--max-steps",
                "20",
                "--batch-size",
                "4",
                "--log-every",
                "20",
            ]
        )
    return {k: run[k] for k in ("data_wait_seconds", "data_wait_share", "tokens_per_second", "peak_rss_mb")}


def part_padding(cache: Path, rounds: int) -> dict:
    import numpy as np

    from kd.cache.reader import CacheReader
    from kd.pipeline.training.order import EpochPlan, OrderSettings

    reader = CacheReader(cache)
    units = reader.units()
    lengths = reader.sequence_lengths(units)
    flat = {}

    def padding(plan: EpochPlan) -> tuple[float, float]:
        real = padded = 0
        sizes = []
        for micro in plan.micro_batches(0):
            ls = [int(lengths[u][r]) for _, u, r in micro]
            real += sum(ls)
            padded += max(ls) * len(ls)
            sizes.append(max(ls) * len(ls))
        return 1 - real / padded, float(np.mean(sizes))

    by_size, mean_padded = padding(EpochPlan([u.rows for u in units], OrderSettings(0, 1024, 1, batch_size=8)))
    budget = int(round(mean_padded))
    by_tokens, _ = padding(EpochPlan([u.rows for u in units], OrderSettings(0, 1024, 1, batch_tokens=budget), lengths))
    flat.update({"padding_batch_size_8": by_size, "batch_tokens": budget, "padding_batch_tokens": by_tokens})
    speeds: dict[str, list[float]] = {"batch_size": [], "batch_tokens": []}
    common = ["--student-from-teacher", "--layers", "0,10,20,29", "--max-steps", "8", "--log-every", "8"]
    for _ in range(rounds):
        for mode, flags in (("batch_size", ["--batch-size", "8"]), ("batch_tokens", ["--batch-tokens", str(budget)])):
            with tempfile.TemporaryDirectory(dir=WORK) as out:
                run = child_run(["train", "--from-cache", str(cache), "--out", out, *common, *flags])
            speeds[mode].append(run["tokens_per_second"])
            print(f"padding {mode}: {run['tokens_per_second']:.0f} target tok/s", flush=True)
    flat["target_tokens_per_second"] = speeds
    flat["tokens_per_second_ratio"] = statistics.median(speeds["batch_tokens"]) / statistics.median(
        speeds["batch_size"]
    )
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--copies", default="1,16,128")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parts", default="rss,tiny,reader,wait,padding")
    args = parser.parse_args()
    require_gsm8k()
    SCALE.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    copies = [int(c) for c in args.copies.split(",")]
    caches = build_real_caches(args.rows, copies)
    results_path = REPO / "bench" / "results" / "stage_two_scale.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.pop("command", None)
    results.pop("machine", None)
    student = ["--student-from-teacher", "--layers", "0,10,20,29", "--max-steps", "1", "--batch-size", "4"]
    if "rss" in parts:
        results["rss"] = scale_runs(caches, student, args.rounds, "rss")
    if "tiny" in parts:
        results["tiny"] = part_tiny(args.rounds)
    mid = caches[sorted(copies)[len(copies) // 2]]
    if "reader" in parts:
        results["reader"] = part_reader(mid)
        print(f"reader: {results['reader']['targets_per_second']:,.0f} targets/s", flush=True)
    if "wait" in parts:
        results["wait"] = part_wait(mid)
        print(f"wait share: {results['wait']['data_wait_share']:.4f}", flush=True)
    if "padding" in parts:
        results["padding"] = part_padding(caches[1], args.rounds + 1)
    write_results("stage_two_scale", results)


if __name__ == "__main__":
    main()
