"""`kd cache-logits`: stage one, run the teacher once and write the logit cache.

kd cache-logits --data train.jsonl --out cache/ --top-k 64
kd cache-logits --data train.jsonl --out cache-rs/ --sampling rs --samples 64
torchrun --nproc-per-node 4 -m kd.cli cache-logits --teacher big-model/ --data c.jsonl --out cache/
kd cache-logits --config recipes/laptop-smollm2/cache-logits.yaml

Every flag is a field of kd.pipeline.capture.config.CacheConfig (see kd/stages/options.py); the
resolved settings are written to OUT/config.yaml once the run ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import TextIO

import typer

from kd.pipeline.capture import CacheConfig, run_cache_logits
from kd.pipeline.progress import log
from kd.stages.options import CommonSwitches, config_command, write_config


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


def run(cfg: CacheConfig, switches: CommonSwitches) -> None:
    if switches.as_json:
        with stdout_to_stderr() as real_stdout:
            summary = run_cache_logits(cfg)
            if cfg.rank == 0:
                write_config(cfg.out, cfg)
        real_stdout.write(json.dumps(summary) + "\n")
        real_stdout.close()
        return
    summary = run_cache_logits(cfg)
    if cfg.rank == 0:
        write_config(cfg.out, cfg)
    state = "complete" if summary["complete"] else "waiting for other ranks"
    log(
        f"[green]rank {summary['rank']}: {summary['shards_written']} shards written, "
        f"{summary['shards_reused']} reused, {summary['targets']:,} target tokens in "
        f"{summary['seconds']:.1f}s; cache {state}: {summary['cache']}[/green]"
    )


def register(app: typer.Typer) -> None:
    config_command(
        app,
        "cache-logits",
        CacheConfig,
        run,
        doc="Stage one: run the teacher once over a corpus and write top-k (or sampled) log-probs as shards.",
    )
