"""On-policy against off-policy distillation at an equal budget of teacher-scored tokens (issue 12).

    .venv/bin/python bench/on_policy.py            # about 25 minutes on a 2-core CPU

Teacher: the embedded SmolLM2-135M-Instruct. Student: 8 of its 30 layers (`--student-from-teacher
--layers even:8`), first given one short off-policy warm start (cached KD on the teacher's top-64 over
GSM8K reference solutions of the first --warm-rows train problems), shared by every arm. Then, from
that warm start, with the same optimizer settings and the same number of optimizer steps:

* (a) off-policy: `kd gen-traces` (the teacher answers train problems, same template, temperature and
  --max-new-tokens as the students; its ledger keeps cut samples too, and they are used, as the
  on-policy arm uses the student's) -> `kd cache-logits` over those samples, cut to the same number of
  teacher-scored target tokens as (b) -> `kd train --from-cache` (forward KL, the usual off-policy choice);
* (b) on-policy: `kd on-policy` for --rounds rounds (reverse KL, its default); its caches hold the
  budget B of teacher-scored tokens that (a) and (c) are matched to;
* (c) half of each: (a)'s recipe on B/2 tokens and half the steps, then `kd on-policy` for half the rounds.

Held out (GSM8K test, first --test-rows problems): `kd eval --on-policy-prompts` gives the teacher-judged
reverse KL of each student's own greedy and sampled answers (95% bootstrap interval over prompts, and
a paired interval for each arm's difference from (a)) and their answer accuracy; `kd eval --cache`
on the teacher's top-64 over the reference solutions gives forward KL, CE and top-1 agreement.
Wall time per arm counts generation, scoring and training. Steps are reused from bench/out/on_policy/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import WORK, require_gsm8k, run_step, write_results

from kd.pipeline.onpolicy.judge import paired_difference_ci


def subset(source: Path, out: Path, start: int, count: int) -> Path:
    """Rows [start, start + count) of a JSONL file (bench/out is outside version control)."""
    if not out.is_file():
        rows = source.read_text().splitlines()[start : start + count]
        out.write_text("".join(row + "\n" for row in rows))
    return out


class Clock:
    """Wall seconds per step, kept in times.json so a rerun that reuses steps still reports them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, name: str, args: list[str], done: Path, log: Path) -> float:
        seconds = run_step(args, done, log)
        if seconds:
            self.times[name] = seconds
            self.path.write_text(json.dumps(self.times, indent=2) + "\n")
        return self.times.get(name, 0.0)


def cache_targets(cache: Path) -> int:
    return sum(int(s["targets"]) for s in json.loads((cache / "manifest.json").read_text())["shards"])


def budget_cut(ledger: Path, prompts: Path, out: Path, tokens: int) -> tuple[Path, int]:
    """The teacher's first samples (gen-traces' ledger, truncated ones included, as in the on-policy arm)
    holding `tokens` sampled tokens, as prompt/completion records rendered with the same template."""
    from kd.pipeline.engines.generation import build_messages
    from kd.pipeline.traces.run import load_prompts

    questions = {p.id: p.question for p in load_prompts(str(prompts))}
    entries = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
    entries.sort(key=lambda e: (int(e["prompt_id"]), e["sample"]))
    kept, total = [], 0
    for entry in entries:
        if total >= tokens:
            break
        messages = build_messages(questions[entry["prompt_id"]])
        completion = [{"role": "assistant", "content": entry["text"]}]
        kept.append(json.dumps({"prompt": messages, "completion": completion}))
        # The chat template closes a cut sample with an end-of-turn token: one more target.
        total += int(entry["completion_tokens"]) + (entry["finish_reason"] == "length")
    if total < tokens:
        raise SystemExit(f"{ledger}: only {total} teacher tokens for a budget of {tokens}; raise --trace-prompts")
    out.write_text("".join(line + "\n" for line in kept))
    return out, len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-rows", type=int, default=64, help="train problems of the shared warm start")
    parser.add_argument("--warm-steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompts-per-round", type=int, default=12)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--trace-prompts", type=int, default=112, help="train problems the teacher answers for (a)")
    parser.add_argument("--test-rows", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--engine", default="vllm", help="sampling engine (students and teacher traces)")
    args = parser.parse_args()
    gsm8k = require_gsm8k()
    work = WORK / "on_policy"
    work.mkdir(parents=True, exist_ok=True)
    clock = Clock(work / "times.json")
    train_file = gsm8k / "train.jsonl"
    warm_data = subset(train_file, work / "warm.jsonl", 0, args.warm_rows)
    pool = subset(train_file, work / "pool.jsonl", args.warm_rows, max(args.trace_prompts, 400))
    test = subset(gsm8k / "test.jsonl", work / "test.jsonl", 0, args.test_rows)
    steps_per_round = args.prompts_per_round * args.samples // args.batch_size
    total_steps = steps_per_round * args.rounds
    optim = ["--batch-size", str(args.batch_size), "--lr", str(args.learning_rate), "--seed", "0"]

    # The shared warm start: cached KD on reference solutions (not counted in any arm's budget).
    warm_cache, warm = work / "warm-cache", work / "warm-student"
    clock.run("warm_cache", ["cache-logits", "--data", str(warm_data), "--out", str(warm_cache)],
              warm_cache / "manifest.json", work / "warm-cache.log")  # fmt: skip
    clock.run(
        "warm_train",
        ["train", "--from-cache", str(warm_cache), "--student-from-teacher", "--layers", "even:8", "--out", str(warm),
         "--max-steps", str(args.warm_steps), "--alpha", "0.5", *optim, "--lr", "5e-4"],
        warm / "kd_training.json", work / "warm-train.log",
    )  # fmt: skip

    def on_policy(name: str, student: Path, rounds: int) -> Path:
        out = work / name
        clock.run(
            name,
            ["on-policy", "--student", str(student), "--prompts", str(pool), "--out", str(out),
             "--rounds", str(rounds), "--prompts-per-round", str(args.prompts_per_round),
             "--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens),
             "--engine", args.engine, "--teacher-engine", "transformers", "--steps-per-round", str(steps_per_round),
             *optim, "--json"],
            work / f"{name}.json", work / f"{name}.log",
        )  # fmt: skip
        return out

    # (b) on-policy rounds; their caches set the budget.
    on = on_policy("b-on-policy", warm, args.rounds)
    budget = sum(cache_targets(on / f"round-{r:03d}" / "cache") for r in range(args.rounds))

    # (a) off-policy: teacher traces, cut to the budget, cached, trained for as many steps.
    traces, ledger = work / "traces.jsonl", work / "traces.raw.jsonl"
    clock.run(
        "a_traces",
        ["gen-traces", "--prompts", str(pool), "--limit", str(args.trace_prompts), "--out", str(traces), "--n", "1",
         "--filter", "all", "--temperature", "1.0", "--top-p", "1.0",
         "--max-new-tokens", str(args.max_new_tokens), "--engine", args.engine, "--json"],
        work / "traces.summary.json", work / "traces.log",
    )  # fmt: skip

    def off_policy(name: str, tokens: int, steps: int) -> Path:
        corpus, rows = budget_cut(ledger, pool, work / f"{name}-traces.jsonl", tokens)
        cache, out = work / f"{name}-cache", work / name
        clock.run(f"{name}_cache", ["cache-logits", "--data", str(corpus), "--out", str(cache)],
                  cache / "manifest.json", work / f"{name}-cache.log")  # fmt: skip
        clock.run(
            f"{name}_train",
            ["train", "--from-cache", str(cache), "--student", str(warm), "--out", str(out), "--alpha", "0",
             "--max-steps", str(steps), *optim],
            out / "kd_training.json", work / f"{name}-train.log",
        )  # fmt: skip
        return out

    off = off_policy("a-off-policy", budget, total_steps)
    half_rounds = max(1, args.rounds // 2)
    half_budget = sum(cache_targets(on / f"round-{r:03d}" / "cache") for r in range(half_rounds))
    half = off_policy("c-off-half", budget - half_budget, total_steps - half_rounds * steps_per_round)
    mixed = on_policy("c-then-on-policy", half, half_rounds)

    # Held out: the reference solutions' teacher cache, and each student's own answers.
    test_cache = work / "test-cache"
    clock.run("test_cache", ["cache-logits", "--data", str(test), "--out", str(test_cache), "--value-encoding",
                             "float32"], test_cache / "manifest.json", work / "test-cache.log")  # fmt: skip
    students = {
        "warm start": warm,
        "(a) off-policy": off,
        "(b) on-policy": on / "student",
        "(c) half + half": mixed / "student",
    }
    results: dict[str, dict] = {}
    for label, model in students.items():
        key = label.split()[0].strip("()").replace(" ", "-")
        row: dict = {}
        reference = work / f"eval-{key}-reference.json"
        clock.run(f"eval_{key}_reference", ["eval", "--model", str(model), "--cache", str(test_cache), "--json"],
                  reference, work / f"eval-{key}-reference.log")  # fmt: skip
        ref = json.loads(reference.read_text())
        row.update({f"reference_{k}": ref.get(k) for k in ("kl", "kl_ci", "ce", "ce_ci", "top1_agreement")})
        for mode, temperature in (("greedy", "0"), ("sampled", "1.0")):
            report = work / f"eval-{key}-{mode}.json"
            kept = work / f"eval-{key}-{mode}"
            clock.run(
                f"eval_{key}_{mode}",
                ["eval", "--model", str(model), "--on-policy-prompts", str(test), "--temperature", temperature,
                 "--max-new-tokens", str(args.max_new_tokens), "--engine", args.engine, "--on-policy-out", str(kept),
                 "--json"],
                report, work / f"eval-{key}-{mode}.log",
            )  # fmt: skip
            measured = json.loads(report.read_text())
            for name in ("reverse_kl", "reverse_kl_ci", "teacher_logprob", "answer_accuracy", "sample_tokens",
                         "truncated_share", "tokens_as_sampled_share"):  # fmt: skip
                row[f"{mode}_{name}"] = measured.get(f"on_policy_{name}")
            row[f"{mode}_per_prompt"] = str(kept / "per_prompt.json")
        results[label] = row

    base = "(a) off-policy"
    for label, row in results.items():
        for mode in ("greedy", "sampled"):
            if label != base:
                mine = json.loads(Path(row[f"{mode}_per_prompt"]).read_text())
                theirs = json.loads(Path(results[base][f"{mode}_per_prompt"]).read_text())
                paired = paired_difference_ci(mine, theirs)
                row[f"{mode}_reverse_kl_minus_a"] = paired["difference"]
                row[f"{mode}_reverse_kl_minus_a_ci"] = paired["difference_ci"]
    times = clock.times
    wall = {
        "warm start": times.get("warm_cache", 0) + times.get("warm_train", 0),
        "(a) off-policy": times.get("a_traces", 0) + times.get("a-off-policy_cache", 0)
        + times.get("a-off-policy_train", 0),
        "(b) on-policy": times.get("b-on-policy", 0),
        "(c) half + half": times.get("a_traces", 0) / 2 + times.get("c-off-half_cache", 0)
        + times.get("c-off-half_train", 0) + times.get("c-then-on-policy", 0),
    }  # fmt: skip
    for label in results:
        results[label]["wall_seconds"] = wall[label]
    on_rounds = [json.loads(line) for line in (on / "metrics.jsonl").read_text().splitlines() if line.strip()]
    payload = {
        "settings": vars(args),
        "budget_target_tokens": budget,
        "steps": total_steps,
        "off_policy_rows": budget_cut(ledger, pool, work / "a-off-policy-traces.jsonl", budget)[1],
        "scored_tokens": {
            "(a) off-policy": cache_targets(work / "a-off-policy-cache"),
            "(b) on-policy": budget,
            "(c) half + half": cache_targets(work / "c-off-half-cache")
            + sum(cache_targets(mixed / f"round-{r:03d}" / "cache") for r in range(half_rounds)),
        },
        "on_policy_rounds": on_rounds,
        "times": times,
        "students": results,
        "stamp": time.strftime("%Y-%m-%d %H:%M"),
    }
    write_results("on_policy", payload)
    print(f"budget {budget} teacher-scored tokens, {total_steps} steps per arm")
    header = ("student", "greedy rKL", "sampled rKL", "ref KL", "CE", "top1", "acc", "wall s")
    print("{:18} {:>22} {:>22} {:>7} {:>6} {:>6} {:>5} {:>7}".format(*header))
    for label, row in results.items():
        g, s = (
            f"{row[f'{m}_reverse_kl']:.3f} [{row[f'{m}_reverse_kl_ci'][0]:.3f}, {row[f'{m}_reverse_kl_ci'][1]:.3f}]"
            for m in ("greedy", "sampled")
        )
        print(
            f"{label:18} {g:>22} {s:>22} {row['reference_kl']:7.3f} {row['reference_ce']:6.3f} "
            f"{row['reference_top1_agreement']:6.3f} {row['greedy_answer_accuracy']:5.2f} {row['wall_seconds']:7.0f}"
        )


if __name__ == "__main__":
    main()
