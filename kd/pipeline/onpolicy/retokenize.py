"""A round's samples in the teacher's tokens, for `kd on-policy --cross-tokenizer` (pure: tokenizers only).

    from kd.pipeline.onpolicy.retokenize import Retokenizer
    teacher_records = Retokenizer(student_tokenizer, teacher_tokenizer).convert(read_samples(path))

samples.jsonl holds the student's own token ids; a teacher with another tokenizer cannot score those
ids, so each record becomes a ``tokens`` record in the teacher's ids, which stage one then scores
unchanged (one record per sample, in order: cache row i is still line i of samples.jsonl):

* **Text.** The student's ids are decoded to text, special tokens kept as text and the student's own
  leading specials (its BOS) dropped, as training/crosstok.py's Aligner does for a teacher's ids.
* **The teacher's ids** are that text encoded by the teacher's tokenizer, after whatever it puts in
  front of a text (Gemma's ``<bos>``). The student's chat-template tokens are text to the teacher,
  except a closing EOS: the student's EOS at the end of a sample becomes the teacher's EOS (a target
  if it was one), and the Aligner maps it back, so the student learns the teacher's "stop here".
* **Targets.** A teacher token is a target when its first character lies in a student target's
  characters: the mirror of the Aligner's rule (`by_first_character`), which later carries these
  teacher targets back onto the student's tokens. A run of student targets covers the characters from
  the end of the token before it to the end of its last token (`token_spans`' convention), found by
  decoding the ids before each boundary, so a sample need not be the canonical tokenization of its text.

Afterwards the student is judged and trained through the Aligner: on its text re-tokenized canonically
by its own tokenizer, so a sample the engine drew as a non-canonical tokenization is trained on as the
canonical one (the same text, other ids).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kd.pipeline.training.crosstok import by_first_character, covered_characters, leading_special_ids, token_spans


class Retokenizer:
    """Student-token sample records -> teacher-token records with the targets carried across by text."""

    def __init__(self, student_tokenizer, teacher_tokenizer) -> None:
        self.student = student_tokenizer.backend_tokenizer
        self.teacher = teacher_tokenizer.backend_tokenizer
        self.student_prefix = leading_special_ids(student_tokenizer)
        self.teacher_prefix = leading_special_ids(teacher_tokenizer)
        self.student_eos = student_tokenizer.eos_token_id
        self.teacher_eos = teacher_tokenizer.eos_token_id

    def convert(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """samples.jsonl records (``input_ids``, ``loss_mask``, ``meta``) -> ``tokens`` records, in order.

        Every tokenizer pass is one `*_batch` call over the records (in Rust, on every core).
        """
        closings = [self._closing(r["input_ids"], r["loss_mask"]) for r in records]
        bodies = [
            self._body(r["input_ids"][: len(r["input_ids"]) - bool(c)], r["loss_mask"][: len(r["input_ids"]) - bool(c)])
            for r, c in zip(records, closings, strict=True)
        ]
        texts = self.student.decode_batch([ids for ids, _ in bodies], skip_special_tokens=False)
        bounds = [_run_bounds(mask) for _, mask in bodies]
        # The text before each boundary strictly inside a record (0 and the end need no decoding), as far
        # as it agrees with the whole text: a boundary inside a character (a byte-level BPE piece) falls
        # at that character's start.
        inner = [(i, b) for i, (ids, _) in enumerate(bodies) for b in bounds[i] if 0 < b < len(ids)]
        prefixes = self.student.decode_batch([bodies[i][0][:b] for i, b in inner], skip_special_tokens=False)
        char_at = {(i, b): len(os.path.commonprefix([p, texts[i]])) for (i, b), p in zip(inner, prefixes, strict=True)}
        encodings = self.teacher.encode_batch(texts, add_special_tokens=False)
        out = []
        for i, (record, text, enc) in enumerate(zip(records, texts, encodings, strict=True)):
            n = len(bodies[i][0])
            chars = [0 if b == 0 else len(text) if b == n else char_at[(i, b)] for b in bounds[i]]
            covered = covered_characters(np.array(chars[0::2], np.int64), np.array(chars[1::2], np.int64), len(text))
            starts, ends = token_spans(enc.offsets)
            mask = [0] * len(self.teacher_prefix) + by_first_character(starts, ends, covered).astype(int).tolist()
            ids = self.teacher_prefix + list(enc.ids)
            if closings[i]:  # the student's closing EOS is the teacher's: "stop here" is scored as such
                ids.append(self.teacher_eos)
                mask.append(int(closings[i] == "target"))
            if mask:
                mask[0] = 0  # position 0 predicts nothing
            out.append({"input_ids": ids, "loss_mask": mask, "meta": record["meta"]})
        return out

    def _closing(self, input_ids: list[int], loss_mask: list[int]) -> str | None:
        """ "target" / "context" when the sample closes with the student's EOS (a target or not), else None.

        Why: decoded as text the student's EOS would reach the teacher as the characters of its name,
        and the teacher's probability of stopping would never be asked for.
        """
        if self.student_eos is None or self.teacher_eos is None or len(input_ids) < 2:
            return None
        if int(input_ids[-1]) != self.student_eos:
            return None
        return "target" if loss_mask[-1] else "context"

    def _body(self, input_ids: list[int], loss_mask: list[int]) -> tuple[list[int], np.ndarray]:
        """The student's ids after its own leading specials, and their loss mask."""
        ids = [int(i) for i in input_ids]
        skip = len(self.student_prefix) if ids[: len(self.student_prefix)] == self.student_prefix else 0
        return ids[skip:], np.asarray(loss_mask[skip:], dtype=bool)


def _run_bounds(mask: np.ndarray) -> list[int]:
    """[start, end, start, end, ...] of each run of True in `mask` (token indices, ends exclusive)."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return edges.tolist()
