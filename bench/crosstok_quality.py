"""Held-out value of a teacher with another tokenizer, and of two teachers: paired against CE-only and each alone.

    PYTHONPATH=$PWD .venv/bin/python bench/crosstok_quality.py [--seeds 0,1]     # GSM8K; see BENCHMARKS.md

Direction: **Gemma-3-270M (262k SentencePiece) cache -> a SmolLM2-tokenizer student** (the issue allows
either; this one because a student's step cost is its head, and a 49k-id head is 5x cheaper on this
CPU than Gemma's 262k one, so every row gets the same 64 steps in minutes). The same student start for
every row: two of SmolLM2-135M-Instruct's 30 layers (0 and 29) with its embeddings, norm and head
(`--layers 0,29` of the quality ladder), saved once as an HF directory.

Corpus: the first --train-rows GSM8K train problems as plain text ("Question: ...\\nAnswer: ...", every
token a target), the same text for both teachers, so a same-tokenizer and a cross-tokenizer cache give
the student one sequence per problem (kd.pipeline.training.crosstok: a record's EOS becomes the
student's EOS). Caches: top-64 of SmolLM2-135M-Instruct and of Gemma-3-270M (Q4_K_M, converted by kd,
with its <bos>), --max-seq-len 512 so that neither tokenization truncates a problem.

Rows, each --max-steps-free one pass of --batch-size 3 at --alpha 0.5 (CE on every student target; the
divergence where a teacher has a row): CE-only (alpha 1), SmolLM2 (same tokenizer), Gemma
(--cross-tokenizer), both summed and both mixed (--teacher-mix sum|mixture, equal weights).

Held-out (the first --test-rows GSM8K test problems, same text format): `kd compare` scores every
student on a SmolLM2 top-64 cache (CE, KL to SmolLM2, top-1 agreement) and, with --cross-tokenizer, on
a Gemma-3 top-64 cache (KL and agreement on the aligned targets, coverage stated). Each row gets the
paired difference against CE-only and, for the two-teacher rows, against each teacher alone (95%
bootstrap over sequences). Students are kept under bench/out/crosstok-quality/<budget>/seed<S>.

Caveat: each cached row reads its own cache's record order (the plan of --seed over that cache's
layout); with --shuffle-window above the data both are permutations of the same problems by the same
seed, not necessarily the same permutation.
"""

from __future__ import annotations

import argparse
import json

from common import WORK, require_gsm8k, run_step, write_results

from kd.pipeline.evaluation.compare import CompareConfig, score_models

TEACHERS = {"smollm2": "smollm2-135m-instruct", "gemma": "gemma-3-270m"}
ROWS = {
    "ce_only": (["smollm2"], 1.0, []),
    "smollm2": (["smollm2"], None, []),
    "gemma": (["gemma"], None, ["--cross-tokenizer"]),
    "sum": (["smollm2", "gemma"], None, ["--cross-tokenizer", "--teacher-mix", "sum"]),
    "mixture": (["smollm2", "gemma"], None, ["--cross-tokenizer", "--teacher-mix", "mixture"]),
}
"""Row -> (caches it trains from, alpha override, extra flags)."""
BASELINES = {"sum": ("smollm2", "gemma"), "mixture": ("smollm2", "gemma", "sum")}
"""Two-teacher rows are also paired against these rows."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="one pass over the rows per seed (data order)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--train-rows", type=int, default=192)
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5, help="CE weight of the KD rows")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--bootstrap", type=int, default=1000)
    return parser.parse_args()


def write_text_corpus(source, out, rows: int) -> None:
    """GSM8K problems as plain text records: the same characters for every teacher's tokenizer."""
    if out.exists():
        return
    lines = source.read_text().splitlines()[:rows]
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for line in lines:
            record = json.loads(line)
            f.write(json.dumps({"text": f"Question: {record['question']}\nAnswer: {record['answer']}"}) + "\n")
    tmp.replace(out)


def initial_student(work) -> str:
    """Layers 0 and 29 of SmolLM2-135M-Instruct with its embeddings, norm, head and tokenizer (saved once)."""
    out = work / "student-init"
    if (out / "config.json").exists():
        return str(out)
    from kd.pipeline.models import load_tokenizer, resolve_model
    from kd.pipeline.training.students import build_student

    source = resolve_model(TEACHERS["smollm2"])
    model, _, _ = build_student(None, source, "0,29", "cpu")
    tmp = work / "student-init.tmp"
    model.save_pretrained(str(tmp), safe_serialization=True)
    load_tokenizer(source).save_pretrained(str(tmp))
    tmp.rename(out)
    return str(out)


def paired(scores, i: int, j: int, bootstrap: int, seed: int) -> dict:
    metrics = scores.against(i, j, bootstrap, seed)["metrics"]
    return {k: {f: v[f] for f in ("difference", "difference_ci", "verdict")} for k, v in metrics.items()}


def main() -> None:
    args = parse_args()
    rows = [r for r in args.rows.split(",") if r]
    gsm8k = require_gsm8k()
    work = WORK / "crosstok-quality"
    work.mkdir(parents=True, exist_ok=True)
    train, test = work / "train.jsonl", work / "test.jsonl"
    write_text_corpus(gsm8k / "train.jsonl", train, args.train_rows)
    write_text_corpus(gsm8k / "test.jsonl", test, args.test_rows)
    text = ["--data-format", "text", "--max-seq-len", "512", "--top-k", "64"]
    for name, teacher in TEACHERS.items():
        cache, heldout = work / f"cache-{name}", work / f"heldout-{name}"
        run_step(["cache-logits", "--teacher", teacher, "--data", str(train), *text, "--out", str(cache)],
                 cache / "manifest.json")  # fmt: skip
        run_step(["cache-logits", "--teacher", teacher, "--data", str(test), *text, "--value-encoding", "q64",
                  "--out", str(heldout)], heldout / "manifest.json")  # fmt: skip
    student = initial_student(work)
    budget = f"n{args.train_rows}-bs{args.batch_size}-lr{args.learning_rate:g}-a{args.alpha:g}"
    common = ["--student", student, "--epochs", "1", "--batch-size", str(args.batch_size), "--learning-rate",
              str(args.learning_rate), "--warmup-steps", "3", "--dtype", "auto", "--log-every", "1",
              "--shuffle-window", "100000"]  # fmt: skip
    per_seed = earlier_seeds(args)
    for seed in [int(s) for s in args.seeds.split(",")]:
        students = {}
        for row in rows:
            caches, alpha, extra = ROWS[row]
            out = work / budget / f"seed{seed}" / f"student-{row}"
            sources = [a for name in caches for a in ("--from-cache", str(work / f"cache-{name}"))]
            run_step(["train", *sources, *common, *extra, "--seed", str(seed), "--alpha",
                      str(args.alpha if alpha is None else alpha), "--out", str(out)],
                     out / "kd_training.json")  # fmt: skip
            students[row] = str(out)
        index = {row: i for i, row in enumerate(students)}
        results: dict = {row: {} for row in rows}
        for name in TEACHERS:
            cfg = CompareConfig(models=list(students.values()), cache=str(work / f"heldout-{name}"),
                                cross_tokenizer=name != "smollm2", bootstrap=args.bootstrap, seed=seed)  # fmt: skip
            scores = score_models(cfg)
            for row, i in index.items():
                entry = {k: scores.rows[i].get(k) for k in ("ce", "kl", "top1_agreement", "crosstok_target_coverage")}
                for base in ("ce_only", *BASELINES.get(row, ())):
                    if base in index and base != row:
                        entry[f"vs_{base}"] = paired(scores, i, index[base], args.bootstrap, seed)
                results[row][f"heldout_{name}"] = entry
        per_seed[seed] = results
        write_results("crosstok_quality", {"settings": vars(args), "seeds": per_seed})
    report(per_seed)


def earlier_seeds(args: argparse.Namespace) -> dict:
    """Seeds an earlier run of the same settings wrote to the results file (a later --seeds adds to them)."""
    from common import RESULTS

    path = RESULTS / "crosstok_quality.json"
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    same = {k: v for k, v in earlier.get("settings", {}).items() if k != "seeds"} == {
        k: v for k, v in vars(args).items() if k != "seeds"
    }
    return {int(seed): rows for seed, rows in earlier.get("seeds", {}).items()} if same else {}


def report(per_seed: dict) -> None:
    def diff(entry: dict, base: str, key: str) -> str:
        vs = entry.get(f"vs_{base}", {}).get(key)
        if not vs:
            return ""
        lo, hi = vs["difference_ci"]
        return f"{vs['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]"

    for seed, results in per_seed.items():
        for name in TEACHERS:
            print(f"\nseed {seed}, held-out cache of {name}")
            print(f"{'row':9} {'CE':>7} {'KL':>7} {'top1':>6}  {'CE − CE-only':>28}  {'KL − CE-only':>28}")
            for row, by_cache in results.items():
                e = by_cache[f"heldout_{name}"]
                print(f"{row:9} {e['ce']:7.4f} {e['kl']:7.4f} {e['top1_agreement']:6.3f}  "
                      f"{diff(e, 'ce_only', 'ce'):>28}  {diff(e, 'ce_only', 'kl'):>28}")  # fmt: skip
            for row, bases in BASELINES.items():
                if row in results:
                    e = results[row][f"heldout_{name}"]
                    for base in bases:
                        if f"vs_{base}" in e:
                            print(f"  {row} − {base}: CE {diff(e, base, 'ce')}  KL {diff(e, base, 'kl')}")


if __name__ == "__main__":
    main()
