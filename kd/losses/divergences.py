"""Divergences between teacher and student distributions over buckets (cached ids + one tail), and the bucket maps."""

from __future__ import annotations

import math

import torch

from kd.errors import KdError
from kd.losses.signals import DIVERGENCES, LOG_FLOOR, SparseTeacher, upcast_logits

# ----------------------------------------------------------------------------- divergences


def kl_last_dim(a_logp: torch.Tensor, b_logp: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) = Σ a·(log a − log b) over the last dim, with 0·log 0 = 0 and NaN-free gradients.

    The masking goes through torch.where on *safe* inputs: a where() whose unselected branch holds
    inf would still push NaN into the gradient.
    """
    support = a_logp > float("-inf")
    a_safe = torch.where(support, a_logp, torch.zeros_like(a_logp))
    b_safe = torch.where(support, b_logp.clamp(min=LOG_FLOOR), torch.zeros_like(b_logp))
    terms = torch.where(support, a_safe.exp() * (a_safe - b_safe), torch.zeros_like(a_safe))
    return terms.sum(dim=-1)


def divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor, name: str, beta: float = 0.5) -> torch.Tensor:
    """D(teacher‖student) between two normalised log-distributions [N, B] -> [N].

    B is the full vocabulary (dense) or the K+1 buckets of a sparse teacher.
    """
    if name == "forward_kl":
        return kl_last_dim(teacher_logp, student_logp)
    if name == "reverse_kl":
        return kl_last_dim(student_logp, teacher_logp)
    if name == "jsd":
        # Where both sides are empty the mixture is empty too; logaddexp(-inf, -inf) has a NaN gradient.
        empty = torch.isneginf(teacher_logp) & torch.isneginf(student_logp)
        zeros = torch.zeros_like(teacher_logp)
        mixture = torch.logaddexp(
            torch.where(empty, zeros, teacher_logp) + math.log(beta),
            torch.where(empty, zeros, student_logp) + math.log1p(-beta),
        )
        mixture = torch.where(empty, torch.full_like(mixture, float("-inf")), mixture)
        return beta * kl_last_dim(teacher_logp, mixture) + (1 - beta) * kl_last_dim(student_logp, mixture)
    if name == "tvd":
        return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(dim=-1)
    raise KdError(f"--divergence {name}: expected one of {', '.join(DIVERGENCES)}")


def bucket_divergence(
    teacher_logprobs: torch.Tensor,
    teacher_tail_logmass: torch.Tensor,
    student_logprobs: torch.Tensor,
    student_tail_logmass: torch.Tensor,
    name: str,
    beta: float = 0.5,
) -> torch.Tensor:
    """D over K+1 buckets: teacher_logprobs[N, K] + teacher_tail_logmass[N] vs the student's -> [N]."""
    teacher = torch.cat([teacher_logprobs, teacher_tail_logmass[:, None]], dim=1)
    student = torch.cat([student_logprobs, student_tail_logmass[:, None]], dim=1)
    return divergence(teacher, student, name, beta)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x <= 0, stable at both ends (Mächler 2012); -inf at x = 0."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def retemper_sparse(
    teacher_logprobs: torch.Tensor,
    teacher_tail_logmass: torch.Tensor,
    temperature: float,
    teacher_tempered_tail_logmass: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher buckets at temperature τ from T=1 top-k data: [N, K], [N] (+ [N]) -> [N, K], [N], normalised.

    At τ = 1 this only renormalises (which also removes the drift that value quantisation adds to Σ p).
    At τ ≠ 1 the cached ids keep their exact ratios, p_τ(i) ∝ p(i)^(1/τ), and share 1 − tail_τ, where
    tail_τ = teacher_tempered_tail_logmass is the tempered tail stage one recorded from the full
    logits (`kd cache-logits --temperatures`). The tail's shape is not in a top-k cache, so without
    that value τ ≠ 1 is refused (unless the tail is empty, where nothing is unknown): spreading the
    tail evenly over the uncached ids, as kd once did, is the largest tempered tail for τ > 1 and
    was measured at 0.092 nats/token KL from the exact target at τ = 2 (SmolLM2-135M, k = 64).
    """
    logp = upcast_logits(teacher_logprobs)
    tail = upcast_logits(teacher_tail_logmass)
    if temperature == 1.0:
        norm = torch.logsumexp(torch.cat([logp, tail[:, None]], dim=1), dim=1, keepdim=True)
        return logp - norm, tail - norm[:, 0]
    if teacher_tempered_tail_logmass is None:
        if not bool(torch.isneginf(tail).all()):
            raise KdError(
                f"--temperature {temperature:g}: the cache holds no tempered tail for it; "
                f"re-create it with `kd cache-logits --temperatures 1,{temperature:g}`"
            )
        tempered_tail = tail
    else:
        tempered_tail = upcast_logits(teacher_tempered_tail_logmass).to(logp.dtype)
    cached = torch.log_softmax(logp / temperature, dim=1) + log1mexp(tempered_tail.clamp(max=0.0))[:, None]
    # A row listing nothing (every candidate moved to the tail: ids another vocabulary lacks) is all
    # tail; log_softmax of an all -inf row would be NaN.
    cached = torch.where(torch.isneginf(logp).all(dim=1, keepdim=True), logp, cached)
    return cached, tempered_tail


def fold_out_of_vocab(teacher: SparseTeacher, vocab_size: int) -> SparseTeacher:
    """Move cached ids the student's vocabulary lacks (padding ids of a bigger teacher embedding) into the tail.

    Their teacher mass is added to the tail bucket, never dropped and renormalised away (at T=1 and
    at every recorded tempered tail); their slots become empty (-inf) and point at id 0 so that
    gathers stay in range.
    """
    outside = teacher.teacher_ids >= vocab_size
    if not bool(outside.any()):
        return teacher

    def outside_mass(logprobs: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(torch.where(outside, logprobs, torch.full_like(logprobs, float("-inf"))), dim=1)

    tempered = teacher.teacher_tempered_tails
    if tempered is not None:
        columns = []
        for m, temperature in enumerate(teacher.teacher_temperatures):
            cached, tail = retemper_sparse(
                teacher.teacher_logprobs, teacher.teacher_tail_logmass, temperature, tempered[:, m]
            )
            columns.append(torch.logaddexp(tail, outside_mass(cached)).to(tempered.dtype))
        tempered = torch.stack(columns, dim=1)
    return SparseTeacher(
        teacher_ids=torch.where(outside, torch.zeros_like(teacher.teacher_ids), teacher.teacher_ids),
        teacher_logprobs=torch.where(
            outside, torch.full_like(teacher.teacher_logprobs, float("-inf")), teacher.teacher_logprobs
        ),
        teacher_tail_logmass=torch.logaddexp(teacher.teacher_tail_logmass, outside_mass(teacher.teacher_logprobs)),
        teacher_tempered_tails=tempered,
        teacher_temperatures=teacher.teacher_temperatures,
    )


def student_buckets(
    student_logits: torch.Tensor, student_lse: torch.Tensor, teacher_ids: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-probabilities on a sparse teacher's buckets.

    student_logits[N, V] (already divided by T), student_lse[N] their logsumexp, teacher_ids[N, K],
    valid[N, K] -> student_logprobs[N, K] (-inf on empty slots), student_tail_logmass[N].
    The tail is an exact logsumexp over the ids outside the valid slots (not log(1 − Σ p), which
    loses all precision when the top-k holds nearly all the mass). Used by `kd eval` and the
    autograd reference; it costs a scattered [N, V] copy and a second logsumexp, which training's
    `fused_chunk_loss` avoids.
    """
    gathered = student_logits.gather(1, teacher_ids)
    student_logprobs = torch.where(valid, gathered - student_lse[:, None], torch.full_like(gathered, float("-inf")))
    # Empty slots point at the row's first valid id, so the scatter below writes -inf only where it should.
    first_valid = teacher_ids.gather(1, valid.int().argmax(dim=1, keepdim=True))
    mask_ids = torch.where(valid, teacher_ids, first_valid)
    outside = student_logits.scatter(1, mask_ids, float("-inf"))
    vocab = student_logits.shape[1]
    if teacher_ids.shape[1] >= vocab:
        # Rows whose slots may cover the whole vocabulary: logsumexp of all -inf has a NaN gradient.
        empty = torch.isneginf(outside).all(dim=1, keepdim=True)
        tail = torch.logsumexp(torch.where(empty, torch.zeros_like(outside), outside), dim=1)
        tail = torch.where(empty[:, 0], torch.full_like(tail, float("-inf")), tail)
    else:
        tail = torch.logsumexp(outside, dim=1)
    return student_logprobs, tail - student_lse
