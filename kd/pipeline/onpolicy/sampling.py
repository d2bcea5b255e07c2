"""Step one of a round: the current student answers the round's prompts with gen-traces' engines.

Samples go to a ledger first (gen-traces' `Ledger`: appended and fsynced one engine batch at a
time, a torn last line cut on reopening), so a killed round loses at most the batch in flight and a
rerun asks the engine only for the missing (slot, sample) pairs. Since batches are written whole and
in order, the missing pairs are whole trailing batches, and the transformers engine (per-sample
seeds) regenerates them exactly as an uninterrupted run would have: the same samples, bit for bit.
vLLM seeds per engine, so its samples depend on batching and a resumed round's new samples differ.

When every pair is in the ledger, ``samples.jsonl`` is written atomically in (slot, sample) order.
Each record carries the exact token ids the engine used and sampled (``input_ids`` = prompt +
completion, ``loss_mask`` = 1 on the completion), so stage one scores exactly those sequences (the
``tokens`` data format): decoding a sample and re-tokenizing its text gives other tokens for a
large share of samples. The chat turns stay beside the ids for people and for answer checking.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.cache.manifest import atomic_write_lines
from kd.errors import KdError
from kd.pipeline.engines.generation import GenerationSettings, Messages, build_messages
from kd.pipeline.models import ModelSource, hf_dir_for
from kd.pipeline.progress import log, make_progress
from kd.pipeline.traces.run import Ledger, Prompt, _vllm_max_model_len
from kd.pipeline.traces.verify import answers_match, extract_answer

LEDGER_NAME = "samples.raw.jsonl"


@dataclass
class SamplerSettings:
    """Everything besides the model that decides a round's samples."""

    generation: GenerationSettings
    template: str
    system: str | None
    engine: str
    """vllm or transformers (already resolved)."""
    batch_size: int = 8
    device: str = "cpu"


def open_generator(engine: str, source: ModelSource, settings: SamplerSettings, messages: list[Messages]):
    """A gen-traces generation engine over the student; a student it cannot load is a one-line error."""
    from kd.pipeline.engines import generation as gen

    try:
        if engine == "transformers":
            return gen.TransformersGenerator(source, device=settings.device, batch_size=settings.batch_size)
        max_len = _vllm_max_model_len(source, messages, settings.generation.max_new_tokens)
        return gen.VllmGenerator(
            source,
            seed=settings.generation.seed,
            max_model_len=max_len,
            chunk_size=max(settings.batch_size, 64),
        )
    except KdError as exc:  # already one line (vLLM missing, unreadable weights...): say which step failed
        raise KdError(f"--engine {engine} cannot load the student: {exc}") from exc
    except Exception as exc:  # whatever the engine raises (unsupported architecture, bad weights...)
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise KdError(
            f"--engine {engine} cannot load the student {source.path} ({type(exc).__name__}: {reason}); "
            "try the other --engine"
        ) from exc


def sample_round(
    source: ModelSource,
    prompts: list[Prompt],
    settings: SamplerSettings,
    out_dir: Path,
    extra_records: list[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Sample `settings.generation.n` completions per prompt into OUT_DIR/samples.jsonl (resumable).

    `prompts` are the round's prompts in slot order (a prompt may fill two slots); `extra_records`
    (off-policy --mix records) are appended after the samples. Returns the sampling summary.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.jsonl"
    generation = settings.generation
    messages = [build_messages(p.question, settings.template, settings.system) for p in prompts]
    ledger = Ledger(out_dir / LEDGER_NAME)
    seconds, generated_tokens = 0.0, 0
    try:
        if ledger.repaired:
            log(f"{ledger.path}: cut a partial last line left by an interrupted run")
        todo = [(i, s) for i in range(len(prompts)) for s in range(generation.n) if (str(i), s) not in ledger.records]
        if todo and len(todo) < len(prompts) * generation.n:
            log(f"resuming: {len(prompts) * generation.n - len(todo)} samples already in {ledger.path}")
        if todo:
            engine = open_generator(settings.engine, source, settings, messages)
            started = time.perf_counter()  # after loading: tokens/s measures generation only
            try:
                with make_progress("sample") as progress:
                    task = progress.add_task("student sampling", total=len(todo))
                    for batch in engine.generate(messages, generation, todo):
                        ledger.append([_ledger_entry(prompts[c.prompt_index], c) for c in batch])
                        generated_tokens += sum(c.completion_tokens for c in batch)
                        progress.advance(task, len(batch))
            finally:
                seconds = time.perf_counter() - started
                engine.close()
        entries = [ledger.records[(str(i), s)] for i in range(len(prompts)) for s in range(generation.n)]
    finally:
        ledger.close()
    records = [_sample_record(prompts[int(e["prompt_id"])], messages[int(e["prompt_id"])], e) for e in entries]
    atomic_write_lines(samples_path, (json.dumps(r, ensure_ascii=False) + "\n" for r in [*records, *extra_records]))
    summary = summarize_samples(records)
    summary.update(
        {
            "generated_samples": len(todo),
            "sampling_seconds": seconds,
            "sampling_tokens_per_second": generated_tokens / seconds if seconds > 0 else None,
            "off_policy_sequences": len(extra_records),
        }
    )
    return summary


def _ledger_entry(prompt: Prompt, completion) -> dict[str, Any]:
    return {
        "prompt_id": str(completion.prompt_index),  # the round's slot: a prompt may fill two slots
        "sample": completion.sample_index,
        "id": prompt.id,
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "prompt_token_ids": completion.prompt_token_ids,
        "token_ids": completion.token_ids,
    }


def _sample_record(prompt: Prompt, messages: Messages, entry: dict[str, Any]) -> dict[str, Any]:
    answer = extract_answer(entry["text"])
    correct = None
    if prompt.reference is not None:
        correct = answer is not None and answers_match(answer, prompt.reference)
    prompt_ids, completion_ids = entry.get("prompt_token_ids"), entry.get("token_ids")
    if prompt_ids is None or completion_ids is None:
        raise KdError(
            f"sample {entry['prompt_id']}/{entry['sample']} has no token ids (a ledger from an older kd); "
            "delete the round's directory and rerun"
        )
    return {
        "input_ids": [*prompt_ids, *completion_ids],
        "loss_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
        "prompt": messages,
        "completion": [{"role": "assistant", "content": entry["text"]}],
        "meta": {
            "kind": "on-policy",
            "prompt_id": prompt.id,
            "slot": int(entry["prompt_id"]),
            "sample": entry["sample"],
            "finish_reason": entry["finish_reason"],
            "completion_tokens": entry["completion_tokens"],
            "answer": answer,
            "reference": prompt.reference,
            "correct": correct,
        },
    }


def summarize_samples(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Length, truncation and answer accuracy of on-policy sample records."""
    metas = [r["meta"] for r in records if r["meta"].get("kind") == "on-policy"]
    verified = [m for m in metas if m["correct"] is not None]
    n = max(len(metas), 1)
    return {
        "samples": len(metas),
        "sample_tokens": sum(int(m["completion_tokens"]) for m in metas) / n,
        "truncated_share": sum(m["finish_reason"] == "length" for m in metas) / n,
        "answer_accuracy": sum(bool(m["correct"]) for m in verified) / len(verified) if verified else None,
        "answered": len(verified),
    }


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The records of a samples.jsonl (on-policy first, then any off-policy --mix records)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def student_source_dir(source: ModelSource) -> str:
    """The directory an engine loads (GGUF converted once)."""
    return hf_dir_for(source)
