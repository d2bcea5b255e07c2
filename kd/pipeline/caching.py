"""Stage one as a library: run a teacher once over a corpus and write the logit cache.

    from kd.pipeline.caching import CacheConfig, run_cache_logits
    run_cache_logits(CacheConfig(data="train.jsonl", out="cache/"))

Determinism is what makes resume and scale-out safe: rank r takes corpus rows r, r+W, r+2W...;
its shards are cut from that row sequence by target-token count alone; and a shard's batches are
formed from its own rows only. So every shard is a pure function of (corpus, settings), a rerun
skips the shards the manifest lists, and the result equals an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kd.cache import format as fmt
from kd.cache.manifest import open_or_create, record_rank_done
from kd.cache.writer import BackgroundShardWriter
from kd.pipeline.data import corpus_fingerprint, iter_examples, tokenize_example
from kd.pipeline.engines.teacher import SequenceToScore, TargetSpec
from kd.pipeline.errors import KdError
from kd.pipeline.models import load_tokenizer, resolve_model, tokenizer_fingerprint, weights_fingerprint
from kd.pipeline.progress import log, make_progress

ENGINES = ("transformers", "vllm")


@dataclass
class CacheConfig:
    """Settings of `kd cache-logits`."""

    data: str
    """Corpus: .jsonl, .jsonl.zst or .parquet."""
    out: str
    """Cache directory (created; an existing cache with the same settings is resumed)."""
    teacher: str | None = None
    """HF model directory, .gguf file or hub id; default: the embedded SmolLM2-135M-Instruct."""
    data_format: str | None = None
    """Force the record format instead of detecting it."""
    engine: str = "transformers"
    """transformers or vllm."""
    top_k: int = 64
    """Top-k ids and log-probs stored per target token."""
    sampling: str | None = None
    """``rs`` for random-sampling KD instead of top-k."""
    samples: int = 64
    """Draws per target token in rs mode."""
    value_encoding: str = "q64"
    """q64 (uint16, max error 0.0078 nats) or float32."""
    mass_epsilon: float = 0.0
    """Adaptive top-k: keep only the leading ids until they hold 1 - epsilon of the mass (0: always k)."""
    max_seq_len: int = 2048
    """Longest sequence; longer ones are truncated or skipped (see overflow)."""
    overflow: str = "truncate"
    """truncate or skip sequences longer than max_seq_len."""
    batch_size: int = 8
    """Sequences per teacher forward."""
    shard_tokens: int = 1_000_000
    """Target tokens per shard (the unit of resume)."""
    rank: int = 0
    world_size: int = 1
    device: str | None = None
    """Default: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    dtype: str = "auto"
    device_map: str | None = None
    tensor_parallel_size: int = 1
    seed: int = 0
    limit: int | None = None
    """Use only the first N records of the corpus."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise KdError(f"--engine {self.engine}: expected one of {', '.join(ENGINES)}")
        if self.sampling not in (None, "rs"):
            raise KdError(f"--sampling {self.sampling}: the only sampling mode is 'rs'")
        if self.top_k < 1:
            raise KdError(f"--top-k must be >= 1, got {self.top_k}")
        if not 1 <= self.samples <= 65535:
            raise KdError(f"--samples must be in [1, 65535], got {self.samples}")
        if not 0.0 <= self.mass_epsilon < 1.0:
            raise KdError(f"--mass-epsilon must be in [0, 1), got {self.mass_epsilon}")
        if self.mass_epsilon and self.sampling == "rs":
            raise KdError("--mass-epsilon applies to top-k caches, not --sampling rs")
        if self.value_encoding not in fmt.VALUE_ENCODINGS:
            raise KdError(f"--value-encoding {self.value_encoding}: expected one of {', '.join(fmt.VALUE_ENCODINGS)}")
        if self.max_seq_len < 2:
            raise KdError(f"--max-seq-len must be >= 2, got {self.max_seq_len}")
        if self.overflow not in ("truncate", "skip"):
            raise KdError(f"--overflow {self.overflow}: expected truncate or skip")
        if self.batch_size < 1:
            raise KdError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.shard_tokens < 1:
            raise KdError(f"--shard-tokens must be >= 1, got {self.shard_tokens}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise KdError(f"--rank {self.rank} / --world-size {self.world_size}: need 0 <= rank < world size")
        if self.limit is not None and self.limit < 1:
            raise KdError(f"--limit must be >= 1, got {self.limit}")

    @property
    def mode(self) -> str:
        return "rs" if self.sampling == "rs" else "topk"


def _teacher_vocab_size(source) -> int:
    """The teacher's output vocabulary (its config), which may exceed the tokenizer's (padding)."""
    from transformers import AutoConfig

    from kd.pipeline.models import hf_dir_for

    config = AutoConfig.from_pretrained(hf_dir_for(source))
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


def plan_shards(lengths: list[tuple[int, int]], shard_tokens: int) -> list[list[int]]:
    """Cut a rank's rows into shards of about shard_tokens targets.

    lengths: (position in the rank's row list, targets) pairs. Returns lists of positions.
    """
    shards, current, tokens = [], [], 0
    for position, targets in lengths:
        current.append(position)
        tokens += targets
        if tokens >= shard_tokens:
            shards.append(current)
            current, tokens = [], 0
    if current:
        shards.append(current)
    return shards


def run_cache_logits(cfg: CacheConfig) -> dict[str, Any]:
    """Run stage one for this rank. Returns a summary (counts, throughput)."""
    started = time.perf_counter()
    source = resolve_model(cfg.teacher, "--teacher")
    tokenizer = load_tokenizer(source)
    vocab_size = _teacher_vocab_size(source)
    if cfg.mode == "topk" and cfg.top_k > vocab_size:
        raise KdError(f"--top-k {cfg.top_k} exceeds the teacher's vocabulary size ({vocab_size})")

    # Pre-pass: validate and tokenize this rank's rows before any teacher or cache work, so bad
    # input fails fast and leaves nothing behind.
    sequences: list[SequenceToScore] = []
    read = skipped = truncated = 0
    for row, example in enumerate(iter_examples(cfg.data, cfg.data_format, cfg.limit)):
        read += 1
        if row % cfg.world_size != cfg.rank:
            continue
        tokenized = tokenize_example(example, tokenizer, cfg.max_seq_len, cfg.overflow)
        if tokenized is None:
            skipped += 1
            continue
        truncated += tokenized.truncated
        sequences.append(
            SequenceToScore(row, np.asarray(tokenized.input_ids, dtype=np.int64), np.asarray(tokenized.loss_mask, bool))
        )
    if read == 0:
        raise KdError(f"--data {cfg.data}: empty corpus (no records)")
    if not sequences and cfg.world_size == 1:
        raise KdError(
            f"--data {cfg.data}: no usable records ({read} read, {skipped} skipped as too long or without targets)"
        )
    if skipped or truncated:
        action = "skipped" if cfg.overflow == "skip" else "truncated"
        log(
            f"[yellow]{truncated if cfg.overflow == 'truncate' else skipped} sequences longer than --max-seq-len "
            f"{cfg.max_seq_len} were {action}; {skipped} skipped in all[/yellow]"
        )

    settings = {
        "format_version": fmt.FORMAT_VERSION,
        "teacher": {
            "name": source.display_name,
            "kind": source.kind,
            "path": source.path,
            "weights_fingerprint": weights_fingerprint(source),
        },
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "mode": cfg.mode,
        "k": cfg.top_k if cfg.mode == "topk" else None,
        "num_samples": cfg.samples if cfg.mode == "rs" else None,
        "seed": cfg.seed if cfg.mode == "rs" else None,
        "value_encoding": cfg.value_encoding if cfg.mode == "topk" else None,
        "mass_epsilon": cfg.mass_epsilon if cfg.mode == "topk" else None,
        "engine": cfg.engine,
        "dtype": cfg.dtype,
        "corpus": {
            "path": os.path.basename(cfg.data),
            "fingerprint": corpus_fingerprint(cfg.data),
            "format": cfg.data_format,
            "limit": cfg.limit,
            "max_seq_len": cfg.max_seq_len,
            "overflow": cfg.overflow,
        },
        "world_size": cfg.world_size,
        "shard_tokens": cfg.shard_tokens,
    }
    out = Path(cfg.out)
    manifest = open_or_create(out, settings)
    done = {s["index"] for s in manifest["shards"] if s["rank"] == cfg.rank}

    plan = plan_shards([(i, int(s.loss_mask[1:].sum())) for i, s in enumerate(sequences)], cfg.shard_tokens)
    todo = [(index, positions) for index, positions in enumerate(plan) if index not in done]
    total_targets = sum(int(sequences[p].loss_mask[1:].sum()) for _, ps in todo for p in ps)
    if done:
        log(f"resuming: {len(done)} of {len(plan)} shards of rank {cfg.rank} already in {out}")

    stats = {"rows_read": read, "rows_skipped": skipped, "rows_truncated": truncated}
    teacher_seconds = 0.0
    if todo:
        spec = TargetSpec(cfg.mode, cfg.top_k, cfg.samples, cfg.seed)
        engine = _make_engine(cfg, source, spec)
        if engine.vocab_size != vocab_size:
            raise KdError(f"--teacher: model head has {engine.vocab_size} outputs but its config says {vocab_size}")
        schema = fmt.schema(cfg.mode, vocab_size, cfg.top_k, cfg.value_encoding, cfg.samples)
        writer = BackgroundShardWriter(out, schema)
        try:
            with make_progress("tok") as progress:
                task = progress.add_task(f"teacher pass (rank {cfg.rank})", total=total_targets)
                for index, positions in todo:
                    shard_seqs = [sequences[p] for p in positions]
                    t0 = time.perf_counter()
                    targets = _score_shard(engine, shard_seqs, cfg.batch_size, progress, task)
                    if cfg.mass_epsilon:
                        targets = [fmt.truncate_to_mass(t, cfg.mass_epsilon) for t in targets]
                    teacher_seconds += time.perf_counter() - t0
                    counts = [int(s.loss_mask[1:].sum()) for s in shard_seqs]
                    start = 0
                    for end in fmt.cut_points(counts, fmt.BATCH_TARGETS):
                        part = shard_seqs[start:end]
                        batch = fmt.build_batch(
                            schema,
                            [s.row for s in part],
                            [s.input_ids for s in part],
                            [s.loss_mask for s in part],
                            targets[start:end],
                            cfg.value_encoding,
                        )
                        writer.submit_batch(cfg.rank, index, batch)
                        start = end
                    shard_stats = {
                        "rows": len(shard_seqs),
                        "first_row": shard_seqs[0].row,
                        "last_row": shard_seqs[-1].row,
                        "tokens": int(sum(len(s.input_ids) for s in shard_seqs)),
                        "targets": int(sum(counts)),
                    }
                    writer.finish_shard(cfg.rank, index, shard_stats)
        finally:
            writer.close()
            engine.close()
    manifest = record_rank_done(out, cfg.rank, stats)
    elapsed = time.perf_counter() - started
    return {
        "cache": str(out),
        "rank": cfg.rank,
        "shards_written": len(todo),
        "shards_reused": len(done),
        "targets": total_targets,
        "seconds": elapsed,
        "teacher_seconds": teacher_seconds,
        "complete": manifest["complete"],
        **stats,
    }


def _make_engine(cfg: CacheConfig, source, spec: TargetSpec):
    if cfg.engine == "vllm":
        from kd.pipeline.engines.logits_vllm import VllmTeacher

        return VllmTeacher(source, spec, cfg.tensor_parallel_size, cfg.dtype, cfg.max_seq_len + 1, seed=cfg.seed)
    from kd.pipeline.engines.logits_hf import TransformersTeacher

    return TransformersTeacher(
        source, spec, device=cfg.device or default_device(), dtype=cfg.dtype, device_map=cfg.device_map
    )


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def _score_shard(engine, seqs: list[SequenceToScore], batch_size: int, progress, task):
    """Score a shard's rows in length-sorted batches (less padding); return targets in row order."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids))
    results: list = [None] * len(seqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, targets in zip(chunk, engine.score([seqs[i] for i in chunk]), strict=True):
            results[i] = targets
        progress.advance(task, sum(int(seqs[i].loss_mask[1:].sum()) for i in chunk))
    return results


def settings_summary(cfg: CacheConfig) -> dict[str, Any]:
    return asdict(cfg)
