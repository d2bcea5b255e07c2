"""`kd eval`: measure any student (or the teacher) on held-out data.

kd eval --model student/ --cache heldout-cache/ --json          # CE, KL to teacher, top-1 agreement, ECE
kd eval --model student/ --data test.jsonl --teacher T/         # same, teacher run live (top-k 64)
kd eval --model student/ --data test.jsonl --generate 50        # + answer accuracy and generation tok/s
"""

from __future__ import annotations

import json

import typer
from rich.table import Table

from kd.pipeline.errors import KdError
from kd.pipeline.progress import console


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        model: str = typer.Option(..., "--model", help="Model to evaluate: HF dir or .gguf (a student, or a teacher)."),
        data: str = typer.Option(None, "--data", help="Held-out corpus (any kd data format)."),
        cache: str = typer.Option(
            None, "--cache", help="Held-out cache from `kd cache-logits` (gives teacher metrics)."
        ),
        teacher: str = typer.Option(None, "--teacher", help="Teacher run live over --data for KL and agreement."),
        data_format: str = typer.Option(None, "--data-format", help="Force the record format of --data."),
        top_k: int = typer.Option(64, "--top-k", help="Teacher top-k used for KL with --teacher."),
        generate: int = typer.Option(0, "--generate", help="Also answer the first N prompts greedily and verify them."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Token budget per generated answer."),
        batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward."),
        max_seq_len: int = typer.Option(2048, "--max-seq-len", help="Longest sequence."),
        limit: int = typer.Option(None, "--limit", help="Use only the first N records."),
        device: str = typer.Option(None, "--device", help="cpu or cuda [default: cuda if available]."),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Held-out CE, KL to the teacher, top-1 agreement, calibration, size; optionally answer accuracy."""
        from kd.pipeline.model_eval import EvalConfig, evaluate_model

        if cache is None and data is None:
            raise KdError("give --cache CACHE or --data PATH")
        if cache is not None and teacher is not None:
            raise KdError("--cache already holds the teacher's log-probs; drop --teacher")
        cfg = EvalConfig(
            model=model,
            data=data,
            cache=cache,
            teacher=teacher,
            data_format=data_format,
            top_k=top_k,
            generate=generate,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            limit=limit,
            device=device,
        )
        metrics = evaluate_model(cfg)
        if as_json:
            typer.echo(json.dumps(metrics, indent=2))
            return
        table = Table(title=f"kd eval {model}", show_header=False)
        for key, value in metrics.items():
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        console.print(table)
