"""gen-traces: generated tokens/s of the vllm engine against the transformers engine (issue 4).

    .venv/bin/python bench/gen_traces_speed.py [--prompts 32] [--n 4] [--max-new-tokens 256]

Both engines run the embedded SmolLM2-135M-Instruct teacher on the same first --prompts GSM8K
train problems with the R1 defaults (temperature 0.6, top-p 0.95) and --n samples each, through
the real `kd gen-traces` command. Tokens/s counts generated tokens over generation time (model
loading excluded, as `kd gen-traces --json` reports it); accepted/min counts samples whose final
answer verified correct per minute of generation.
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
    write_results("gen_traces_speed", payload)
    print(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
