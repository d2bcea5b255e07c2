"""Several teachers' losses (kd/losses/multi.py) against dense and brute-force references.

    .venv/bin/python -m pytest tests/test_multi_teacher_losses.py -q

`mix_topk` with K = V is the dense mixture exactly (loss and gradients, every divergence); with
K < V it equals a brute-force bucket mixture built id by id (the rule: an id a teacher does not
list counts in that teacher's tail); mixing a teacher with itself is that teacher; the sum mode is
the weighted sum of single-teacher losses (gradients included, top-k and RS teachers alike).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd.errors import KdError
from kd.losses import (
    DIVERGENCES,
    LossConfig,
    SampledTeacher,
    SparseTeacher,
    TeacherSet,
    distill_loss_sum,
    mix_topk,
    normalised_weights,
    teachers_loss_sum,
)

N, H, V = 10, 16, 40


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 3.0 / math.sqrt(H)
    labels = torch.randint(0, V, (N,), generator=g)
    teachers = [torch.randn(N, V, generator=g, dtype=torch.float64) * 3.0 for _ in range(3)]
    return hidden, weight, labels, teachers


def topk(teacher_logits: torch.Tensor, k: int) -> SparseTeacher:
    logp = F.log_softmax(teacher_logits, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return SparseTeacher(ids, values, torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1))


def dense_of(teacher: SparseTeacher) -> tuple[dict[int, float], float]:
    """Row 0 of a sparse teacher as {id: p} (valid slots) and its tail mass."""
    valid = teacher.teacher_logprobs[0] > float("-inf")
    ids = teacher.teacher_ids[0][valid].tolist()
    probs = teacher.teacher_logprobs[0][valid].exp().tolist()
    assert len(set(ids)) == len(ids), "a mixed row lists each id once"
    return dict(zip(ids, probs, strict=True)), float(teacher.teacher_tail_logmass[0].exp())


def loss_and_grads(hidden, weight, labels, teacher, config):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if isinstance(teacher, TeacherSet):
        parts, _ = teachers_loss_sum(h, w, None, labels, teacher, config)
    else:
        parts = distill_loss_sum(h, w, None, labels, teacher, config)
    parts.total.backward()
    return parts, h.grad, w.grad


@pytest.mark.parametrize("name", DIVERGENCES)
def test_mixture_with_full_support_is_the_dense_mixture(name):
    hidden, weight, labels, logits = problem()
    weights = (0.5, 0.3, 0.2)
    mixed = mix_topk([topk(z, V) for z in logits], weights)
    dense = torch.log(sum(w * F.softmax(z, dim=-1) for w, z in zip(weights, logits, strict=True)))
    config = LossConfig(alpha=0.3, divergence=name, chunk_size=4)
    got, gh, gw = loss_and_grads(
        hidden, weight, labels, TeacherSet([topk(z, V) for z in logits], weights, "mixture"), config
    )
    # The reference: the same loss with the dense mixture given as a full-vocabulary top-k.
    ref, rh, rw = loss_and_grads(hidden, weight, labels, topk(dense, V), config)
    assert float(got.total.detach()) == pytest.approx(float(ref.total.detach()), rel=1e-10)
    torch.testing.assert_close(gh, rh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-9, atol=1e-12)
    # And the mixed teacher itself is the dense mixture, id by id.
    valid = mixed.teacher_logprobs > float("-inf")
    assert mixed.teacher_ids.shape == (N, 3 * V) and bool((valid.sum(1) == V).all()), "each id once, then padding"
    probs = mixed.teacher_logprobs.exp()
    torch.testing.assert_close(probs[valid], dense.exp().gather(1, mixed.teacher_ids)[valid], rtol=1e-12, atol=1e-15)
    assert bool((mixed.teacher_tail_logmass.exp() < 1e-12).all())


def test_mixture_of_top_k_against_a_brute_force_bucket_mixture():
    _, _, _, logits = problem(1)
    weights = (0.6, 0.4)
    teachers = [topk(logits[0], 5), topk(logits[1], 3)]
    mixed = mix_topk(teachers, weights)
    for row in range(N):
        want: dict[int, float] = {}
        tail = 0.0
        for teacher, w in zip(teachers, weights, strict=True):
            p = teacher.teacher_logprobs[row].exp()
            norm = float(p.sum() + teacher.teacher_tail_logmass[row].exp())
            for i, pi in zip(teacher.teacher_ids[row].tolist(), p.tolist(), strict=True):
                want[i] = want.get(i, 0.0) + w * pi / norm  # listed by this teacher: its own probability
            tail += w * float(teacher.teacher_tail_logmass[row].exp()) / norm  # the rest: its tail
        got, got_tail = dense_of(SparseTeacher(*(t[row : row + 1] for t in vars(mixed).values() if torch.is_tensor(t))))
        assert got.keys() == want.keys()
        for i in want:
            assert got[i] == pytest.approx(want[i], rel=1e-12)
        assert got_tail == pytest.approx(tail, rel=1e-12)
        assert sum(got.values()) + got_tail == pytest.approx(1.0, abs=1e-12)
        listed = mixed.teacher_logprobs[row].exp()
        assert bool((listed[:-1] >= listed[1:]).all()), "descending probability order"


def test_empty_slots_and_an_empty_tail_mix_cleanly():
    a = SparseTeacher(
        torch.tensor([[3, 7, 0]]),
        torch.tensor([[math.log(0.5), math.log(0.5), float("-inf")]]),
        torch.tensor([float("-inf")]),
    )
    b = SparseTeacher(
        torch.tensor([[7, 9, 2]]), torch.log(torch.tensor([[0.4, 0.2, 0.1]])), torch.log(torch.tensor([0.3]))
    )
    got, tail = dense_of(mix_topk([a, b], (0.5, 0.5)))
    assert got == pytest.approx({3: 0.25, 7: 0.45, 9: 0.1, 2: 0.05})
    assert tail == pytest.approx(0.15)


def test_a_teacher_mixed_with_itself_is_that_teacher():
    hidden, weight, labels, logits = problem(2)
    teacher = topk(logits[0], 8)
    config = LossConfig(alpha=0.5, chunk_size=3)
    alone, ah, aw = loss_and_grads(hidden, weight, labels, teacher, config)
    both, bh, bw = loss_and_grads(hidden, weight, labels, TeacherSet([teacher, teacher], (0.3, 0.7), "mixture"), config)
    assert float(both.total.detach()) == pytest.approx(float(alone.total.detach()), rel=1e-10)
    torch.testing.assert_close(bh, ah, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bw, aw, rtol=1e-9, atol=1e-12)


def sampled(teacher_logits: torch.Tensor, draws: int, seed: int) -> SampledTeacher:
    g = torch.Generator().manual_seed(seed)
    samples = torch.multinomial(F.softmax(teacher_logits, dim=-1), draws, replacement=True, generator=g)
    counts = torch.zeros(teacher_logits.shape, dtype=torch.float64).scatter_add_(
        1, samples, torch.ones_like(samples, dtype=torch.float64)
    )
    width = int((counts > 0).sum(1).max())
    values, ids = counts.topk(width, dim=-1)
    return SampledTeacher(ids, values.float(), draws)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_sum_mode_is_the_weighted_sum_of_single_teacher_losses(name, alpha):
    hidden, weight, labels, logits = problem(3)
    teachers = [topk(logits[0], 6), topk(logits[1], 4), topk(logits[2], V)]
    weights = normalised_weights([5.0, 3.0, 2.0])
    config = LossConfig(alpha=alpha, divergence=name, temperature=1.0, chunk_size=4)
    got, gh, gw = loss_and_grads(hidden, weight, labels, TeacherSet(teachers, weights, "sum"), config)
    singles = [loss_and_grads(hidden, weight, labels, t, config) for t in teachers]
    assert float(got.total.detach()) == pytest.approx(
        sum(w * float(s[0].total.detach()) for w, s in zip(weights, singles, strict=True)), rel=1e-10
    )
    assert float(got.divergence) == pytest.approx(
        sum(w * float(s[0].divergence) for w, s in zip(weights, singles, strict=True))
    )
    assert float(got.ce) == pytest.approx(float(singles[0][0].ce), rel=1e-12)
    torch.testing.assert_close(gh, sum(w * s[1] for w, s in zip(weights, singles, strict=True)), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, sum(w * s[2] for w, s in zip(weights, singles, strict=True)), rtol=1e-9, atol=1e-12)


def test_sum_mode_takes_top_k_and_rs_teachers_together():
    hidden, weight, labels, logits = problem(4)
    teachers = [topk(logits[0], 6), sampled(logits[1], 32, seed=0)]
    weights = (0.7, 0.3)
    config = LossConfig(alpha=0.2, chunk_size=4)
    got, gh, _ = loss_and_grads(hidden, weight, labels, TeacherSet(teachers, weights, "sum"), config)
    singles = [loss_and_grads(hidden, weight, labels, t, config) for t in teachers]
    assert float(got.total.detach()) == pytest.approx(
        sum(w * float(s[0].total.detach()) for w, s in zip(weights, singles, strict=True)), rel=1e-10
    )
    torch.testing.assert_close(gh, sum(w * s[1] for w, s in zip(weights, singles, strict=True)), rtol=1e-9, atol=1e-12)
    with pytest.raises(KdError, match="--teacher-mix mixture needs top-k caches"):
        teachers_loss_sum(hidden, weight, None, labels, TeacherSet(teachers, weights, "mixture"), config)


def test_weights_are_normalised_and_must_be_positive():
    assert normalised_weights([7, 3]) == pytest.approx((0.7, 0.3))
    for bad in ([1.0, -1.0], [0.0, 1.0], [float("nan"), 1.0], [float("inf"), 1.0]):
        with pytest.raises(KdError, match="finite numbers > 0"):
            normalised_weights(bad)


@pytest.mark.parametrize("mix", ["sum", "mixture"])
def test_alpha_one_trains_on_ce_and_still_measures_the_divergence(mix):
    hidden, weight, labels, logits = problem(5)
    teachers = TeacherSet([topk(logits[0], 6), topk(logits[1], 4)], (0.5, 0.5), mix)
    ce_only, ch, cw = loss_and_grads(hidden, weight, labels, None, LossConfig(alpha=1.0, chunk_size=4))
    got, gh, gw = loss_and_grads(hidden, weight, labels, teachers, LossConfig(alpha=1.0, chunk_size=4))
    kd_only, _, _ = loss_and_grads(hidden, weight, labels, teachers, LossConfig(alpha=0.0, chunk_size=4))
    assert float(got.total.detach()) == pytest.approx(float(ce_only.total.detach()), rel=1e-12)
    torch.testing.assert_close(gh, ch, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gw, cw, rtol=1e-12, atol=1e-14)
    assert float(got.divergence) == pytest.approx(float(kd_only.divergence), rel=1e-12)
    assert float(got.divergence) > 0


def test_teachers_on_some_targets_are_summed_where_they_cover():
    """Cross-tokenizer teachers cover only their aligned targets: the divergence there, the CE everywhere."""
    hidden, weight, labels, logits = problem(6)
    rows = [torch.arange(N) % 2 == 0, torch.arange(N) < 7, None]
    full = [topk(z, 5) for z in logits]

    def covering(teacher: SparseTeacher, r: torch.Tensor | None) -> SparseTeacher:
        if r is None:
            return teacher
        return SparseTeacher(teacher.teacher_ids[r], teacher.teacher_logprobs[r], teacher.teacher_tail_logmass[r])

    teachers = [covering(t, r) for t, r in zip(full, rows, strict=True)]
    weights = (0.5, 0.3, 0.2)
    config = LossConfig(alpha=0.4, chunk_size=3)
    got, gh, gw = loss_and_grads(hidden, weight, labels, TeacherSet(teachers, weights, "sum", rows=rows), config)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = 0.4 * distill_loss_sum(h, w, None, labels, None, config).total
    kd = LossConfig(alpha=0.0, chunk_size=3)
    for teacher, wj, r in zip(teachers, weights, rows, strict=True):
        r = torch.ones(N, dtype=torch.bool) if r is None else r
        want = want + 0.6 * wj * distill_loss_sum(h[r], w, None, labels[r], teacher, kd).total
    want.backward()
    assert float(got.total.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    torch.testing.assert_close(gh, h.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, w.grad, rtol=1e-9, atol=1e-12)
    with pytest.raises(KdError, match="mixture needs every teacher on every target"):
        teachers_loss_sum(hidden, weight, None, labels, TeacherSet(teachers, weights, "mixture", rows=rows), config)
