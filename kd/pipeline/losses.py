"""The distillation loss: α·CE + (1−α)·T²·D(teacher_T ‖ student_T), summed over target tokens.

Everything here works on a flat list of N target tokens (see kd.pipeline.batches) and returns
**sums**: the trainer divides once by the number of target tokens in the whole accumulated,
all-rank batch (TRL's ``num_items_in_batch`` fix; torchtitan's ``global_valid_tokens``).

Teacher signals:

- ``SparseTeacher`` (a top-k cache): K ids with log-probabilities at T=1 plus the tail log-mass
  log(1 − Σ top-k). Divergences are taken over K+1 *buckets*: each cached id, and "everything
  else" for teacher and student alike. With K = V and an empty tail this is exactly the dense loss.
- ``SampledTeacher`` (an RS cache): unique ids and counts of N draws from the teacher. The loss is
  the cross-entropy of the student against the empirical distribution counts/N, an unbiased
  estimate of CE(teacher, student) = KL + H(teacher), whose gradient is the KL's (Anshumann et al.).
- ``DenseTeacher`` (online KD): the teacher's hidden states and head, turned into full-vocabulary
  logits one chunk at a time.

Memory: the student's [N, V] logits are never materialised for the whole batch. ``FusedHeadLoss``
walks over chunks of tokens, computes the loss and its gradient with respect to the chunk's logits
in the forward pass, folds that into gradients for the hidden states and head weight right away
(the approach of Liger's fused linear cross-entropy), and frees the chunk. Peak extra memory is a
few [chunk, V] fp32 buffers; no logits are recomputed in backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kd.pipeline.errors import KdError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
"""forward KL(teacher‖student) (the default, as in MiniMind/Hinton), reverse KL(student‖teacher),
generalized JSD(β) in TRL's GKD convention, total variation distance."""

LOG_FLOOR = -1.0e3
"""Floor for the second argument of a KL's log so that a zero-probability bucket gives a huge but
finite loss instead of inf/NaN; exp(-1000) is 0 in fp32, so it never binds on real distributions."""

MAX_FOREIGN_TEACHER_MASS = 1e-3
"""Online KD with a teacher vocabulary larger than the student's (embedding padding, e.g. 151936 vs
151665): the teacher mass on ids the student lacks must stay below this, else kd refuses."""


# ----------------------------------------------------------------------------- teacher signals


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Softmax statistics in fp32 at least (bf16 logits lose the tail); fp64 stays fp64 for reference tests."""
    return logits if logits.dtype == torch.float64 else logits.float()


@dataclass
class SparseTeacher:
    """Top-k teacher data for N target tokens.

    teacher_ids[N, K] (long), teacher_logprobs[N, K] (log p at T=1; -inf marks an empty slot),
    teacher_tail_logmass[N] (log of the mass outside the valid slots; -inf if none).
    """

    teacher_ids: torch.Tensor
    teacher_logprobs: torch.Tensor
    teacher_tail_logmass: torch.Tensor


@dataclass
class SampledTeacher:
    """RS-KD teacher data: teacher_ids[N, W] and teacher_counts[N, W] (0 pads a row), num_samples draws each."""

    teacher_ids: torch.Tensor
    teacher_counts: torch.Tensor
    num_samples: int


@dataclass
class DenseTeacher:
    """Full-vocabulary teacher: either teacher_logits[N, V], or teacher_hidden[N, H] with the head's
    teacher_head_weight[V, H] (+ bias[V]) so that logits are made one chunk at a time."""

    teacher_logits: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    teacher_head_weight: torch.Tensor | None = None
    teacher_head_bias: torch.Tensor | None = None

    def logits(self, lo: int, hi: int) -> torch.Tensor:
        """fp32 teacher logits of tokens [lo, hi)."""
        if self.teacher_logits is not None:
            return _upcast(self.teacher_logits[lo:hi])
        if self.teacher_hidden is None or self.teacher_head_weight is None:
            raise ValueError("DenseTeacher needs teacher_logits or teacher_hidden + teacher_head_weight")
        return _upcast(F.linear(self.teacher_hidden[lo:hi], self.teacher_head_weight, self.teacher_head_bias))


TeacherSignal = SparseTeacher | SampledTeacher | DenseTeacher


# ----------------------------------------------------------------------------- configuration


@dataclass
class LossConfig:
    """How the student is pulled towards the labels and the teacher."""

    alpha: float = 0.5
    """Weight of the cross-entropy on the labels; 1 - alpha weighs the divergence (MiniMind's --alpha)."""
    temperature: float = 1.0
    """Softmax temperature applied to both distributions; the divergence is scaled by T² (Hinton)."""
    divergence: str = "forward_kl"
    """forward_kl, reverse_kl, jsd or tvd."""
    jsd_beta: float = 0.5
    """β of the generalized JSD: M = β·teacher + (1−β)·student; loss = β·KL(t‖M) + (1−β)·KL(s‖M)."""
    chunk_size: int = 1024
    """Target tokens per logits chunk: bounds the [chunk, V] fp32 buffers."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0 or math.isnan(self.alpha):
            raise KdError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0 or math.isinf(self.temperature):
            raise KdError(f"--temperature must be > 0, got {self.temperature}")
        if self.divergence not in DIVERGENCES:
            raise KdError(f"--divergence {self.divergence}: expected one of {', '.join(DIVERGENCES)}")
        if self.divergence == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            raise KdError(
                f"--jsd-beta must be in (0, 1), got {self.jsd_beta} (β=0 and β=1 are forward_kl and reverse_kl)"
            )
        if self.chunk_size < 1:
            raise KdError(f"--chunk-size must be >= 1, got {self.chunk_size}")


@dataclass
class LossParts:
    """Sums over the batch's target tokens. `total` carries the gradient; the rest are for logging."""

    total: torch.Tensor
    """α·Σ w·CE + (1−α)·T²·Σ w·D."""
    ce: torch.Tensor
    """Σ w·CE at temperature 1 (detached)."""
    divergence: torch.Tensor
    """Σ w·D at the configured temperature, without the T² factor (detached; 0 without a teacher)."""
    num_tokens: int
    weight_sum: float


# ----------------------------------------------------------------------------- divergences


def _kl(a_logp: torch.Tensor, b_logp: torch.Tensor) -> torch.Tensor:
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
        return _kl(teacher_logp, student_logp)
    if name == "reverse_kl":
        return _kl(student_logp, teacher_logp)
    if name == "jsd":
        # Where both sides are empty the mixture is empty too; logaddexp(-inf, -inf) has a NaN gradient.
        empty = torch.isneginf(teacher_logp) & torch.isneginf(student_logp)
        zeros = torch.zeros_like(teacher_logp)
        mixture = torch.logaddexp(
            torch.where(empty, zeros, teacher_logp) + math.log(beta),
            torch.where(empty, zeros, student_logp) + math.log1p(-beta),
        )
        mixture = torch.where(empty, torch.full_like(mixture, float("-inf")), mixture)
        return beta * _kl(teacher_logp, mixture) + (1 - beta) * _kl(student_logp, mixture)
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


def retemper_sparse(
    teacher_logprobs: torch.Tensor, teacher_tail_logmass: torch.Tensor, temperature: float, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher buckets at temperature T from T=1 top-k data: [N, K], [N] -> [N, K], [N], normalised.

    p_T(i) ∝ p(i)^(1/T) is exact for the cached ids. The tail's shape is unknown; kd assumes its
    mass is spread evenly over the V − K ids it covers (each holds tail/(V−K), so the tempered tail
    is (V−K)·(tail/(V−K))^(1/T)). At T=1 this only renormalises, which also removes the drift that
    value quantisation adds to Σ p.
    """
    logp = _upcast(teacher_logprobs)
    tail = _upcast(teacher_tail_logmass)
    if temperature != 1.0:
        valid = torch.isfinite(logp).sum(dim=1)
        log_tail_ids = torch.log((vocab_size - valid).clamp(min=1).to(logp.dtype))
        logp = logp / temperature
        tail = (tail - log_tail_ids) / temperature + log_tail_ids
    norm = torch.logsumexp(torch.cat([logp, tail[:, None]], dim=1), dim=1, keepdim=True)
    return logp - norm, tail - norm[:, 0]


def fold_out_of_vocab(teacher: SparseTeacher, vocab_size: int) -> SparseTeacher:
    """Move cached ids the student's vocabulary lacks (padding ids of a bigger teacher embedding) into the tail.

    Their teacher mass is added to the tail bucket, never dropped and renormalised away; their slots
    become empty (-inf) and point at id 0 so that gathers stay in range.
    """
    outside = teacher.teacher_ids >= vocab_size
    if not bool(outside.any()):
        return teacher
    outside_mass = torch.logsumexp(
        torch.where(outside, teacher.teacher_logprobs, torch.full_like(teacher.teacher_logprobs, float("-inf"))), dim=1
    )
    return SparseTeacher(
        teacher_ids=torch.where(outside, torch.zeros_like(teacher.teacher_ids), teacher.teacher_ids),
        teacher_logprobs=torch.where(
            outside, torch.full_like(teacher.teacher_logprobs, float("-inf")), teacher.teacher_logprobs
        ),
        teacher_tail_logmass=torch.logaddexp(teacher.teacher_tail_logmass, outside_mass),
    )


def student_buckets(
    student_logits: torch.Tensor, student_lse: torch.Tensor, teacher_ids: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-probabilities on a sparse teacher's buckets.

    student_logits[N, V] (already divided by T), student_lse[N] their logsumexp, teacher_ids[N, K],
    valid[N, K] -> student_logprobs[N, K] (-inf on empty slots), student_tail_logmass[N].
    The tail is an exact logsumexp over the ids outside the valid slots (not log(1 − Σ p), which
    loses all precision when the top-k holds nearly all the mass).
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


# ----------------------------------------------------------------------------- per-chunk losses


def _chunk_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherSignal | None,
    lo: int,
    hi: int,
    config: LossConfig,
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, divergence) sums for one chunk of fp32 student logits[n, V]."""
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
        teacher_logprobs, teacher_tail = retemper_sparse(
            teacher_logprobs, teacher.teacher_tail_logmass[lo:hi], temperature, vocab
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
            teacher_logits = teacher.logits(lo, hi)
            if teacher_logits.shape[1] > vocab:
                foreign = torch.logsumexp(teacher_logits, 1) - torch.logsumexp(teacher_logits[:, vocab:], 1)
                share = float(torch.exp(-foreign).max())
                if share > MAX_FOREIGN_TEACHER_MASS:
                    raise KdError(
                        f"the teacher puts {share:.2%} of its mass on {teacher_logits.shape[1] - vocab} ids the "
                        f"student's vocabulary ({vocab}) lacks; use a student with the teacher's vocabulary"
                    )
                # Below the threshold these are never-trained padding ids; dropping them is explicit here.
                teacher_logits = teacher_logits[:, :vocab]
            elif teacher_logits.shape[1] < vocab:
                raise KdError(
                    f"the student's vocabulary ({vocab}) is larger than the teacher's ({teacher_logits.shape[1]})"
                )
            teacher_logprobs = torch.log_softmax(teacher_logits / temperature, dim=1)
        div = divergence(teacher_logprobs, student_logits - student_lse[:, None], config.divergence, config.jsd_beta)
    if weights is not None:
        div = div * weights
    div_sum = div.sum()
    total = config.alpha * ce_sum + (1.0 - config.alpha) * temperature**2 * div_sum
    return total, ce_sum, div_sum


class FusedHeadLoss(torch.autograd.Function):
    """loss(hidden @ W.T + b) summed over chunks, with gradients computed chunk by chunk in forward.

    forward(hidden[N, H], weight[V, H], bias[V] | None, loss_fn) -> (total, ce, divergence) sums.
    loss_fn(logits_fp32[n, V], lo, hi) -> the three sums of tokens [lo, hi).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss_fn: Callable, chunk_size: int):  # type: ignore[override]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        accumulate = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if need_bias and bias is not None else None
        totals = torch.zeros(3, dtype=torch.float64, device=hidden.device)
        n = hidden.shape[0]
        for lo in range(0, n, chunk_size):
            hi = min(lo + chunk_size, n)
            h = hidden[lo:hi]
            with torch.enable_grad():
                logits = _upcast(F.linear(h, weight, bias)).detach().requires_grad_(need_hidden or need_weight)
                total, ce, div = loss_fn(logits, lo, hi)
                if logits.requires_grad and total.requires_grad:
                    (grad_logits,) = torch.autograd.grad(total, logits)
                else:
                    grad_logits = None
            totals += torch.stack([total.detach(), ce.detach(), div.detach()]).double()
            if grad_logits is not None:
                g = grad_logits.to(h.dtype)
                if grad_hidden is not None:
                    grad_hidden[lo:hi] = g @ weight.to(g.dtype)
                if grad_weight is not None:
                    grad_weight += (g.t() @ h).to(grad_weight.dtype)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(dim=0).to(grad_bias.dtype)
            del logits, grad_logits
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
        return grads[0], grads[1], grads[2], None, None


def distill_loss_sum(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    student_head_bias: torch.Tensor | None,
    labels: torch.Tensor,
    teacher: TeacherSignal | None,
    config: LossConfig,
    token_weights: torch.Tensor | None = None,
) -> LossParts:
    """The loss of N target tokens as sums (see module docstring).

    student_hidden[N, H] are the final hidden states that predict each target, the head maps them to
    V logits, labels[N] are the target ids, teacher holds N rows of teacher signal (None: CE only,
    e.g. reasoning SFT), token_weights[N] optional per-token weights (reasoning-tag weighting).
    """
    if isinstance(teacher, SampledTeacher) and config.temperature != 1.0:
        raise KdError("--temperature must be 1 with an RS cache: its samples come from the teacher at T=1")
    if isinstance(teacher, SampledTeacher) and config.divergence != "forward_kl":
        raise KdError(f"--divergence {config.divergence} needs teacher log-probabilities; an RS cache has only counts")
    vocab = student_head_weight.shape[0]
    if isinstance(teacher, SparseTeacher):
        teacher = fold_out_of_vocab(teacher, vocab)
    elif isinstance(teacher, SampledTeacher) and bool((teacher.teacher_ids >= vocab).any()):
        raise KdError(f"the RS cache holds token ids beyond the student's vocabulary ({vocab})")

    def loss_fn(logits: torch.Tensor, lo: int, hi: int):
        weights = None if token_weights is None else token_weights[lo:hi].to(logits.dtype)
        return _chunk_loss(logits, labels[lo:hi], teacher, lo, hi, config, weights)

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_head_weight, student_head_bias)
    )
    if needs_grad:
        total, ce, div = FusedHeadLoss.apply(
            student_hidden, student_head_weight, student_head_bias, loss_fn, config.chunk_size
        )
    else:  # evaluation: the same chunked sums, no gradient bookkeeping
        sums = torch.zeros(3, dtype=torch.float64, device=student_hidden.device)
        for lo in range(0, student_hidden.shape[0], config.chunk_size):
            hi = min(lo + config.chunk_size, student_hidden.shape[0])
            logits = _upcast(F.linear(student_hidden[lo:hi], student_head_weight, student_head_bias))
            sums += torch.stack([t.detach() for t in loss_fn(logits, lo, hi)]).double()
        total, ce, div = sums.to(torch.float64 if student_hidden.dtype == torch.float64 else torch.float32).unbind()
    weight_sum = float(token_weights.sum()) if token_weights is not None else float(labels.numel())
    return LossParts(total, ce.detach(), div.detach(), int(labels.numel()), weight_sum)
