"""Teacher signals (sparse top-k, sampled, dense online) and the loss configuration: the inputs of every loss."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from kd.errors import KdError

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


def upcast_logits(logits: torch.Tensor) -> torch.Tensor:
    """Softmax statistics in fp32 at least (bf16 logits lose the tail); fp64 stays fp64 for reference tests."""
    return logits if logits.dtype == torch.float64 else logits.float()


@dataclass
class SparseTeacher:
    """Top-k teacher data for N target tokens.

    teacher_ids[N, K] (long), teacher_logprobs[N, K] (log p at T=1; -inf marks an empty slot),
    teacher_tail_logmass[N] (log of the mass outside the valid slots; -inf if none),
    teacher_tempered_tails[N, M] (optional): for each τ of `teacher_temperatures`, the log of the
    tail mass of softmax(z/τ), Σ over the ids outside the valid slots, recorded by stage one from the
    full logits. The cached ids re-tempered are exact from their T=1 log-probs; the tail's shape is
    not, so a τ ≠ 1 loss needs this (`tempered_tail_logmass`).
    """

    teacher_ids: torch.Tensor
    teacher_logprobs: torch.Tensor
    teacher_tail_logmass: torch.Tensor
    teacher_tempered_tails: torch.Tensor | None = None
    teacher_temperatures: tuple[float, ...] = ()

    def tempered_tail_logmass(self, temperature: float) -> torch.Tensor | None:
        """teacher_tempered_tails[:, m] for the recorded τ equal to `temperature`; None if not recorded."""
        for m, recorded in enumerate(self.teacher_temperatures):
            if math.isclose(recorded, temperature, rel_tol=1e-9):
                assert self.teacher_tempered_tails is not None
                return self.teacher_tempered_tails[:, m]
        return None


@dataclass
class SampledTeacher:
    """RS-KD teacher data: teacher_ids[N, W] and teacher_counts[N, W] (0 pads a row), num_samples draws each."""

    teacher_ids: torch.Tensor
    teacher_counts: torch.Tensor
    num_samples: int


class LogitMap(Protocol):
    """A model's post-head transform (kd.pipeline.heads.LogitTransform): losses only call these two methods.

    apply(logits[n, V]) -> z[n, V] in fp32 (fp64 stays fp64); slope(z) -> dz/dlogits elementwise
    ([n, V] or a float). Falsy when it is the identity.
    """

    def apply(self, logits: torch.Tensor) -> torch.Tensor: ...

    def slope(self, transformed: torch.Tensor) -> torch.Tensor | float: ...


@dataclass
class DenseTeacher:
    """Full-vocabulary teacher: either teacher_logits[N, V] (final logits), or teacher_hidden[N, H] with the
    head's teacher_head_weight[V, H] (+ bias[V]) and its post-head transform (scale, soft-cap), so that
    logits are made one chunk at a time exactly as the teacher's forward makes them."""

    teacher_logits: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    teacher_head_weight: torch.Tensor | None = None
    teacher_head_bias: torch.Tensor | None = None
    teacher_logit_transform: LogitMap | None = None
    """Applied to the head's output (teacher_hidden path only); None or a falsy map: none."""

    def logits(self, lo: int, hi: int) -> torch.Tensor:
        """fp32 teacher logits of tokens [lo, hi)."""
        if self.teacher_logits is not None:
            return upcast_logits(self.teacher_logits[lo:hi])
        if self.teacher_hidden is None or self.teacher_head_weight is None:
            raise ValueError("DenseTeacher needs teacher_logits or teacher_hidden + teacher_head_weight")
        # The hidden rows take the head's dtype (a cache decodes them to fp32; a bf16 head stays bf16).
        hidden = self.teacher_hidden[lo:hi].to(self.teacher_head_weight.dtype)
        logits = F.linear(hidden, self.teacher_head_weight, self.teacher_head_bias)
        if self.teacher_logit_transform:
            logits = self.teacher_logit_transform.apply(logits)
        return upcast_logits(logits)


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
    feature: torch.Tensor | float = 0.0
    """W·Σ feature loss (detached), when the trainer adds feature distillation (kd.losses.features); else 0."""
