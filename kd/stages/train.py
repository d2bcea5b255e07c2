"""`kd train`: stage two (from a cache), online KD (live teacher), or (reasoning) SFT.

kd train --from-cache cache/ --student-from-teacher --layers even:8 --out student/
kd train --teacher T/ --data train.jsonl --student S/ --out student/            # online KD
kd train --data traces.jsonl --student S/ --out student/ --tag-weight 10       # reasoning SFT
kd train --config student/config.yaml                                          # rerun a training exactly
torchrun --nproc-per-node 8 -m kd.cli train --from-cache cache/ --student S/ --out student/

Every flag is a field of kd.pipeline.training.config.TrainConfig (see kd/stages/options.py).
"""

from __future__ import annotations

import json

import typer

from kd.pipeline.progress import log
from kd.pipeline.training.trainer import TrainConfig, train
from kd.stages.options import CommonSwitches, config_command, write_config


def run(cfg: TrainConfig, switches: CommonSwitches) -> None:
    cfg.loss_config()  # validate --alpha/--temperature/--divergence before loading anything
    # config.yaml is written (by rank 0) only once every check has passed and training starts,
    # so a refused run leaves no settings behind in --out.
    summary = train(cfg, on_start=lambda: write_config(cfg.out, cfg))
    if switches.as_json:
        typer.echo(json.dumps(summary))
    else:
        log(f"[green]student saved to {summary['out']} after {summary['steps']} steps[/green]")


def register(app: typer.Typer) -> None:
    config_command(
        app,
        "train",
        TrainConfig,
        run,
        doc="Train a student: from a logit cache (stage two), with a live teacher (online KD), or plain SFT.",
        json_help="Print the final metrics as JSON on stdout.",
    )
