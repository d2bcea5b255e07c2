"""Per-chunk losses in closed form: CE plus the divergence to the teacher, with the gradient written over the logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kd.errors import KdError
from kd.losses.divergences import divergence, kl_last_dim, retemper_sparse
from kd.losses.signals import (
    LOG_FLOOR,
    MAX_FOREIGN_TEACHER_MASS,
    DenseTeacher,
    LossConfig,
    SparseTeacher,
    TeacherSignal,
)

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
    student_tail_logmass[n]. Conventions as `kl_last_dim`: empty teacher buckets add nothing and the
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
        if temperature != 1.0:  # exact: the tempered tail stage one recorded (refused if it did not)
            tempered = teacher.tempered_tail_logmass(temperature)
            teacher_logprobs, teacher_tail = retemper_sparse(
                teacher_logprobs, teacher_tail, temperature, None if tempered is None else tempered[lo:hi]
            )
            teacher_logprobs, teacher_tail = teacher_logprobs.to(logits.dtype), teacher_tail.to(logits.dtype)
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
        teacher_logits = checked_teacher_logits(teacher, lo, hi, vocab)
        teacher_logprobs = torch.log_softmax(teacher_logits / temperature if temperature != 1.0 else teacher_logits, 1)
        del teacher_logits  # one [n, V] buffer fewer at the peak (a hidden cache's logits are made here)
    if config.divergence == "forward_kl" and temperature == 1.0 and bool(torch.isfinite(teacher_logprobs).all()):
        return _dense_forward_kl_at_t1(logits, labels, teacher_logprobs, config, w, ce_scale, need_grad)
    student_logprobs = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=1)
    lse = torch.logsumexp(logits, dim=1)
    ce_sum = ((lse - logits.gather(1, labels[:, None])[:, 0]) * w).sum()
    if config.divergence == "forward_kl":
        div_sum = (kl_last_dim(teacher_logprobs, student_logprobs) * w).sum()
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


def _dense_forward_kl_at_t1(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    config: LossConfig,
    w: torch.Tensor,
    ce_scale: float,
    need_grad: bool,
) -> ChunkSums:
    """`_dense_chunk_loss` for forward KL at T = 1 (online KD's and a hidden cache's usual case), in about
    half the [n, V] passes: at T = 1 the student's softmax serves CE and KD alike, its log-softmax gives
    CE without a separate log-sum-exp, and p = exp(teacher) serves the divergence and its gradient.

    The teacher's log-probs must be finite (no -inf padding ids); the caller checks. They are
    overwritten (the divergence's terms are formed in their buffer): the caller made them for this call.
    Gradient: w·(q − onehot)·ce_scale − kd_scale·w·(p − q·Σp), as the general path's.
    """
    student_logprobs = torch.log_softmax(logits, dim=1)
    ce_sum = -(student_logprobs.gather(1, labels[:, None])[:, 0] * w).sum()
    p = teacher_logprobs.exp()
    div_sum = (teacher_logprobs.sub_(student_logprobs).mul_(p).sum(dim=1) * w).sum()
    total = ce_scale * ce_sum + (1.0 - config.alpha) * div_sum
    if not need_grad:
        return ChunkSums(total, ce_sum, div_sum, None)
    kd_w = (1.0 - config.alpha) * w
    ce_w = ce_scale * w
    q_scale = ce_w + kd_w * p.sum(dim=1)
    grad = p.mul_(-kd_w[:, None]).add_(student_logprobs.exp_().mul_(q_scale[:, None]))
    grad.scatter_add_(1, labels[:, None], -ce_w[:, None])
    return ChunkSums(total, ce_sum, div_sum, grad)


def checked_teacher_logits(teacher: DenseTeacher, lo: int, hi: int, vocab: int) -> torch.Tensor:
    """The teacher's fp32 logits [hi − lo, V] on the student's vocabulary of V ids.

    A larger teacher vocabulary is cut only where that is safe (padding ids holding almost no mass);
    a smaller one (the student's head padded beyond the shared tokenizer) is padded with -inf: the
    student's extra ids get teacher probability 0, as a top-k cache gives them (they never appear
    among its ids).
    """
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
        missing = teacher_logits.new_full((teacher_logits.shape[0], vocab - teacher_logits.shape[1]), float("-inf"))
        teacher_logits = torch.cat([teacher_logits, missing], dim=1)
    return teacher_logits
