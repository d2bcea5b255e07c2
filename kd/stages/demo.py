"""`kd demo`: the whole distillation on the embedded teacher, with a report; `kd make-problems`.

kd demo                                   # writes demo-out/report.md (about 11 min on 2 idle CPU cores)
kd demo --teacher my-model/ --train-problems 500 --layers 0,4,8,12 --out my-demo
"""

from __future__ import annotations

import typer

from kd.pipeline.evaluation.demo import DemoConfig, run_demo
from kd.pipeline.progress import log
from kd.stages.options import CommonSwitches, config_command, write_config


def run(cfg: DemoConfig, _: CommonSwitches) -> None:
    write_config(cfg.out, cfg)
    log(f"[green bold]report: {run_demo(cfg)}[/green bold]")


def register(app: typer.Typer) -> None:
    config_command(
        app,
        "demo",
        DemoConfig,
        run,
        doc="Distil the teacher into two students (cached KD vs CE-only) and report what KD bought.",
    )

    @app.command("make-problems")
    def make_problems_command(
        out: str = typer.Option(..., "--out", help="JSONL file to write (GSM8K-shaped records)."),
        count: int = typer.Option(64, "--count", help="Number of problems."),
        seed: int = typer.Option(0, "--seed", help="Same seed, same problems."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Write arithmetic word problems with known answers (the demo's own data)."""
        from pathlib import Path

        from kd.pipeline.traces.problems import write_problems

        write_problems(Path(out), count, seed)
        log(f"wrote {count} problems to {out}")
