"""Reading corpora and turning them into (input_ids, loss_mask) for the teacher and the student.

Supported files: ``.jsonl``, ``.jsonl.zst`` (streamed with zstandard), ``.parquet``.
Supported record formats (auto-detected from the first record's keys, or forced with --data-format):

========================  =====================================================  ==========================
format                    record                                                 loss mask covers
========================  =====================================================  ==========================
``conversations``         ``{"conversations": [{"role", "content"}, ...]}``      assistant turns + end-of-turn
``messages``              ``{"messages": [{"role", "content"}, ...]}`` (OpenAI)  assistant turns + end-of-turn
``alpaca``                ``{"instruction", "input"?, "output"}``                the output + end-of-turn
``prompt_completion``     ``{"prompt", "completion"}``                           the completion + end-of-turn
``gsm8k``                 ``{"question", "answer"}``                             the answer + end-of-turn
``text``                  ``{"text"}`` (pre-training)                            every token but the first
``tokens``                ``{"input_ids": [...], "loss_mask"?: [0/1, ...]}``     the mask's 1s (default: all)
========================  =====================================================  ==========================

Chat-shaped records are rendered with the tokenizer's chat template. The loss mask is computed from
character spans: each assistant turn's span runs from where the template's generation prompt ends to
the end of its end-of-turn token (trailing whitespace the template adds is not a target).

``tokens`` records are already tokenized: the ids are used as they are (no template, no special
tokens added). That is how `kd on-policy` hands the teacher exactly the token sequences the student
sampled: decoding a sample and re-tokenizing its text can give different tokens.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kd.errors import KdError, where

FORMATS = ("conversations", "messages", "alpaca", "prompt_completion", "gsm8k", "text", "tokens")
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One normalised record: a chat (`messages`), plain pre-training `text`, or token ids."""

    source: str
    """Where it came from, ``file:line`` (or ``file:row`` for Parquet) for error messages."""
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    input_ids: list[int] | None = None
    """Pre-tokenized (``tokens`` format), with `loss_mask` beside it."""
    loss_mask: list[int] | None = None


@dataclass
class TokenizedExample:
    """Token ids and the 0/1 loss mask over them; mask[t] = 1 means token t is a training target."""

    source: str
    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False
    text: str = ""
    """The string that was tokenized (chat template applied), which `offsets` index into."""
    offsets: list[tuple[int, int]] = field(default_factory=list)
    """Character span of each token in `text`; (0, 0) for tokens that are not in it (special tokens)."""

    @property
    def num_targets(self) -> int:
        # Position 0 has no preceding context, so it can never be predicted.
        return sum(self.loss_mask[1:])


# ----------------------------------------------------------------------------- reading files


def iter_raw_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_or_row_number, record) from a .jsonl, .jsonl.zst or .parquet file (1-based)."""
    path = Path(path)
    if path.is_dir():
        raise KdError(f"--data {path}: is a directory; expected a .jsonl, .jsonl.zst or .parquet file")
    if not path.is_file():
        raise KdError(f"--data {path}: no such file")
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif name.endswith((".jsonl.zst", ".jsonl.zstd", ".json.zst")):
        yield from _iter_jsonl(path, _zstd_lines(path))
    elif name.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of line 1's JSON
            yield from _iter_jsonl(path, f)
    else:
        raise KdError(f"--data {path}: unknown file type; expected .jsonl, .jsonl.zst or .parquet")


def _zstd_lines(path: Path) -> Iterator[str]:
    """The text lines of a .zst file, frame after frame.

    zstandard's stream reader ends quietly on a file cut short (the partial block's records vanish, or
    a whole small file reads as empty), so frames are decoded here and a missing frame end is an error
    naming the line where the text stops.
    """
    import zstandard

    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    tail, lines_read, fed = "", 0, False
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        with open(path, "rb") as raw:
            while chunk := raw.read(1 << 20):
                while chunk:
                    fed = True
                    text = tail + decoder.decode(decompressor.decompress(chunk))
                    *lines, tail = text.split("\n")
                    lines_read += len(lines)
                    yield from (line + "\n" for line in lines)
                    chunk = b""
                    if decompressor.eof:  # a frame ended: the rest of the chunk starts the next one
                        chunk, fed = decompressor.unused_data, False
                        decompressor = zstandard.ZstdDecompressor().decompressobj()
    except zstandard.ZstdError as exc:
        raise KdError(f"{path}: corrupt zstd stream after line {lines_read} ({exc})") from exc
    if fed and not decompressor.eof:
        raise KdError(f"{path}: truncated zstd stream (the file ends inside a frame, after line {lines_read})")
    tail += decoder.decode(b"", final=True)
    if tail:
        yield tail


def _iter_jsonl(path: Path, lines) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KdError(f"{where(path, line_no)}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(record, dict):
                raise KdError(f"{where(path, line_no)}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record
    except UnicodeDecodeError as exc:
        raise KdError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise KdError(f"{path}: not a readable Parquet file ({exc})") from exc
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def corpus_fingerprint(path: str | Path) -> str:
    """sha256 of the corpus file's bytes (streamed): a changed corpus must not resume into old shards."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- formats


def detect_format(record: dict[str, Any], source: str) -> str:
    """Guess a record format from its keys (see the module docstring)."""
    keys = set(record)
    if "input_ids" in keys:  # checked first: an on-policy sample also carries its chat turns
        return "tokens"
    if "conversations" in keys:
        return "conversations"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "question" in keys and "answer" in keys:
        return "gsm8k"
    if "text" in keys:
        return "text"
    raise KdError(
        f"{source}: unknown record format (keys: {', '.join(sorted(keys)) or 'none'}); "
        f"use --data-format with one of {', '.join(FORMATS)}"
    )


def _require_str(record: dict[str, Any], key: str, source: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise KdError(f"{source}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _check_messages(messages: Any, source: str, key: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise KdError(f"{source}: '{key}' must be a non-empty list of {{role, content}} turns")
    out = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise KdError(f"{source}: {key}[{i}] must be an object with 'role' and 'content'")
        role, content = turn["role"], turn["content"]
        if role not in CHAT_ROLES:
            raise KdError(f"{source}: {key}[{i}] has unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
        if not isinstance(content, str):
            raise KdError(f"{source}: {key}[{i}].content must be a string")
        out.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise KdError(f"{source}: conversation has no assistant turn (nothing to distil)")
    return out


def normalize_record(record: dict[str, Any], fmt: str, source: str) -> Example:
    """Turn a raw record of format `fmt` into an Example (chat messages or plain text)."""
    if fmt in ("conversations", "messages"):
        return Example(source, messages=_check_messages(record.get(fmt), source, fmt))
    if fmt == "alpaca":
        instruction = _require_str(record, "instruction", source)
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise KdError(f"{source}: field 'input' must be a string")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return Example(
            source,
            messages=[
                {"role": "user", "content": user},
                {"role": "assistant", "content": _require_str(record, "output", source)},
            ],
        )
    if fmt == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational form
            return Example(source, messages=_check_messages(prompt + completion, source, "prompt+completion"))
        return Example(
            source,
            messages=[
                {"role": "user", "content": _require_str(record, "prompt", source)},
                {"role": "assistant", "content": _require_str(record, "completion", source)},
            ],
        )
    if fmt == "gsm8k":
        return Example(
            source,
            messages=[
                {"role": "user", "content": _require_str(record, "question", source)},
                {"role": "assistant", "content": _require_str(record, "answer", source)},
            ],
        )
    if fmt == "text":
        text = _require_str(record, "text", source)
        if not text:
            raise KdError(f"{source}: empty 'text'")
        return Example(source, text=text)
    if fmt == "tokens":
        return _token_example(record, source)
    raise KdError(f"--data-format {fmt}: unknown format; expected one of {', '.join(FORMATS)}")


def _token_example(record: dict[str, Any], source: str) -> Example:
    ids = record.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(type(t) is int and t >= 0 for t in ids):
        raise KdError(f"{source}: 'input_ids' must be a non-empty list of non-negative integers")
    mask = record.get("loss_mask")
    if mask is None:
        mask = [1] * len(ids)
    elif not isinstance(mask, list) or len(mask) != len(ids) or not all(m in (0, 1) for m in mask):
        raise KdError(f"{source}: 'loss_mask' must be a list of 0/1 as long as 'input_ids' ({len(ids)})")
    return Example(source, input_ids=ids, loss_mask=[int(m) for m in mask])


def check_token_ids(example: Example, tokenizer) -> None:
    """Ids of a ``tokens`` record must exist in the tokenizer (else the teacher's embedding fails later)."""
    top = max(example.input_ids)
    if top >= len(tokenizer):
        raise KdError(f"{example.source}: token id {top} is outside the tokenizer's vocabulary ({len(tokenizer)} ids)")


def iter_examples(path: str | Path, data_format: str | None = None, limit: int | None = None) -> Iterator[Example]:
    """Read and normalise records; the format is detected from the first record unless given."""
    if data_format is not None and data_format not in FORMATS:
        raise KdError(f"--data-format {data_format}: unknown format; expected one of {', '.join(FORMATS)}")
    fmt = data_format
    detected_at = None
    count = 0
    for line_no, record in iter_raw_records(path):
        if limit is not None and count >= limit:
            break
        source = where(path, line_no)
        if fmt is None:
            fmt, detected_at = detect_format(record, source), source
        try:
            example = normalize_record(record, fmt, source)
        except KdError as exc:
            if detected_at is not None:  # a record of another format than the first one: say that, not a field
                _refuse_other_format(record, fmt, source, detected_at, exc)
            raise
        yield example
        count += 1


def _refuse_other_format(record: dict[str, Any], fmt: str, source: str, detected_at: str, exc: KdError) -> None:
    """Raise a clearer error when a record that failed as `fmt` has the keys of another format."""
    try:
        other = detect_format(record, source)
    except KdError:
        return
    if other != fmt:
        raise KdError(
            f"{source}: a {other} record, but this file's format is {fmt} (detected from {detected_at}); "
            "one record format per file, or force one with --data-format"
        ) from exc


# ----------------------------------------------------------------------------- tokenization


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict[str, str]], source: str) -> tuple[str, list[tuple[int, int]]]:
    """Render a chat and return (text, [(start, end)) character spans of assistant turns).

    Each span starts where the generation prompt for that turn ends and stops after the turn's
    end-of-turn token. This relies on the template being prefix-stable (rendering the first i turns
    is a prefix of rendering all of them), which we check rather than assume.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise KdError(f"{source}: chat data needs a tokenizer with a chat template; this tokenizer has none")
    full = _render(tokenizer, messages)
    spans = []
    eos = tokenizer.eos_token or ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        # The last turn's rendering is the full one: one Jinja render saved per single-turn chat.
        through = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])
        if not full.startswith(through) or not through.startswith(prefix):
            raise KdError(
                f"{source}: the chat template is not prefix-stable (it rewrites earlier turns), "
                "so assistant tokens cannot be located; use --data-format text or another template"
            )
        # Stop right after the end-of-turn token if the template wrote one (the last eos in the
        # turn); otherwise after the turn's last non-space character.
        eos_at = through.rfind(eos, len(prefix)) if eos else -1
        end = eos_at + len(eos) if eos_at >= 0 else len(through.rstrip())
        spans.append((len(prefix), end))
    return full, spans


def tokenize_example(
    example: Example,
    tokenizer,
    max_seq_len: int | None = None,
    overflow: str = "truncate",
) -> TokenizedExample | None:
    """Tokenize one example into ids and loss mask.

    Returns None when the example must be skipped: longer than max_seq_len with overflow="skip",
    or left with no target token after truncation. The caller counts and reports skips.
    """
    if example.input_ids is not None:
        check_token_ids(example, tokenizer)
        ids, mask, text = list(example.input_ids), list(example.loss_mask), ""
        offsets = [(0, 0)] * len(ids)
    elif example.text is not None:
        text = example.text
        encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], [tuple(o) for o in encoding["offset_mapping"]]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids, offsets = ids + [tokenizer.eos_token_id], offsets + [(0, 0)]
        mask = [1] * len(ids)
    else:
        text, spans = assistant_char_spans(tokenizer, example.messages, example.source)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], [tuple(o) for o in encoding["offset_mapping"]]
        mask = [0] * len(ids)
        for t, (start, end) in enumerate(offsets):
            if end <= start:
                continue
            for span_start, span_end in spans:
                if start < span_end and end > span_start:
                    mask[t] = 1
                    break
    truncated = False
    if max_seq_len is not None and len(ids) > max_seq_len:
        if overflow == "skip":
            return None
        ids, mask, offsets, truncated = ids[:max_seq_len], mask[:max_seq_len], offsets[:max_seq_len], True
    result = TokenizedExample(example.source, ids, mask, truncated, text, offsets)
    return result if result.num_targets > 0 else None


# ----------------------------------------------------------------------------- batched tokenization


@dataclass
class EncodedExample:
    """What stage one keeps of a tokenized record: compact arrays, no text or offsets.

    `tokenize_example` keeps the rendered text and every token's character span (the trace and eval
    paths need them); at corpus scale those Python lists cost ~20x the ids, so the streaming
    tokenizer drops them as soon as the loss mask is known.
    """

    source: str
    input_ids: np.ndarray
    """int32 token ids."""
    loss_mask: np.ndarray
    """bool, True where the token is a target."""
    truncated: bool = False


def encode_examples(
    examples: list[Example],
    tokenizer,
    max_seq_len: int | None = None,
    overflow: str = "truncate",
) -> list[EncodedExample | None]:
    """`tokenize_example` for many examples at once: one fast-tokenizer call per kind of record.

    Chat templates are still rendered one record at a time (Jinja is Python), but the tokenizer
    runs once over the whole list (its Rust batch path) and the loss masks are computed from the
    offsets with numpy instead of a per-token loop. Returns, per example, the same ids, mask and
    truncation as `tokenize_example`, or None where it would skip the example.
    """
    texts: list[str | None] = [None] * len(examples)
    spans: list[list[tuple[int, int]] | None] = [None] * len(examples)
    plain, chat = [], []
    for i, example in enumerate(examples):
        if example.input_ids is not None:
            check_token_ids(example, tokenizer)
        elif example.text is not None:
            texts[i] = example.text
            plain.append(i)
        else:
            texts[i], spans[i] = assistant_char_spans(tokenizer, example.messages, example.source)
            chat.append(i)
    ids_of: list[list[int] | None] = [None] * len(examples)
    offsets_of: list[Any] = [None] * len(examples)
    for indices, special in ((plain, True), (chat, False)):
        if not indices:
            continue
        encoding = tokenizer(
            [texts[i] for i in indices], add_special_tokens=special, return_offsets_mapping=not special
        )
        for j, i in enumerate(indices):
            ids_of[i] = encoding["input_ids"][j]
            if not special:
                offsets_of[i] = encoding["offset_mapping"][j]
    eos = tokenizer.eos_token_id
    is_plain = set(plain)
    results: list[EncodedExample | None] = []
    for i, example in enumerate(examples):
        if example.input_ids is not None:
            ids, mask = np.asarray(example.input_ids, dtype=np.int32), np.asarray(example.loss_mask, dtype=bool)
        elif i in is_plain:
            ids = np.asarray(ids_of[i], dtype=np.int32)
            if eos is not None and (not len(ids) or ids[-1] != eos):
                ids = np.append(ids, np.int32(eos))
            mask = np.ones(len(ids), dtype=bool)
        else:
            ids = np.asarray(ids_of[i], dtype=np.int32)
            offsets = np.asarray(offsets_of[i], dtype=np.int64).reshape(-1, 2)
            start, end = offsets[:, 0], offsets[:, 1]
            mask = np.zeros(len(ids), dtype=bool)
            for span_start, span_end in spans[i]:
                mask |= (start < span_end) & (end > span_start)
            mask &= end > start
        truncated = False
        if max_seq_len is not None and len(ids) > max_seq_len:
            if overflow == "skip":
                results.append(None)
                continue
            ids, mask, truncated = ids[:max_seq_len], mask[:max_seq_len], True
        results.append(EncodedExample(example.source, ids, mask, truncated) if mask[1:].any() else None)
    return results
