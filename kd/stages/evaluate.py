"""`kd eval`: measure any student (or the teacher) on held-out data.

kd eval --model student/ --cache heldout-cache/ --json          # CE, KL to teacher, top-1 agreement, ECE
kd eval --model student/ --data test.jsonl --teacher T/         # same, teacher run live (top-k 64)
kd eval --model student/ --data test.jsonl --generate 50        # + answer accuracy and generation tok/s
kd eval --model student/ --teacher T/ --on-policy-prompts test.jsonl   # teacher-judged reverse KL of its own answers
"""

from __future__ import annotations

import json

import typer
from rich.table import Table

from kd.pipeline.evaluation.model_eval import EvalConfig, evaluate_model
from kd.pipeline.progress import console
from kd.stages.cache_logits import stdout_to_stderr
from kd.stages.options import CommonSwitches, config_command


def run(cfg: EvalConfig, switches: CommonSwitches) -> None:
    if switches.as_json:
        # vLLM (an --on-policy-prompts engine) logs to stdout; --json's stdout holds only the metrics.
        with stdout_to_stderr() as real_stdout:
            metrics = evaluate_model(cfg)
        real_stdout.write(json.dumps(metrics, indent=2) + "\n")
        real_stdout.close()
        return
    metrics = evaluate_model(cfg)
    table = Table(title=f"kd eval {cfg.model}", show_header=False)
    for key, value in metrics.items():
        if isinstance(value, list):
            value = "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def register(app: typer.Typer) -> None:
    config_command(
        app,
        "eval",
        EvalConfig,
        run,
        doc="Held-out CE, KL to the teacher, top-1 agreement, calibration, size; optionally answer accuracy.",
        json_help="Print the metrics as JSON on stdout.",
    )
