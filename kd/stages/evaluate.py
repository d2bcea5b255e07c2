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

from kd.pipeline.errors import KdError
from kd.pipeline.progress import console
from kd.stages.cache_logits import stdout_to_stderr


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
        on_policy_prompts: str = typer.Option(
            None,
            "--on-policy-prompts",
            help="Prompts the model answers; the teacher (--teacher, default the embedded SmolLM2) scores the "
            "answers: reverse KL per token of the model's own samples, teacher log-likelihood, accuracy.",
        ),
        samples: int = typer.Option(1, "--samples", help="Samples per prompt for --on-policy-prompts."),
        temperature: float = typer.Option(
            0.0, "--temperature", help="Sampling temperature for --on-policy-prompts (0: greedy)."
        ),
        seed: int = typer.Option(0, "--seed", help="Sampling seed for --on-policy-prompts."),
        engine: str = typer.Option(
            "auto", "--engine", help="Sampling engine for --on-policy-prompts: vllm, transformers or auto."
        ),
        teacher_engine: str = typer.Option(
            "transformers", "--teacher-engine", help="Scoring engine for --on-policy-prompts: transformers or vllm."
        ),
        on_policy_out: str = typer.Option(
            None,
            "--on-policy-out",
            help="Keep the on-policy samples, cache and per-prompt sums here (a rerun reuses them).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Held-out CE, KL to the teacher, top-1 agreement, calibration, size; optionally answer accuracy."""
        from kd.pipeline.model_eval import EvalConfig, evaluate_model

        if cache is None and data is None and on_policy_prompts is None:
            raise KdError("give --cache CACHE, --data PATH or --on-policy-prompts PATH")
        if cache is not None and teacher is not None and on_policy_prompts is None:
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
            on_policy_prompts=on_policy_prompts,
            samples=samples,
            temperature=temperature,
            seed=seed,
            engine=engine,
            teacher_engine=teacher_engine,
            on_policy_out=on_policy_out,
        )
        if as_json:
            # vLLM (an --on-policy-prompts engine) logs to stdout; --json's stdout holds only the metrics.
            with stdout_to_stderr() as real_stdout:
                metrics = evaluate_model(cfg)
            real_stdout.write(json.dumps(metrics, indent=2) + "\n")
            real_stdout.close()
            return
        metrics = evaluate_model(cfg)
        table = Table(title=f"kd eval {model}", show_header=False)
        for key, value in metrics.items():
            if isinstance(value, list):
                value = "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        console.print(table)
