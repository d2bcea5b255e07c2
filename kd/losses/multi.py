"""Several teachers at once: a weighted sum of per-teacher divergences, or the divergence to their mixture.

Two ways to combine J teachers with weights w_j (normalised to Σ w_j = 1, so --alpha keeps its
meaning and one teacher of weight 1 is the single-teacher loss):

- ``sum``: α·CE + (1−α)·T²·Σ_j w_j·D(teacher_j ‖ student). Each teacher's signal goes through the
  single-teacher loss (`distill_loss_sum`) unchanged, so every divergence and cache type valid for
  one teacher is valid here; it costs one pass of the head per teacher.
- ``mixture``: α·CE + (1−α)·T²·D(Σ_j w_j·teacher_j ‖ student). `kd.losses.mixture` builds the mixture
  on the union of the teachers' listed ids plus one tail bucket, then the single-teacher loss runs
  on it (one pass of the head; two with teachers across tokenizers or RS teachers). It takes top-k
  and RS teachers, teachers that cover only some targets (across tokenizers: at each target the
  teachers present, weights renormalised over them) and any temperature (the mixture of the
  tempered teachers); the rules, and what is refused (RS at T ≠ 1 or with another divergence than
  forward KL, as for one RS teacher), are in that module's docstring.

Imports: torch and kd.losses only (tests/test_layering.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kd.errors import KdError
from kd.losses.head import distill_loss_sum
from kd.losses.mixture import mixture_loss_sum
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
    if teachers.mix == "mixture":
        parts = mixture_loss_sum(
            one, student_hidden, labels, teachers.teachers, teachers.weights, teachers.rows, config,  # type: ignore[arg-type]
            token_weights, student_head_weight.shape[0],
        )  # fmt: skip
        return parts, []
    if teachers.partial:
        return _partial_loss_sum(one, student_hidden, labels, teachers, config, token_weights)
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
