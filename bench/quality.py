"""The quality ladder: every distillation mode from the same student start, data and order, with paired intervals.

    PYTHONPATH=$PWD .venv/bin/python bench/quality.py --smoke          # minutes: the ladder on a few problems
    PYTHONPATH=$PWD .venv/bin/python bench/quality.py [--seeds 0,1]    # the full ladder (GSM8K; see BENCHMARKS.md)

Teacher: the embedded SmolLM2-135M-Instruct. Student: --layers of its layers (embeddings, norm and head
copied), the same start for every row. Rows: CE-only (alpha 1), cached top-1 / top-4 / top-16 / top-64
(+ tail), RS-16 / RS-64 (random-sampling caches), hidden (a bf16 hidden-state cache: exact full-vocabulary
KD from the cache, which should land on online KD), online KD (teacher live, full vocabulary). Each row
trains on the same sequences in the same order (one --seed per pass over the ladder) for the same number
of steps; --alpha is the KD rows' CE weight (0: pure distillation).

Every student of a seed is scored by `kd compare`'s library on the same held-out sequences (a top-64 q64
cache of the test rows: KL over 64 ids + tail for every row, RS included), and each row gets, against
CE-only and against online KD, the paired difference of held-out CE, KL and top-1 agreement with a 95%
bootstrap interval over sequences, plus "gap closed" = (KL_ce − KL_row) / (KL_ce − KL_online) with a
joint bootstrap interval (1.0: the row reaches online KD's held-out KL). --generate N adds GSM8K-style
answer accuracy on N test problems (paired over problems). Steps are reused from bench/out/quality*/.

Top-1 and top-16 are cut from the top-64 pass (DERIVED below); each other cache is its own teacher pass.

Caveat: cached rows read their cache's record order, the online row its prepared --data; with
--shuffle-window larger than the data both are permutations of the same sequences by the same seed,
but not the same permutation.
"""

from __future__ import annotations

import argparse
import json
import statistics

from common import WORK, require_gsm8k, run_step, write_results

from kd.cache.replicate import replicate_cache
from kd.pipeline.evaluation.compare import CompareConfig, gap_closed_ci, score_models

LADDER = {
    "ce_only": ("top64", 1.0),
    "top1": ("top1", None),
    "top4": ("top4", None),
    "top16": ("top16", None),
    "top64": ("top64", None),
    "rs16": ("rs16", None),
    "rs64": ("rs64", None),
    "hidden": ("hidden", None),
    "online": (None, None),
}
"""Row -> (cache it trains from, alpha override); online KD trains with the teacher live."""
CACHES = {
    "top1": ["--top-k", "1"],
    "top4": ["--top-k", "4"],
    "top16": ["--top-k", "16"],
    "top64": ["--top-k", "64"],
    "rs16": ["--sampling", "rs", "--samples", "16"],
    "rs64": ["--sampling", "rs", "--samples", "64"],
    "hidden": ["--store", "hidden", "--hidden-encoding", "bf16"],
}
DERIVED = {"top1": ("top64", 1), "top16": ("top64", 16)}
"""Caches cut from a wider one without a teacher pass (kd.cache.replicate keep_top: the k most probable
cached ids, the rest of their mass into the tail; tests/test_keep_top.py checks it equals a --top-k pass)."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few generated problems, 2 steps per row")
    parser.add_argument("--seeds", default="0,1", help="one pass over the ladder per seed (data order)")
    parser.add_argument("--rows", default=",".join(LADDER), help="ladder rows to run")
    parser.add_argument("--train-rows", type=int, default=192, help="GSM8K train problems (one pass)")
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--max-seq-len", type=int, default=256, help="short sequences: more steps per CPU hour")
    parser.add_argument("--layers", default="0,29", help="teacher layers the student is cut from (2: cheap steps)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=3, help="3: 64 steps over 192 problems")
    parser.add_argument("--alpha", type=float, default=0.0, help="CE weight of the KD rows")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--generate", type=int, default=0, help="answer accuracy on N test problems")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    if args.smoke:
        args.train_rows, args.test_rows, args.max_seq_len, args.layers = 8, 4, 128, "0,29"
        args.max_steps, args.batch_size, args.bootstrap = 2, 4, 200
    return args


def data(args: argparse.Namespace, work) -> tuple[str, str]:
    if args.smoke:  # the demo's own problems: no GSM8K needed
        train, test = work / "train.jsonl", work / "test.jsonl"
        for path, count, seed in ((train, args.train_rows, 0), (test, args.test_rows, 1000)):
            run_step(["make-problems", "--count", str(count), "--seed", str(seed), "--out", str(path)], path)
        return str(train), str(test)
    gsm8k = require_gsm8k()
    return str(gsm8k / "train.jsonl"), str(gsm8k / "test.jsonl")


def main() -> None:
    args = parse_args()
    rows = [r for r in args.rows.split(",") if r]
    if unknown := set(rows) - set(LADDER):
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; choose from {','.join(LADDER)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = WORK / ("quality-smoke" if args.smoke else "quality")
    work.mkdir(parents=True, exist_ok=True)
    train, test = data(args, work)
    limit = ["--limit", str(args.train_rows), "--max-seq-len", str(args.max_seq_len)]
    needed = {LADDER[r][0] for r in rows} - {None}
    needed |= {DERIVED[n][0] for n in needed if n in DERIVED}
    for name in sorted(needed - set(DERIVED)):
        out = work / f"cache-{name}"
        run_step(["cache-logits", "--data", train, "--out", str(out), *limit, *CACHES[name]], out / "manifest.json")
    for name in sorted(needed & set(DERIVED)):
        source, k = DERIVED[name]
        out = work / f"cache-{name}"
        if not (out / "manifest.json").exists():
            print(f"derive {out} from cache-{source} (keep_top={k})", flush=True)
            replicate_cache(work / f"cache-{source}", out, keep_top=k)
    heldout = work / "cache-heldout"
    run_step(
        ["cache-logits", "--data", test, "--limit", str(args.test_rows), "--max-seq-len", str(args.max_seq_len),
         "--out", str(heldout), "--top-k", "64", "--value-encoding", "q64"],
        heldout / "manifest.json",
    )  # fmt: skip

    common = ["--student-from-teacher", "--layers", args.layers, "--epochs", str(args.epochs), "--batch-size",
              str(args.batch_size), "--learning-rate", str(args.learning_rate), "--warmup-steps", "3",
              "--max-seq-len", str(args.max_seq_len), "--dtype", "auto", "--log-every", "1",
              "--shuffle-window", "100000"]  # fmt: skip
    if args.max_steps:
        common += ["--max-steps", str(args.max_steps)]
    # students are reused by folder: the folder names the budget, so another budget trains afresh
    budget = (
        f"n{args.train_rows}-len{args.max_seq_len}-L{args.layers.replace(',', '_')}-ep{args.epochs:g}"
        f"-bs{args.batch_size}-lr{args.learning_rate:g}-a{args.alpha:g}-steps{args.max_steps or 'all'}"
    )
    per_seed = {}
    for seed in seeds:
        students = {}
        for row in rows:
            cache, alpha = LADDER[row]
            online = ["--teacher", "smollm2-135m-instruct", "--data", train, *limit]
            source = ["--from-cache", str(work / f"cache-{cache}")] if cache else online
            out = work / budget / f"seed{seed}" / f"student-{row}"
            run_step(
                ["train", *source, *common, "--seed", str(seed), "--alpha", str(args.alpha if alpha is None else alpha),
                 "--out", str(out)],
                out / "kd_training.json",
            )  # fmt: skip
            students[row] = str(out)
        cfg = CompareConfig(
            models=list(students.values()),
            cache=str(heldout),
            data=test if args.generate else None,
            generate=args.generate,
            bootstrap=args.bootstrap,
            seed=seed,
        )
        scores = score_models(cfg)
        index = {row: i for i, row in enumerate(students)}
        results = {}
        for row, i in index.items():
            entry = {key: scores.rows[i].get(key) for key in ("ce", "kl", "top1_agreement", "answer_accuracy")}
            for base in ("ce_only", "online"):
                if base in index and base != row:
                    vs = scores.against(i, index[base], args.bootstrap, seed)["metrics"]
                    entry[f"vs_{base}"] = {k: {f: v[f] for f in ("difference", "difference_ci", "verdict")}
                                           for k, v in vs.items()}  # fmt: skip
            if "ce_only" in index and "online" in index:
                kl = [(scores.per_sequence[j]["kl"], scores.per_sequence[j]["kl_tokens"])
                      for j in (index["ce_only"], i, index["online"])]  # fmt: skip
                entry["gap_closed"], entry["gap_closed_ci"] = gap_closed_ci(*kl, samples=args.bootstrap, seed=seed)
            results[row] = entry
        per_seed[seed] = results

    write_results("quality-smoke" if args.smoke else "quality", {"settings": vars(args), "seeds": per_seed})
    print(f"{'row':9} {'seed':>4} {'CE':>7} {'KL':>7} {'top1':>6}  {'KL − CE-only [95% paired]':>28}  gap closed")
    for seed, results in per_seed.items():
        for row, e in results.items():
            vs = e.get("vs_ce_only", {}).get("kl")
            lo, hi = vs["difference_ci"] if vs else (0.0, 0.0)
            diff = f"{vs['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]" if vs else ""
            gap = e.get("gap_closed")
            ci = e.get("gap_closed_ci")
            gap_text = f"{gap:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if gap is not None and ci else "–"
            print(f"{row:9} {seed:>4} {e['ce']:7.3f} {e['kl']:7.3f} {e['top1_agreement']:6.3f}  {diff:>28}  {gap_text}")
    if len(per_seed) > 1:
        order = [sorted(res, key=lambda r: res[r]["kl"]) for res in per_seed.values()]
        print("ranking by held-out KL per seed:", " | ".join(" < ".join(o) for o in order))
        spread = {r: statistics.pstdev(per_seed[s][r]["kl"] for s in per_seed) for r in rows}
        print("KL spread across seeds:", json.dumps({r: round(v, 4) for r, v in spread.items()}))


if __name__ == "__main__":
    main()
