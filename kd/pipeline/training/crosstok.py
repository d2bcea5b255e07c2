"""Cross-tokenizer distillation from a cache: `kd train --from-cache C --student S/ --cross-tokenizer`.

A cache holds the teacher's top-k (or RS draws) per teacher token. A student with another tokenizer
is served by three pure steps (numpy + tokenizers; no model), run on the loader's thread:

1. **Text and spans.** The teacher's ids of a record are decoded to text (special tokens kept as
   text, the teacher's own leading BOS dropped). Where that text is exactly the concatenation of
   each id's own text (byte-level BPE whose pieces are whole characters), the spans are those
   pieces' lengths, cumulated. Otherwise the text is re-encoded by the teacher's tokenizer with
   offsets; that round trip must give the cached ids back, else the record gives the student no
   targets at all (its teacher targets cannot be placed in the text; counted in
   ``records_not_round_tripped``). Each token's span is [end of the
   previous token, its end), so offsets trimmed of leading spaces (byte-level BPE) still tile the text.
2. **The student's sequence** is the same text, tokenized by the student's tokenizer with whatever it
   adds in front of a text (its BOS: Gemma's ``<bos>``). Teacher chat-template tokens are part of
   that text, as text: the student sees exactly what the teacher saw. A student token is a target
   when its first character lies in a teacher target's span; it gets the teacher distribution of
   the teacher target that starts at the same character, and CE only when none does (or that
   teacher token has no text in the student's vocabulary). A record that closes with the teacher's
   EOS closes with the student's EOS (not the characters of the teacher's EOS name), which gets the
   teacher's EOS row, so a text corpus gives the student the same sequence from a cache in its own
   tokenizer and from one in another (several teachers need that). Known limit: offsets are in characters,
   so the later byte pieces of a character that byte-level BPE splits (many Chinese characters,
   emoji) have no start of their own and get CE only, even with the same tokenizer on both sides.
3. **Vocabulary map.** Teacher id t counts towards the student token its text starts with: the first
   student id of the student's tokenization of t's text; ids with no text (special tokens, partial
   UTF-8 bytes) map to -1 and their mass joins the tail, except the EOS (the student's EOS).
   Computed once per tokenizer pair and kept in ``$KD_HOME/crosstok/``; the identical tokenizer maps
   to the identity. The cached top-k of an aligned position becomes a row over student ids
   (duplicates merged by log-sum-exp, width K kept, -inf padding), so the existing fused loss runs
   unchanged; RS draws are mapped and merged the same way (unmapped draws are dropped).

The divergence is computed on aligned targets only (`loss_sum`); CE covers every student target.
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers.decoders import ByteLevel as ByteLevelDecoder

from kd.cache.format import SampledTargets, TopKTargets, target_positions
from kd.errors import KdError
from kd.pipeline.models import kd_home, tokenizer_fingerprint
from kd.pipeline.training.batches import Batch, TrainSequence, collate


def leading_special_ids(tokenizer) -> list[int]:
    """Ids the tokenizer puts in front of any text (its BOS if it adds one; [] for SmolLM2)."""
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    return [i for i in ids if i != eos]


def token_spans(offsets) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of each token from an encoding's offsets: a token spans [end of the previous token,
    its end), so offsets trimmed of leading spaces (byte-level BPE) still tile the text."""
    ends = np.array([e for _, e in offsets], dtype=np.int64)
    starts = np.r_[0, ends[:-1]] if len(ends) else ends
    return starts, ends


def covered_characters(starts: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """bool[length + 1]: the characters of a text inside any of the spans [starts[i], ends[i])."""
    edges = np.zeros(length + 2, dtype=np.int64)  # +1 at each start, -1 at each end, cumulated
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    return np.cumsum(edges)[: length + 1] > 0


def by_first_character(starts: np.ndarray, ends: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """bool per token: its first character is `covered` (the rule that carries targets across tokenizers).

    A token of zero width is a later byte of the character the token before it started (byte-level
    BPE splits a Chinese character or an emoji into 2-4 ids): it goes with that token.
    """
    if not len(ends):
        return np.zeros(0, dtype=bool)
    width = ends > starts
    owner = np.maximum.accumulate(np.where(width, np.arange(len(ends)), 0))
    return covered[starts[owner]]


def vocab_texts(tokenizer) -> list[str | None]:
    """Text of each id alone, or None where it has none (special/added tokens, partial UTF-8 bytes)."""
    backend = tokenizer.backend_tokenizer
    special = set(tokenizer.all_special_ids) | {
        i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", True)
    }
    texts: list[str | None] = []
    for i in range(len(tokenizer)):
        if i in special:
            texts.append(None)
            continue
        text = backend.decode([i], skip_special_tokens=False)
        texts.append(None if not text or "\ufffd" in text else text)
    return texts


def build_vocab_map(teacher_tokenizer, student_tokenizer) -> np.ndarray:
    """map[teacher id] = first student id of the student's tokenization of its text, or -1 (int64).

    One special token maps by its role rather than its text: the teacher's EOS is the student's EOS
    (a record's end of text, `Aligner`), so "stop here" keeps its meaning across vocabularies.
    """
    if tokenizer_fingerprint(teacher_tokenizer) == tokenizer_fingerprint(student_tokenizer):
        return np.arange(len(teacher_tokenizer), dtype=np.int64)
    texts = vocab_texts(teacher_tokenizer)
    have = [i for i, t in enumerate(texts) if t is not None]
    encoded = student_tokenizer.backend_tokenizer.encode_batch([texts[i] for i in have], add_special_tokens=False)
    out = np.full(len(texts), -1, dtype=np.int64)
    for i, enc in zip(have, encoded, strict=True):
        if enc.ids:
            out[i] = enc.ids[0]
    if teacher_tokenizer.eos_token_id is not None and student_tokenizer.eos_token_id is not None:
        out[teacher_tokenizer.eos_token_id] = student_tokenizer.eos_token_id
    return out


def cached_vocab_map(teacher_tokenizer, student_tokenizer) -> np.ndarray:
    """`build_vocab_map`, computed once per tokenizer pair and kept under ``$KD_HOME/crosstok``."""
    key = f"{tokenizer_fingerprint(teacher_tokenizer)}-to-{tokenizer_fingerprint(student_tokenizer)}-v2.npy"
    path = kd_home() / "crosstok" / key
    if path.is_file():
        return np.load(path)
    vocab_map = build_vocab_map(teacher_tokenizer, student_tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{key}.{os.getpid()}.npy")
    np.save(tmp, vocab_map)
    os.replace(tmp, path)  # atomic: concurrent ranks write the same bytes
    return vocab_map


def student_ids(vocab_map: np.ndarray, ids) -> np.ndarray:
    """vocab_map[ids], with -1 for ids beyond the teacher tokenizer (padding rows of a larger embedding).

    Why: a teacher whose embedding is padded past its tokenizer (Qwen: 151,936 logits, 151,665
    tokens) can list such an id in its top-k; it has no text, so its mass joins the tail.
    """
    ids = np.asarray(ids, dtype=np.int64)
    inside = ids < len(vocab_map)
    return np.where(inside, vocab_map[np.where(inside, ids, 0)], -1)


def map_topk(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, vocab_map: np.ndarray):
    """Teacher top-k rows [N, K] -> student rows [N, K] (merged by logsumexp, -inf padded), tail [N], mapped mass [N].

    Returns (student_ids, student_logprobs, student_tail, mapped_prob, listed_prob): the last two are
    per row the teacher probability that found a student id and the probability the row listed.
    Every step sorts within rows (axis 1) rather than over all N·K entries: the loader maps a whole
    record batch in one call, and a global sort of that grows faster than the batch.
    """
    n, k = ids.shape
    student = student_ids(vocab_map, ids)
    lp = logprobs.astype(np.float64)
    valid = np.isfinite(lp)
    mapped = valid & (student >= 0)
    p = np.where(valid, np.exp(np.where(valid, lp, 0.0)), 0.0)
    listed_prob = p.sum(1)
    mapped_prob = np.where(mapped, p, 0.0).sum(1)
    unmapped_prob = listed_prob - mapped_prob
    out_ids = np.zeros((n, k), dtype=np.int64)
    out_lp = np.full((n, k), -np.inf, dtype=np.float32)
    if n and k and mapped.any():
        key = np.where(mapped, student, np.iinfo(np.int64).max)
        by_value = np.sort(key, axis=1)
        merges = ((by_value[:, 1:] == by_value[:, :-1]) & (by_value[:, 1:] != np.iinfo(np.int64).max)).any(1)
        # Rows in descending order (as readers give them) where no two candidates land on one student
        # id (most rows): drop the unmapped slots and keep the order -- no sort. Others: the general path.
        descending = np.where(valid[:, 1:], lp[:, 1:] <= lp[:, :-1], True).all(1)
        merges |= ~descending
        clean = ~merges
        rows, cols = np.nonzero(mapped & clean[:, None])
        slot = (np.cumsum(mapped, axis=1) - 1)[rows, cols]
        out_ids[rows, slot] = student[rows, cols]
        out_lp[rows, slot] = logprobs[rows, cols]
        if merges.any():
            merged_ids, merged_lp = _merge_rows(key[merges], lp[merges], mapped[merges])
            out_ids[merges], out_lp[merges] = merged_ids, merged_lp
    with np.errstate(divide="ignore"):
        out_tail = np.logaddexp(tail.astype(np.float64), np.log(np.maximum(unmapped_prob, 0.0))).astype(np.float32)
    return out_ids, out_lp, out_tail, mapped_prob, listed_prob


def _merge_rows(key: np.ndarray, lp: np.ndarray, mapped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows where several candidates share a student id: one log-sum-exp per id, rows re-sorted descending."""
    n, k = key.shape
    # group equal student ids inside each row: sort the row by id (unmapped last), then one
    # log-sum-exp per run of equal ids, written at the run's first slot
    by_id = np.argsort(key, axis=1, kind="stable")
    key = np.take_along_axis(key, by_id, 1)
    lp_sorted = np.take_along_axis(np.where(mapped, lp, -np.inf), by_id, 1)
    first = np.ones((n, k), dtype=bool)
    first[:, 1:] = key[:, 1:] != key[:, :-1]
    starts = np.flatnonzero(first)
    merged = np.full(n * k, -np.inf)
    merged[starts] = np.logaddexp.reduceat(lp_sorted.ravel(), starts)
    merged = merged.reshape(n, k).astype(np.float32)  # sort as stored: float32 ties keep id order
    merged[~first | (key == np.iinfo(np.int64).max)] = -np.inf
    # keep each row in descending probability order, as readers hand rows out
    order = np.argsort(-merged, axis=1, kind="stable")
    out_lp = np.take_along_axis(merged, order, 1)
    out_ids = np.where(np.isfinite(out_lp), np.take_along_axis(key, order, 1), 0)
    return out_ids, out_lp


def map_tempered_tails(
    ids: np.ndarray, logprobs: np.ndarray, tempered_tails: np.ndarray, temperatures, vocab_map: np.ndarray
) -> np.ndarray:
    """The tempered tails [N, M] of teacher rows once their unmapped ids have joined the tail.

    At τ the cached ids share 1 − tail_τ in proportion to p^(1/τ) (`retemper_sparse`), so an id that
    maps to no student token adds that share to the tail at τ, as `map_topk` adds its p at τ = 1
    (the rule of `fold_out_of_vocab` for ids beyond a student's vocabulary). Ids that merge into one
    student id are re-tempered as one bucket by the loss: their tempered share is exact only when
    each student id receives one teacher id (the usual case: the vocabulary map is nearly injective
    on a top-k row).
    """
    lp = logprobs.astype(np.float64)
    valid = np.isfinite(lp)
    unmapped = valid & (student_ids(vocab_map, ids) < 0)
    out = tempered_tails.astype(np.float64).copy()
    if not unmapped.any():
        return tempered_tails
    for m, temperature in enumerate(temperatures):
        scaled = np.where(valid, lp / temperature, -np.inf)
        top = np.max(scaled, axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        weights = np.exp(scaled - top)
        share = np.where(unmapped, weights, 0.0).sum(1) / np.maximum(weights.sum(1), 1e-300)
        tail = np.exp(np.minimum(out[:, m], 0.0))
        with np.errstate(divide="ignore"):
            out[:, m] = np.log(tail + (1.0 - tail) * share)
    return out.astype(tempered_tails.dtype)


def map_sampled(ids: list[np.ndarray], counts: list[np.ndarray], vocab_map: np.ndarray):
    """RS rows: map ids, sum counts of ids that merge, drop draws that map nowhere."""
    out_ids, out_counts, mapped, total = [], [], 0.0, 0.0
    for i, c in zip(ids, counts, strict=True):
        s = student_ids(vocab_map, i)
        c = np.asarray(c, dtype=np.float64)
        keep = s >= 0
        u, inv = np.unique(s[keep], return_inverse=True)
        out_ids.append(u.astype(np.int64))
        out_counts.append(np.bincount(inv, weights=c[keep], minlength=len(u)).astype(np.float32))
        mapped += float(c[keep].sum())
        total += float(c.sum())
    return out_ids, out_counts, mapped, total


@dataclass
class AlignedSequence(TrainSequence):
    """A student sequence whose teacher data covers only the aligned targets (`teacher_rows`)."""

    teacher_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    """bool per student target (in target order): True where a teacher row exists."""
    row: int | None = None
    """The cache row it was aligned from (kept by `Aligner.__call__`: the on-policy judge groups by it)."""


@dataclass
class AlignStats:
    """Running coverage counts (loader thread writes, training loop reads)."""

    student_targets: int = 0
    aligned_targets: int = 0
    teacher_mass_listed: float = 0.0
    teacher_mass_mapped: float = 0.0
    records: int = 0
    records_not_round_tripped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def metrics(self) -> dict[str, float]:
        with self._lock:
            return {
                "crosstok_target_coverage": self.aligned_targets / max(self.student_targets, 1),
                "crosstok_mass_mapped": self.teacher_mass_mapped / max(self.teacher_mass_listed, 1e-30),
                "crosstok_records_not_round_tripped": self.records_not_round_tripped / max(self.records, 1),
            }


@dataclass
class _Pieces:
    """A teacher vocabulary's texts, one per id, and their lengths in characters (-1: part of a character)."""

    texts: list[str]
    lengths: np.ndarray


class Aligner:
    """Turns cached teacher sequences into student sequences with mapped teacher rows (see module docstring)."""

    def __init__(
        self, teacher_tokenizer, student_tokenizer, vocab_map: np.ndarray | None = None, num_samples: int = 0
    ) -> None:
        self.num_samples = num_samples
        """RS draws per position in the cache (kept: unmapped draws are dropped, not renormalised)."""
        self.teacher = teacher_tokenizer.backend_tokenizer
        self.student = student_tokenizer.backend_tokenizer
        self.teacher_prefix = leading_special_ids(teacher_tokenizer)
        self.student_prefix = leading_special_ids(student_tokenizer)
        self.teacher_eos = teacher_tokenizer.eos_token_id
        self.student_eos = student_tokenizer.eos_token_id
        self.vocab_map = cached_vocab_map(teacher_tokenizer, student_tokenizer) if vocab_map is None else vocab_map
        self.identity = np.array_equal(self.vocab_map, np.arange(len(self.vocab_map)))
        """Same tokenizer on both sides: teacher rows pass through untouched (bit-identical loss)."""
        self.stats = AlignStats()
        self._teacher_pieces: _Pieces | None = None

    def teacher_spans(self, input_ids: np.ndarray) -> tuple[str, np.ndarray, np.ndarray, int] | None:
        """(text, starts, ends, skipped) of the teacher tokens after its leading specials; None if no round trip."""
        body, skip = self._body(input_ids)
        text = self.teacher.decode(body, skip_special_tokens=False)
        return self._spans(body, skip, text, self.teacher.encode(text, add_special_tokens=False))

    def _body(self, input_ids: np.ndarray) -> tuple[list[int], int]:
        """The teacher ids between its leading specials and a closing EOS, and how many leading ones were skipped."""
        ids = [int(i) for i in input_ids]
        skip = len(self.teacher_prefix) if ids[: len(self.teacher_prefix)] == self.teacher_prefix else 0
        end = len(ids) - 1 if self._ends_with_eos(ids) and len(ids) - 1 >= skip else len(ids)
        return ids[skip:end], skip

    def _ends_with_eos(self, ids) -> bool:
        """Whether a record closes with the teacher's EOS that the student's EOS then stands for.

        Why: decoded as text, the teacher's EOS would reach the student as the characters of its name
        ("<eos>"), and a same-tokenizer cache of the same text would give the student other tokens
        than a cross-tokenizer one (several teachers need one student sequence per record).
        """
        return (
            self.student_eos is not None
            and self.teacher_eos is not None
            and not self.identity
            and len(ids) > 0
            and int(ids[-1]) == self.teacher_eos
        )

    def _spans_from_pieces(
        self, body: list[int], skip: int, text: str
    ) -> tuple[str, np.ndarray, np.ndarray, int] | None:
        """Token spans from each id's own text, when the text is exactly their concatenation; else None.

        Why: this skips re-encoding the text (a third of the alignment's time). It holds for byte-level
        BPE wherever every piece is whole characters; a piece that is part of a character (its text has
        no length of its own), or a decoder that rewrites text around pieces (SentencePiece's leading
        space), falls back to `_spans` on the re-encoded text. Only a byte-level decoder concatenates
        its pieces as they are, so any other teacher goes straight to the round trip (without building
        a table of its whole vocabulary: 0.8 s for Gemma-3's, every record a miss).
        """
        if not isinstance(self.teacher.decoder, ByteLevelDecoder):
            return None
        pieces = self._pieces()
        lengths = pieces.lengths[body] if body else np.zeros(0, dtype=np.int64)
        if (lengths < 0).any() or int(lengths.sum()) != len(text) or "".join(pieces.texts[i] for i in body) != text:
            return None
        ends = np.cumsum(lengths)
        return text, np.r_[0, ends[:-1]] if len(ends) else ends, ends, skip

    def _pieces(self) -> _Pieces:
        """Each teacher id's text alone and its length (-1: not whole characters), computed on first use."""
        if self._teacher_pieces is None:
            size = self.teacher.get_vocab_size(with_added_tokens=True)
            texts = self.teacher.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
            lengths = np.array([-1 if "\ufffd" in t else len(t) for t in texts], dtype=np.int64)
            self._teacher_pieces = _Pieces(texts, lengths)
        return self._teacher_pieces

    @staticmethod
    def _spans(body: list[int], skip: int, text: str, enc) -> tuple[str, np.ndarray, np.ndarray, int] | None:
        if enc.ids != body:
            return None
        starts, ends = token_spans(enc.offsets)
        return text, starts, ends, skip

    def align(self, input_ids: np.ndarray, loss_mask: np.ndarray, teacher) -> AlignedSequence:
        """One record: the student's ids, loss mask and teacher rows (only where aligned)."""
        return self.align_many([(input_ids, loss_mask, teacher)])[0]

    def align_many(self, records: list[tuple[np.ndarray, np.ndarray, object]]) -> list[AlignedSequence]:
        """Records (ids, loss mask, teacher rows) -> student sequences, in order.

        Why batched: the three tokenizer passes (teacher decode, teacher round trip, student encode) run
        as one `*_batch` call each, in Rust on every core, and the top-k rows of all records are mapped
        in one `map_topk` call; per record that was most of the loader's time.
        """
        bodies = [self._body(ids) for ids, _, _ in records]
        texts = self.teacher.decode_batch([b for b, _ in bodies], skip_special_tokens=False)
        spans = [self._spans_from_pieces(b, skip, t) for (b, skip), t in zip(bodies, texts, strict=True)]
        again = [i for i, span in enumerate(spans) if span is None]
        if again:  # pieces that are not whole characters: offsets from re-encoding the text
            round_trips = self.teacher.encode_batch([texts[i] for i in again], add_special_tokens=False)
            for i, enc in zip(again, round_trips, strict=True):
                spans[i] = self._spans(bodies[i][0], bodies[i][1], texts[i], enc)
        for i, span in enumerate(spans):
            if span is None:  # the record's text with its leading specials, CE only
                texts[i] = self.teacher.decode([int(x) for x in records[i][0]], skip_special_tokens=False)
        student_encs = self.student.encode_batch(texts, add_special_tokens=False)
        plans = [
            self._plan(ids, mask, span, text, enc)
            for (ids, mask, _), span, text, enc in zip(records, spans, texts, student_encs, strict=True)
        ]
        rows_of = self._teacher_rows([teacher for _, _, teacher in records], [plan[3] for plan in plans])
        out = []
        for (s_ids, s_mask, aligned, _), teacher_rows in zip(plans, rows_of, strict=True):
            out.append(AlignedSequence(s_ids, s_mask, teacher_rows, None, aligned))
        with self.stats._lock:
            self.stats.records += len(records)
            self.stats.records_not_round_tripped += sum(span is None for span in spans)
            self.stats.student_targets += sum(len(plan[2]) for plan in plans)
            self.stats.aligned_targets += sum(int(plan[2].sum()) for plan in plans)
        return out

    def _plan(self, input_ids, loss_mask, spans, text: str, enc):
        """(student ids, student loss mask, aligned per student target, teacher row per aligned target)."""
        t_targets = target_positions(loss_mask)
        closing = spans is not None and self._ends_with_eos(input_ids)  # teacher EOS -> student EOS
        if spans is None:
            masked = np.zeros(len(text) + 1, dtype=bool)
            start_of, target_of = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        else:
            _, starts, ends, skip = spans
            inside = (t_targets - skip >= 0) & (t_targets - skip < len(starts))
            ordinal = np.flatnonzero(inside)  # index among the teacher's targets
            b = t_targets[ordinal] - skip
            masked = covered_characters(starts[b], ends[b], len(text))  # characters of a teacher target
            wide = ends[b] > starts[b]  # starts are increasing over tokens of non-zero width
            start_of, target_of = starts[b][wide], ordinal[wide]
        s_starts, s_ends = token_spans(enc.offsets)
        prefix = len(self.student_prefix)
        suffix = [self.student_eos] if closing else []
        s_ids = np.array(self.student_prefix + list(enc.ids) + suffix, dtype=np.int64)
        s_mask = np.zeros(len(s_ids), dtype=np.uint8)
        # A zero-width token (a later byte of a character) is a target with the token that started the
        # character, and never aligned (its "start" is the next character's).
        width = s_ends > s_starts
        s_mask[prefix : prefix + len(s_ends)] = by_first_character(s_starts, s_ends, masked)
        eos_is_target = closing and len(t_targets) > 0 and t_targets[-1] == len(input_ids) - 1
        if closing:
            s_mask[-1] = eos_is_target
        s_mask[0] = 0  # position 0 predicts nothing
        s_targets = target_positions(s_mask)
        body_targets = len(s_targets) - int(eos_is_target and len(s_ids) > 1)
        rows = np.full(len(s_targets), -1, dtype=np.int64)
        if len(start_of) and body_targets:
            at = s_targets[:body_targets] - prefix
            k = np.minimum(np.searchsorted(start_of, s_starts[at]), len(start_of) - 1)
            j = target_of[k]
            teacher_target_ids = np.asarray(input_ids, dtype=np.int64)[t_targets]
            hit = width[at] & (start_of[k] == s_starts[at]) & (student_ids(self.vocab_map, teacher_target_ids[j]) >= 0)
            if not self.identity and self.teacher_eos is not None:
                # an EOS inside a record (a chat turn's end, then more text) reaches the student as the
                # characters of its name: the teacher's row (its mass on "stop", mapped to the student's
                # EOS) is not a distribution over those characters' first token. CE only there.
                hit &= teacher_target_ids[j] != self.teacher_eos
            rows[:body_targets] = np.where(hit, j, -1)
        if eos_is_target and len(s_ids) > 1 and self.vocab_map[self.teacher_eos] >= 0:
            rows[-1] = len(t_targets) - 1  # the teacher's EOS row, its EOS mass now on the student's EOS
        aligned = rows >= 0
        return s_ids, s_mask, aligned, rows[aligned]

    def _teacher_rows(self, teachers: list, picks: list[np.ndarray]) -> list:
        """Each record's teacher rows at its aligned targets, mapped onto the student's vocabulary."""
        if not teachers:
            return []
        if isinstance(teachers[0], TopKTargets):
            ids = np.concatenate([t.ids[p] for t, p in zip(teachers, picks, strict=True)])
            lp = np.concatenate([t.logprobs[p] for t, p in zip(teachers, picks, strict=True)])
            tail = np.concatenate([t.tail[p] for t, p in zip(teachers, picks, strict=True)])
            temperatures = teachers[0].temperatures if teachers[0].tempered_tails is not None else ()
            tempered = (
                np.concatenate([t.tempered_tails[p] for t, p in zip(teachers, picks, strict=True)])
                if temperatures
                else None
            )
            if self.identity:
                mapped_mass = listed_mass = float(np.exp(lp.astype(np.float64)).sum())
            else:
                if tempered is not None:  # before map_topk: it needs the teacher's own rows
                    tempered = map_tempered_tails(ids, lp, tempered, temperatures, self.vocab_map)
                ids, lp, tail, mapped, listed = map_topk(ids, lp, tail, self.vocab_map)
                mapped_mass, listed_mass = float(mapped.sum()), float(listed.sum())
            bounds = np.cumsum([len(p) for p in picks])[:-1]
            tempered_parts = np.split(tempered, bounds) if tempered is not None else [None] * len(picks)
            out = [
                TopKTargets(i, v, t, tt, temperatures if tt is not None else ())
                for i, v, t, tt in zip(
                    np.split(ids, bounds), np.split(lp, bounds), np.split(tail, bounds), tempered_parts, strict=True
                )
            ]
        else:
            out, mapped_mass, listed_mass = [], 0.0, 0.0
            for teacher, picked in zip(teachers, picks, strict=True):
                ids, counts, mapped, listed = map_sampled(
                    [teacher.ids[j] for j in picked], [teacher.counts[j] for j in picked], self.vocab_map
                )
                out.append(SampledTargets(ids, counts))
                mapped_mass, listed_mass = mapped_mass + mapped, listed_mass + listed
        with self.stats._lock:
            self.stats.teacher_mass_mapped += mapped_mass
            self.stats.teacher_mass_listed += listed_mass
        return out

    def stream(self, seqs, batch_size: int):
        """Cached sequences (any iterable) -> aligned ones, `batch_size` records at a time (streamed)."""
        seqs = iter(seqs)
        while chunk := list(itertools.islice(seqs, batch_size)):
            yield from self(chunk)

    def __call__(self, seqs: list) -> list[AlignedSequence]:
        """The loader's hook: cached sequences in, student sequences out (same order, same rows)."""
        out = self.align_many([(s.input_ids, s.loss_mask, s.teacher) for s in seqs])
        for seq, aligned in zip(seqs, out, strict=True):
            aligned.row = getattr(seq, "row", None)
        return out

    def collate(self, seqs: list[AlignedSequence], pad_id: int = 0) -> Batch:
        """`collate`, plus the per-target mask of rows that carry a teacher distribution."""
        batch = collate(seqs, pad_id)
        batch.teacher_rows = torch.from_numpy(np.concatenate([s.teacher_rows for s in seqs]))
        if self.num_samples and batch.teacher is not None and hasattr(batch.teacher, "num_samples"):
            batch.teacher.num_samples = self.num_samples
        return batch


def loss_sum(distill_loss_sum, hidden, weight, bias, labels, teacher, config, token_weights, transform, rows):
    """The loss when only `rows` (bool[N]) of the targets have teacher data: divergence there, α·CE everywhere.

    With every row aligned it is exactly `distill_loss_sum` on the whole batch.
    """
    if bool(rows.all()):
        return distill_loss_sum(hidden, weight, bias, labels, teacher, config, token_weights, transform)
    if not bool(rows.any()):
        parts = distill_loss_sum(hidden, weight, bias, labels, None, config, token_weights, transform)
        parts.total = config.alpha * parts.total
        return parts
    ce_only = ~rows

    def pick(x, m):
        return None if x is None else x[m]

    parts = distill_loss_sum(
        hidden[rows], weight, bias, labels[rows], teacher, config, pick(token_weights, rows), transform
    )
    rest = distill_loss_sum(
        hidden[ce_only], weight, bias, labels[ce_only], None, config, pick(token_weights, ce_only), transform
    )
    parts.total = parts.total + config.alpha * rest.total
    parts.ce = parts.ce + rest.ce
    return parts


def aligner_for(reader, student_tokenizer, load_tokenizer, flag: str = "--from-cache") -> Aligner:
    """The Aligner of a cache and a student; the teacher's tokenizer comes from the path the manifest names.

    The cache keeps the teacher's ids, not its text: the text is recovered with the teacher's
    tokenizer, so a cache whose teacher is not on this machine (or changed) is refused in one line.
    """
    from kd.pipeline.models import resolve_model

    mode = reader.settings.get("mode", "topk")
    if mode not in ("topk", "rs"):  # a hidden cache's teacher head speaks the teacher's vocabulary only
        raise KdError(f"{flag}: --cross-tokenizer needs a top-k or rs cache, not a {mode} cache")
    teacher = reader.settings["teacher"]
    path = teacher["path"]
    if teacher["kind"] in ("gguf", "hf_dir") and not Path(path).exists():
        raise KdError(
            f"{flag}: --cross-tokenizer needs the teacher's tokenizer to recover the text, "
            f"and the cache's teacher {path} is not on this machine"
        )
    teacher_tokenizer = load_tokenizer(resolve_model(path, flag))
    if tokenizer_fingerprint(teacher_tokenizer) != reader.settings["tokenizer_fingerprint"]:
        raise KdError(f"{flag}: the tokenizer at {path} is not the one the cache was made with (--cross-tokenizer)")
    return Aligner(teacher_tokenizer, student_tokenizer, num_samples=int(reader.settings.get("num_samples") or 0))
