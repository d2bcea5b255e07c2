"""`kd compare`: models scored on the same held-out sequences, each against the first, with paired intervals.

kd compare student-ce/ student-kd/ --cache heldout-cache/                     # CE, KL, top-1 agreement
kd compare base/ a/ b/ --data test.jsonl --teacher T/ --generate 50 --out cmp/ # live teacher; answer accuracy
kd compare ce/ kd/ --cache c/ --data test.jsonl --samples-at 0.1,0.7,1.2 --out cmp/  # samples side by side
kd compare ce/ kd/run/checkpoints/step-0000100 --cache c/ --json              # a checkpoint of `kd train`

Every flag is a field of kd.pipeline.evaluation.compare.CompareConfig (see kd/stages/options.py).
"""

from __future__ import annotations

import json

import typer
from rich.table import Table

from kd.pipeline.evaluation.compare import CompareConfig, compare_models, comparison_rows
from kd.pipeline.progress import console, log
from kd.stages.cache_logits import stdout_to_stderr
from kd.stages.options import CommonSwitches, config_command

STYLE = {"better": "green", "worse": "red", "within noise": "dim"}


def run(cfg: CompareConfig, switches: CommonSwitches) -> None:
    if switches.as_json:
        with stdout_to_stderr() as real_stdout:  # --json: stdout holds exactly one JSON object
            result = compare_models(cfg)
        real_stdout.write(json.dumps(result, indent=2) + "\n")
        real_stdout.close()
        return
    result = compare_models(cfg)
    held = result["held_out"]
    table = Table(
        title=f"kd compare: each model − {result['baseline']} on {held['sequences']} held-out sequences "
        "(95% paired bootstrap)"
    )
    for column in ("model", "metric", "baseline", "model", "difference", "95% interval", "verdict"):
        table.add_column(column)
    for row in comparison_rows(result):
        table.add_row(*row[:-1], f"[{STYLE[row[-1]]}]{row[-1]}[/]")
    console.print(table)
    if cfg.out:
        log(f"[green]wrote {cfg.out}/compare.md and compare.json[/green]")


def register(app: typer.Typer) -> None:
    config_command(
        app,
        "compare",
        CompareConfig,
        run,
        doc="Compare models with the first on the same held-out sequences: paired differences and verdicts.",
        json_help="Print the comparison as one JSON object on stdout.",
    )
