"""`kd gen-traces` as a library: sample R1-style reasoning traces, verify them, write SFT data.

    from kd.pipeline.traces.run import TracesConfig, run_gen_traces
    summary = run_gen_traces(TracesConfig(prompts="problems.jsonl", out="traces.jsonl", filter="all"))

Files next to ``--out traces.jsonl``:

* ``traces.raw.jsonl``: the ledger. Every generated sample, accepted or not, one JSON line each,
  appended and fsynced batch by batch. It is the only state: a killed run is resumed by rerunning
  the same command, which skips the (prompt id, sample) pairs the ledger already holds.
* ``traces.settings.json``: what decides the samples (teacher, prompts file, template, system
  prompt, n, temperature, top-p, max new tokens, seed). Resuming with other settings is refused.
* ``traces.jsonl``: the accepted traces in the ``conversations`` format `kd cache-logits` and
  `kd train` read, rewritten atomically from the ledger at the end of every run. The filter,
  verification and --require-think-tags act only here, so changing them costs no generation.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kd.cache.manifest import atomic_write_lines, atomic_write_text, describe_difference, hold_exclusive
from kd.errors import KdError, where
from kd.pipeline.data import corpus_fingerprint, iter_raw_records
from kd.pipeline.engines.generation import (
    DEFAULT_TEMPLATE,
    Completion,
    GenerationSettings,
    build_messages,
    fill_template,
    resolve_engine,
)
from kd.pipeline.progress import log, make_progress
from kd.pipeline.traces.decontaminate import HeldOutNgrams
from kd.pipeline.traces.verify import answers_match, extract_answer, question_and_reference
from kd.settings import cli

FILTERS = ("correct", "all", "pass-rate:LO-HI")


@dataclass
class TracesConfig:
    """Settings of `kd gen-traces`."""

    prompts: str
    """Problems: .jsonl, .jsonl.zst or .parquet with GSM8K, prompt or conversations records."""
    out: str
    """Output .jsonl of accepted traces (the ledger and settings files sit beside it)."""
    teacher: str | None = None
    """HF directory, .gguf or hub id (the served model name with --engine openai); default: embedded SmolLM2."""
    engine: str = "auto"
    """vllm, openai, transformers, or auto (openai with --base-url, else vllm if installed, else transformers)."""
    n: int = 4
    """Samples per prompt."""
    temperature: float = 0.6
    """Sampling temperature (0 = greedy)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    max_new_tokens: int = 1024
    """Longest completion; longer ones are truncated and dropped."""
    seed: int = 0
    """Random seed."""
    template: str = field(default=DEFAULT_TEMPLATE, metadata=cli(show_default=False))
    """User-turn template with a {question} placeholder."""
    system: str | None = None
    """Optional system prompt."""
    verify: bool = field(default=True, metadata=cli("--verify/--no-verify"))
    """Check each sample's final answer against the prompt's reference."""
    filter: str = "correct"
    """correct (verified right), all (every non-truncated sample), or pass-rate:LO-HI."""
    require_think_tags: bool = False
    """Drop samples in which the model did not write </think> itself."""
    base_url: str | None = None
    """OpenAI-compatible endpoint for --engine openai, e.g. http://127.0.0.1:8000/v1."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (never logged or written)."""
    concurrency: int = 8
    """Requests in flight at once with --engine openai."""
    timeout: float = 600.0
    """Seconds before one HTTP request is abandoned (then retried)."""
    max_retries: int = 6
    """Retries per request on 429, 5xx and connection errors (exponential backoff with jitter)."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism."""
    batch_size: int = 8
    """Samples per transformers generate() call (and per ledger write)."""
    limit: int | None = None
    """Use only the first N prompts."""
    device: str | None = None
    """transformers device; default cuda when available, else cpu."""
    dtype: str = "auto"
    """Teacher dtype: auto, bfloat16, float16, float32."""
    max_model_len: int | None = None
    """vLLM context length; default: the longest prompt plus max_new_tokens."""
    decontaminate: list[str] = field(default_factory=list)
    """Held-out files (kd data formats): drop prompts sharing an n-gram of words with them; repeat for several."""
    decontaminate_ngram: int = 8
    """Words per n-gram for --decontaminate (open-r1's rule: lowercased, whitespace-split words)."""

    def __post_init__(self) -> None:
        self.generation  # noqa: B018 - validates n, temperature, top-p, max new tokens
        parse_filter(self.filter)
        if "{question}" not in self.template:
            raise KdError("--template must contain the placeholder {question}")
        if self.concurrency < 1:
            raise KdError(f"--concurrency must be >= 1, got {self.concurrency}")
        from kd.pipeline.models import check_device  # lazy, as this module's other uses of models

        check_device(self.device)
        if self.timeout <= 0:
            raise KdError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.max_retries < 0:
            raise KdError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.tensor_parallel_size < 1:
            raise KdError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.batch_size < 1:
            raise KdError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise KdError(f"--limit must be >= 1, got {self.limit}")
        if self.decontaminate_ngram < 1:
            raise KdError(f"--decontaminate-ngram must be >= 1, got {self.decontaminate_ngram}")
        if not self.out.endswith(".jsonl"):
            raise KdError(f"--out {self.out}: expected a .jsonl file name")
        if self.engine == "auto" and self.base_url:
            self.engine = "openai"
        self.engine = resolve_engine(self.engine)
        if self.engine == "openai" and not self.base_url:
            raise KdError("--engine openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        if self.engine != "openai" and self.base_url:
            raise KdError(f"--base-url is only used with --engine openai, not --engine {self.engine}")
        if parse_filter(self.filter)[0] != "all" and not self.verify:
            raise KdError(f"--filter {self.filter} needs --verify (or use --filter all)")

    @property
    def generation(self) -> GenerationSettings:
        return GenerationSettings(self.n, self.temperature, self.top_p, self.max_new_tokens, self.seed)


def parse_filter(spec: str) -> tuple[str, tuple[float, float] | None]:
    """``correct`` / ``all`` / ``pass-rate:LO-HI`` -> (kind, (lo, hi) or None)."""
    if spec in ("correct", "all"):
        return spec, None
    if spec.startswith("pass-rate:"):
        try:
            lo, hi = (float(x) for x in spec.split(":", 1)[1].split("-"))
        except ValueError:
            lo = hi = -1.0
        if 0 <= lo <= hi <= 1:
            return "pass-rate", (lo, hi)
        raise KdError(f"--filter {spec}: pass-rate needs LO-HI with 0 <= LO <= HI <= 1, e.g. pass-rate:0.25-0.75")
    raise KdError(f"--filter {spec}: expected one of {', '.join(FILTERS)}")


def side_paths(out: Path) -> tuple[Path, Path]:
    """The ledger and settings files of an --out file: traces.jsonl -> traces.raw.jsonl, traces.settings.json."""
    stem = out.name.removesuffix(".jsonl")
    return out.with_name(f"{stem}.raw.jsonl"), out.with_name(f"{stem}.settings.json")


# ----------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """One problem to sample: its id, question text and reference answer (None if unknown)."""

    id: str
    question: str
    reference: str | None
    source: str


def load_prompts(path: str, limit: int | None = None) -> list[Prompt]:
    """Read problems; the id is the record's ``id`` field, else its line (row) number."""
    if not Path(path).is_file():
        raise KdError(f"--prompts {path}: no such file")
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for line_no, record in iter_raw_records(path):
        if limit is not None and len(prompts) >= limit:
            break
        source = where(path, line_no)
        question, reference = question_and_reference(record)
        if not isinstance(question, str) or not question.strip():
            raise KdError(
                f"{source}: no usable question (expected a non-empty 'question' or 'prompt' string, "
                "or a user turn in 'conversations'/'messages')"
            )
        prompt_id = str(record["id"]) if record.get("id") is not None else str(line_no)
        if prompt_id in seen:
            raise KdError(f"{source}: duplicate prompt id {prompt_id!r} (also at {seen[prompt_id]})")
        seen[prompt_id] = source
        prompts.append(Prompt(prompt_id, question.strip(), reference, source))
    if not prompts:
        raise KdError(f"--prompts {path}: no prompts in the file")
    return prompts


# ----------------------------------------------------------------------------- the ledger


class Ledger:
    """Append-only JSONL of generated samples, exclusively locked while a run uses it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        refusal = f"--out: another kd gen-traces is writing {path}; wait for it or choose another --out"
        self.file = hold_exclusive(path, refusal, "a+b")  # held open (and locked) for the whole run
        self.records: dict[tuple[str, int], dict[str, Any]] = {}
        self.repaired = self._load()

    def _load(self) -> bool:
        """Read finished samples; cut a torn last line (a kill mid-write) away. True if one was cut."""
        self.file.seek(0)
        complete, newline, tail = self.file.read().rpartition(b"\n")
        lines = complete.split(b"\n") if newline else []
        keep = len(complete) + len(newline)  # bytes through the last newline
        cut = bool(tail)  # no trailing newline: the last write was torn
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                self.records[(str(record["prompt_id"]), int(record["sample"]))] = record
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
                if i < len(lines) - 1:
                    raise KdError(f"{where(self.path, i + 1)}: corrupt ledger line ({exc}); delete the file") from exc
                keep -= len(raw) + 1  # an unparsable final line is a torn write as well
                cut = True
        if cut:
            self.file.truncate(keep)
            self.file.flush()
            os.fsync(self.file.fileno())
        return cut

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Write a batch of samples with one write call, then flush and fsync: after a kill a
        batch is either all there, or its torn tail is cut away by the next run."""
        if not entries:
            return
        self.file.seek(0, os.SEEK_END)
        self.file.write(b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in entries))
        self.file.flush()
        os.fsync(self.file.fileno())
        for e in entries:
            self.records[(e["prompt_id"], e["sample"])] = e

    def close(self) -> None:
        self.file.close()


def check_settings(path: Path, settings: dict[str, Any], ledger_has_lines: bool, out: Path) -> None:
    """Record the settings of a new trace set, or refuse to resume one made with others."""
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise KdError(f"{path}: corrupt settings file ({exc.msg}); delete it and the .raw.jsonl ledger") from exc
        if old != settings:
            diff = describe_difference(old, settings)
            raise KdError(
                f"--out {out}: the traces there were made with different settings ({diff}); "
                f"use another --out or delete {path.name} and its .raw.jsonl ledger"
            )
        return
    if ledger_has_lines:
        raise KdError(f"--out {out}: a ledger exists without {path.name}; delete it or choose another --out")
    atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- turning samples into traces


@dataclass
class Trace:
    """A sample split into reasoning and answer, and whether it is kept."""

    reasoning: str
    answer_text: str
    think_tags: str
    """``model`` (the model wrote </think>) or ``inferred`` (the whole completion taken as reasoning)."""
    answer: str | None

    @property
    def content(self) -> str:
        """The assistant turn: ``<think>\\n...\\n</think>\\n\\n<answer>``."""
        head = f"<think>\n{self.reasoning}\n</think>"
        return f"{head}\n\n{self.answer_text}" if self.answer_text else head


def split_trace(text: str, finish_reason: str) -> Trace | None:
    """Split a completion into reasoning and answer; None when it is truncated (always dropped).

    Any completion cut by max_new_tokens is truncated: without </think> the reasoning is cut, and
    with it the answer may be; training on either teaches the student to stop mid-thought.
    Without </think> but finished, the whole text is the reasoning and the answer line is made
    from the extracted answer (small models like SmolLM2-135M rarely write the tags).
    """
    if finish_reason == "length":
        return None
    if "</think>" in text:
        before, after = text.split("</think>", 1)
        reasoning = before.split("<think>", 1)[1] if "<think>" in before else before
        answer_text = after.strip()
        answer = extract_answer(answer_text) or extract_answer(reasoning)
        return Trace(reasoning.strip(), answer_text, "model", answer)
    reasoning = text.replace("<think>", "", 1).strip()
    answer = extract_answer(reasoning)
    answer_text = f"The final answer is \\boxed{{{answer}}}." if answer is not None else ""
    return Trace(reasoning, answer_text, "inferred", answer)


def build_output(
    prompts: list[Prompt], ledger: dict[tuple[str, int], dict[str, Any]], cfg: TracesConfig
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The accepted output records (prompt order, then sample order) and the counts behind them."""
    kind, bounds = parse_filter(cfg.filter)
    out: list[dict[str, Any]] = []
    counts = {"samples": 0, "truncated": 0, "duplicates": 0, "verified": 0, "correct": 0, "no_think_tags": 0}
    counts["completion_tokens"] = 0
    for prompt in prompts:
        entries = [ledger[(prompt.id, s)] for s in range(cfg.n) if (prompt.id, s) in ledger]
        candidates = []
        for entry in entries:
            counts["samples"] += 1
            counts["completion_tokens"] += int(entry.get("completion_tokens") or 0)
            trace = split_trace(entry["text"], entry["finish_reason"])
            correct = None
            if cfg.verify and prompt.reference is not None:
                answer = trace.answer if trace is not None else extract_answer(entry["text"])
                correct = answer is not None and answers_match(answer, prompt.reference)
                counts["verified"] += 1
                counts["correct"] += int(correct)
            if trace is None:
                counts["truncated"] += 1
                continue
            if cfg.require_think_tags and trace.think_tags != "model":
                counts["no_think_tags"] += 1
                continue
            candidates.append((entry, trace, correct))
        pass_rate = sum(c is True for _, _, c in candidates) / len(entries) if entries else 0.0
        seen: set[str] = set()
        for entry, trace, correct in candidates:
            if kind != "all" and correct is not True:
                continue
            if kind == "pass-rate" and not bounds[0] <= pass_rate <= bounds[1]:
                continue
            if trace.content in seen:
                counts["duplicates"] += 1
                continue
            seen.add(trace.content)
            out.append(_output_record(prompt, entry, trace, correct, cfg))
    return out, counts


def _output_record(prompt: Prompt, entry: dict[str, Any], trace: Trace, correct: bool | None, cfg: TracesConfig):
    turns = [{"role": "system", "content": cfg.system}] if cfg.system else []
    turns += [
        {"role": "user", "content": fill_template(cfg.template, prompt.question)},
        {"role": "assistant", "content": trace.content},
    ]
    meta = {
        "prompt_id": prompt.id,
        "sample": entry["sample"],
        "finish_reason": entry["finish_reason"],
        "prompt_tokens": entry.get("prompt_tokens"),
        "completion_tokens": entry.get("completion_tokens"),
        "think_tags": trace.think_tags,
        "answer": trace.answer,
        "reference": prompt.reference,
        "correct": correct,
    }
    return {"id": f"{prompt.id}-{entry['sample']}", "conversations": turns, "meta": meta}


# ----------------------------------------------------------------------------- the run


def _teacher_identity(cfg: TracesConfig, engine) -> tuple[dict[str, Any], Any]:
    """What identifies the teacher in the settings (engine-independent), and its ModelSource."""
    if cfg.engine == "openai":
        return {"name": engine.model}, None
    from kd.pipeline.models import resolve_model, weights_fingerprint

    source = resolve_model(cfg.teacher, "--teacher")
    return {"name": source.display_name, "weights": weights_fingerprint(source)}, source


def _vllm_max_model_len(source, messages: list[list[dict[str, str]]], max_new_tokens: int) -> int:
    """The longest prompt plus max_new_tokens, refused if beyond the teacher's context."""
    from transformers import AutoConfig

    from kd.pipeline.models import hf_dir_for, load_tokenizer

    tokenizer = load_tokenizer(source)
    longest = max(
        len(tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True))["input_ids"])
        for m in messages
    )
    config = AutoConfig.from_pretrained(hf_dir_for(source))
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    needed = longest + max_new_tokens
    if context is not None and needed > context:
        raise KdError(
            f"--max-new-tokens {max_new_tokens}: with the longest prompt ({longest} tokens) it exceeds the "
            f"teacher's context of {context} tokens"
        )
    rounded = -(-needed // 256) * 256
    return min(rounded, context) if context else rounded


def _open_engine(cfg: TracesConfig, source, messages: list[list[dict[str, str]]]):
    from kd.pipeline.engines import generation as gen

    if cfg.engine == "transformers":
        import torch

        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return gen.TransformersGenerator(source, device=device, dtype=cfg.dtype, batch_size=cfg.batch_size)
    max_len = cfg.max_model_len or _vllm_max_model_len(source, messages, cfg.max_new_tokens)
    return gen.VllmGenerator(
        source,
        seed=cfg.seed,
        tensor_parallel_size=cfg.tensor_parallel_size,
        dtype=cfg.dtype,
        max_model_len=max_len,
        chunk_size=max(cfg.batch_size, 64),
    )


def _ledger_entry(prompt: Prompt, completion: Completion) -> dict[str, Any]:
    return {
        "prompt_id": prompt.id,
        "sample": completion.sample_index,
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
    }


def _generate(engine, prompts: list[Prompt], messages, todo, cfg: TracesConfig, ledger: Ledger) -> Iterator[Completion]:
    """Run the engine over the missing samples, appending each finished batch to the ledger."""
    with make_progress("sample") as progress:
        task = progress.add_task("generating traces", total=len(todo))
        for batch in engine.generate(messages, cfg.generation, todo):
            ledger.append([_ledger_entry(prompts[c.prompt_index], c) for c in batch])
            progress.advance(task, len(batch))
            yield from batch


def _decontaminated_prompts(cfg: TracesConfig) -> tuple[list[Prompt], int]:
    """The prompts to sample, and how many --decontaminate dropped (--limit counts the kept ones)."""
    if not cfg.decontaminate:
        return load_prompts(cfg.prompts, cfg.limit), 0
    held_out = HeldOutNgrams.from_files(cfg.decontaminate, cfg.decontaminate_ngram)
    prompts = load_prompts(cfg.prompts)
    kept = [p for p in prompts if not held_out.overlaps(p.question)]
    dropped = len(prompts) - len(kept)
    if not kept:
        raise KdError(
            f"--decontaminate: all {len(prompts)} prompts of {cfg.prompts} share a {cfg.decontaminate_ngram}-word "
            "sequence with the held-out files; nothing is left to sample"
        )
    log(
        f"--decontaminate: dropped {dropped} of {len(prompts)} prompts sharing a {cfg.decontaminate_ngram}-word "
        f"sequence with {', '.join(cfg.decontaminate)}"
    )
    return kept[: cfg.limit] if cfg.limit is not None else kept, dropped


def run_gen_traces(cfg: TracesConfig) -> dict[str, Any]:
    """Generate the missing samples, then rewrite --out from the ledger; returns the summary."""
    out = Path(cfg.out)
    ledger_path, settings_path = side_paths(out)
    prompts, decontaminated = _decontaminated_prompts(cfg)
    kind, _ = parse_filter(cfg.filter)
    if kind != "all" and not any(p.reference is not None for p in prompts):
        raise KdError(
            f"--filter {cfg.filter}: no prompt in {cfg.prompts} has a reference answer to verify; use --filter all"
        )
    messages = [build_messages(p.question, cfg.template, cfg.system) for p in prompts]

    client = None
    if cfg.engine == "openai":  # opened first: without --teacher the model name comes from the server
        from kd.pipeline.engines.generation import OpenAIGenerator

        client = OpenAIGenerator(
            cfg.base_url, cfg.teacher, cfg.api_key_env, cfg.concurrency, cfg.timeout, cfg.max_retries
        )
    try:
        teacher, source = _teacher_identity(cfg, client)
        settings = {
            "teacher": teacher,
            "prompts": corpus_fingerprint(cfg.prompts),
            "template": cfg.template,
            "system": cfg.system,
            **asdict(cfg.generation),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        ledger = Ledger(ledger_path)
        try:
            check_settings(settings_path, settings, bool(ledger.records) or ledger.repaired, out)
            if ledger.repaired:
                log(f"{ledger_path}: cut a partial last line left by an interrupted run")
            todo = [(i, s) for i, p in enumerate(prompts) for s in range(cfg.n) if (p.id, s) not in ledger.records]
            reused = len(prompts) * cfg.n - len(todo)
            if reused:
                log(f"resuming: {reused} of {len(prompts) * cfg.n} samples already in {ledger_path.name}")
            generated: list[Completion] = []
            seconds = 0.0
            if todo:
                engine = client or _open_engine(cfg, source, messages)
                started = time.perf_counter()  # after loading: tokens/s measures generation only
                try:
                    generated = list(_generate(engine, prompts, messages, todo, cfg, ledger))
                finally:
                    seconds = time.perf_counter() - started
                    if engine is not client:
                        engine.close()
            records, counts = build_output(prompts, ledger.records, cfg)
            atomic_write_lines(out, (json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        finally:
            ledger.close()
    finally:
        if client is not None:
            client.close()

    new_pairs = {(prompts[c.prompt_index].id, c.sample_index) for c in generated}
    accepted_new = sum((r["meta"]["prompt_id"], r["meta"]["sample"]) in new_pairs for r in records)
    generated_tokens = sum(c.completion_tokens for c in generated)
    summary = {
        "prompts": len(prompts),
        "decontaminated": decontaminated,
        "samples": counts["samples"],
        "accepted": len(records),
        "accepted_share": len(records) / counts["samples"] if counts["samples"] else 0.0,
        "correct_share": counts["correct"] / counts["verified"] if counts["verified"] else None,
        "verified": counts["verified"],
        "truncated": counts["truncated"],
        "duplicates": counts["duplicates"],
        "dropped_no_think_tags": counts["no_think_tags"],
        "mean_completion_tokens": counts["completion_tokens"] / counts["samples"] if counts["samples"] else 0.0,
        "generated_samples": len(generated),
        "reused_samples": reused,
        "generated_tokens": generated_tokens,
        "seconds": seconds,
        "tokens_per_second": generated_tokens / seconds if seconds > 0 else None,
        "accepted_per_minute": accepted_new / (seconds / 60) if seconds > 0 else None,
        "engine": cfg.engine,
        "filter": cfg.filter,
        "out": str(out),
    }
    return summary
