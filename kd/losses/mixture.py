"""The mixture of several teachers as one sparse teacher: `kd train --teacher-mix mixture`.

The loss is α·CE + (1−α)·T²·D(m_T ‖ student_T), one sparse teacher m_T built here from J teachers
with weights w_j (Σ = 1) and handed to the single-teacher loss (`distill_loss_sum`). Each teacher
is first turned into **buckets at T**: probabilities on its listed ids and a tail mass.

- A top-k teacher: its listed ids re-tempered exactly and its tail at T as the single-teacher loss
  takes them (`retemper_sparse`: at T = 1 a renormalisation; at T ≠ 1 the tempered tail the cache
  recorded, refused in one line where it recorded none and the tail is not empty, as for one
  teacher). Ids beyond the student's vocabulary join the tail first (`fold_out_of_vocab`).
- An RS teacher: the empirical distribution counts/num_samples on its drawn ids, tail 0. T = 1 and
  forward KL only, as for one RS teacher (its draws come from the teacher at T = 1; it has no
  log-probabilities for the other divergences): anything else is refused in one line naming the flag.
  Across tokenizers the draws that map to no student id are dropped and num_samples is kept
  (crosstok.map_sampled), so a row's counts may sum to s < 1. The single-teacher RS loss,
  −Σ (c_k/N)·log q_k, then pulls with gradient s·q − c/N: the row counts with weight s towards
  the kept draws renormalised, and the dropped share goes nowhere (not to the tail). The mixture
  keeps that rule: teacher j contributes w_j·c/N and no tail, the mixture's total on the row is
  M = Σ_j ŵ_j·s_j (1 for top-k teachers), and the row's divergence is M·D(m/M ‖ student). With one
  RS teacher this has the single RS loss's gradient exactly; its value differs by a constant, the
  entropy of the draws (the RS loss is a cross-entropy, this a KL).

**The union rule** (`mix_buckets`). A teacher knows p_j(x) only for the ids it lists; the rest of
its mass, its tail t_j, is spread over every other id in an unknown way. For an id x that teacher i
lists and teacher j does not, w_j·p_j(x) is counted in the **tail bucket** (where teacher j put it):
the mixture lists x with Σ_{j lists x} w_j·p_j(x), and its tail is Σ_j w_j·t_j. That is a proper
distribution over (union ids + tail), exact on every bucket whose teachers all list it, and it never
invents mass. The error against the true mixture on such an id is w_j·p_j(x) ≤ w_j·min(listed p_j)
(x ranks below teacher j's k-th id), moved between x's bucket and the tail. The student is compared
bucket by bucket, its tail being its mass outside the union.

**Partial coverage** (teachers across tokenizers: teacher j has rows only at the student targets
its cache aligns to, `rows[j]`). At each target the mixture is of the teachers that have a row
there, their weights renormalised over those present: ŵ_j = w_j / Σ_{i present} w_i. A target no
teacher covers gets the CE only; a target one teacher covers gets that teacher alone. α·CE is taken
on every target (as for one cross-tokenizer teacher, crosstok.loss_sum).

**Temperature.** m_T = Σ_j ŵ_j·p_{j,T}, the mixture of the teachers each tempered at T (not the
mixture tempered). The single-teacher loss re-tempers a `SparseTeacher` from its T = 1 log-probs
and the tempered tail recorded for T; the mixed teacher is handed over as logprobs = T·log m_T
(re-tempering divides by T and renormalises the listed ids to 1 − tail_T, giving m_T back) with
tail_T recorded as its tempered tail at T. At T ≠ 1 the loss reads no other field (the T = 1
tail is only checked when no tempered tail is recorded): the object is a teacher at T only, built
and consumed inside `mixture_loss_sum`.

Imports: torch and kd.losses only (tests/test_layering.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kd.errors import KdError
from kd.losses.divergences import fold_out_of_vocab, retemper_sparse
from kd.losses.signals import LossConfig, LossParts, SampledTeacher, SparseTeacher


@dataclass
class Buckets:
    """One teacher's distribution at T over N rows: ids[N, K] (long), probs[N, K] (fp64, 0 on empty slots),
    tail[N] (fp64). probs + tail sum to 1 per row, or less for an RS row whose draws were partly dropped."""

    ids: torch.Tensor
    probs: torch.Tensor
    tail: torch.Tensor


def teacher_buckets(teacher: SparseTeacher | SampledTeacher, temperature: float, vocab: int | None) -> Buckets:
    """A top-k or RS teacher's buckets at `temperature` (rules: module docstring), in fp64.

    vocab: the student's vocabulary size (ids beyond it are folded into the tail, or refused for RS
    as by the single-teacher loss); None: no check.
    """
    if isinstance(teacher, SampledTeacher):
        if temperature != 1.0:
            raise KdError("--temperature must be 1 with an RS cache: its samples come from the teacher at T=1")
        if vocab is not None and bool((teacher.teacher_ids >= vocab).any()):
            raise KdError(f"the RS cache holds token ids beyond the student's vocabulary ({vocab})")
        probs = teacher.teacher_counts.double() / teacher.num_samples  # count 0 pads a row
        return Buckets(teacher.teacher_ids.long(), probs, torch.zeros_like(probs[:, 0]))
    if vocab is not None:
        teacher = fold_out_of_vocab(teacher, vocab)
    tempered = teacher.tempered_tail_logmass(temperature) if temperature != 1.0 else None
    logp, tail = retemper_sparse(
        teacher.teacher_logprobs.double(),
        teacher.teacher_tail_logmass.double(),
        temperature,
        None if tempered is None else tempered.double(),
    )
    return Buckets(teacher.teacher_ids.long(), logp.exp(), tail.exp())


def mix_buckets(teachers: list[Buckets], row_weights: list[torch.Tensor]) -> Buckets:
    """The union rule (module docstring): Σ_j ŵ_j·teacher_j on the union of their ids plus one tail.

    teachers[j] over the same N rows, row_weights[j][N] >= 0 (ŵ_j per row) -> Buckets with ids[N, Σ K_j]
    (each id listed once per row; empty slots have probability 0 and point at id 0), probs in
    descending order per row, tail Σ_j ŵ_j·tail_j.
    """
    p = torch.cat([t.probs * w[:, None] for t, w in zip(teachers, row_weights, strict=True)], dim=1)
    cat_ids = torch.cat([t.ids for t in teachers], dim=1)
    # Empty slots sort last (an id above every real one) and carry 0 probability.
    sentinel = int(cat_ids.max()) + 1 if cat_ids.numel() else 1  # GPU sync, once per batch
    keyed = torch.where(p > 0, cat_ids, torch.full_like(cat_ids, sentinel))
    sorted_ids, order = keyed.sort(dim=1)
    sorted_p = p.gather(1, order)
    # One group per distinct id of a row: ids that several teachers list add their w_j·p_j.
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = starts.long().cumsum(dim=1) - 1
    mixed_p = torch.zeros_like(sorted_p).scatter_add_(1, group, sorted_p)
    mixed_ids = torch.zeros_like(sorted_ids).scatter_(1, group, sorted_ids)
    real = (mixed_p > 0) & (mixed_ids != sentinel)
    mixed_ids = torch.where(real, mixed_ids, torch.zeros_like(mixed_ids))
    mixed_p = torch.where(real, mixed_p, torch.zeros_like(mixed_p))
    mixed_p, by_prob = mixed_p.sort(dim=1, descending=True)  # probability order, as readers hand rows out
    tail = sum(t.tail * w for t, w in zip(teachers, row_weights, strict=True))
    return Buckets(mixed_ids.gather(1, by_prob), mixed_p, tail)  # type: ignore[arg-type]


def as_sparse_teacher(mixed: Buckets, temperature: float, dtype: torch.dtype) -> SparseTeacher:
    """Normalised buckets at T as the `SparseTeacher` whose re-tempering at T gives them back (module docstring).

    Rows of zero mass get an empty row (-inf everywhere); the caller leaves them out of the loss.
    """
    mass = mixed.probs.sum(dim=1) + mixed.tail
    scale = torch.where(mass > 0, mass, torch.ones_like(mass))
    logp = torch.where(mixed.probs > 0, (mixed.probs / scale[:, None]).log(), float("-inf"))
    tail = (mixed.tail / scale).log()
    if temperature == 1.0:
        return SparseTeacher(mixed.ids, logp.to(dtype), tail.to(dtype))
    return SparseTeacher(
        teacher_ids=mixed.ids,
        teacher_logprobs=(logp * temperature).to(dtype),  # -inf stays -inf
        teacher_tail_logmass=tail.to(dtype),  # not read at T ≠ 1 (the tempered tail below is)
        teacher_tempered_tails=tail[:, None].to(dtype),
        teacher_temperatures=(temperature,),
    )


def mix_topk(teachers: list[SparseTeacher], weights: tuple[float, ...] | list[float]) -> SparseTeacher:
    """The weighted mixture at T = 1 of top-k teachers on the union of their ids plus a tail (`mix_buckets`).

    teachers[j]: teacher_ids[N, K_j], teacher_logprobs[N, K_j] (-inf: empty slot), teacher_tail_logmass[N];
    weights[j] >= 0 summing to 1 -> SparseTeacher with ids[N, Σ K_j] (each valid id once; empty slots
    -inf, pointing at id 0), logprobs in descending order, the mixed tail. Each teacher is first
    renormalised (listed + tail = 1, which removes value quantisation's drift). Mixed in fp64.
    """
    if len(teachers) != len(weights):
        raise ValueError(f"{len(teachers)} teachers, {len(weights)} weights")
    buckets = [teacher_buckets(t, 1.0, None) for t in teachers]
    row_weights = [torch.full_like(b.tail, float(w)) for b, w in zip(buckets, weights, strict=True)]
    return as_sparse_teacher(mix_buckets(buckets, row_weights), 1.0, teachers[0].teacher_logprobs.dtype)


def _scattered(buckets: Buckets, rows: torch.Tensor | None, n: int) -> Buckets:
    """A teacher's buckets over its covered rows -> over all N targets (zero probability where absent)."""
    if rows is None:
        return buckets
    ids = buckets.ids.new_zeros((n, buckets.ids.shape[1]))
    probs = buckets.probs.new_zeros((n, buckets.probs.shape[1]))
    tail = buckets.tail.new_zeros(n)
    ids[rows], probs[rows], tail[rows] = buckets.ids, buckets.probs, buckets.tail
    return Buckets(ids, probs, tail)


def mixed_teacher(
    teachers: list[SparseTeacher | SampledTeacher],
    weights: tuple[float, ...],
    rows: list[torch.Tensor | None] | None,
    n: int,
    temperature: float,
    vocab: int,
    dtype: torch.dtype,
) -> tuple[SparseTeacher, torch.Tensor, torch.Tensor]:
    """The mixture at T over N targets -> (SparseTeacher[N] in `dtype`, mass[N], present[N]).

    present: the targets where some teacher has a row with mass; mass: the mixture's total M there
    (1 unless RS draws were dropped; module docstring), the row's weight in the divergence.
    """
    rows = rows or [None] * len(teachers)
    buckets, row_weights = [], []
    for teacher, w, covered in zip(teachers, weights, rows, strict=True):
        one = _scattered(teacher_buckets(teacher, temperature, vocab), covered, n)
        buckets.append(one)
        here = torch.ones(n, dtype=torch.bool, device=one.probs.device) if covered is None else covered
        row_weights.append(here.double() * w)
    total = sum(row_weights)
    safe = torch.where(total > 0, total, 1.0)  # type: ignore[arg-type]
    row_weights = [w / safe for w in row_weights]  # ŵ_j: renormalised over the teachers present (0 where none)
    mixed = mix_buckets(buckets, row_weights)
    mass = mixed.probs.sum(dim=1) + mixed.tail
    return as_sparse_teacher(mixed, temperature, dtype), mass, mass > 0


def _rows_of(teacher: SparseTeacher, keep: torch.Tensor) -> SparseTeacher:
    return SparseTeacher(
        teacher.teacher_ids[keep],
        teacher.teacher_logprobs[keep],
        teacher.teacher_tail_logmass[keep],
        None if teacher.teacher_tempered_tails is None else teacher.teacher_tempered_tails[keep],
        teacher.teacher_temperatures,
    )


def mixture_loss_sum(
    one: Callable[..., LossParts],
    student_hidden: torch.Tensor,
    labels: torch.Tensor,
    teachers: list[SparseTeacher | SampledTeacher],
    weights: tuple[float, ...],
    rows: list[torch.Tensor | None] | None,
    config: LossConfig,
    token_weights: torch.Tensor | None,
    vocab: int,
) -> LossParts:
    """α·Σ w·CE + (1−α)·T²·Σ w·M·D(m_T/M ‖ student_T) over the targets some teacher covers -> LossParts of sums.

    `one(teacher, config[, hidden, labels, token_weights])` is the single-teacher loss over all
    targets or the given ones. Every teacher on every target, each a full distribution: one pass of
    the head on the mixture. Otherwise one pass for the CE over all targets and one for the
    divergence over the covered ones, with token weights × M.
    """
    has_rs = any(isinstance(t, SampledTeacher) for t in teachers)
    if has_rs and config.divergence != "forward_kl":
        raise KdError(f"--divergence {config.divergence} needs teacher log-probabilities; an RS cache has only counts")
    # The loss's own precision (fp32, fp64 in reference tests), whatever the autocast dtype of the hidden states.
    dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    mixed, mass, present = mixed_teacher(teachers, weights, rows, labels.shape[0], config.temperature, vocab, dtype)
    partial = rows is not None and any(r is not None for r in rows)
    if not partial and not has_rs:
        return one(mixed, config)
    ce = one(None, config)  # total = Σ w·CE
    total = config.alpha * ce.total
    if not bool(present.any()):  # GPU sync: no target of this batch has a teacher
        return LossParts(total, ce.ce, torch.zeros_like(ce.divergence), ce.num_tokens, ce.weight_sum)
    row_weight = mass[present].to(dtype)
    if token_weights is not None:
        row_weight = row_weight * token_weights[present].to(dtype)
    kd = one(
        _rows_of(mixed, present),
        dataclasses.replace(config, alpha=0.0),
        student_hidden[present],
        labels[present],
        row_weight,
    )
    total = total + (1.0 - config.alpha) * kd.total
    return LossParts(total, ce.ce, kd.divergence, ce.num_tokens, ce.weight_sum)
