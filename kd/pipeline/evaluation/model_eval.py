"""Evaluating a model end to end for `kd eval` and the demo report.

Token-level metrics come from kd.pipeline.evaluation.sequences on a cache (or on top-k computed live from a
teacher); answer accuracy comes from greedy generation verified against each record's reference;
``on_policy_*`` metrics (--on-policy-prompts) are the teacher's verdict on the model's own samples
(kd.pipeline.onpolicy.measure: the model samples, the teacher scores, reverse KL per token).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd.cache.reader import CacheReader
from kd.errors import KdError
from kd.pipeline.capture import default_device
from kd.pipeline.data import iter_examples, iter_raw_records, tokenize_example
from kd.pipeline.engines.teacher import SequenceToScore, TargetSpec
from kd.pipeline.evaluation.sequences import evaluate_sequences
from kd.pipeline.models import check_device, load_causal_lm, load_tokenizer, resolve_model, tokenizer_fingerprint
from kd.pipeline.progress import make_progress
from kd.pipeline.training.batches import TrainSequence
from kd.pipeline.training.crosstok import aligner_for
from kd.pipeline.training.hidden_teacher import load_cached_teacher_head


@dataclass
class EvalConfig:
    """Settings of `kd eval` (each field's docstring is its --help text)."""

    model: str
    """Model to evaluate: HF dir or .gguf (a student, or a teacher)."""
    data: str | None = None
    """Held-out corpus (any kd data format)."""
    cache: str | None = None
    """Held-out cache from `kd cache-logits` (gives teacher metrics)."""
    cross_tokenizer: bool = False
    """--cache was made by a teacher with another tokenizer: each record is re-tokenized by --model's
    tokenizer (as `kd train --cross-tokenizer` does); KL and agreement on the aligned targets, CE on all,
    and the coverage (crosstok_*) reported beside them. With --on-policy-prompts: a --teacher with
    another tokenizer scores the model's samples as text (as `kd on-policy --cross-tokenizer` does)."""
    teacher: str | None = None
    """Teacher run live over --data for KL and agreement (and the judge of --on-policy-prompts)."""
    data_format: str | None = None
    """Force the record format of --data."""
    top_k: int = 64
    """Teacher top-k used for KL with --teacher."""
    generate: int = 0
    """Also answer the first N prompts greedily and verify them."""
    max_new_tokens: int = 256
    """Token budget per generated answer."""
    batch_size: int = 8
    """Sequences per forward."""
    max_seq_len: int = 2048
    """Longest sequence."""
    limit: int | None = None
    """Use only the first N records."""
    device: str | None = None
    """cpu or cuda [default: cuda if available]."""
    on_policy_prompts: str | None = None
    """Prompts the model answers; the teacher (--teacher, default the embedded SmolLM2) scores the answers:
    reverse KL per token of the model's own samples, teacher log-likelihood, accuracy."""
    samples: int = 1
    """Samples per prompt for --on-policy-prompts."""
    temperature: float = 0.0
    """Sampling temperature for --on-policy-prompts (0: greedy)."""
    seed: int = 0
    """Sampling seed for --on-policy-prompts."""
    engine: str = "auto"
    """Sampling engine for --on-policy-prompts: vllm, transformers or auto."""
    teacher_engine: str = "transformers"
    """Scoring engine for --on-policy-prompts: transformers or vllm."""
    on_policy_out: str | None = None
    """Keep the on-policy samples, cache and per-prompt sums here (a rerun reuses them)."""

    def __post_init__(self) -> None:
        if self.cache is None and self.data is None and self.on_policy_prompts is None:
            raise KdError("give --cache CACHE, --data PATH or --on-policy-prompts PATH")
        if self.cross_tokenizer and self.cache is None and self.on_policy_prompts is None:
            raise KdError(
                "--cross-tokenizer applies to --cache (a cache made with another tokenizer) or --on-policy-prompts"
            )
        if self.cache is not None and self.teacher is not None and self.on_policy_prompts is None:
            raise KdError("--cache already holds the teacher's log-probs; drop --teacher")
        check_device(self.device)


def model_size_bytes(source) -> int:
    path = Path(source.path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) + sum(f.stat().st_size for f in path.glob("*.bin"))


def evaluate_model(cfg: EvalConfig) -> dict[str, Any]:
    device = cfg.device or default_device()
    source = resolve_model(cfg.model, "--model")
    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source, dtype="float32" if device == "cpu" else "auto", device=device).eval()
    metrics: dict[str, Any] = {
        "model": cfg.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_bytes": model_size_bytes(source),
    }
    if cfg.on_policy_prompts:
        from kd.pipeline.onpolicy.measure import MeasureSettings, measure_on_policy

        settings = MeasureSettings(
            prompts=cfg.on_policy_prompts,
            teacher=cfg.teacher,
            samples=cfg.samples,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed,
            engine=cfg.engine,
            teacher_engine=cfg.teacher_engine,
            top_k=cfg.top_k,
            max_seq_len=cfg.max_seq_len,
            batch_size=cfg.batch_size,
            limit=cfg.limit,
            out=cfg.on_policy_out,
            cross_tokenizer=cfg.cross_tokenizer,
        )
        metrics.update(measure_on_policy(source, settings, device))
        if not cfg.cache and not cfg.data:
            return metrics
    teacher_head = aligner = None
    if cfg.cache:
        reader = CacheReader(cfg.cache, flag="--cache")
        seqs = itertools.islice(reader.iter_sequences(), cfg.limit)  # streamed: one record batch at a time
        if reader.settings["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
            if not cfg.cross_tokenizer:
                raise KdError(
                    f"--cache {cfg.cache}: made with another tokenizer than --model's "
                    "(--cross-tokenizer scores it on the targets the two tokenizations share)"
                )
            aligner = aligner_for(reader, tokenizer, load_tokenizer, flag="--cache")
            seqs = aligner.stream(seqs, cfg.batch_size)
        teacher_head = load_cached_teacher_head(reader, device)  # a hidden cache: the exact teacher
    else:
        seqs = []
        for example in iter_examples(cfg.data, cfg.data_format, cfg.limit):
            tokenized = tokenize_example(example, tokenizer, cfg.max_seq_len)
            if tokenized is not None:
                seqs.append(TrainSequence(np.asarray(tokenized.input_ids), np.asarray(tokenized.loss_mask, bool)))
        if not seqs:
            raise KdError(f"--data {cfg.data}: no usable records")
        if cfg.teacher:
            attach_live_teacher(seqs, cfg.teacher, cfg.top_k, cfg.batch_size, device, tokenizer, "--model")
    metrics.update(evaluate_sequences(model, seqs, cfg.batch_size, device=device, teacher_head=teacher_head))
    if aligner is not None:
        metrics.update(aligner.stats.metrics())
    if cfg.generate:
        if not cfg.data:
            raise KdError("--generate needs --data (prompts with reference answers)")
        metrics.update(answer_accuracy(model, tokenizer, cfg, device))
    return metrics


def attach_live_teacher(
    seqs: list[TrainSequence], teacher: str, top_k: int, batch_size: int, device: str, tokenizer, model_flag: str
) -> None:
    """Score `seqs` with the teacher run live (top-k + tail) and attach its targets to each sequence."""
    from kd.pipeline.engines.logits_hf import TransformersTeacher

    teacher_source = resolve_model(teacher, "--teacher")
    if tokenizer_fingerprint(load_tokenizer(teacher_source)) != tokenizer_fingerprint(tokenizer):
        raise KdError(f"--teacher and {model_flag} use different tokenizers")
    engine = TransformersTeacher(teacher_source, TargetSpec("topk", top_k), device=device)
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        scored = engine.score([SequenceToScore(i, s.input_ids, s.loss_mask) for i, s in enumerate(chunk)])
        for seq, targets in zip(chunk, scored, strict=True):
            seq.teacher = targets
    engine.close()


def reference_prompts(data: str, limit: int) -> list[tuple[str, str]]:
    """(question, reference answer) of the first `limit` records of `data` that carry both."""
    from kd.pipeline.traces.verify import question_and_reference

    prompts = []
    for _, record in iter_raw_records(data):
        question, reference = question_and_reference(record)
        if isinstance(question, str) and reference is not None:
            prompts.append((question, reference))
        if len(prompts) >= limit:
            break
    if not prompts:
        raise KdError(f"--data {data}: no prompt with a reference answer to verify")
    return prompts


@dataclass
class Answer:
    """One generated answer, verified against its prompt's reference."""

    text: str
    tokens: int
    """Generated tokens, end of sequence included."""
    answer: str | None
    """The final answer extracted from the text (None: none given)."""
    correct: bool
    truncated: bool
    """The answer ran into --max-new-tokens."""


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: list[tuple[str, str]],
    max_new_tokens: int,
    batch_size: int,
    device: str,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[Answer]:
    """Each prompt answered once (greedy at temperature 0, else sampled with torch seeded by `seed`)."""
    from kd.pipeline.engines.generation import render_prompt
    from kd.pipeline.traces.verify import answers_match, extract_answer

    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    if temperature > 0:
        torch.manual_seed(seed)
    answers = []
    with make_progress("prompt") as progress:
        task = progress.add_task(f"answering (T={temperature:g})", total=len(prompts))
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            texts = [render_prompt(tokenizer, q) for q, _ in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
            new = out[:, enc["input_ids"].shape[1] :]
            for (_, reference), tokens in zip(chunk, new, strict=True):
                tokens = tokens[tokens != pad]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                answer = extract_answer(text)
                truncated = int(tokens.numel()) >= max_new_tokens
                answers.append(
                    Answer(
                        text=text,
                        tokens=int(tokens.numel()) + (0 if truncated else 1),  # + the end-of-sequence token
                        answer=answer,
                        correct=bool(answer is not None and answers_match(answer, reference)),
                        truncated=truncated,
                    )
                )
            progress.advance(task, len(chunk))
    return answers


def answer_accuracy(model, tokenizer, cfg: EvalConfig, device: str) -> dict[str, Any]:
    """Greedy answers to the first `cfg.generate` prompts, verified against their references."""
    prompts = reference_prompts(cfg.data, cfg.generate)
    started = time.perf_counter()
    answers = generate_answers(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, device)
    seconds = time.perf_counter() - started
    return {
        "answer_accuracy": sum(a.correct for a in answers) / len(prompts),
        "answered": len(prompts),
        "generation_tokens_per_second": sum(a.tokens for a in answers) / seconds,
    }
