"""The data of a training run: the train corpus or cache, cut by --limit; the held-out set; the step plan.

Also the reasoning-SFT token weights (`--tag-weight`), computed when a --data corpus is prepared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.distributed as dist

from kd.cache.reader import CacheReader, CacheUnit
from kd.errors import KdError
from kd.pipeline.data import TokenizedExample
from kd.pipeline.training.config import TrainConfig
from kd.pipeline.training.distributed import DistEnv
from kd.pipeline.training.order import EpochPlan, OrderSettings
from kd.pipeline.training.prepared import prepare_corpus

THINK_TAGS = ("<think>", "</think>")


def tag_token_weights(tokenized: TokenizedExample, tag_weight: float) -> np.ndarray:
    """Per-token weights: `tag_weight` on exactly the tokens that spell <think> or </think>, 1 elsewhere.

    MiniMind's reasoning trainer up-weighted every token id that appears in the tags ('<', 'think',
    '>' ...) wherever it occurred; here only the tokens whose character span overlaps a tag count,
    found through the offsets the tokenizer gave when the example was tokenized.
    """
    weights = np.ones(len(tokenized.input_ids), dtype=np.float32)
    if tag_weight == 1.0:
        return weights
    text = tokenized.text
    spans = []
    for tag in THINK_TAGS:
        start = text.find(tag)
        while start != -1:
            spans.append((start, start + len(tag)))
            start = text.find(tag, start + 1)
    for t, (a, b) in enumerate(tokenized.offsets):
        if b > a and any(a < e and b > s for s, e in spans):
            weights[t] = tag_weight
    return weights


class TagWeights:
    """Per-token CE weights for prepared corpora (a callable with a fingerprint for the prepared manifest)."""

    def __init__(self, tag_weight: float) -> None:
        self.tag_weight = tag_weight
        self.fingerprint = f"think-tags:{tag_weight}"

    def __call__(self, tokenized: TokenizedExample) -> np.ndarray:
        return tag_token_weights(tokenized, self.tag_weight)


def open_data(
    path: str, flag: str, out: Path, name: str, tokenizer, cfg: TrainConfig, env: DistEnv, weighted: bool
) -> CacheReader:
    """Tokenize a --data / --eval-data corpus into OUT/prepared/NAME (rank 0; others wait) and open it."""
    prepared = out / "prepared" / name
    weights = TagWeights(cfg.tag_weight) if weighted and cfg.tag_weight != 1.0 else None

    def prepare() -> CacheReader:
        return prepare_corpus(
            path,
            prepared,
            tokenizer,
            flag=flag,
            data_format=cfg.data_format,
            max_seq_len=cfg.max_seq_len,
            limit=cfg.limit if name == "train" else None,
            weights_of=weights,
        )

    if env.world_size == 1:
        return prepare()
    failure = None
    if env.is_main:
        try:
            prepare()
        except KdError as exc:  # every rank must reach the barrier, then all fail with the same message
            failure = str(exc)
    box = [failure]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise KdError(box[0])
    return CacheReader(prepared, flag=flag)


def limited_units(reader: CacheReader, limit: int | None) -> list[CacheUnit]:
    """The reader's units, cut to the first `limit` sequences (the last unit possibly partly)."""
    units = reader.units()
    if limit is None:
        return units
    kept, rows = [], 0
    for unit in units:
        if rows >= limit:
            break
        take = min(unit.rows, limit - rows)
        kept.append(unit if take == unit.rows else CacheUnit(unit.shard, unit.batch, take, unit.targets, unit.rows))
        rows += take
    return kept


def build_plan(reader: CacheReader, units: list[CacheUnit], cfg: TrainConfig, env: DistEnv, flag: str) -> EpochPlan:
    """The data order of this run (identical on every rank); checks --batch-tokens against the data."""
    settings = OrderSettings(
        seed=cfg.seed,
        shuffle_window=cfg.shuffle_window,
        micro_per_step=cfg.accumulation_steps * env.world_size,
        batch_size=None if cfg.batch_tokens else cfg.batch_size,
        batch_tokens=cfg.batch_tokens,
    )
    lengths = None
    if cfg.batch_tokens:
        lengths = reader.sequence_lengths(units)
        longest = max(int(x.max()) for x in lengths if len(x))
        if longest > cfg.batch_tokens:
            raise KdError(
                f"--batch-tokens {cfg.batch_tokens} is smaller than the longest sequence in {flag} {reader.dir} "
                f"({longest} tokens); raise --batch-tokens to at least {longest}"
            )
    return EpochPlan([u.rows for u in units], settings, lengths)


def plan_steps(
    reader: CacheReader, units: list[CacheUnit], cfg: TrainConfig, env: DistEnv, flag: str
) -> tuple[EpochPlan, int]:
    """The data plan and the number of optimizer steps this run takes (--max-steps, else --epochs)."""
    plan = build_plan(reader, units, cfg, env, flag)
    if plan.steps_in_epoch(0) == 0:
        size = f"--batch-tokens {cfg.batch_tokens}" if cfg.batch_tokens else f"--batch-size {cfg.batch_size}"
        raise KdError(
            f"{plan.num_sequences} training sequences are fewer than one global batch ({size} x "
            f"--accumulation-steps {cfg.accumulation_steps} x {env.world_size} processes); lower them"
        )
    return plan, cfg.max_steps or max(1, plan.total_steps(cfg.epochs))
