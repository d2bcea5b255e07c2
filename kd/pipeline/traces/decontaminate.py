"""Decontamination: drop training prompts that share a word n-gram with a held-out set.

    from kd.pipeline.traces.decontaminate import HeldOutNgrams
    held_out = HeldOutNgrams.from_files(["heldout.jsonl"], n=8)
    kept = [p for p in prompts if not held_out.overlaps(p.question)]

open-r1's rule (scripts/decontaminate.py): lowercase, split on whitespace, and a prompt is
contaminated when any of its n consecutive words (8 by default) also occur consecutively in a
held-out text. A text shorter than n words has no n-gram; it is compared whole instead, so a short
held-out question copied verbatim into the training prompts is still caught.

Held-out records are read in kd's data formats (`kd.pipeline.data`): the prompt side of each record
(``question``, ``problem``, ``prompt``, ``instruction``/``input``, ``text``, and the system and user
turns of ``messages``/``conversations``), not its answer: an answer that happens to repeat a
training question is not a leak of the question.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.errors import KdError
from kd.pipeline.data import iter_raw_records

_PROMPT_FIELDS = ("question", "problem", "prompt", "instruction", "input", "text")
_TURN_FIELDS = ("messages", "conversations")


def words(text: str) -> list[str]:
    """open-r1's normalisation: lowercase, whitespace-separated words (punctuation stays on the word)."""
    return text.lower().split()


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The word n-grams of a text."""
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def record_texts(record: dict[str, Any]) -> Iterator[str]:
    """The prompt-side texts of a record in any of kd's formats (see the module docstring)."""
    for key in _PROMPT_FIELDS:
        value = record.get(key)
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):  # TRL's conversational prompt: a list of turns
            yield from _turn_texts(value)
    for key in _TURN_FIELDS:
        if isinstance(record.get(key), list):
            yield from _turn_texts(record[key])


def _turn_texts(turns: list) -> Iterator[str]:
    for turn in turns:
        if isinstance(turn, dict) and turn.get("role") != "assistant" and isinstance(turn.get("content"), str):
            yield turn["content"]


@dataclass
class HeldOutNgrams:
    """The n-grams (and short whole texts) of held-out sets, to test training prompts against."""

    n: int
    grams: set[tuple[str, ...]] = field(default_factory=set)
    short: set[tuple[str, ...]] = field(default_factory=set)
    """Held-out texts of fewer than n words, whole."""

    def add(self, text: str) -> None:
        w = tuple(words(text))
        if not w:
            return
        if len(w) < self.n:
            self.short.add(w)
        else:
            self.grams.update(w[i : i + self.n] for i in range(len(w) - self.n + 1))

    def overlaps(self, text: str) -> bool:
        """Whether `text` shares an n-gram with a held-out text, or equals a short one."""
        w = tuple(words(text))
        if w in self.short:
            return True
        return any(w[i : i + self.n] in self.grams for i in range(len(w) - self.n + 1))

    @classmethod
    def from_files(cls, paths: Iterable[str], n: int, flag: str = "--decontaminate") -> HeldOutNgrams:
        """Read every record of each file (.jsonl, .jsonl.zst, .parquet); a missing or empty file is a KdError."""
        held_out = cls(n)
        paths = list(paths)
        for path in paths:  # all checked before any is read: a typo fails at once
            if not Path(path).is_file():
                raise KdError(f"{flag} {path}: no such file")
        for path in paths:
            texts = 0
            for _, record in iter_raw_records(path):
                for text in record_texts(record):
                    held_out.add(text)
                    texts += 1
            if not texts:
                raise KdError(f"{flag} {path}: no question, prompt, text or user turn in any record")
        return held_out
