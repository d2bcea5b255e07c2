"""The distillation loss against dense references built from full logits.

    .venv/bin/python -m pytest tests/test_losses.py -q

Properties checked (after TRL's GKD tests and torchtune's chunked-loss tests), all on the fused
head that training runs (`distill_loss_sum` -> `fused_chunk_loss`): top-k = V gives exactly the
dense divergence for every divergence and temperature, gradients included; the fused closed form
equals the autograd reference (`autograd_chunk_loss`) for every teacher signal; a student holding
all but 1e-7 (or 1e-33) of its mass on the cached ids still gets the fp64 tail and gradient;
chunked equals unchunked; equal distributions give 0; a top-k cache gives the K+1-bucket
divergence; the RS estimator's gradient is unbiased; padding ids go to the tail, never silently
dropped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.cache.format import decode_tail, decode_topk_values, encode_tail, encode_topk_values
from kd.errors import KdError
from kd.losses import (
    DIVERGENCES,
    DenseTeacher,
    LossConfig,
    SampledTeacher,
    SparseTeacher,
    autograd_chunk_loss,
    distill_loss_sum,
    fold_out_of_vocab,
    fused_chunk_loss,
    head_loss_sum,
    retemper_sparse,
    tail_guard,
)

N, H, V = 12, 16, 50


def make_problem(seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * scale / math.sqrt(H)
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    teacher_logits = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, bias, teacher_logits, labels


def dense_reference(student_logits, teacher_logits, labels, name, temperature=1.0, alpha=0.0, beta=0.5):
    """Straightforward dense loss sum, written independently of kd's implementation."""
    p_log = F.log_softmax(teacher_logits / temperature, dim=-1)
    q_log = F.log_softmax(student_logits / temperature, dim=-1)
    p, q = p_log.exp(), q_log.exp()
    if name == "forward_kl":
        d = F.kl_div(q_log, p_log, log_target=True, reduction="none").sum(-1)
    elif name == "reverse_kl":
        d = F.kl_div(p_log, q_log, log_target=True, reduction="none").sum(-1)
    elif name == "jsd":  # TRL's generalized_jsd_loss
        m_log = torch.log(beta * p + (1 - beta) * q)
        d = beta * (p * (p_log - m_log)).sum(-1) + (1 - beta) * (q * (q_log - m_log)).sum(-1)
    else:
        d = 0.5 * (p - q).abs().sum(-1)
    ce = F.cross_entropy(student_logits, labels, reduction="sum")
    return alpha * ce + (1 - alpha) * temperature**2 * d.sum(), ce, d.sum()


TEMPERATURES = (0.5, 1.3, 1.5, 2.0, 3.0)
"""Temperatures whose exact tempered tails the test teachers carry (what `--temperatures` records)."""


def tempered_tails(teacher_logits, ids, valid, temperatures=TEMPERATURES):
    """[N, M]: log of softmax(z/T)'s mass outside the valid ids, per T (the dense reference stage one records)."""
    columns = []
    for temperature in temperatures:
        logp = F.log_softmax(teacher_logits / temperature, dim=-1)
        covered = (
            torch.zeros(logp.shape, dtype=torch.long).scatter_reduce(1, ids, valid.expand_as(ids).long(), reduce="amax")
            > 0
        )
        columns.append(torch.logsumexp(logp.masked_fill(covered, float("-inf")), dim=-1))
    return torch.stack(columns, dim=1)


def full_topk(teacher_logits, k):
    logp = F.log_softmax(teacher_logits, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(1, ids, float("-inf"))
    tempered = tempered_tails(teacher_logits, ids, torch.ones_like(ids, dtype=torch.bool))
    return SparseTeacher(ids, values, torch.logsumexp(rest, dim=-1), tempered, TEMPERATURES)


def kd_loss(hidden, weight, bias, labels, teacher, **cfg):
    chunk = cfg.pop("chunk_size", 5)
    return distill_loss_sum(hidden, weight, bias, labels, teacher, LossConfig(chunk_size=chunk, **cfg))


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_equal_to_vocab_is_the_dense_loss_with_gradients(name, temperature):
    hidden, weight, bias, teacher_logits, labels = make_problem()
    alpha = 0.3
    # Dense reference through plain autograd.
    h_ref, w_ref, b_ref = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    ref_total, ref_ce, ref_div = dense_reference(
        F.linear(h_ref, w_ref, b_ref), teacher_logits, labels, name, temperature, alpha
    )
    ref_total.backward()
    # kd: top-k with K = V and an empty tail.
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    parts = kd_loss(
        h, w, b, labels, full_topk(teacher_logits, V), alpha=alpha, temperature=temperature, divergence=name
    )
    parts.total.backward()
    # fp64 throughout: the fused closed form must agree with autograd on the dense loss to rounding.
    assert float(parts.total.detach()) == pytest.approx(float(ref_total.detach()), rel=1e-10, abs=1e-12)
    assert float(parts.ce) == pytest.approx(float(ref_ce.detach()), rel=1e-10)
    assert float(parts.divergence) == pytest.approx(float(ref_div.detach()), rel=1e-10, abs=1e-12)
    for got, want in ((h.grad, h_ref.grad), (w.grad, w_ref.grad), (b.grad, b_ref.grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_online_dense_teacher_matches_reference(name):
    hidden, weight, bias, teacher_logits, labels = make_problem(1)
    g = torch.Generator().manual_seed(5)
    teacher_hidden = torch.randn(N, 8, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(V, 8, generator=g, dtype=torch.float64)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_total, _, _ = dense_reference(
        F.linear(h_ref, w_ref, bias), teacher_hidden @ teacher_weight.T, labels, name, 1.5, 0.5
    )
    ref_total.backward()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    teacher = DenseTeacher(teacher_hidden=teacher_hidden, teacher_head_weight=teacher_weight)
    parts = kd_loss(h, w, bias, labels, teacher, alpha=0.5, temperature=1.5, divergence=name)
    parts.total.backward()
    assert float(parts.total.detach()) == pytest.approx(float(ref_total.detach()), rel=1e-10)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, N, 10 * N])
@pytest.mark.parametrize("teacher_kind", ["top8", "rs"])
def test_chunked_equals_unchunked(chunk_size, teacher_kind):
    hidden, weight, bias, teacher_logits, labels = make_problem(2)
    teacher = full_topk(teacher_logits, 8) if teacher_kind == "top8" else rs_teacher(teacher_logits)
    temperature = 2.0 if teacher_kind == "top8" else 1.0  # RS samples are at T = 1
    results = []
    for chunk in (N, chunk_size):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        parts = kd_loss(h, w, bias, labels, teacher, alpha=0.2, temperature=temperature, chunk_size=chunk)
        parts.total.backward()
        results.append((float(parts.total.detach()), h.grad, w.grad))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-10)
    torch.testing.assert_close(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][2], results[1][2])


@pytest.mark.parametrize("name", DIVERGENCES)
def test_identical_distributions_give_zero(name):
    hidden, weight, bias, _, labels = make_problem(3)
    student_logits = F.linear(hidden, weight, bias)
    for teacher in (full_topk(student_logits, V), full_topk(student_logits, 5), DenseTeacher(student_logits)):
        parts = kd_loss(hidden, weight, bias, labels, teacher, alpha=0.0, divergence=name)
        assert abs(float(parts.divergence)) < 1e-9


def test_topk_with_tail_is_the_bucket_divergence():
    """K < V: KL over the K cached ids plus one bucket holding everything else, for both sides."""
    hidden, weight, bias, teacher_logits, labels = make_problem(4)
    k = 6
    teacher = full_topk(teacher_logits, k)
    parts = kd_loss(hidden, weight, bias, labels, teacher, alpha=0.0)
    p = F.softmax(teacher_logits, -1)
    q = F.softmax(F.linear(hidden, weight, bias), -1)
    ids = teacher.teacher_ids
    p_top, q_top = p.gather(1, ids), q.gather(1, ids)
    p_b = torch.cat([p_top, 1 - p_top.sum(1, keepdim=True)], 1)
    q_b = torch.cat([q_top, 1 - q_top.sum(1, keepdim=True)], 1)
    expected = (p_b * (p_b.log() - q_b.log())).sum()
    assert float(parts.divergence) == pytest.approx(float(expected), rel=1e-8)
    # ...and it is a lower bound of the dense KL (data processing inequality).
    dense = F.kl_div(q.log(), p.log(), log_target=True, reduction="sum")
    assert float(parts.divergence) <= float(dense) + 1e-12


def test_quantized_cache_values_stay_within_a_hundredth_of_a_nat():
    hidden, weight, bias, teacher_logits, labels = make_problem(5)
    exact = full_topk(teacher_logits.float(), 16)
    q = decode_topk_values(encode_topk_values(exact.teacher_logprobs.numpy(), "q64"), "q64")
    tail = decode_tail(encode_tail(exact.teacher_tail_logmass.numpy(), "q64"), "q64")
    quantized = SparseTeacher(exact.teacher_ids, torch.from_numpy(np.asarray(q)), torch.from_numpy(np.asarray(tail)))
    a = kd_loss(hidden.float(), weight.float(), bias.float(), labels, exact, alpha=0.0)
    b = kd_loss(hidden.float(), weight.float(), bias.float(), labels, quantized, alpha=0.0)
    assert abs(float(a.divergence) - float(b.divergence)) / N < 0.01


def test_rs_estimator_gradient_is_unbiased():
    """E[counts/N] = p, so the mean RS gradient over many draws approaches the dense forward-KL gradient."""
    hidden, weight, bias, teacher_logits, labels = make_problem(6, scale=1.5)
    p = F.softmax(teacher_logits, -1)
    h_ref = hidden.clone().requires_grad_()
    ref, _, _ = dense_reference(F.linear(h_ref, weight, bias), teacher_logits, labels, "forward_kl")
    ref.backward()
    g = torch.Generator().manual_seed(0)
    num_samples, trials = 16, 400
    grads = torch.zeros_like(hidden)
    for _ in range(trials):
        draws = torch.multinomial(p, num_samples, replacement=True, generator=g)
        counts = torch.zeros(N, V, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=torch.float64)
        )
        ids = torch.arange(V).expand(N, V)
        h = hidden.clone().requires_grad_()
        parts = kd_loss(h, weight, bias, labels, SampledTeacher(ids, counts, num_samples), alpha=0.0)
        parts.total.backward()
        grads += h.grad
    mean = grads / trials
    # Monte-Carlo error shrinks like 1/sqrt(trials * samples); the bias would not.
    err = (mean - h_ref.grad).norm() / h_ref.grad.norm()
    assert err < 0.05, float(err)


def test_rs_value_is_cross_entropy_against_the_counts():
    hidden, weight, bias, _, labels = make_problem(7)
    ids = torch.tensor([[3, 9, 0]] * N)
    counts = torch.tensor([[5.0, 3.0, 0.0]] * N)  # a padded row slot has count 0
    parts = kd_loss(hidden, weight, bias, labels, SampledTeacher(ids, counts, 8), alpha=0.0)
    logq = F.log_softmax(F.linear(hidden, weight, bias), -1)
    expected = -(5 / 8 * logq[:, 3] + 3 / 8 * logq[:, 9]).sum()
    assert float(parts.divergence) == pytest.approx(float(expected), rel=1e-9)


def test_rs_refuses_temperature_and_other_divergences():
    hidden, weight, bias, _, labels = make_problem(7)
    teacher = SampledTeacher(torch.zeros(N, 1, dtype=torch.long), torch.ones(N, 1), 1)
    with pytest.raises(KdError, match="--temperature"):
        kd_loss(hidden, weight, bias, labels, teacher, temperature=2.0)
    with pytest.raises(KdError, match="--divergence"):
        kd_loss(hidden, weight, bias, labels, teacher, divergence="tvd")


def test_alpha_one_is_plain_cross_entropy_and_weights_apply():
    hidden, weight, bias, teacher_logits, labels = make_problem(8)
    logits = F.linear(hidden, weight, bias)
    parts = kd_loss(hidden, weight, bias, labels, full_topk(teacher_logits, 4), alpha=1.0)
    assert float(parts.total.detach()) == pytest.approx(
        float(F.cross_entropy(logits, labels, reduction="sum")), rel=1e-10
    )
    weights = torch.linspace(0.5, 3.0, N, dtype=torch.float64)
    weighted = distill_loss_sum(hidden, weight, bias, labels, None, LossConfig(chunk_size=5), token_weights=weights)
    expected = (F.cross_entropy(logits, labels, reduction="none") * weights).sum()
    assert float(weighted.total.detach()) == pytest.approx(float(expected), rel=1e-10)
    assert weighted.weight_sum == pytest.approx(float(weights.sum()))


def test_padding_ids_of_a_bigger_teacher_go_to_the_tail():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.1]], dtype=torch.float64))
    teacher = SparseTeacher(torch.tensor([[7, V + 3, 2]]), logp, torch.log(torch.tensor([0.2], dtype=torch.float64)))
    folded = fold_out_of_vocab(teacher, V)
    assert torch.isneginf(folded.teacher_logprobs[0, 1])
    assert float(folded.teacher_tail_logmass.exp()[0]) == pytest.approx(0.4)
    total = torch.logsumexp(torch.cat([folded.teacher_logprobs, folded.teacher_tail_logmass[:, None]], 1), 1)
    assert float(total.exp()[0]) == pytest.approx(1.0)
    # The loss runs on it and counts the student's id 0 (the placeholder) in its tail, not in a slot.
    hidden, weight, bias, _, _ = make_problem(9)
    parts = kd_loss(hidden[:1], weight, bias, torch.tensor([7]), teacher, alpha=0.0)
    q = F.softmax(F.linear(hidden[:1], weight, bias), -1)[0]
    p_b = torch.tensor([0.5, 0.1, 0.4], dtype=torch.float64)
    q_b = torch.stack([q[7], q[2], 1 - q[7] - q[2]])
    assert float(parts.divergence) == pytest.approx(float((p_b * (p_b / q_b).log()).sum()), rel=1e-8)


def test_dense_teacher_with_padding_vocab():
    hidden, weight, bias, teacher_logits, labels = make_problem(10)
    padded = torch.cat([teacher_logits, torch.full((N, 4), -60.0, dtype=torch.float64)], 1)
    a = kd_loss(hidden, weight, bias, labels, DenseTeacher(padded), alpha=0.0)
    b = kd_loss(hidden, weight, bias, labels, DenseTeacher(teacher_logits), alpha=0.0)
    assert float(a.divergence) == pytest.approx(float(b.divergence), rel=1e-9)
    heavy = torch.cat([teacher_logits, torch.full((N, 4), 20.0, dtype=torch.float64)], 1)
    with pytest.raises(KdError, match="lacks"):
        kd_loss(hidden, weight, bias, labels, DenseTeacher(heavy), alpha=0.0)


def test_retemper_is_exact_with_the_recorded_tempered_tail():
    logits = torch.randn(4, V, dtype=torch.float64) * 3
    full = full_topk(logits, V)  # empty tail: nothing unknown, no tempered tail needed
    lp, tail = retemper_sparse(full.teacher_logprobs, full.teacher_tail_logmass, 3.0)
    torch.testing.assert_close(lp, F.log_softmax(logits / 3.0, -1).gather(1, full.teacher_ids))
    assert torch.isneginf(tail).all()
    part = full_topk(logits, 5)
    for temperature in (0.5, 2.0, 3.0):
        exact = F.log_softmax(logits / temperature, -1)
        lp, tail = retemper_sparse(
            part.teacher_logprobs, part.teacher_tail_logmass, temperature, part.tempered_tail_logmass(temperature)
        )
        torch.testing.assert_close(lp, exact.gather(1, part.teacher_ids))
        torch.testing.assert_close(tail, torch.logsumexp(exact.scatter(1, part.teacher_ids, float("-inf")), -1))
    with pytest.raises(KdError, match="--temperature 2: the cache holds no tempered tail"):
        retemper_sparse(part.teacher_logprobs, part.teacher_tail_logmass, 2.0)


def test_padding_ids_fold_into_every_tempered_tail():
    logits = torch.randn(4, V + 3, dtype=torch.float64) * 3
    logits[:, V:] += 4.0  # padding ids inside the top-k
    teacher = full_topk(logits, 8)
    folded = fold_out_of_vocab(teacher, V)
    for temperature in TEMPERATURES:
        exact = F.log_softmax(logits / temperature, -1)
        kept = folded.teacher_ids.masked_fill(torch.isneginf(folded.teacher_logprobs), 0)
        lp, tail = retemper_sparse(
            folded.teacher_logprobs, folded.teacher_tail_logmass, temperature, folded.tempered_tail_logmass(temperature)
        )
        valid = torch.isfinite(folded.teacher_logprobs)
        torch.testing.assert_close(lp[valid], exact.gather(1, kept)[valid])
        want_tail = tempered_tails(logits, teacher.teacher_ids, valid, (temperature,))[:, 0]
        torch.testing.assert_close(tail, want_tail)


def test_no_grad_evaluation_matches_training_values():
    hidden, weight, bias, teacher_logits, labels = make_problem(11)
    teacher = full_topk(teacher_logits, 10)
    with torch.no_grad():
        evaluated = kd_loss(hidden, weight, bias, labels, teacher, alpha=0.4, temperature=1.3)
    trained = kd_loss(hidden.clone().requires_grad_(), weight, bias, labels, teacher, alpha=0.4, temperature=1.3)
    assert float(evaluated.total) == pytest.approx(float(trained.total.detach()), rel=1e-6)


def test_bf16_autocast_is_close_to_fp32():
    hidden, weight, bias, teacher_logits, labels = (t.float() if t.is_floating_point() else t for t in make_problem(12))
    teacher = full_topk(teacher_logits, 16)
    w32 = weight.clone().requires_grad_()
    ref = kd_loss(hidden, w32, bias, labels, teacher, alpha=0.5)
    ref.total.backward()
    w16 = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kd_loss(hidden, w16, bias, labels, teacher, alpha=0.5)
    got.total.backward()
    assert float(got.total.detach()) == pytest.approx(float(ref.total.detach()), rel=0.03)
    assert w16.grad.dtype == torch.float32
    cos = F.cosine_similarity(w16.grad.flatten(), w32.grad.flatten(), dim=0)
    assert float(cos) > 0.99


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"alpha": 1.5}, "--alpha"),
        ({"alpha": -0.1}, "--alpha"),
        ({"temperature": 0.0}, "--temperature"),
        ({"divergence": "kl"}, "--divergence"),
        ({"divergence": "jsd", "jsd_beta": 0.0}, "--jsd-beta"),
        ({"chunk_size": 0}, "--chunk-size"),
    ],
)
def test_bad_settings_name_the_flag(kwargs, flag):
    with pytest.raises(KdError, match=flag):
        LossConfig(**kwargs)


# ----------------------------------------------------------------------------- the fused head


def teacher_with_empty_slots(teacher_logits: torch.Tensor, k: int) -> SparseTeacher:
    """A top-k teacher whose last two slots are empty (-inf, as adaptive top-k pads), pointing at
    ids that repeat a valid id or sit in the tail: the fused path must neither zero nor count them."""
    top = full_topk(teacher_logits, k)
    ids, logp = top.teacher_ids.clone(), top.teacher_logprobs.clone()
    tail = torch.logaddexp(top.teacher_tail_logmass, torch.logsumexp(logp[:, -2:], dim=1))
    tempered = tempered_tails(teacher_logits, ids, torch.arange(k) < k - 2)
    ids[:, -2], ids[:, -1] = ids[:, 0], (ids[:, 0] + 1) % V
    logp[:, -2:] = float("-inf")
    return SparseTeacher(ids, logp, tail, tempered, TEMPERATURES)


def rs_teacher(teacher_logits: torch.Tensor, num_samples: int = 16, seed: int = 0) -> SampledTeacher:
    """Unique ids of num_samples draws with their counts, zero-count slots padding each row."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(F.softmax(teacher_logits, -1), num_samples, replacement=True, generator=g)
    counts = torch.zeros(teacher_logits.shape, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=torch.float64)
    )
    width = int((counts > 0).sum(1).max())
    values, ids = counts.topk(width, dim=1)
    return SampledTeacher(ids, values, num_samples)


TEACHERS = {
    "top8": lambda t: full_topk(t, 8),
    "top8_empty_slots": lambda t: teacher_with_empty_slots(t, 8),
    "dense": DenseTeacher,
}


def loss_and_grads(chunk_loss, hidden, weight, bias, labels, teacher, config, token_weights=None):
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    parts = head_loss_sum(h, w, b, labels, teacher, config, token_weights, chunk_loss)
    parts.total.backward()
    return parts, (h.grad, w.grad, b.grad)


@pytest.mark.parametrize("teacher_kind", list(TEACHERS))
@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_equals_autograd_reference(teacher_kind, name, temperature):
    """Closed-form values and gradients equal autograd's (fp64), with token weights and several chunks."""
    hidden, weight, bias, teacher_logits, labels = make_problem(13)
    teacher = TEACHERS[teacher_kind](teacher_logits)
    token_weights = torch.linspace(0.2, 2.0, N, dtype=torch.float64)
    config = LossConfig(alpha=0.3, temperature=temperature, divergence=name, chunk_size=5)
    got, got_grads = loss_and_grads(fused_chunk_loss, hidden, weight, bias, labels, teacher, config, token_weights)
    want, want_grads = loss_and_grads(autograd_chunk_loss, hidden, weight, bias, labels, teacher, config, token_weights)
    for a, b in ((got.total, want.total), (got.ce, want.ce), (got.divergence, want.divergence)):
        assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-10, abs=1e-12)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fused_rs_equals_autograd_reference(alpha):
    hidden, weight, bias, teacher_logits, labels = make_problem(14)
    teacher = rs_teacher(teacher_logits)
    config = LossConfig(alpha=alpha, chunk_size=5)
    got, got_grads = loss_and_grads(fused_chunk_loss, hidden, weight, bias, labels, teacher, config)
    want, want_grads = loss_and_grads(autograd_chunk_loss, hidden, weight, bias, labels, teacher, config)
    assert float(got.total.detach()) == pytest.approx(float(want.total.detach()), rel=1e-10)
    assert float(got.divergence) == pytest.approx(float(want.divergence), rel=1e-10, abs=1e-12)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("teacher_kind", ["none", "top8", "rs"])
def test_fused_gradient_is_written_into_the_logits_buffer(teacher_kind):
    """At T = 1 the fused loss allocates no [n, V] buffer of its own: the gradient is the logits' storage."""
    hidden, weight, bias, teacher_logits, labels = make_problem(15)
    teacher = {"none": None, "top8": full_topk(teacher_logits, 8), "rs": rs_teacher(teacher_logits)}[teacher_kind]
    logits = F.linear(hidden, weight, bias)
    sums = fused_chunk_loss(logits, labels, teacher, 0, N, LossConfig(alpha=0.5), None, None, True)
    assert sums.grad_logits.data_ptr() == logits.data_ptr()


def peaked_student(tail_mass: float, dtype: torch.dtype, k: int = 6, seed: int = 16):
    """Logits (head = identity) whose softmax holds all but `tail_mass` on k ids per row, and a teacher
    on those ids with 5% in its tail. Returns hidden, weight, bias, labels, teacher, cached ids' mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    cached = torch.zeros(N, V, dtype=torch.bool).scatter_(1, ids, True)
    z = torch.randn(N, V, generator=g, dtype=torch.float64)
    inside = torch.where(cached, z.exp(), 0.0).sum(1)
    outside = torch.where(cached, 0.0, z.exp()).sum(1)
    shift = torch.log(tail_mass * inside / ((1 - tail_mass) * outside))  # outside·e^shift / total = tail_mass
    logits = torch.where(cached, z, z + shift[:, None]).to(dtype)
    teacher_logprobs = F.log_softmax(torch.randn(N, k, generator=g, dtype=torch.float64), -1) + math.log(0.95)
    teacher = SparseTeacher(ids, teacher_logprobs.to(dtype), torch.full((N,), math.log(0.05), dtype=dtype))
    labels = torch.randint(0, V, (N,), generator=g)
    eye = torch.eye(V, dtype=dtype)
    return logits, eye, torch.zeros(V, dtype=dtype), labels, teacher, cached


def bucket_reference(student_logits, teacher, cached, labels, name, alpha):
    """fp64 loss over the K+1 buckets, the student's tail summed over the complement (never 1 − Σ)."""
    z = student_logits.double()
    q = F.softmax(z, -1)
    q_b = torch.cat([q.gather(1, teacher.teacher_ids), torch.where(cached, 0.0, q).sum(1, keepdim=True)], 1)
    p_b = torch.cat([teacher.teacher_logprobs, teacher.teacher_tail_logmass[:, None]], 1).double().exp()
    if name == "forward_kl":
        d = (p_b * (p_b.log() - q_b.log())).sum(-1)
    elif name == "reverse_kl":
        d = (q_b * (q_b.log() - p_b.log())).sum(-1)
    elif name == "jsd":
        m = 0.5 * p_b + 0.5 * q_b
        d = 0.5 * (p_b * (p_b / m).log()).sum(-1) + 0.5 * (q_b * (q_b / m).log()).sum(-1)
    else:
        d = 0.5 * (p_b - q_b).abs().sum(-1)
    ce = F.cross_entropy(z, labels, reduction="sum")
    return alpha * ce + (1 - alpha) * d.sum(), d.sum(), q_b[:, -1]


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize(
    ("tail_mass", "dtype"),
    [(1e-7, torch.float64), (1e-7, torch.float32), (1e-20, torch.float32), (1e-33, torch.float32)],
)
def test_student_with_nearly_all_mass_on_the_cached_ids(name, tail_mass, dtype):
    """1 − Σ q_k would lose the student's tail (in fp32, 1e-7 is 1–2 ulps of 1); the fused path sums the
    complement itself, and 1e-33 (below `tail_guard`) takes the exact log-space fallback. fp64 reference."""
    logits, eye, bias, labels, teacher, cached = peaked_student(tail_mass, dtype)
    ref_logits = logits.double().clone().requires_grad_()
    ref_total, ref_div, ref_tail = bucket_reference(ref_logits, teacher, cached, labels, name, alpha=0.3)
    ref_total.backward()
    assert float(ref_tail.detach().min()) == pytest.approx(tail_mass, rel=1e-3)
    if dtype == torch.float32 and tail_mass == 1e-7:  # the hazard is real: the naive tail is off by > 10%
        q = F.softmax(logits, -1)
        naive = 1 - q.gather(1, teacher.teacher_ids).sum(1)
        assert float(((naive.double() - ref_tail.detach()) / ref_tail.detach()).abs().max()) > 0.1
    if tail_mass == 1e-33:
        assert tail_mass < tail_guard(dtype, V)
    h = logits.clone().requires_grad_()
    parts = distill_loss_sum(h, eye, bias, labels, teacher, LossConfig(alpha=0.3, divergence=name, chunk_size=5))
    parts.total.backward()
    # fp32 within a few of its ulps (the autograd reference path's own error is the same, ~1e-7).
    rel = 1e-10 if dtype == torch.float64 else 1e-6
    assert float(parts.divergence) == pytest.approx(float(ref_div.detach()), rel=rel, abs=1e-12)
    assert float(parts.total.detach()) == pytest.approx(float(ref_total.detach()), rel=rel)
    scale = float(ref_logits.grad.abs().max())
    torch.testing.assert_close(h.grad.double(), ref_logits.grad, rtol=2 * rel, atol=2 * rel * scale)


def test_fp64_fallback_below_the_fp64_guard():
    """The fallback in fp64 too: a tail mass of 1e-300 is under V·tiny/eps there."""
    logits, eye, bias, labels, teacher, cached = peaked_student(1e-300, torch.float64)
    assert 1e-300 < tail_guard(torch.float64, V)
    ref_logits = logits.clone().requires_grad_()
    ref_total, ref_div, _ = bucket_reference(ref_logits, teacher, cached, labels, "forward_kl", alpha=0.3)
    ref_total.backward()
    h = logits.clone().requires_grad_()
    parts = distill_loss_sum(h, eye, bias, labels, teacher, LossConfig(alpha=0.3, chunk_size=5))
    parts.total.backward()
    assert float(parts.divergence) == pytest.approx(float(ref_div.detach()), rel=1e-10)
    torch.testing.assert_close(h.grad, ref_logits.grad, rtol=1e-8, atol=1e-12)
