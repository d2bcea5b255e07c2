"""Steps two and three of a round: the teacher scores the samples (stage one, unchanged), and the
student that wrote them is judged against that cache.

Scoring is `run_cache_logits` over the round's samples.jsonl: the same code, settings checks, resume
and manifest as `kd cache-logits`, so a round's cache is an ordinary cache (`kd inspect --verify`,
`kd train --from-cache` and `kd eval --cache` all read it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.cache.manifest import atomic_write_lines, read_manifest
from kd.cache.reader import CacheReader
from kd.errors import KdError
from kd.pipeline.capture import CacheConfig, run_cache_logits
from kd.pipeline.models import ModelSource, load_causal_lm
from kd.pipeline.onpolicy.judge import judge_sequences
from kd.pipeline.onpolicy.retokenize import Retokenizer
from kd.pipeline.training.crosstok import Aligner
from kd.pipeline.training.hidden_teacher import load_cached_teacher_head


@dataclass
class ScoringSettings:
    """How the teacher scores samples (the stage-one settings an on-policy run fixes)."""

    teacher: str | None
    engine: str = "transformers"
    top_k: int = 64
    value_encoding: str = "sqrt8"
    max_seq_len: int = 2048
    batch_size: int = 8
    device: str | None = None
    seed: int = 0
    temperatures: str = "1"
    """Temperatures the round's cache is exact at (`--temperatures`): 1 and the distillation temperature."""
    store: str = "topk"
    """topk, or hidden: the teacher's final hidden states and head (exact at every temperature)."""
    hidden_encoding: str = "bf16"

    def cache_config(self, samples: Path, cache_dir: Path) -> CacheConfig:
        return CacheConfig(
            data=str(samples),
            out=str(cache_dir),
            teacher=self.teacher,
            data_format="tokens",  # the sampled ids themselves, not their text re-tokenized
            engine=self.engine,
            top_k=self.top_k,
            value_encoding=self.value_encoding,
            max_seq_len=self.max_seq_len,
            batch_size=self.batch_size,
            device=self.device,
            seed=self.seed,
            temperatures="1" if self.store == "hidden" else self.temperatures,  # hidden: exact at any T
            store=self.store,
            hidden_encoding=self.hidden_encoding,
        )


TEACHER_SAMPLES = "samples.teacher.jsonl"
"""Across tokenizers: samples.jsonl's records in the teacher's tokens, the file the teacher scores."""


def teacher_samples(samples: Path, records: list[dict[str, Any]], crossed: tuple[Any, Any] | None) -> Path:
    """The file the teacher scores: SAMPLES itself, or across tokenizers (`crossed`: the student's and the
    teacher's tokenizers) its records in the teacher's tokens (retokenize.py), written beside it once.

    A pure function of samples.jsonl, written atomically: a rerun finds it whole or writes it again.
    A sample whose completion merges into the teacher's token before it (a run of newlines after the
    template's) keeps no teacher target; stage one leaves it out and the judge counts it
    (``crosstok_unscored_share``). If no record keeps one there is nothing to score: a one-line error.
    """
    if crossed is None:
        return samples
    path = samples.with_name(TEACHER_SAMPLES)
    if not path.is_file():
        converted = Retokenizer(*crossed).convert(records)
        own = [r for r in converted if r["meta"].get("kind") == "on-policy"]  # not the --mix rows
        if not any(any(r["loss_mask"][1:]) for r in own):
            raise KdError(
                f"{samples}: no sample keeps a target in the teacher's tokens (--cross-tokenizer: each completion "
                "merges into the teacher's token before it); sample longer answers (--max-new-tokens, --temperature)"
            )
        atomic_write_lines(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in converted))
    return path


def cache_is_complete(cache_dir: Path) -> bool:
    manifest = read_manifest(cache_dir) if cache_dir.is_dir() else None
    return bool(manifest and manifest.get("complete"))


def score_samples(samples: Path, cache_dir: Path, settings: ScoringSettings) -> dict[str, Any]:
    """The teacher's top-k over every sampled sequence, cached in CACHE_DIR (resumed if interrupted)."""
    if cache_is_complete(cache_dir):
        return {"reused": True}
    return run_cache_logits(settings.cache_config(samples, cache_dir))


def judge_samples(
    student: ModelSource,
    records: list[dict[str, Any]],
    cache_dir: Path,
    device: str,
    batch_size: int = 8,
    chunk_size: int = 1024,
    aligner: Aligner | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """The teacher-judged metrics of the student that sampled `records` (samples.jsonl, in order).

    Only on-policy rows are judged (cache row i is line i of samples.jsonl); --mix rows are not the
    student's own samples. `aligner` (--cross-tokenizer): the cache is in the teacher's tokens
    (retokenize.py); each row is aligned to the student's tokenizer as `kd eval --cache --cross-tokenizer`
    does (`Aligner.stream`), judged on the aligned targets only, and the coverage (``crosstok_*``: the
    share of the student's targets judged, the teacher mass its vocabulary holds) reported beside.
    """
    group_of_row, expected = {}, {}
    for row, record in enumerate(records):
        meta = record["meta"]
        if meta.get("kind") != "on-policy":
            continue
        group_of_row[row] = str(meta["prompt_id"])
        expected[row] = int(sum(record["loss_mask"]))
    model = load_causal_lm(student, dtype="float32" if device == "cpu" else "auto", device=device)
    reader = CacheReader(cache_dir)
    try:
        head = load_cached_teacher_head(reader, device)  # None unless the round stored hidden states
        seqs = reader.iter_sequences()
        if aligner is None:
            return judge_sequences(model, seqs, group_of_row, expected, batch_size, chunk_size, device, head)
        # Only the student's own samples are aligned, so the coverage describes them (not --mix rows).
        seqs = aligner.stream((s for s in seqs if s.row in group_of_row), batch_size)
        metrics, per_prompt = judge_sequences(model, seqs, group_of_row, None, batch_size, chunk_size, device)
        unscored = 1.0 - metrics["judged_sequences"] / max(len(group_of_row), 1)  # no target in the teacher's tokens
        return {**metrics, **aligner.stats.metrics(), "crosstok_unscored_share": unscored}, per_prompt
    finally:
        reader.close()
        del model
