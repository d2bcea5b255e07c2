"""The fused head: hidden states → logits chunk by chunk → loss sums, gradients folded in forward."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kd.errors import KdError
from kd.losses.divergences import fold_out_of_vocab
from kd.losses.fused import ChunkLoss, ChunkSums, fused_chunk_loss
from kd.losses.signals import (
    LogitMap,
    LossConfig,
    LossParts,
    SampledTeacher,
    SparseTeacher,
    TeacherSignal,
    upcast_logits,
)

# ----------------------------------------------------------------------------- the head


def _chunk_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transform: LogitMap | None
) -> torch.Tensor:
    """A fresh fp32 (fp64) buffer of the student's final logits: head, then its post-head transform if any."""
    logits = F.linear(h, weight, bias)
    return upcast_logits(transform.apply(logits) if transform else logits)


class FusedHeadLoss(torch.autograd.Function):
    """loss(transform(hidden @ W.T + b)) summed over chunks, with gradients computed chunk by chunk in forward.

    forward(hidden[N, H], weight[V, H], bias[V] | None, chunk_fn, chunk_size, transform) -> (total, ce,
    divergence) sums. chunk_fn(logits_fp32[n, V], lo, hi, relogits, need_grad) -> ChunkSums of tokens
    [lo, hi), its gradient with respect to the transformed logits z; `transform` (the student's
    post-head scale / soft-cap, or None) carries it back to the head's output by dz/dlogits.
    Memory peak per chunk: the logits, whatever chunk_fn adds (the fused loss: nothing at T = 1),
    the chunk's [n, H] and [V, H] matmul outputs, and under a soft-cap one [n, V] slope buffer.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_fn: Callable, chunk_size: int, transform=None):  # type: ignore[override]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_grad = need_hidden or need_weight or (need_bias and bias is not None)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        accumulate = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if need_bias and bias is not None else None
        totals = torch.zeros(3, dtype=torch.float64, device=hidden.device)
        n = hidden.shape[0]
        for lo in range(0, n, chunk_size):
            hi = min(lo + chunk_size, n)
            h = hidden[lo:hi]

            def relogits(rows: torch.Tensor, h: torch.Tensor = h) -> torch.Tensor:
                return _chunk_logits(h[rows], weight, bias, transform)

            # A fresh buffer even when F.linear already gives fp32: chunk_fn may overwrite it.
            logits = _chunk_logits(h, weight, bias, transform)
            # dz/dlogits, taken before chunk_fn overwrites z (a constant without a soft-cap).
            slope = transform.slope(logits) if transform and need_grad else None
            sums = chunk_fn(logits, lo, hi, relogits, need_grad)
            totals += torch.stack([sums.total, sums.ce, sums.divergence]).double()
            grad_logits = sums.grad_logits
            if grad_logits is not None and slope is not None:
                grad_logits = grad_logits.mul_(slope)
            if grad_logits is not None:
                g = grad_logits.to(h.dtype)
                if grad_hidden is not None:
                    grad_hidden[lo:hi] = g @ weight.to(g.dtype)
                if grad_weight is not None and g.dtype == grad_weight.dtype:
                    grad_weight.addmm_(g.t(), h)  # no [V, H] temporary
                elif grad_weight is not None:  # bf16 autocast: the product in bf16, summed in fp32
                    grad_weight += (g.t() @ h).to(grad_weight.dtype)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(dim=0).to(grad_bias.dtype)
            del logits, grad_logits, sums, slope
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_hidden, grad_weight, grad_bias)))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.weight_dtype = weight.dtype
        out = totals.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_div):  # type: ignore[override]
        saved = ctx.saved_tensors
        grads = [saved[i] * grad_total.to(saved[i].dtype) if ctx.has[i] else None for i in range(3)]
        if grads[1] is not None:
            grads[1] = grads[1].to(ctx.weight_dtype)
        return grads[0], grads[1], grads[2], None, None, None


def distill_loss_sum(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    student_head_bias: torch.Tensor | None,
    labels: torch.Tensor,
    teacher: TeacherSignal | None,
    config: LossConfig,
    token_weights: torch.Tensor | None = None,
    student_logit_transform: LogitMap | None = None,
) -> LossParts:
    """The loss of N target tokens as sums (see module docstring), by the fused head (`fused_chunk_loss`).

    student_hidden[N, H] are the final hidden states that predict each target, the head maps them to
    V logits, labels[N] are the target ids, teacher holds N rows of teacher signal (None: CE only,
    e.g. reasoning SFT), token_weights[N] optional per-token weights (reasoning-tag weighting),
    student_logit_transform the student's post-head scale / soft-cap (the gradient flows through it).
    """
    return head_loss_sum(
        student_hidden,
        student_head_weight,
        student_head_bias,
        labels,
        teacher,
        config,
        token_weights,
        fused_chunk_loss,
        student_logit_transform,
    )


def head_loss_sum(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    student_head_bias: torch.Tensor | None,
    labels: torch.Tensor,
    teacher: TeacherSignal | None,
    config: LossConfig,
    token_weights: torch.Tensor | None,
    chunk_loss: ChunkLoss,
    student_logit_transform: LogitMap | None = None,
) -> LossParts:
    """`distill_loss_sum` with the per-chunk loss given: `fused_chunk_loss` or the `autograd_chunk_loss` reference."""
    if isinstance(teacher, SampledTeacher) and config.temperature != 1.0:
        raise KdError("--temperature must be 1 with an RS cache: its samples come from the teacher at T=1")
    if isinstance(teacher, SampledTeacher) and config.divergence != "forward_kl":
        raise KdError(f"--divergence {config.divergence} needs teacher log-probabilities; an RS cache has only counts")
    vocab = student_head_weight.shape[0]
    if isinstance(teacher, SparseTeacher):
        teacher = fold_out_of_vocab(teacher, vocab)
    elif isinstance(teacher, SampledTeacher) and bool((teacher.teacher_ids >= vocab).any()):
        raise KdError(f"the RS cache holds token ids beyond the student's vocabulary ({vocab})")

    def chunk_fn(logits: torch.Tensor, lo: int, hi: int, relogits: Callable, need_grad: bool) -> ChunkSums:
        weights = None if token_weights is None else token_weights[lo:hi].to(logits.dtype)
        return chunk_loss(logits, labels[lo:hi], teacher, lo, hi, config, weights, relogits, need_grad)

    transform = student_logit_transform if student_logit_transform else None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_head_weight, student_head_bias)
    )
    if needs_grad:
        total, ce, div = FusedHeadLoss.apply(
            student_hidden, student_head_weight, student_head_bias, chunk_fn, config.chunk_size, transform
        )
    else:  # evaluation: the same chunked sums, no gradient bookkeeping
        sums = torch.zeros(3, dtype=torch.float64, device=student_hidden.device)
        for lo in range(0, student_hidden.shape[0], config.chunk_size):
            hi = min(lo + config.chunk_size, student_hidden.shape[0])
            h = student_hidden[lo:hi]

            def relogits(rows: torch.Tensor, h: torch.Tensor = h) -> torch.Tensor:
                return _chunk_logits(h[rows], student_head_weight, student_head_bias, transform)

            logits = _chunk_logits(h, student_head_weight, student_head_bias, transform)
            part = chunk_fn(logits, lo, hi, relogits, False)
            sums += torch.stack([part.total, part.ce, part.divergence]).double()
        total, ce, div = sums.to(torch.float64 if student_hidden.dtype == torch.float64 else torch.float32).unbind()
    weight_sum = float(token_weights.sum()) if token_weights is not None else float(labels.numel())
    return LossParts(total, ce.detach(), div.detach(), int(labels.numel()), weight_sum)
