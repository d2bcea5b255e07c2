"""`kd gen-traces`: sample R1-style reasoning traces from a teacher, verify them, write SFT data.

kd gen-traces --prompts problems.jsonl --out traces.jsonl                       # embedded SmolLM2, auto engine
kd gen-traces --teacher Qwen2.5-7B-Instruct/ --prompts gsm8k.jsonl --out t.jsonl --engine vllm --n 8
kd gen-traces --engine openai --base-url http://127.0.0.1:8000/v1 --prompts p.jsonl --out t.jsonl
kd gen-traces ... --filter pass-rate:0.25-0.75    # keep correct traces of problems neither too easy nor too hard
kd gen-traces ... --decontaminate heldout.jsonl   # drop prompts sharing 8 words in a row with a held-out set

Rerunning the same command resumes a killed run; --filter/--verify may change between runs.
Every flag is a field of kd.pipeline.traces.TracesConfig (see kd/stages/options.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from kd.errors import KdError
from kd.pipeline.engines.generation import DEFAULT_TEMPLATE
from kd.pipeline.progress import log
from kd.pipeline.traces.run import TracesConfig, run_gen_traces
from kd.stages.options import CommonSwitches, config_command


def read_template(value: str | None) -> str:
    """--template is either the template text (with {question}) or the path of a file holding it."""
    if value is None:
        return DEFAULT_TEMPLATE
    if "{question}" not in value:
        path = Path(value).expanduser()
        if path.is_file():
            try:
                value = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise KdError(f"--template {path}: cannot read it ({exc})") from exc
            if "{question}" not in value:
                raise KdError(f"--template {path}: the file must contain the placeholder {{question}}")
            return value
        raise KdError(f"--template {value}: neither a file nor a template with the placeholder {{question}}")
    return value


def _prepare(values: dict[str, Any], given: set[str]) -> dict[str, Any]:
    return {**values, "template": read_template(values["template"])}


def run(cfg: TracesConfig, switches: CommonSwitches) -> None:
    summary = run_gen_traces(cfg)
    if switches.as_json:
        typer.echo(json.dumps(summary))
        return
    correct = summary["correct_share"]
    rate = summary["tokens_per_second"]
    log(
        f"[green]{summary['accepted']} of {summary['samples']} samples kept ({summary['prompts']} prompts"
        + (f", {summary['decontaminated']} dropped by --decontaminate" if summary["decontaminated"] else "")
        + f"; {summary['truncated']} truncated, {summary['duplicates']} duplicates"
        + (f", {correct:.1%} correct" if correct is not None else "")
        + (f"; {summary['generated_tokens']:,} tokens at {rate:,.1f} tok/s" if rate else "")
        + f"): {summary['out']}[/green]"
    )


def register(app: typer.Typer) -> None:
    config_command(
        app,
        "gen-traces",
        TracesConfig,
        run,
        doc="Sample <think>...</think> reasoning traces, verify the answers, and write them as SFT data.",
        prepare=_prepare,
    )
