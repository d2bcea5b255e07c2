"""The teacher's verdict on any model's own samples (`kd eval --on-policy-prompts`).

The same three steps as one on-policy round without the training: the model answers the prompts
(gen-traces' engines), the teacher scores those samples (stage one), and the model is judged from
that cache (`judge`). So an off-policy student, an on-policy student and the teacher itself are
measured on equal terms: reverse KL to the teacher on the tokens each one writes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kd.cache.manifest import atomic_write_text, describe_difference
from kd.errors import KdError
from kd.pipeline.data import corpus_fingerprint
from kd.pipeline.engines.generation import DEFAULT_TEMPLATE, GenerationSettings, resolve_engine
from kd.pipeline.models import ModelSource, resolve_model, weights_fingerprint
from kd.pipeline.onpolicy.run import check_tokenizers
from kd.pipeline.onpolicy.sampling import SamplerSettings, read_samples, sample_round, summarize_samples
from kd.pipeline.onpolicy.scoring import ScoringSettings, judge_samples, score_samples, teacher_samples
from kd.pipeline.traces.run import load_prompts
from kd.pipeline.training.crosstok import Aligner


@dataclass
class MeasureSettings:
    """How the model samples and the teacher scores for an on-policy measurement."""

    prompts: str
    teacher: str | None = None
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    engine: str = "auto"
    teacher_engine: str = "transformers"
    top_k: int = 64
    max_seq_len: int = 2048
    batch_size: int = 8
    limit: int | None = None
    template: str = DEFAULT_TEMPLATE
    system: str | None = None
    out: str | None = None
    """Keep samples, cache and per-prompt sums here (a rerun reuses them); None: a temporary directory."""
    cross_tokenizer: bool = False
    """The teacher's tokenizer differs from the model's: samples scored as text (`kd on-policy`'s way)."""


def measure_on_policy(model: ModelSource, settings: MeasureSettings, device: str) -> dict[str, Any]:
    """Sample, score and judge; returns ``on_policy_*`` metrics (and writes per_prompt.json with --out)."""
    generation = GenerationSettings(
        settings.samples, settings.temperature, settings.top_p, settings.max_new_tokens, settings.seed
    )
    engine = resolve_engine(settings.engine)
    if engine not in ("vllm", "transformers"):
        raise KdError(f"--engine {settings.engine}: expected vllm, transformers or auto")
    prompts = load_prompts(settings.prompts, settings.limit)
    teacher = resolve_model(settings.teacher, "--teacher")
    crossed = check_tokenizers(teacher, model, settings.cross_tokenizer, flag="--model")
    work = Path(settings.out) if settings.out else Path(tempfile.mkdtemp(prefix="kd-on-policy-"))
    try:
        _check_work_dir(work, model, teacher, settings)
        sampler = SamplerSettings(generation, settings.template, settings.system, engine, settings.batch_size, device)
        sampled = sample_round(model, prompts, sampler, work)
        scoring = ScoringSettings(
            settings.teacher,
            settings.teacher_engine,
            settings.top_k,
            "float32",
            settings.max_seq_len,
            settings.batch_size,
            device,
            settings.seed,
        )
        records = read_samples(work / "samples.jsonl")
        score_samples(teacher_samples(work / "samples.jsonl", records, crossed), work / "cache", scoring)
        aligner = Aligner(crossed[1], crossed[0]) if crossed else None
        judged, per_prompt = judge_samples(model, records, work / "cache", device, settings.batch_size, aligner=aligner)
        if settings.out:
            atomic_write_text(work / "per_prompt.json", json.dumps(per_prompt) + "\n")
    finally:
        if not settings.out:
            shutil.rmtree(work, ignore_errors=True)
    metrics = {**summarize_samples(records), **judged}
    metrics["sampling_tokens_per_second"] = sampled.get("sampling_tokens_per_second")
    return {f"on_policy_{k}": v for k, v in metrics.items()}


def _check_work_dir(work: Path, model: ModelSource, teacher: ModelSource, settings: MeasureSettings) -> None:
    """A kept --on-policy-out is reused only for the same model, teacher, prompts and settings."""
    record = {
        **{k: v for k, v in asdict(settings).items() if k not in ("out", "prompts", "teacher", "batch_size")},
        "model": weights_fingerprint(model),
        "teacher": weights_fingerprint(teacher),
        "prompts": corpus_fingerprint(settings.prompts),
    }
    if not settings.cross_tokenizer:  # recorded only when set, as kept directories made before it were
        record.pop("cross_tokenizer")
    path = work / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != record:
            raise KdError(
                f"--on-policy-out {work}: holds a measurement made with other settings "
                f"({describe_difference(old, record)}); choose another directory"
            )
        return
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
