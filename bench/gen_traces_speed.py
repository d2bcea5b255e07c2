"""gen-traces: generated tokens/s of the vllm engine against the transformers engine (issue 4).

    .venv/bin/python bench/gen_traces_speed.py [--prompts 32] [--n 4] [--max-new-tokens 256]

Both engines run the embedded SmolLM2-135M-Instruct teacher on the same first --prompts GSM8K
train problems with the R1 defaults (temperature 0.6, top-p 0.95) and --n samples each, through
the real `kd gen-traces` command. Tokens/s counts generated tokens over generation time (model
loading excluded, as `kd gen-traces --json` reports it); accepted/min counts samples whose final
answer verified correct per minute of generation.

Then the traces are used the way the issue's done-check asks: `kd train --data` runs reasoning
SFT (CE only, --tag-weight on the think tags) for --train-steps steps on the accepted traces of the
engine that accepted the most, in a student cut from the teacher, and the losses are recorded.
"""

from __future__ import annotations

import argparse
import json

from common import WORK, require_gsm8k, run_step, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--train-steps", type=int, default=4, help="SFT steps on the accepted traces (0: skip).")
    args = parser.parse_args()
    gsm8k = require_gsm8k()
    work = WORK / f"gen-traces-{args.prompts}x{args.n}-{args.max_new_tokens}"
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for engine in args.engines.split(","):
        summary = work / f"{engine}.summary.json"
        run_step(
            [
                "gen-traces",
                "--engine",
                engine,
                "--prompts",
                str(gsm8k / "train.jsonl"),
                "--limit",
                str(args.prompts),
                "--n",
                str(args.n),
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--out",
                str(work / f"{engine}.jsonl"),
                "--filter",
                "correct",
                "--json",
            ],
            summary,
            work / f"{engine}.log",
        )
        results[engine] = json.loads(summary.read_text())
    table = {
        engine: {
            k: r.get(k)
            for k in (
                "samples",
                "generated_tokens",
                "seconds",
                "tokens_per_second",
                "correct_share",
                "accepted",
                "accepted_per_minute",
                "truncated",
                "mean_completion_tokens",
            )
        }
        for engine, r in results.items()
    }
    payload = {"settings": vars(args), "engines": table}
    if "vllm" in table and "transformers" in table:
        payload["ratio_vllm_to_transformers"] = (
            table["vllm"]["tokens_per_second"] / table["transformers"]["tokens_per_second"]
        )
    if args.train_steps:
        payload["sft_on_traces"] = train_on_traces(work, results, args.train_steps)
    write_results("gen_traces_speed", payload)
    print(json.dumps(payload, indent=1))


def train_on_traces(work, results: dict, steps: int) -> dict:
    """`kd train --data` (reasoning SFT) on the accepted traces of the engine that accepted the most."""
    engine = max(results, key=lambda e: results[e].get("accepted") or 0)
    if not results[engine].get("accepted"):
        return {"skipped": "no engine accepted any trace"}
    traces = work / f"{engine}.jsonl"
    out = work / f"sft-{engine}"
    metrics = out / "final.json"
    run_step(
        [
            "train",
            "--data",
            str(traces),
            "--teacher",
            "smollm2-135m-instruct",
            "--student-from-teacher",
            "--layers",
            "even:8",
            "--alpha",
            "1",
            "--tag-weight",
            "10",
            "--max-steps",
            str(steps),
            "--batch-size",
            str(min(2, results[engine]["accepted"])),
            "--log-every",
            "1",
            "--out",
            str(out),
            "--json",
        ],
        metrics,
        work / f"sft-{engine}.log",
    )
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [row["loss"] for row in logged if "loss" in row]
    return {
        "engine": engine,
        "traces": results[engine]["accepted"],
        "steps": steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "student_saved": any(out.glob("*.safetensors")),
    }


if __name__ == "__main__":
    main()
