"""Several teachers at once: a weighted sum of per-teacher divergences, or the divergence to their mixture.

Two ways to combine J teachers with weights w_j (normalised to Σ w_j = 1, so --alpha keeps its
meaning and one teacher of weight 1 is the single-teacher loss):

- ``sum``: α·CE + (1−α)·T²·Σ_j w_j·D(teacher_j ‖ student). Each teacher's signal goes through the
  single-teacher loss (`distill_loss_sum`) unchanged, so every divergence and cache type valid for
  one teacher is valid here; it costs one pass of the head per teacher.
- ``mixture``: α·CE + (1−α)·T²·D(Σ_j w_j·teacher_j ‖ student), for top-k teachers. `mix_topk` builds the
  mixture on the union of the teachers' cached ids plus one tail bucket; then the single-teacher
  loss runs on it (one pass of the head).

The mixture's approximation. A top-k teacher j knows p_j(x) only for the ids it lists; its tail
mass t_j = 1 − Σ listed p_j is spread over every other id in an unknown way. For an id x that
teacher i lists and teacher j does not, the rule here counts w_j·p_j(x) in the **tail bucket**
(where teacher j put it): the mixture lists x with Σ_{j lists x} w_j·p_j(x), and its tail is
Σ_j w_j·t_j. That is a proper distribution over (union ids + tail), exact on every bucket whose
teachers all list it, and it never invents mass. The error against the true mixture on such an id
is w_j·p_j(x) ≤ w_j·min(listed p_j) (x ranks below teacher j's k-th id), moved between x's bucket
and the tail. The student is compared bucket by bucket, its tail being its mass outside the union.

Imports: torch and kd.losses only (tests/test_layering.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kd.errors import KdError
from kd.losses.divergences import retemper_sparse
from kd.losses.head import distill_loss_sum
from kd.losses.signals import LossConfig, LossParts, SampledTeacher, SparseTeacher, TeacherSignal

TEACHER_MIXES = ("sum", "mixture")
"""sum: Σ_j w_j·D(teacher_j‖student); mixture: D(Σ_j w_j·teacher_j‖student) on the union of supports."""


@dataclass
class TeacherSet:
    """The signals of J teachers for the same N target tokens, their weights (Σ = 1) and how to combine them."""

    teachers: list[SparseTeacher | SampledTeacher]
    weights: tuple[float, ...]
    mix: str = "sum"
    tally: Callable[[list[torch.Tensor], float], None] | None = None
    """Called by the training step with each teacher's Σ w·D and the batch's Σ w (logging only)."""
    rows: list[torch.Tensor | None] | None = None
    """Per teacher, bool[N]: the targets its rows cover (a cross-tokenizer teacher's aligned targets;
    None: all). teachers[j] then holds rows for those targets only, in order."""

    def __post_init__(self) -> None:
        if len(self.teachers) != len(self.weights):
            raise ValueError(f"{len(self.teachers)} teachers, {len(self.weights)} weights")
        if self.mix not in TEACHER_MIXES:
            raise KdError(f"--teacher-mix {self.mix}: expected one of {', '.join(TEACHER_MIXES)}")

    def to(self, device: torch.device | str) -> TeacherSet:
        moved = [
            type(t)(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(t).items()})
            for t in self.teachers
        ]
        rows = None if self.rows is None else [None if r is None else r.to(device) for r in self.rows]
        return TeacherSet(moved, self.weights, self.mix, self.tally, rows)

    @property
    def partial(self) -> bool:
        """Whether some teacher covers only some of the targets."""
        return self.rows is not None and any(r is not None for r in self.rows)


def normalised_weights(weights: list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """Weights divided by their sum (each must be finite and > 0)."""
    if not weights or not all(w > 0 and w != float("inf") for w in weights):
        raise KdError(f"teacher weights must be finite numbers > 0, got {list(weights)}")
    total = sum(weights)
    return tuple(w / total for w in weights)


def mix_topk(teachers: list[SparseTeacher], weights: tuple[float, ...] | list[float]) -> SparseTeacher:
    """The weighted mixture of top-k teachers on the union of their ids plus a tail (rule: module docstring).

    teachers[j]: teacher_ids[N, K_j], teacher_logprobs[N, K_j] (-inf: empty slot), teacher_tail_logmass[N];
    weights[j] >= 0 summing to 1 -> SparseTeacher with ids[N, Σ K_j] (each valid id once; empty slots
    -inf, pointing at id 0), logprobs in descending order, the mixed tail. Each teacher is first
    renormalised (listed + tail = 1, which removes value quantisation's drift). Mixed in fp64.
    Tempered tails are not carried: a mixture is taken at T = 1 (training refuses it at T ≠ 1).
    """
    if len(teachers) != len(weights):
        raise ValueError(f"{len(teachers)} teachers, {len(weights)} weights")
    probs, ids, tails = [], [], []
    for teacher, w in zip(teachers, weights, strict=True):
        logp, tail = retemper_sparse(
            teacher.teacher_logprobs.double(), teacher.teacher_tail_logmass.double(), 1.0
        )  # normalised: Σ listed + tail = 1
        probs.append(logp.exp() * w)  # 0 on empty slots
        tails.append(tail.exp() * w)
        ids.append(teacher.teacher_ids.long())
    p = torch.cat(probs, dim=1)
    cat_ids = torch.cat(ids, dim=1)
    # Empty slots sort last (an id above every real one) and carry 0 probability.
    sentinel = int(cat_ids.max()) + 1 if cat_ids.numel() else 1
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
    mixed_lp = torch.where(real, mixed_p.log(), torch.full_like(mixed_p, float("-inf")))
    mixed_lp, by_prob = mixed_lp.sort(dim=1, descending=True)  # probability order, as readers hand rows out
    mixed_ids = mixed_ids.gather(1, by_prob)
    tail = torch.stack(tails, dim=0).sum(dim=0)
    dtype = teachers[0].teacher_logprobs.dtype
    return SparseTeacher(
        teacher_ids=mixed_ids,
        teacher_logprobs=mixed_lp.to(dtype),
        teacher_tail_logmass=tail.log().to(dtype),
    )


def teachers_loss_sum(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    student_head_bias: torch.Tensor | None,
    labels: torch.Tensor,
    teachers: TeacherSet,
    config: LossConfig,
    token_weights: torch.Tensor | None = None,
    student_logit_transform=None,
) -> tuple[LossParts, list[torch.Tensor]]:
    """The multi-teacher loss; student_hidden[N, H], labels[N] -> (LossParts of sums over N, per-teacher Σ w·D).

    `divergence` in the parts is Σ_j w_j·(Σ w·D_j) (sum) or Σ w·D(mixture) (mixture); the list holds
    each teacher's own Σ w·D_j (sum mode; empty for mixture), detached, for logging.
    """

    def one(teacher: TeacherSignal | None, cfg: LossConfig, hidden=None, targets=None, weights=None) -> LossParts:
        """The single-teacher loss over all targets, or over the given subset of them."""
        if hidden is None:
            hidden, targets, weights = student_hidden, labels, token_weights
        return distill_loss_sum(
            hidden, student_head_weight, student_head_bias, targets, teacher, cfg,
            token_weights=weights, student_logit_transform=student_logit_transform,
        )  # fmt: skip

    alpha = config.alpha
    if alpha == 1.0:
        # CE alone is the loss; the divergences are measured anyway (no gradient), as for one teacher,
        # so that the logged ones are real, not 0. Costs one more pass of the head per teacher.
        with torch.no_grad():
            measured, per_teacher = teachers_loss_sum(
                student_hidden.detach(), student_head_weight.detach(),
                None if student_head_bias is None else student_head_bias.detach(), labels, teachers,
                dataclasses.replace(config, alpha=0.0), token_weights, student_logit_transform,
            )  # fmt: skip
        parts = one(None, config)  # Σ w·CE, the whole loss at α = 1
        return dataclasses.replace(parts, divergence=measured.divergence), per_teacher
    if teachers.partial:
        return _partial_loss_sum(one, student_hidden, labels, teachers, config, token_weights)
    if teachers.mix == "mixture":
        if not all(isinstance(t, SparseTeacher) for t in teachers.teachers):
            raise KdError("--teacher-mix mixture needs top-k caches; use --teacher-mix sum with RS caches")
        return one(mix_topk(teachers.teachers, teachers.weights), config), []  # type: ignore[arg-type]
    # Teacher 0 carries the CE: c0·(a0·CE + (1−a0)·T²·D0) = α·CE + (1−α)·w0·T²·D0 with c0 = α + (1−α)·w0;
    # every other teacher adds (1−α)·w_j·T²·D_j through an α = 0 pass. One head pass per teacher.
    w0 = teachers.weights[0]
    c0 = alpha + (1.0 - alpha) * w0
    first = one(teachers.teachers[0], dataclasses.replace(config, alpha=alpha / c0))
    total = c0 * first.total
    divergence = w0 * first.divergence
    per_teacher = [first.divergence]
    for teacher, w in zip(teachers.teachers[1:], teachers.weights[1:], strict=True):
        parts = one(teacher, dataclasses.replace(config, alpha=0.0))
        total = total + (1.0 - alpha) * w * parts.total
        divergence = divergence + w * parts.divergence
        per_teacher.append(parts.divergence)
    return LossParts(total, first.ce, divergence, first.num_tokens, first.weight_sum), per_teacher


def _partial_loss_sum(one, student_hidden, labels, teachers: TeacherSet, config: LossConfig, token_weights):
    """Sum mode when teachers cover only some targets: α·Σ w·CE over all, (1−α)·T²·w_j·Σ w·D_j over teacher j's.

    With one teacher this is the cross-tokenizer loss (`kd.pipeline.training.crosstok.loss_sum`).
    One pass of the head for the CE, then one per teacher over its targets.
    """
    if teachers.mix == "mixture":
        raise KdError(
            "--teacher-mix mixture needs every teacher on every target; use --teacher-mix sum across tokenizers"
        )
    assert teachers.rows is not None
    ce = one(None, config)  # total = Σ w·CE (no teacher: the CE is the whole loss)
    alpha = config.alpha
    total = alpha * ce.total
    divergence = torch.zeros((), dtype=ce.divergence.dtype, device=ce.divergence.device)
    per_teacher = []
    kd_config = dataclasses.replace(config, alpha=0.0)
    for teacher, w, rows in zip(teachers.teachers, teachers.weights, teachers.rows, strict=True):
        if rows is None:
            parts = one(teacher, kd_config)
        elif not bool(rows.any()):  # GPU sync: no target of this batch has this teacher's distribution
            per_teacher.append(torch.zeros_like(divergence))
            continue
        else:
            parts = one(
                teacher,
                kd_config,
                student_hidden[rows],
                labels[rows],
                None if token_weights is None else token_weights[rows],
            )
        total = total + (1.0 - alpha) * w * parts.total
        divergence = divergence + w * parts.divergence
        per_teacher.append(parts.divergence)
    return LossParts(total, ce.ce, divergence, ce.num_tokens, ce.weight_sum), per_teacher
