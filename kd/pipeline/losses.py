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

Memory and speed: the student's [N, V] logits are never materialised for the whole batch.
``FusedHeadLoss`` walks over chunks of tokens, computes the loss and its gradient with respect to
the chunk's logits in the forward pass, folds that into gradients for the hidden states and head
weight right away (the approach of Liger's fused linear cross-entropy), and frees the chunk; no
logits are recomputed in backward. ``fused_chunk_loss`` does the loss in closed form: the CE's
softmax pass also yields the student's tail bucket and the gradient, softmax · (scalar per row)
plus [chunk, K] sparse terms, written over the logits buffer itself, so a cached-KD chunk costs
what a CE chunk costs plus O(chunk · K) (measured in bench/head_loss_speed.py; BENCHMARKS.md).
``autograd_chunk_loss`` is the same loss through autograd, kept as the tests' reference.
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


# ----------------------------------------------------------------------------- per-chunk losses


@dataclass
class ChunkSums:
    """One logits chunk's (total, ce, divergence) sums (0-dim, detached) and d total / d logits[n, V] (or None)."""

    total: torch.Tensor
    ce: torch.Tensor
    divergence: torch.Tensor
    grad_logits: torch.Tensor | None


ChunkLoss = Callable[..., ChunkSums]
"""chunk_loss(logits[n, V], labels[n], teacher, lo, hi, config, weights[n] | None, relogits, need_grad) -> ChunkSums.

`logits` are the fp32 (or fp64) logits of target tokens [lo, hi); a chunk loss may overwrite them.
`relogits(rows)` recomputes the logits of some of the chunk's rows (the fused path's exact fallback)."""


def tail_guard(dtype: torch.dtype, vocab: int) -> float:
    """Smallest trusted tail sum of exp(logit − row max): below it, exp's underflow may have eaten ≥ 1 ulp of it.

    Each of the V terms loses at most finfo.tiny when exp underflows, so a sum above V·tiny/eps is
    exact to within one ulp. In fp32 and V = 49,152 that is a student tail mass under ~5e-27.
    """
    info = torch.finfo(dtype)
    return vocab * info.tiny / info.eps


@dataclass
class _BucketGrad:
    """Σ w·D over a chunk (0-dim) and h = d(Σ w·D)/d(student log-buckets): h_ids[n, K], h_tail[n], h_sum[n] = Σ h."""

    div_sum: torch.Tensor
    h_ids: torch.Tensor | None
    h_tail: torch.Tensor | None
    h_sum: torch.Tensor | None


def _forward_kl_buckets(
    teacher_logprobs: torch.Tensor,
    teacher_tail_logmass: torch.Tensor,
    student_shifted: torch.Tensor,
    student_log_sum: torch.Tensor,
    student_tail_logmass: torch.Tensor,
    weights: torch.Tensor,
) -> _BucketGrad:
    """Σ w·KL(teacher‖student) over K+1 buckets, h = −w·p, in closed form.

    teacher_logprobs[n, K] (-inf: empty slot) and teacher_tail_logmass[n], renormalised here (q64
    drift); the student's log-probs are student_shifted[n, K] − student_log_sum[n] and its tail
    student_tail_logmass[n]. Conventions as `_kl`: empty teacher buckets add nothing and the
    student's tail log is floored at LOG_FLOOR (no gradient where the floor binds). Written with as
    few [n, K] ops as possible: on a busy CPU every op of that size costs a thread wake-up.
    """
    p_raw = teacher_logprobs.exp()  # 0 on empty slots
    p_tail_raw = teacher_tail_logmass.exp()
    cached_raw = p_raw.sum(dim=1)
    norm = cached_raw + p_tail_raw
    log_norm = norm.log()
    p_tail = p_tail_raw / norm
    # Σ_k p_k·(log p_k − ℓ_k) with p_k = p_raw/norm, ℓ_k = shifted_k − log_sum; clamping keeps 0·(−inf) out.
    cross = (p_raw * teacher_logprobs.clamp(min=LOG_FLOOR).sub_(student_shifted)).sum(dim=1)
    cached = (cross + cached_raw * (student_log_sum - log_norm)) / norm
    floored = student_tail_logmass < LOG_FLOOR
    tail_log_ratio = teacher_tail_logmass - log_norm - student_tail_logmass.clamp(min=LOG_FLOOR)
    tail = torch.where(p_tail > 0, p_tail * torch.where(p_tail > 0, tail_log_ratio, 0.0), 0.0)
    h_tail = torch.where(floored, 0.0, -weights * p_tail)
    h_ids = p_raw.mul_((-weights / norm)[:, None])
    return _BucketGrad(((cached + tail) * weights).sum(), h_ids, h_tail, -weights)


def _autograd_buckets(
    teacher_logprobs: torch.Tensor,
    teacher_tail_logmass: torch.Tensor,
    student_logprobs: torch.Tensor,
    student_tail_logmass: torch.Tensor,
    weights: torch.Tensor,
    config: LossConfig,
    need_grad: bool,
) -> _BucketGrad:
    """Σ w·D and h for reverse KL, JSD and TVD by autograd on the [n, K+1] buckets only.

    The buckets are tiny next to the vocabulary, so autograd here costs little and reuses
    `divergence`, the code the dense tests check; the chain rule to the logits is done by hand.
    """
    with torch.enable_grad():
        student = torch.cat([student_logprobs, student_tail_logmass[:, None]], dim=1).detach()
        student.requires_grad_(need_grad)
        teacher = torch.cat([teacher_logprobs, teacher_tail_logmass[:, None]], dim=1)
        div_sum = (divergence(teacher, student, config.divergence, config.jsd_beta) * weights).sum()
        if not need_grad:
            return _BucketGrad(div_sum.detach(), None, None, None)
        h = torch.autograd.grad(div_sum, student)[0]
    return _BucketGrad(div_sum.detach(), h[:, :-1], h[:, -1], h.sum(dim=1))


def fused_chunk_loss(
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
    """α·CE + (1−α)·T²·D of one chunk and its gradient in closed form. logits[n, V] -> sums over the chunk.

    **Overwrites `logits`**: at T = 1 the buffer becomes exp(z − max), then the gradient in place,
    so CE, the sparse divergence and their gradient cost one [n, V] buffer in all (at T ≠ 1 one
    more, the gradient). Passes over the vocabulary: max, exp, sum, scale (plus exp and sum at
    T ≠ 1): the ones CE alone needs. Everything about the teacher is [n, K].

    With q = softmax(z/T), the student's log-buckets ℓ = (log q_k for the K cached ids, log Q_t for
    the tail) and h = d(Σ w·D)/dℓ, the gradient with respect to z/T is

        q_j·(h_t/Q_t − Σh)  for ids j outside the cache,      h_k − q_k·Σh  for cached id k,

    a softmax times a scalar per row plus [n, K] sparse terms; the CE adds w·(softmax(z) − onehot).
    Q_t comes from the complement itself: the cached ids are zeroed in exp(z/T − max) and the row
    summed, so there is no 1 − Σ q_k cancellation however much mass the cached ids hold. Only
    where that sum is so small that exp's underflow could have eaten part of it (`tail_guard`: a
    tail mass under ~1e-26 in fp32) are the row's logits recomputed (`relogits`) and its tail taken
    in log space.
    """
    n, vocab = logits.shape
    w = weights if weights is not None else logits.new_ones(n)
    kd = teacher is not None and config.alpha != 1.0
    ce_scale = config.alpha if teacher is not None else 1.0  # d total / d Σ w·CE
    if kd and isinstance(teacher, DenseTeacher):
        return _dense_chunk_loss(logits, labels, teacher, lo, hi, config, w, ce_scale, need_grad)
    temperature = config.temperature if kd else 1.0
    kd_scale = (1.0 - config.alpha) * temperature  # (1−α)·T² · d(z/T)/dz
    sparse = kd and isinstance(teacher, SparseTeacher)

    # What the loss needs from the logits themselves, gathered before the buffer is overwritten.
    z_max = logits.amax(dim=1, keepdim=True)
    z_label = logits.gather(1, labels[:, None])[:, 0] - z_max[:, 0]
    if kd:
        ids = teacher.teacher_ids[lo:hi]
        shifted = logits.gather(1, ids).sub_(z_max)  # [n, K]: (z − max)/T at the teacher's ids
        if temperature != 1.0:
            shifted.mul_(1.0 / temperature)
    if sparse:
        teacher_logprobs = teacher.teacher_logprobs[lo:hi].to(logits.dtype)
        valid = teacher_logprobs > float("-inf")  # log-probs are never +inf or NaN
        e_ids = torch.where(valid, shifted, float("-inf")).exp_()  # 0 on empty slots

    # exp(z − max) for CE and exp((z − max)/T) for the divergence: the same buffer at T = 1.
    # Memory peak of the loss: `logits`, plus `grad` [n, V] at T ≠ 1 only.
    logits.sub_(z_max)
    if temperature == 1.0:
        grad = e_kd = logits.exp_()
    else:
        grad = torch.exp(logits)
        e_kd = logits.mul_(1.0 / temperature).exp_()
        sum_1 = grad.sum(dim=1)
    if sparse:
        # Zero the cached ids' entries (an empty slot multiplies by 1: its id may repeat a valid one),
        # so the row sum is the tail's own sum.
        e_kd.scatter_reduce_(1, ids, torch.where(valid, 0.0, 1.0).to(e_kd.dtype), reduce="prod")
        tail = e_kd.sum(dim=1)
        sum_kd = tail + e_ids.sum(dim=1)
    else:
        sum_kd = e_kd.sum(dim=1)
    if temperature == 1.0:
        sum_1 = sum_kd
    ce_sum = ((sum_1.log() - z_label) * w).sum()
    log_sum = sum_kd.log()

    fallback = None
    if not kd:
        bucket = _BucketGrad(ce_sum.new_zeros(()), None, None, None)
    elif sparse:
        student_tail = tail.log() - log_sum  # -inf when the cached ids cover the vocabulary
        suspect = tail < tail_guard(logits.dtype, vocab)
        # GPU sync point, once per chunk: which rows need the fallback decides what runs next.
        if bool(suspect.any()):  # rare rows: an empty tail is exact, else a logsumexp over recomputed logits
            suspect &= valid.sum(dim=1) < vocab
            fallback = suspect.nonzero()[:, 0] if bool(suspect.any()) else None
        if fallback is not None:
            exact = _exact_tail_rows(relogits(fallback), ids[fallback], valid[fallback], temperature)
            student_tail[fallback] = exact.tail_lse - exact.lse
        teacher_tail = teacher.teacher_tail_logmass[lo:hi].to(logits.dtype)
        if temperature != 1.0:
            teacher_logprobs, teacher_tail = retemper_sparse(teacher_logprobs, teacher_tail, temperature, vocab)
        if config.divergence == "forward_kl":
            bucket = _forward_kl_buckets(teacher_logprobs, teacher_tail, shifted, log_sum, student_tail, w)
        else:
            student_logprobs = torch.where(valid, shifted - log_sum[:, None], float("-inf"))
            bucket = _autograd_buckets(
                teacher_logprobs, teacher_tail, student_logprobs, student_tail, w, config, need_grad
            )
    else:  # RS: Σ w·CE(counts/N, q) over the sampled ids; h = −w·counts/N in closed form
        h_ids = teacher.teacher_counts[lo:hi].to(logits.dtype) * (-w / teacher.num_samples)[:, None]
        h_sum = h_ids.sum(dim=1)
        div_sum = (h_ids * shifted).sum() - (h_sum * log_sum).sum()
        bucket = _BucketGrad(div_sum, h_ids, None, h_sum)
    div_sum = bucket.div_sum
    total = ce_scale * ce_sum + ((1.0 - config.alpha) * temperature**2 * div_sum if kd else 0.0)
    if not need_grad:
        return ChunkSums(total, ce_sum, div_sum, None)

    # The gradient, written into `grad`: a scale per row of the softmax buffer plus [n, K] scatters.
    ce_w = ce_scale * w
    if not kd:
        grad.mul_((ce_w / sum_1)[:, None])
    else:
        q_scale = (-kd_scale / sum_kd) * bucket.h_sum  # −q·Σh, per unit of exp((z − max)/T)
        tail_scale = 0.0
        if sparse:  # h_t/Q_t per unit of the tail buffer; 0 where the tail is empty or exact below
            usable = tail > 0
            if fallback is not None:
                usable[fallback] = False
            tail_scale = torch.where(usable, kd_scale * bucket.h_tail / torch.where(usable, tail, 1.0), 0.0)
        if temperature == 1.0:
            grad.mul_((ce_w / sum_1 + q_scale + tail_scale)[:, None])
        else:
            grad.mul_((ce_w / sum_1)[:, None]).addcmul_(e_kd, (q_scale + tail_scale)[:, None])
        if sparse:
            # The cached entries were zeroed in e_kd: their whole softmax term comes back here.
            cached_scale = q_scale + ce_w / sum_1 if temperature == 1.0 else q_scale
            cached = torch.addcmul(bucket.h_ids * kd_scale, e_ids, cached_scale[:, None])
        else:
            cached = bucket.h_ids * kd_scale
        grad.scatter_add_(1, ids, cached)
    grad.scatter_add_(1, labels[:, None], -ce_w[:, None])
    if fallback is not None:
        grad[fallback] = _exact_rows_gradient(
            exact,
            ids[fallback],
            labels[fallback],
            bucket.h_ids[fallback],
            bucket.h_tail[fallback],
            bucket.h_sum[fallback],
            ce_w[fallback],
            kd_scale,
        )
    return ChunkSums(total, ce_sum, div_sum, grad)


@dataclass
class _ExactRows:
    """Log space statistics of a few recomputed rows: logits[r, V], student_logits = logits/T, their lse[r],
    tail_lse[r] (logsumexp of student_logits outside the cached ids, -inf if none) and that outside mask."""

    logits: torch.Tensor
    student_logits: torch.Tensor
    lse: torch.Tensor
    tail_lse: torch.Tensor
    outside: torch.Tensor


def _exact_tail_rows(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, temperature: float) -> _ExactRows:
    """The exact fallback: the tail as a logsumexp over the complement. A few rows, [r, V] buffers each."""
    student_logits = logits / temperature if temperature != 1.0 else logits
    hits = torch.zeros_like(student_logits).scatter_add_(1, ids, valid.to(student_logits.dtype))
    outside = hits == 0
    masked = torch.where(outside, student_logits, float("-inf"))
    return _ExactRows(
        logits, student_logits, torch.logsumexp(student_logits, dim=1), torch.logsumexp(masked, dim=1), outside
    )


def _exact_rows_gradient(
    exact: _ExactRows,
    ids: torch.Tensor,
    labels: torch.Tensor,
    h_ids: torch.Tensor,
    h_tail: torch.Tensor,
    h_sum: torch.Tensor,
    ce_w: torch.Tensor,
    kd_scale: float,
) -> torch.Tensor:
    """The fused gradient of the fallback rows [r, V], with h_t·q_j/Q_t taken as h_t·exp(z_j/T − tail_lse)."""
    grad = ce_w[:, None] * torch.softmax(exact.logits, dim=1)
    grad.scatter_add_(1, labels[:, None], -ce_w[:, None])
    grad -= (kd_scale * h_sum)[:, None] * torch.exp(exact.student_logits - exact.lse[:, None])
    finite = torch.isfinite(exact.tail_lse)[:, None] & exact.outside
    tail_share = torch.exp(torch.where(finite, exact.student_logits - exact.tail_lse[:, None], float("-inf")))
    grad += (kd_scale * h_tail)[:, None] * tail_share
    return grad.scatter_add_(1, ids, kd_scale * h_ids)


def _dense_chunk_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: DenseTeacher,
    lo: int,
    hi: int,
    config: LossConfig,
    w: torch.Tensor,
    ce_scale: float,
    need_grad: bool,
) -> ChunkSums:
    """Online KD against full-vocabulary teacher logits: the same chain rule with every id a bucket.

    Forward KL has h = −w·p in closed form; reverse KL, JSD and TVD take h from autograd on the
    student's [n, V] log-probs (their closed forms need as many [n, V] passes). Memory: the teacher's
    logits and log-probs, the student's log-probs and the gradient, [n, V] each; online KD holds the
    teacher's forward anyway.
    """
    temperature = config.temperature
    vocab = logits.shape[1]
    with torch.no_grad():
        teacher_logprobs = torch.log_softmax(_checked_teacher_logits(teacher, lo, hi, vocab) / temperature, dim=1)
    student_logprobs = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=1)
    lse = torch.logsumexp(logits, dim=1)
    ce_sum = ((lse - logits.gather(1, labels[:, None])[:, 0]) * w).sum()
    if config.divergence == "forward_kl":
        div_sum = (_kl(teacher_logprobs, student_logprobs) * w).sum()
        h = -w[:, None] * teacher_logprobs.exp() if need_grad else None
    else:
        with torch.enable_grad():
            student = student_logprobs.detach().requires_grad_(need_grad)
            div_sum = (divergence(teacher_logprobs, student, config.divergence, config.jsd_beta) * w).sum()
            h = torch.autograd.grad(div_sum, student)[0] if need_grad else None
        div_sum = div_sum.detach()
    total = ce_scale * ce_sum + (1.0 - config.alpha) * temperature**2 * div_sum
    if not need_grad:
        return ChunkSums(total, ce_sum, div_sum, None)
    kd_scale = (1.0 - config.alpha) * temperature
    # d(z/T): h − q·Σh, then the CE's w·(softmax(z) − onehot); h's buffer becomes the gradient.
    h_sum = h.sum(dim=1)
    grad = h.mul_(kd_scale).sub_(student_logprobs.exp_().mul_((kd_scale * h_sum)[:, None]))
    ce_w = ce_scale * w
    grad.add_(torch.softmax(logits, dim=1).mul_(ce_w[:, None]))
    grad.scatter_add_(1, labels[:, None], -ce_w[:, None])
    return ChunkSums(total, ce_sum, div_sum, grad)


def _checked_teacher_logits(teacher: DenseTeacher, lo: int, hi: int, vocab: int) -> torch.Tensor:
    """The teacher's fp32 logits [hi − lo, V], cut to the student's vocabulary only where that is safe."""
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
        raise KdError(f"the student's vocabulary ({vocab}) is larger than the teacher's ({teacher_logits.shape[1]})")
    return teacher_logits


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
            teacher_logprobs = torch.log_softmax(_checked_teacher_logits(teacher, lo, hi, vocab) / temperature, dim=1)
        div = divergence(teacher_logprobs, student_logits - student_lse[:, None], config.divergence, config.jsd_beta)
    if weights is not None:
        div = div * weights
    div_sum = div.sum()
    total = config.alpha * ce_sum + (1.0 - config.alpha) * temperature**2 * div_sum
    return total, ce_sum, div_sum


# ----------------------------------------------------------------------------- the head


class FusedHeadLoss(torch.autograd.Function):
    """loss(hidden @ W.T + b) summed over chunks, with gradients computed chunk by chunk in forward.

    forward(hidden[N, H], weight[V, H], bias[V] | None, chunk_fn, chunk_size) -> (total, ce, divergence)
    sums. chunk_fn(logits_fp32[n, V], lo, hi, relogits, need_grad) -> ChunkSums of tokens [lo, hi).
    Memory peak per chunk: the logits, whatever chunk_fn adds (the fused loss: nothing at T = 1),
    and the chunk's [n, H] and [V, H] matmul outputs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_fn: Callable, chunk_size: int):  # type: ignore[override]
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
                return _upcast(F.linear(h[rows], weight, bias))

            # A fresh buffer even when F.linear already gives fp32: chunk_fn may overwrite it.
            logits = _upcast(F.linear(h, weight, bias))
            sums = chunk_fn(logits, lo, hi, relogits, need_grad)
            totals += torch.stack([sums.total, sums.ce, sums.divergence]).double()
            grad_logits = sums.grad_logits
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
            del logits, grad_logits, sums
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
    """The loss of N target tokens as sums (see module docstring), by the fused head (`fused_chunk_loss`).

    student_hidden[N, H] are the final hidden states that predict each target, the head maps them to
    V logits, labels[N] are the target ids, teacher holds N rows of teacher signal (None: CE only,
    e.g. reasoning SFT), token_weights[N] optional per-token weights (reasoning-tag weighting).
    """
    return head_loss_sum(
        student_hidden, student_head_weight, student_head_bias, labels, teacher, config, token_weights, fused_chunk_loss
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

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_head_weight, student_head_bias)
    )
    if needs_grad:
        total, ce, div = FusedHeadLoss.apply(
            student_hidden, student_head_weight, student_head_bias, chunk_fn, config.chunk_size
        )
    else:  # evaluation: the same chunked sums, no gradient bookkeeping
        sums = torch.zeros(3, dtype=torch.float64, device=student_hidden.device)
        for lo in range(0, student_hidden.shape[0], config.chunk_size):
            hi = min(lo + config.chunk_size, student_hidden.shape[0])
            h = student_hidden[lo:hi]

            def relogits(rows: torch.Tensor, h: torch.Tensor = h) -> torch.Tensor:
                return _upcast(F.linear(h[rows], student_head_weight, student_head_bias))

            part = chunk_fn(_upcast(F.linear(h, student_head_weight, student_head_bias)), lo, hi, relogits, False)
            sums += torch.stack([part.total, part.ce, part.divergence]).double()
        total, ce, div = sums.to(torch.float64 if student_hidden.dtype == torch.float64 else torch.float32).unbind()
    weight_sum = float(token_weights.sum()) if token_weights is not None else float(labels.numel())
    return LossParts(total, ce.detach(), div.detach(), int(labels.numel()), weight_sum)
