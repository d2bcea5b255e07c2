"""`kd cache-logits`: stage one, run the teacher once and write the logit cache.

kd cache-logits --data train.jsonl --out cache/ --top-k 64
kd cache-logits --data train.jsonl --out cache-rs/ --sampling rs --samples 64
torchrun --nproc-per-node 4 -m kd.cli cache-logits --teacher big-model/ --data c.jsonl --out cache/
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import TextIO

import typer

from kd.pipeline.caching import CacheConfig, run_cache_logits
from kd.pipeline.progress import log


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[TextIO]:
    """Point file descriptor 1 at stderr for the block; yield a writer on the real stdout.

    With --json, stdout must hold exactly one JSON object. vLLM logs INFO lines to stdout, and its
    engine-core subprocess inherits fd 1, so redirecting `sys.stdout` is not enough: the descriptor
    itself is re-pointed (dup2) before anything starts and restored afterwards.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w", encoding="utf-8")
    try:
        yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def register(app: typer.Typer) -> None:
    @app.command("cache-logits")
    def cache_logits(
        data: str = typer.Option(..., "--data", help="Corpus: .jsonl, .jsonl.zst or .parquet."),
        out: str = typer.Option(..., "--out", help="Cache directory; rerunning the same command resumes it."),
        teacher: str = typer.Option(
            None, "--teacher", help="HF model dir, .gguf or hub id [default: embedded SmolLM2-135M-Instruct]."
        ),
        data_format: str = typer.Option(
            None, "--data-format", help="conversations|messages|alpaca|prompt_completion|gsm8k|text [default: detect]."
        ),
        engine: str = typer.Option(
            "transformers", "--engine", help="transformers (CPU/GPU, device_map) or vllm (prompt log-probs)."
        ),
        top_k: int = typer.Option(
            64, "--top-k", help="Top-k ids + log-probs stored per target token (with the tail mass)."
        ),
        sampling: str = typer.Option(
            None, "--sampling", help="'rs': random-sampling KD (store N draws as ids + counts) instead of top-k."
        ),
        samples: int = typer.Option(64, "--samples", help="Draws per target token with --sampling rs."),
        value_encoding: str = typer.Option(
            "q64", "--value-encoding", help="q64 (uint16, max error 0.0078 nats) or float32."
        ),
        mass_epsilon: float = typer.Option(
            0.0,
            "--mass-epsilon",
            help="Adaptive top-k: per token keep only the leading ids until they hold 1-EPS of the teacher's "
            "mass (at most --top-k); the rest joins the tail. 0 keeps k ids everywhere.",
        ),
        max_seq_len: int = typer.Option(2048, "--max-seq-len", help="Longest sequence in tokens."),
        overflow: str = typer.Option(
            "truncate", "--overflow", help="What to do with longer sequences: truncate or skip (counted either way)."
        ),
        batch_size: int = typer.Option(
            8, "--batch-size", help="Sequences per teacher forward (transformers; unless --batch-tokens)."
        ),
        batch_tokens: int = typer.Option(
            None,
            "--batch-tokens",
            help="Padded tokens per teacher forward (transformers): length-sorted batches filled up to this "
            "budget instead of --batch-size sequences; must be >= --max-seq-len.",
        ),
        window_tokens: int = typer.Option(
            131_072,
            "--window-tokens",
            help="Sequence tokens handed to the teacher at once: vLLM schedules a whole window itself, "
            "transformers sorts it by length into batches. Bounds memory.",
        ),
        block_records: int = typer.Option(
            1024, "--block-records", help="Corpus records read and tokenized per block (streamed)."
        ),
        shard_tokens: int = typer.Option(
            1_000_000, "--shard-tokens", help="Target tokens per shard (the unit of resume)."
        ),
        rank: int = typer.Option(None, "--rank", help="This process's rank [default: $RANK or 0]."),
        world_size: int = typer.Option(
            None, "--world-size", help="Number of processes splitting the corpus [default: $WORLD_SIZE or 1]."
        ),
        device: str = typer.Option(
            None, "--device", help="cpu, cuda, cuda:1 [default: cuda:$LOCAL_RANK if available, else cpu]."
        ),
        dtype: str = typer.Option(
            "auto", "--dtype", help="Teacher dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32."
        ),
        device_map: str = typer.Option(
            None, "--device-map", help="'auto' spreads a teacher too big for one GPU over all GPUs."
        ),
        tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vLLM tensor parallelism."),
        seed: int = typer.Option(0, "--seed", help="Seed of the rs draws."),
        limit: int = typer.Option(None, "--limit", help="Use only the first N records."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Stage one: run the teacher once over a corpus and write top-k (or sampled) log-probs as shards."""
        cfg = CacheConfig(
            data=data,
            out=out,
            teacher=teacher,
            data_format=data_format,
            engine=engine,
            top_k=top_k,
            sampling=sampling,
            samples=samples,
            value_encoding=value_encoding,
            mass_epsilon=mass_epsilon,
            max_seq_len=max_seq_len,
            overflow=overflow,
            batch_size=batch_size,
            batch_tokens=batch_tokens,
            window_tokens=window_tokens,
            block_records=block_records,
            shard_tokens=shard_tokens,
            rank=int(os.environ.get("RANK", 0)) if rank is None else rank,
            world_size=int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size,
            device=device,
            dtype=dtype,
            device_map=device_map,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            limit=limit,
        )
        if as_json:
            with stdout_to_stderr() as real_stdout:
                summary = run_cache_logits(cfg)
            real_stdout.write(json.dumps(summary) + "\n")
            real_stdout.close()
        else:
            summary = run_cache_logits(cfg)
            state = "complete" if summary["complete"] else "waiting for other ranks"
            log(
                f"[green]rank {summary['rank']}: {summary['shards_written']} shards written, "
                f"{summary['shards_reused']} reused, {summary['targets']:,} target tokens in "
                f"{summary['seconds']:.1f}s; cache {state}: {summary['cache']}[/green]"
            )
