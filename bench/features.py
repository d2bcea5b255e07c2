"""Feature distillation on/off at equal steps: the quality ladder's hidden row, with and without --feature-loss.

    PYTHONPATH=$PWD .venv/bin/python bench/features.py [--heldout CACHE] [--feature-loss cosine --feature-weight 1]
    PYTHONPATH=$PWD .venv/bin/python bench/features.py --smoke        # a few made-up problems, 2 steps per row

Teacher: the embedded SmolLM2-135M-Instruct (30 layers, d = 576). One teacher pass writes a bf16 hidden
cache with --hidden-layers (default 14,29). Both students are the ladder's 2-layer cut (teacher layers
0 and 29), trained from that cache with the same seed, data order and steps (α = 0: pure hidden-cache
KD); the second adds the feature loss (default map: teacher 14 -> student 0, 29 -> 1). Both are scored
by `kd compare`'s library on the held-out top-64 q64 cache (made here, or --heldout to reuse the
ladder's), with the paired difference (features − plain) and its 95% bootstrap interval over sequences.
"""

from __future__ import annotations

import argparse

from common import WORK, run_step, write_results
from quality import data

from kd.pipeline.evaluation.compare import CompareConfig, score_models


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--train-rows", type=int, default=192)
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--hidden-layers", default="14,29")
    parser.add_argument("--feature-loss", default="cosine")
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--feature-map", default=None)
    parser.add_argument("--heldout", default=None, help="an existing held-out top-64 cache of the same test rows")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    if args.smoke:
        args.train_rows, args.test_rows, args.max_seq_len, args.max_steps, args.bootstrap = 8, 4, 128, 2, 200
    return args


def main() -> None:
    args = parse_args()
    work = WORK / ("features-smoke" if args.smoke else "features")
    work.mkdir(parents=True, exist_ok=True)
    train, test = data(args, work)
    cache = work / "cache-hidden-layers"
    run_step(
        ["cache-logits", "--data", train, "--limit", str(args.train_rows), "--max-seq-len", str(args.max_seq_len),
         "--out", str(cache), "--store", "hidden", "--hidden-encoding", "bf16", "--hidden-layers", args.hidden_layers],
        cache / "manifest.json",
    )  # fmt: skip
    heldout = args.heldout or str(work / "cache-heldout")
    if not args.heldout:
        run_step(
            ["cache-logits", "--data", test, "--limit", str(args.test_rows), "--max-seq-len", str(args.max_seq_len),
             "--out", heldout, "--top-k", "64", "--value-encoding", "q64"],
            work / "cache-heldout" / "manifest.json",
        )  # fmt: skip
    # The quality ladder's settings (bench/quality.py), α = 0.
    common = ["--from-cache", str(cache), "--student-from-teacher", "--layers", "0,29", "--batch-size", "6",
              "--learning-rate", "5e-4", "--warmup-steps", "3", "--dtype", "auto", "--log-every", "1",
              "--shuffle-window", "100000", "--alpha", "0", "--seed", str(args.seed)]  # fmt: skip
    if args.max_steps:
        common += ["--max-steps", str(args.max_steps)]
    features = ["--feature-loss", args.feature_loss, "--feature-weight", str(args.feature_weight)]
    features += ["--feature-map", args.feature_map] if args.feature_map else []
    label = f"hidden+{args.feature_loss}-w{args.feature_weight:g}" + (
        f"-map{args.feature_map}" if args.feature_map else ""
    )
    students, seconds = {}, {}
    for row, extra in (("hidden", []), (label, features)):
        out = work / f"seed{args.seed}" / f"student-{row}"
        seconds[row] = run_step(["train", *common, *extra, "--out", str(out)], out / "kd_training.json")
        students[row] = str(out)

    scores = score_models(CompareConfig(models=list(students.values()), cache=heldout, bootstrap=args.bootstrap))
    vs = scores.against(1, 0, args.bootstrap, args.seed)["metrics"]
    results = {
        row: {key: scores.rows[i].get(key) for key in ("ce", "kl", "top1_agreement")} | {"train_seconds": seconds[row]}
        for i, row in enumerate(students)
    }
    results[label]["vs_hidden"] = {
        k: {f: v[f] for f in ("difference", "difference_ci", "verdict")} for k, v in vs.items()
    }
    name = "features-smoke" if args.smoke else "features" if label == "hidden+cosine-w1" else f"features-{label[7:]}"
    write_results(name, {"settings": vars(args), "rows": results})
    print(f"{'row':24} {'CE':>7} {'KL':>7} {'top1':>6} {'train s':>8}")
    for row, e in results.items():
        print(f"{row:24} {e['ce']:7.3f} {e['kl']:7.3f} {e['top1_agreement']:6.3f} {e['train_seconds']:8.1f}")
    for metric, v in vs.items():
        lo, hi = v["difference_ci"]
        print(f"features − plain, {metric}: {v['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}] ({v['verdict']})")


if __name__ == "__main__":
    main()
