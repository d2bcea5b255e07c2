"""`kd demo`: the whole distillation on the embedded teacher, with a report; `kd make-problems`.

kd demo                                   # writes demo-out/report.md (about 11 min on 2 idle CPU cores)
kd demo --teacher my-model/ --train-problems 500 --layers 0,4,8,12 --out my-demo
"""

from __future__ import annotations

import typer

from kd.pipeline.demo import DemoConfig, run_demo
from kd.pipeline.progress import log


def register(app: typer.Typer) -> None:
    defaults = DemoConfig()

    @app.command("demo")
    def demo(
        out: str = typer.Option(defaults.out, "--out", help="Directory for every artefact and report.md."),
        teacher: str = typer.Option(None, "--teacher", help="Teacher [default: embedded SmolLM2-135M-Instruct]."),
        train_problems: int = typer.Option(
            defaults.train_problems, "--train-problems", help="Generated training prompts."
        ),
        eval_problems: int = typer.Option(defaults.eval_problems, "--eval-problems", help="Held-out prompts."),
        samples: int = typer.Option(defaults.samples, "--samples", help="Teacher traces per training prompt."),
        max_new_tokens: int = typer.Option(
            defaults.max_new_tokens, "--max-new-tokens", help="Tokens per trace/answer."
        ),
        layers: str = typer.Option(defaults.layers, "--layers", help="Teacher layers the students keep (e.g. even:8)."),
        top_k: int = typer.Option(defaults.top_k, "--top-k", help="Cached top-k."),
        epochs: float = typer.Option(defaults.epochs, "--epochs", help="Training budget of each student."),
        batch_size: int = typer.Option(defaults.batch_size, "--batch-size", help="Training batch size."),
        learning_rate: float = typer.Option(defaults.learning_rate, "--learning-rate", help="Peak learning rate."),
        alpha: float = typer.Option(defaults.alpha, "--alpha", help="CE weight of the KD student."),
        temperature: float = typer.Option(defaults.temperature, "--temperature", help="Distillation temperature."),
        dtype: str = typer.Option(
            defaults.dtype,
            "--dtype",
            help="Students' training dtype: auto (bf16 on CUDA, fp32 on CPU), bfloat16 or float32.",
        ),
        engine: str = typer.Option(defaults.engine, "--engine", help="gen-traces engine: auto, vllm or transformers."),
        seed: int = typer.Option(defaults.seed, "--seed", help="Seed of prompts, sampling and training."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Distil the teacher into two students (cached KD vs CE-only) and report what KD bought."""
        cfg = DemoConfig(
            out=out,
            teacher=teacher,
            train_problems=train_problems,
            eval_problems=eval_problems,
            samples=samples,
            max_new_tokens=max_new_tokens,
            layers=layers,
            top_k=top_k,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            alpha=alpha,
            temperature=temperature,
            dtype=dtype,
            engine=engine,
            seed=seed,
        )
        report = run_demo(cfg)
        log(f"[green bold]report: {report}[/green bold]")

    @app.command("make-problems")
    def make_problems_command(
        out: str = typer.Option(..., "--out", help="JSONL file to write (GSM8K-shaped records)."),
        count: int = typer.Option(64, "--count", help="Number of problems."),
        seed: int = typer.Option(0, "--seed", help="Same seed, same problems."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Write arithmetic word problems with known answers (the demo's own data)."""
        from pathlib import Path

        from kd.pipeline.problems import write_problems

        write_problems(Path(out), count, seed)
        log(f"wrote {count} problems to {out}")
