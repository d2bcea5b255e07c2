"""Quality of offline KD against online KD: the table of issue 3.

    .venv/bin/python bench/quality.py [--train-rows 160] [--test-rows 60]

Teacher: the embedded SmolLM2-135M-Instruct. Student: 8 of its 30 layers (even:8), embeddings, norm
and head copied. Data: GSM8K train (first --train-rows) for training, GSM8K test (first --test-rows)
held out; each student trains on the first --train-limit sequences. Every run sees the same
sequences in the same order for the same number of steps (the
same token budget): CE-only, cached top-16 + tail, cached top-64 + tail, RS-KD, online full-vocab KD.
Held-out metrics come from `kd eval` against a top-64 cache of the test rows (KL over 64 ids +
tail; the RS and top-16 runs are measured on the same yardstick).

The "gap closed" column is (KL_ce − KL_run) / (KL_ce − KL_online): 1.0 means the run reaches
online KD's held-out KL. Steps are reused from bench/out/quality/ when rerun.
"""

from __future__ import annotations

import argparse
import json

from common import WORK, require_gsm8k, run_step, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=160)
    parser.add_argument("--test-rows", type=int, default=60)
    parser.add_argument("--train-limit", type=int, default=96, help="sequences each student trains on")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    gsm8k = require_gsm8k()
    work = WORK / "quality"
    work.mkdir(parents=True, exist_ok=True)
    train, test = str(gsm8k / "train.jsonl"), str(gsm8k / "test.jsonl")

    caches = {
        "top16": ["--top-k", "16", "--value-encoding", "sqrt8"],
        "top64": ["--top-k", "64", "--value-encoding", "sqrt8"],
        "rs": ["--sampling", "rs", "--samples", str(args.samples)],
    }
    for name, flags in caches.items():
        run_step(
            [
                "cache-logits",
                "--data",
                train,
                "--limit",
                str(args.train_rows),
                "--out",
                str(work / f"cache-{name}"),
                *flags,
            ],
            work / f"cache-{name}" / "manifest.json",
            work / f"cache-{name}.log",
        )
    heldout = work / "cache-heldout"
    run_step(
        # The yardstick stays q64 (1/128-nat log-probs), as in earlier runs of this table.
        [
            "cache-logits",
            "--data",
            test,
            "--limit",
            str(args.test_rows),
            "--out",
            str(heldout),
            "--top-k",
            "64",
            "--value-encoding",
            "q64",
        ],
        heldout / "manifest.json",
        work / "cache-heldout.log",
    )

    common = [
        "--student-from-teacher",
        "--layers",
        "even:8",
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--learning-rate",
        str(args.learning_rate),
        "--warmup-steps",
        "3",
        "--seed",
        "0",
        "--dtype",
        "auto",
        "--log-every",
        "1",
        "--limit",
        str(args.train_limit),
    ]
    runs = {
        "ce_only": ["--from-cache", str(work / "cache-top64"), "--alpha", "1.0"],
        "cached_top16": ["--from-cache", str(work / "cache-top16"), "--alpha", str(args.alpha)],
        "cached_top64": ["--from-cache", str(work / "cache-top64"), "--alpha", str(args.alpha)],
        "cached_rs": ["--from-cache", str(work / "cache-rs"), "--alpha", str(args.alpha)],
        "online": [
            "--teacher",
            "smollm2-135m-instruct",
            "--data",
            train,
            "--alpha",
            str(args.alpha),
        ],
    }
    results = {}
    for name, flags in runs.items():
        out = work / f"student-{name}"
        seconds = run_step(
            ["train", *flags, *common, "--out", str(out)], out / "kd_training.json", work / f"train-{name}.log"
        )
        report = work / f"eval-{name}.json"
        run_step(["eval", "--model", str(out), "--cache", str(heldout), "--json"], report, work / f"eval-{name}.log")
        metrics = json.loads(report.read_text())
        training = json.loads((out / "kd_training.json").read_text())
        results[name] = {
            "heldout_ce": metrics.get("ce"),
            "heldout_kl": metrics.get("kl"),
            "heldout_top1_agreement": metrics.get("top1_agreement"),
            "train_seconds": seconds or None,
            "steps": training.get("final_metrics", {}).get("step"),
        }
    base, ref = results["ce_only"]["heldout_kl"], results["online"]["heldout_kl"]
    for row in results.values():
        row["gap_closed"] = (base - row["heldout_kl"]) / (base - ref) if base != ref else None
    write_results("quality", {"settings": vars(args), "runs": results})
    print(f"{'run':14} {'CE':>7} {'KL':>7} {'top1':>7} {'gap closed':>10}")
    for name, row in results.items():
        print(
            f"{name:14} {row['heldout_ce']:7.4f} {row['heldout_kl']:7.4f} {row['heldout_top1_agreement']:7.4f} "
            f"{row['gap_closed']:10.3f}"
        )


if __name__ == "__main__":
    main()
