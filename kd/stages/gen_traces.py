"""`kd gen-traces`: sample R1-style reasoning traces from a teacher, verify them, write SFT data.

kd gen-traces --prompts problems.jsonl --out traces.jsonl                       # embedded SmolLM2, auto engine
kd gen-traces --teacher Qwen2.5-7B-Instruct/ --prompts gsm8k.jsonl --out t.jsonl --engine vllm --n 8
kd gen-traces --engine openai --base-url http://127.0.0.1:8000/v1 --prompts p.jsonl --out t.jsonl
kd gen-traces ... --filter pass-rate:0.25-0.75    # keep correct traces of problems neither too easy nor too hard

Rerunning the same command resumes a killed run; --filter/--verify may change between runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from kd.pipeline.engines.generation import DEFAULT_TEMPLATE
from kd.pipeline.errors import KdError
from kd.pipeline.progress import log
from kd.pipeline.traces import TracesConfig, run_gen_traces


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


def register(app: typer.Typer) -> None:
    @app.command("gen-traces")
    def gen_traces(
        prompts: str = typer.Option(
            ..., "--prompts", help="Problems: .jsonl/.jsonl.zst/.parquet (question/answer, prompt, conversations)."
        ),
        out: str = typer.Option(..., "--out", help="Output .jsonl of accepted traces; rerunning resumes."),
        teacher: str = typer.Option(
            None,
            "--teacher",
            help="HF dir, .gguf or hub id; with --engine openai the served model name "
            "(default: embedded SmolLM2-135M-Instruct, or the server's first model).",
        ),
        engine: str = typer.Option(
            "auto", "--engine", help="vllm, openai, transformers or auto (vllm if installed, else transformers)."
        ),
        n: int = typer.Option(4, "--n", help="Samples per prompt."),
        temperature: float = typer.Option(0.6, "--temperature", help="Sampling temperature (0 = greedy)."),
        top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass, in (0, 1]."),
        max_new_tokens: int = typer.Option(1024, "--max-new-tokens", help="Longest completion (longer = dropped)."),
        seed: int = typer.Option(0, "--seed", help="Random seed."),
        template: str = typer.Option(
            None, "--template", help="User-turn template with {question}, or a file holding one (default: built in)."
        ),
        system: str = typer.Option(None, "--system", help="System prompt."),
        verify: bool = typer.Option(True, "--verify/--no-verify", help="Check answers against the references."),
        filter_: str = typer.Option(
            "correct", "--filter", help="correct, all (every non-truncated sample) or pass-rate:LO-HI."
        ),
        require_think_tags: bool = typer.Option(
            False, "--require-think-tags", help="Drop samples where the model did not write </think> itself."
        ),
        base_url: str = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint, e.g. http://host:8000/v1."),
        api_key_env: str = typer.Option(
            "OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the API key (never logged)."
        ),
        concurrency: int = typer.Option(8, "--concurrency", help="Requests in flight with --engine openai."),
        timeout: float = typer.Option(600.0, "--timeout", help="Seconds per HTTP request before a retry."),
        max_retries: int = typer.Option(6, "--max-retries", help="Retries on 429/5xx/connection errors."),
        tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vLLM tensor parallelism."),
        max_model_len: int = typer.Option(
            None, "--max-model-len", help="vLLM context length (default: longest prompt + --max-new-tokens)."
        ),
        batch_size: int = typer.Option(8, "--batch-size", help="Samples per transformers batch (and ledger write)."),
        limit: int = typer.Option(None, "--limit", help="Use only the first N prompts."),
        device: str = typer.Option(
            None, "--device", help="transformers device (default: cuda if available, else cpu)."
        ),
        dtype: str = typer.Option(
            "auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Sample <think>...</think> reasoning traces, verify the answers, and write them as SFT data."""
        cfg = TracesConfig(
            prompts=prompts,
            out=out,
            teacher=teacher,
            engine=engine,
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            template=read_template(template),
            system=system,
            verify=verify,
            filter=filter_,
            require_think_tags=require_think_tags,
            base_url=base_url,
            api_key_env=api_key_env,
            concurrency=concurrency,
            timeout=timeout,
            max_retries=max_retries,
            tensor_parallel_size=tensor_parallel_size,
            batch_size=batch_size,
            limit=limit,
            device=device,
            dtype=dtype,
            max_model_len=max_model_len,
        )
        summary = run_gen_traces(cfg)
        if as_json:
            typer.echo(json.dumps(summary))
            return
        correct = summary["correct_share"]
        rate = summary["tokens_per_second"]
        log(
            f"[green]{summary['accepted']} of {summary['samples']} samples kept ({summary['prompts']} prompts; "
            f"{summary['truncated']} truncated, {summary['duplicates']} duplicates"
            + (f", {correct:.1%} correct" if correct is not None else "")
            + (f"; {summary['generated_tokens']:,} tokens at {rate:,.1f} tok/s" if rate else "")
            + f"): {summary['out']}[/green]"
        )
