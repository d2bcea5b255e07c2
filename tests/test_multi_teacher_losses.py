"""Several teachers' losses (kd/losses/multi.py) against dense and brute-force references.

    .venv/bin/python -m pytest tests/test_multi_teacher_losses.py -q

`mix_topk` with K = V is the dense mixture exactly (loss and gradients, every divergence); with
K < V it equals a brute-force bucket mixture built id by id (the rule: an id a teacher does not
list counts in that teacher's tail); mixing a teacher with itself is that teacher; the sum mode is
the weighted sum of single-teacher losses (gradients included, top-k and RS teachers alike).

The mixture on every path (kd/losses/mixture.py), against a dense mixture built by hand on the full
vocabulary (`dense_mixture_loss`): teachers that cover only some targets (the teachers present,
weights renormalised), at T = 2 (each teacher tempered, then mixed), RS teachers (counts/N, dropped
draws lowering the row's mass) with top-k ones; one RS teacher has the RS loss's gradient; at T = 2
the recorded tempered tails are the single-teacher loss's.
"""

from __future__ import annotations

import dataclasses
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
    divergence,
    mix_topk,
    normalised_weights,
    teachers_loss_sum,
)
from kd.losses.mixture import mixed_teacher

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


# ----------------------------------------------------------------------------- mixture mode on every path


def covering(teacher: SparseTeacher | SampledTeacher, rows: torch.Tensor | None):
    """A teacher's rows at the targets `rows` covers only, as a cross-tokenizer cache hands them out."""
    if rows is None:
        return teacher
    return type(teacher)(**{k: (v[rows] if torch.is_tensor(v) else v) for k, v in vars(teacher).items()})


def dense_rs(teacher: SampledTeacher) -> torch.Tensor:
    """An RS teacher's empirical distribution counts/num_samples over the vocabulary [N, V]."""
    counts = teacher.teacher_counts.double() / teacher.num_samples
    return torch.zeros(teacher.teacher_ids.shape[0], V, dtype=torch.float64).scatter_add_(
        1, teacher.teacher_ids, counts
    )


def dense_mixture_loss(hidden, weight, labels, teacher_probs, rows, weights, config):
    """The mixture mode by hand on the full vocabulary, by autograd: α·Σ CE + (1−α)·T²·Σ_i M_i·D(m_i/M_i ‖ q_i).

    teacher_probs[j][N, V]: teacher j's distribution at T on every target (a sub-probability for RS
    rows with dropped draws); at target i, m_i mixes the teachers whose rows[j] covers i (None: all)
    with their weights renormalised over them, M_i its total; targets no teacher covers: CE only.
    """
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = h @ w.T
    ce = F.cross_entropy(logits, labels, reduction="sum")
    student = F.log_softmax(logits / config.temperature, dim=-1)
    div = logits.new_zeros(())
    for i in range(N):
        here = [j for j, r in enumerate(rows) if r is None or bool(r[i])]
        if not here:
            continue
        m = sum(weights[j] / sum(weights[k] for k in here) * teacher_probs[j][i] for j in here)
        mass = m.sum()
        div = div + mass * divergence((m / mass).log()[None], student[i : i + 1], config.divergence)[0]
    total = config.alpha * ce + (1.0 - config.alpha) * config.temperature**2 * div
    total.backward()
    return float(total.detach()), float(div.detach()), h.grad, w.grad


def assert_matches_dense(got, gh, gw, ref):
    total, div, rh, rw = ref
    assert float(got.total.detach()) == pytest.approx(total, rel=1e-10)
    assert float(got.divergence) == pytest.approx(div, rel=1e-9)
    torch.testing.assert_close(gh, rh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-9, atol=1e-12)


# Teacher 0 on even targets, 1 on targets 0-3, 2 on 3-7: targets with two, one (1, 5, 7) and no (9) teacher.
PARTIAL_ROWS = [torch.arange(N) % 2 == 0, torch.arange(N) < 4, (torch.arange(N) >= 3) & (torch.arange(N) < 8)]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_mixture_across_tokenizers_is_the_mixture_of_the_teachers_present(name, temperature):
    """Partial coverage: at each target the teachers present, weights renormalised; at T: each teacher tempered."""
    hidden, weight, labels, logits = problem(7)
    weights = (0.5, 0.3, 0.2)
    teachers = [covering(topk(z, V), r) for z, r in zip(logits, PARTIAL_ROWS, strict=True)]  # K = V: exact
    config = LossConfig(alpha=0.3, temperature=temperature, divergence=name, chunk_size=4)
    got = loss_and_grads(hidden, weight, labels, TeacherSet(teachers, weights, "mixture", rows=PARTIAL_ROWS), config)
    dense = [F.softmax(z / temperature, dim=-1) for z in logits]
    assert_matches_dense(*got, dense_mixture_loss(hidden, weight, labels, dense, PARTIAL_ROWS, weights, config))


def test_mixture_with_every_target_covered_is_the_mixture_path():
    hidden, weight, labels, logits = problem(8)
    teachers, weights = [topk(logits[0], 5), topk(logits[1], 3)], (0.6, 0.4)
    config = LossConfig(alpha=0.4, chunk_size=3)
    whole, wh, ww = loss_and_grads(hidden, weight, labels, TeacherSet(teachers, weights, "mixture"), config)
    every = [torch.ones(N, dtype=torch.bool)] * 2
    got, gh, gw = loss_and_grads(hidden, weight, labels, TeacherSet(teachers, weights, "mixture", rows=every), config)
    assert float(got.total.detach()) == pytest.approx(float(whole.total.detach()), rel=1e-10)
    assert float(got.divergence) == pytest.approx(float(whole.divergence), rel=1e-10)
    torch.testing.assert_close(gh, wh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, ww, rtol=1e-9, atol=1e-12)


def dropped(teacher: SampledTeacher) -> SampledTeacher:
    """An RS teacher whose most drawn id of every other row maps to no student id (cross-tokenizer):
    those draws are gone, num_samples is kept (crosstok.map_sampled)."""
    counts = teacher.teacher_counts.clone()
    counts[::2, 0] = 0.0
    return SampledTeacher(teacher.teacher_ids, counts, teacher.num_samples)


def test_a_mixture_of_one_rs_teacher_has_the_rs_loss_gradient():
    """Same tokenizer: the RS loss minus the draws' entropy. Across tokenizers, dropped draws and all:
    the single cross-tokenizer RS loss (α·CE everywhere, the RS loss on the covered targets)."""
    hidden, weight, labels, logits = problem(9)
    rs = sampled(logits[0], 16, seed=1)
    config = LossConfig(alpha=0.3, chunk_size=4)
    single, sh, sw = loss_and_grads(hidden, weight, labels, rs, config)
    got, gh, gw = loss_and_grads(hidden, weight, labels, TeacherSet([rs], (1.0,), "mixture"), config)
    torch.testing.assert_close(gh, sh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, sw, rtol=1e-9, atol=1e-12)
    p = dense_rs(rs)
    entropy = float(-(p * torch.where(p > 0, p.log(), 0.0)).sum())
    assert float(got.divergence) == pytest.approx(float(single.divergence) - entropy, rel=1e-10)

    rows, lossy = PARTIAL_ROWS[2], dropped(rs)
    got, gh, gw = loss_and_grads(
        hidden, weight, labels, TeacherSet([covering(lossy, rows)], (1.0,), "mixture", rows=[rows]), config
    )
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = 0.3 * distill_loss_sum(h, w, None, labels, None, config).total
    want = want + 0.7 * distill_loss_sum(h[rows], w, None, labels[rows], covering(lossy, rows), LossConfig(0.0)).total
    want.backward()
    torch.testing.assert_close(gh, h.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, w.grad, rtol=1e-9, atol=1e-12)


def test_a_mixture_of_rs_and_top_k_teachers_against_a_dense_reference():
    """RS (draws partly dropped) with top-k teachers, some covering only some targets."""
    hidden, weight, labels, logits = problem(10)
    rs = dropped(sampled(logits[0], 16, seed=2))
    weights = (0.3, 0.5, 0.2)
    rows = [None, PARTIAL_ROWS[1], PARTIAL_ROWS[2]]  # the RS teacher on every target
    teachers = [rs, covering(topk(logits[1], V), rows[1]), covering(topk(logits[2], V), rows[2])]
    config = LossConfig(alpha=0.2, chunk_size=4)
    got = loss_and_grads(hidden, weight, labels, TeacherSet(teachers, weights, "mixture", rows=rows), config)
    dense = [dense_rs(rs), F.softmax(logits[1], dim=-1), F.softmax(logits[2], dim=-1)]
    assert_matches_dense(*got, dense_mixture_loss(hidden, weight, labels, dense, rows, weights, config))
    # As for one RS teacher: forward KL at T = 1 only.
    mixed = TeacherSet(teachers, weights, "mixture", rows=rows)
    with pytest.raises(KdError, match="--divergence reverse_kl needs teacher log-probabilities"):
        teachers_loss_sum(hidden, weight, None, labels, mixed, LossConfig(divergence="reverse_kl"))
    with pytest.raises(KdError, match="--temperature must be 1 with an RS cache"):
        teachers_loss_sum(hidden, weight, None, labels, mixed, LossConfig(temperature=2.0))


def tempered_topk(teacher_logits: torch.Tensor, k: int, temperatures: tuple[float, ...]) -> SparseTeacher:
    """A top-k teacher with the tempered tails stage one records (`kd cache-logits --temperatures`)."""
    teacher = topk(teacher_logits, k)
    tails = [
        torch.logsumexp(F.log_softmax(teacher_logits / t, dim=-1).scatter(1, teacher.teacher_ids, float("-inf")), -1)
        for t in temperatures
    ]
    return dataclasses.replace(teacher, teacher_tempered_tails=torch.stack(tails, 1), teacher_temperatures=temperatures)


def test_a_mixture_at_another_temperature_uses_the_recorded_tempered_tails():
    """K < V at T = 2: one teacher, or a teacher mixed with itself, is the single-teacher loss at T = 2
    (which re-tempers from the recorded tail); without the recorded tail it is refused the same way."""
    hidden, weight, labels, logits = problem(11)
    teacher = tempered_topk(logits[0], 6, (1.0, 2.0))
    config = LossConfig(alpha=0.3, temperature=2.0, chunk_size=4)
    alone, ah, aw = loss_and_grads(hidden, weight, labels, teacher, config)
    for mixed in (TeacherSet([teacher], (1.0,), "mixture"), TeacherSet([teacher, teacher], (0.3, 0.7), "mixture")):
        got, gh, gw = loss_and_grads(hidden, weight, labels, mixed, config)
        assert float(got.total.detach()) == pytest.approx(float(alone.total.detach()), rel=1e-10)
        torch.testing.assert_close(gh, ah, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gw, aw, rtol=1e-9, atol=1e-12)
    # The mixed teacher handed to the loss is one at T only: its T = 1 tail is never read.
    mixed, _, _ = mixed_teacher(
        [teacher, tempered_topk(logits[1], 4, (2.0,))], (0.5, 0.5), None, N, 2.0, V, torch.float64
    )
    poisoned = dataclasses.replace(mixed, teacher_tail_logmass=torch.full((N,), float("nan"), dtype=torch.float64))
    clean, ch, cw = loss_and_grads(hidden, weight, labels, mixed, config)
    got, gh, gw = loss_and_grads(hidden, weight, labels, poisoned, config)
    assert float(got.total.detach()) == float(clean.total.detach())
    assert bool(gh.equal(ch)) and bool(gw.equal(cw))
    untempered = TeacherSet([teacher, topk(logits[1], 6)], (0.5, 0.5), "mixture")
    with pytest.raises(KdError, match="the cache holds no tempered tail for it"):
        teachers_loss_sum(hidden, weight, None, labels, untempered, config)
