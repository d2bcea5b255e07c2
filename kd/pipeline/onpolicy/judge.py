"""The teacher's verdict on a student's own samples, read from the cache the teacher wrote over them.

For every sampled token t (a target of the cache) with the student's prefix before it:

* ``reverse_kl``: KL(student ‖ teacher) over the cached buckets (the teacher's top-k ids plus one
  tail bucket), the quantity on-policy distillation minimises; ``forward_kl`` alongside;
* ``teacher_logprob``: log p_teacher(t). When t lies outside the cached top-k only the tail mass is
  known, and t is given an even share of it (tail / (V − K));
  ``teacher_topk_coverage`` says how often that was needed (1 − coverage);
* ``student_logprob``: log p_student(t), the student's own confidence in what it wrote.

A cached tail of −inf with fewer than V ids cached says only that the teacher's mass outside its
top-k was below what its engine resolves (vLLM derives the tail as log(1 − Σ top-k) from float32
log-probs, which reaches 0 for a confident teacher). Judged as exactly 0, any student mass there
would cost ~1000 nats (the log floor); it is judged as UNRESOLVED_TAIL instead, the most it can be,
and ``teacher_unresolved_tail_share`` counts those tokens.

Across tokenizers (`kd on-policy --cross-tokenizer`) the sequences come aligned to the student's
tokenizer (training/crosstok.py: its text re-tokenized canonically, the teacher's rows mapped onto its
vocabulary) and carry a teacher row at some targets only (``teacher_rows``): every figure is then over
those aligned targets, the only ones the teacher's distribution is known at.

From a hidden-state cache (`--store hidden`) every figure is exact: the teacher's full-vocabulary
log-probs are rebuilt from its stored final hidden state and head, chunk by chunk, so coverage is 1
and no tail is assumed.

Every figure is a per-token mean over all samples, with a 95% bootstrap interval over *prompts*:
a prompt's samples share its difficulty, so prompts (not tokens or samples) are resampled whole.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np
import torch

from kd.cache.reader import CachedSequence
from kd.losses import (
    SparseTeacher,
    bucket_divergence,
    fold_out_of_vocab,
    retemper_sparse,
    student_buckets,
)
from kd.losses.fused import checked_teacher_logits
from kd.pipeline.evaluation.sequences import (
    aligned_rows,
    bootstrap_ratio_ci,
    paired_ratio_difference_ci,
    unwrap_causal_lm,
)
from kd.pipeline.heads import head_logits, split_body_and_head
from kd.pipeline.training.batches import collate

UNRESOLVED_TAIL = 1e-7
"""Tail mass assumed where the cache says -inf (float32 resolution of 1 − Σ p, see above)."""

SUMS = (
    "reverse_kl",
    "forward_kl",
    "teacher_logprob",
    "student_logprob",
    "teacher_topk_coverage",
    "teacher_unresolved_tail_share",
    "tokens",
)


@torch.no_grad()
def judge_sequences(
    model,
    seqs: Iterable[CachedSequence],
    group_of_row: dict[int, str],
    expected_targets: dict[int, int] | None = None,
    batch_size: int = 8,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
    teacher_head=None,
) -> tuple[dict[str, float | list[float] | int], dict[str, dict[str, float]]]:
    """Judge the cached sequences whose row is in `group_of_row` (row -> prompt key); skip the rest.

    `teacher_head` (a hidden cache's `CachedTeacherHead`) turns hidden-state rows into the teacher's
    exact distribution; without it the cache must hold top-k rows.

    `expected_targets` (row -> tokens the student sampled, end-of-sequence included) checks that the
    cache holds a teacher entry for every sampled token (``tokens_as_sampled_share``; below 1 only
    where --max-seq-len cut a sample).

    Returns (metrics, per_prompt): per-token means with ``<name>_ci`` intervals, and each prompt's sums
    (what a paired comparison of two students on the same prompts needs).
    """
    lm = unwrap_causal_lm(model)
    was_training = lm.training
    lm.eval()
    body, head, transform = split_body_and_head(lm)
    vocab = head.weight.shape[0]
    per_prompt: dict[str, dict[str, float]] = {}
    same_length = judged = 0
    stream = (s for s in seqs if s.row in group_of_row)
    while chunk := list(itertools.islice(stream, batch_size)):
        exact = teacher_head is not None
        if not all(s.teacher is not None and hasattr(s.teacher, "hidden" if exact else "logprobs") for s in chunk):
            raise ValueError("judging needs a top-k cache (teacher log-probabilities) or a hidden cache and its head")
        batch = collate(chunk).to(device)
        hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        hidden = hidden[batch.hidden_rows, batch.hidden_cols]
        teacher = teacher_head.attach(batch.teacher, device) if exact else fold_out_of_vocab(batch.teacher, vocab)
        rows, labels_all = batch.hidden_rows, batch.labels
        aligned = aligned_rows(chunk, hidden.device)  # cross-tokenizer: teacher rows (in order) at these only
        if aligned is not None:
            hidden, rows, labels_all = hidden[aligned], rows[aligned], labels_all[aligned]
        rows = rows.cpu().numpy()
        sums = {k: np.zeros(len(chunk)) for k in SUMS}
        for lo in range(0, hidden.shape[0], chunk_size):
            hi = min(lo + chunk_size, hidden.shape[0])
            logits = head_logits(head, transform, hidden[lo:hi])
            lse = torch.logsumexp(logits, dim=-1)
            labels = labels_all[lo:hi]
            if exact:
                parts = _exact_token_terms(logits, lse, labels, checked_teacher_logits(teacher, lo, hi, vocab))
            else:
                parts = _token_terms(logits, lse, labels, _slice(teacher, lo, hi), vocab)
            for key, values in parts.items():
                np.add.at(sums[key], rows[lo:hi], values.double().cpu().numpy())
            np.add.at(sums["tokens"], rows[lo:hi], 1.0)
        for b, seq in enumerate(chunk):
            if aligned is not None and not sums["tokens"][b]:
                continue  # across tokenizers, no target of this sample got a teacher row: not judged
            judged += 1
            if expected_targets is not None:
                same_length += int(sums["tokens"][b]) == expected_targets.get(seq.row)
            group = per_prompt.setdefault(group_of_row[seq.row], dict.fromkeys(SUMS, 0.0))
            for key in SUMS:
                group[key] += float(sums[key][b])
    if was_training:
        lm.train()
    metrics = summarize(per_prompt)
    metrics["judged_sequences"] = judged
    if expected_targets is not None and judged:
        metrics["tokens_as_sampled_share"] = same_length / judged
    return metrics, per_prompt


def _slice(teacher: SparseTeacher, lo: int, hi: int) -> SparseTeacher:
    tempered = teacher.teacher_tempered_tails
    return SparseTeacher(
        teacher.teacher_ids[lo:hi],
        teacher.teacher_logprobs[lo:hi],
        teacher.teacher_tail_logmass[lo:hi],
        None if tempered is None else tempered[lo:hi],
        teacher.teacher_temperatures,
    )


def _token_terms(
    logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, teacher: SparseTeacher, vocab: int
) -> dict[str, torch.Tensor]:
    """Per-token terms. logits[N, V] (fp32), lse[N], labels[N], teacher top-k [N, K] -> each [N]."""
    ids = teacher.teacher_ids
    valid = torch.isfinite(teacher.teacher_logprobs)
    student_lp, student_tail = student_buckets(logits, lse, ids, valid)
    cached_tail = teacher.teacher_tail_logmass.float()
    unresolved = torch.isneginf(cached_tail) & (valid.sum(dim=1) < vocab)
    cached_tail = torch.where(unresolved, torch.full_like(cached_tail, math.log(UNRESOLVED_TAIL)), cached_tail)
    # T = 1: only renormalises (removes the drift value quantisation adds to the cached mass).
    teacher_lp, teacher_tail = retemper_sparse(teacher.teacher_logprobs, cached_tail, 1.0)
    hit = (ids == labels[:, None]) & valid
    in_topk = hit.any(dim=1)
    label_lp = torch.where(hit, teacher_lp, torch.zeros_like(teacher_lp)).sum(dim=1)
    tail_ids = (vocab - valid.sum(dim=1)).clamp(min=1).to(teacher_tail.dtype)
    teacher_label = torch.where(in_topk, label_lp, teacher_tail - torch.log(tail_ids))
    return {
        "reverse_kl": bucket_divergence(teacher_lp, teacher_tail, student_lp, student_tail, "reverse_kl"),
        "forward_kl": bucket_divergence(teacher_lp, teacher_tail, student_lp, student_tail, "forward_kl"),
        "teacher_logprob": teacher_label,
        "student_logprob": logits.gather(1, labels[:, None]).squeeze(1) - lse,
        "teacher_topk_coverage": in_topk.float(),
        "teacher_unresolved_tail_share": unresolved.float(),
    }


def _exact_token_terms(
    logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-token terms against the teacher's full distribution (a hidden cache): no bucket, no tail.

    `teacher_logits` are already on the student's vocabulary (`checked_teacher_logits`, as training
    does); ids the teacher gives no mass (-inf: padding beyond its vocabulary) add nothing to either KL.
    """
    student_lp = logits - lse[:, None]
    teacher_lp = torch.log_softmax(teacher_logits.float(), dim=-1)
    possible = torch.isfinite(teacher_lp)
    diff = torch.where(possible, student_lp - teacher_lp, torch.zeros_like(student_lp))
    return {
        "reverse_kl": (student_lp.exp() * diff).sum(dim=1),
        "forward_kl": -(teacher_lp.exp() * diff).sum(dim=1),
        "teacher_logprob": teacher_lp.gather(1, labels[:, None]).squeeze(1),
        "student_logprob": student_lp.gather(1, labels[:, None]).squeeze(1),
        "teacher_topk_coverage": torch.ones_like(lse),
        "teacher_unresolved_tail_share": torch.zeros_like(lse),
    }


def summarize(per_prompt: dict[str, dict[str, float]]) -> dict[str, float | list[float] | int]:
    """Per-token means over all prompts, each with a bootstrap interval over prompts."""
    keys = list(per_prompt)
    tokens = np.array([per_prompt[k]["tokens"] for k in keys], dtype=np.float64)
    metrics: dict[str, float | list[float] | int] = {"judged_prompts": len(keys), "judged_tokens": int(tokens.sum())}
    if not tokens.sum():
        return metrics
    for name in SUMS[:-1]:
        values = np.array([per_prompt[k][name] for k in keys], dtype=np.float64)
        metrics[name] = float(values.sum() / tokens.sum())
        ci = bootstrap_ratio_ci(values, tokens)
        if ci is not None:
            metrics[f"{name}_ci"] = ci
    return metrics


def paired_difference_ci(
    a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], name: str = "reverse_kl", samples: int = 1000
) -> dict[str, float | list[float]]:
    """Mean(a) − mean(b) of a per-token metric on the prompts both judged, with a paired bootstrap
    interval over prompts (the same resampled prompts for both): what "a beats b" rests on.
    (kd.pipeline.evaluation.sequences.paired_ratio_difference_ci over prompts keyed by name.)"""
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        raise ValueError("a paired comparison needs at least two prompts judged for both")
    difference, ci = paired_ratio_difference_ci(
        np.array([a[k][name] for k in keys]),
        np.array([a[k]["tokens"] for k in keys]),
        np.array([b[k][name] for k in keys]),
        np.array([b[k]["tokens"] for k in keys]),
        samples=samples,
    )
    return {"difference": difference, "difference_ci": ci, "prompts": len(keys)}
