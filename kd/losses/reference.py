"""The per-chunk loss through autograd: not used in training; the reference tests and benchmarks compare with."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kd.losses.divergences import bucket_divergence, divergence, retemper_sparse, student_buckets
from kd.losses.fused import ChunkSums, checked_teacher_logits
from kd.losses.signals import LossConfig, SampledTeacher, SparseTeacher, TeacherSignal


def autograd_chunk_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherSignal | None,
    lo: int,
    hi: int,
    config: LossConfig,
    weights: torch.Tensor | None,
    relogits: Callable[[torch.Tensor], torch.Tensor],
    need_grad: bool,
) -> ChunkSums:
    """The pre-fused loss: the same sums written as plain tensor code, differentiated by autograd.

    Not used in training: it is the reference that tests/test_losses.py and bench/head_loss_speed.py
    compare `fused_chunk_loss` against. Autograd keeps several [n, V] intermediates (the scattered
    copy of the logits in `student_buckets`, a second logsumexp, softmax and mask buffers).
    """
    del relogits  # exact by construction
    with torch.enable_grad():
        logits = logits.detach().requires_grad_(need_grad)
        total, ce_sum, div_sum = _autograd_sums(logits, labels, teacher, lo, hi, config, weights)
        grad = torch.autograd.grad(total, logits)[0] if need_grad and total.requires_grad else None
    return ChunkSums(total.detach(), ce_sum.detach(), div_sum.detach(), grad)


def _autograd_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherSignal | None,
    lo: int,
    hi: int,
    config: LossConfig,
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, divergence) sums for one chunk of fp32 student logits[n, V], as differentiable tensors."""
    lse = torch.logsumexp(logits, dim=1)
    ce = lse - logits.gather(1, labels[:, None])[:, 0]
    if weights is not None:
        ce = ce * weights
    ce_sum = ce.sum()
    if teacher is None or config.alpha == 1.0:
        zero = ce_sum.new_zeros(())
        return ce_sum * (1.0 if teacher is None else config.alpha), ce_sum, zero
    temperature = config.temperature
    student_logits = logits / temperature if temperature != 1.0 else logits
    student_lse = torch.logsumexp(student_logits, dim=1) if temperature != 1.0 else lse
    vocab = logits.shape[1]
    if isinstance(teacher, SparseTeacher):
        teacher_logprobs = teacher.teacher_logprobs[lo:hi]
        valid = torch.isfinite(teacher_logprobs)
        tempered = teacher.tempered_tail_logmass(temperature) if temperature != 1.0 else None
        teacher_logprobs, teacher_tail = retemper_sparse(
            teacher_logprobs,
            teacher.teacher_tail_logmass[lo:hi],
            temperature,
            None if tempered is None else tempered[lo:hi],
        )
        student_logprobs, student_tail = student_buckets(student_logits, student_lse, teacher.teacher_ids[lo:hi], valid)
        div = bucket_divergence(
            teacher_logprobs, teacher_tail, student_logprobs, student_tail, config.divergence, config.jsd_beta
        )
    elif isinstance(teacher, SampledTeacher):
        counts = teacher.teacher_counts[lo:hi].to(student_logits.dtype)
        student_logprobs = student_logits.gather(1, teacher.teacher_ids[lo:hi]) - student_lse[:, None]
        div = -(counts / teacher.num_samples * student_logprobs).sum(dim=1)
    else:
        with torch.no_grad():
            teacher_logprobs = torch.log_softmax(checked_teacher_logits(teacher, lo, hi, vocab) / temperature, dim=1)
        div = divergence(teacher_logprobs, student_logits - student_lse[:, None], config.divergence, config.jsd_beta)
    if weights is not None:
        div = div * weights
    div_sum = div.sum()
    total = config.alpha * ce_sum + (1.0 - config.alpha) * temperature**2 * div_sum
    return total, ce_sum, div_sum
