"""One training step: the student's forward and loss (`DistillStep`), then backward over the accumulated
micro-batches (`forward_backward`).

Normalisation (the bug TRL had to fix): every micro-batch returns a loss SUM, and it is divided once
by the number of target tokens (or the sum of token weights) of the whole global batch: all
accumulation steps on all ranks. Each rank decoded only its own micro-batches, so that count is
all-reduced once per step before the first backward (`global_counts`): one tiny collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from kd.losses import DenseTeacher, LossConfig, TeacherSet, distill_loss_sum, teachers_loss_sum
from kd.pipeline.evaluation.sequences import unwrap_causal_lm
from kd.pipeline.heads import split_body_and_head
from kd.pipeline.training import crosstok
from kd.pipeline.training.batches import Batch
from kd.pipeline.training.distributed import DistEnv, sum_over_ranks
from kd.pipeline.training.features import FeatureProjections
from kd.pipeline.training.hidden_teacher import CachedTeacherHead
from kd.pipeline.training.stream import StepData


class DistillStep(torch.nn.Module):
    """Student forward + loss in one module, so DDP sees (and synchronises) the whole computation.

    forward(batch) -> LossParts with SUMS over the batch's targets. The teacher (online KD) is held
    outside the module's parameters: it is frozen, in eval mode and run under no_grad; so is a
    hidden-state cache's teacher head (`cached_head`), attached to each batch's hidden rows. The
    --feature-loss projections (`features`) are a submodule: DDP synchronises them and AdamW trains them.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        loss_config: LossConfig,
        teacher=None,
        teacher_device: torch.device | None = None,
        cached_head: CachedTeacherHead | None = None,
        features: FeatureProjections | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.features = features  # --feature-loss projections: trained and checkpointed with the student, not exported
        self.loss_config = loss_config
        self._teacher = [teacher] if teacher is not None else []  # a list hides it from Module/DDP
        self._cached_head = [cached_head] if cached_head is not None else []  # a hidden cache's head, frozen
        self.teacher_device = teacher_device
        if teacher is not None:
            self._teacher_parts = split_body_and_head(teacher)  # body, head, post-head transform

    def forward(self, batch: Batch):
        lm = unwrap_causal_lm(self.student)
        body, head, transform = split_body_and_head(lm)
        with self.features.catch(body) if self.features is not None else contextlib.nullcontext({}) as states:
            hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        hidden = hidden[batch.hidden_rows, batch.hidden_cols]
        teacher_signal = batch.teacher
        if self._cached_head:
            teacher_signal = self._cached_head[0].attach(teacher_signal, hidden.device)
        if self._teacher:
            teacher_body, teacher_head, teacher_transform = self._teacher_parts
            device = self.teacher_device or batch.input_ids.device
            with torch.no_grad():
                teacher_hidden = teacher_body(
                    input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
                ).last_hidden_state
                teacher_hidden = teacher_hidden[batch.hidden_rows.to(device), batch.hidden_cols.to(device)]
            teacher_signal = DenseTeacher(
                teacher_hidden=teacher_hidden.to(hidden.device),
                teacher_head_weight=teacher_head.weight.to(hidden.device),
                teacher_head_bias=None if teacher_head.bias is None else teacher_head.bias.to(hidden.device),
                teacher_logit_transform=teacher_transform,
            )
        if isinstance(teacher_signal, TeacherSet):  # several caches (training/multiteacher.py)
            parts, per_teacher = teachers_loss_sum(
                hidden, head.weight, head.bias, batch.labels, teacher_signal, self.loss_config,
                batch.token_weights, transform,
            )  # fmt: skip
            if teacher_signal.tally is not None:
                teacher_signal.tally(per_teacher, parts.weight_sum)
            return parts
        if batch.teacher_rows is not None:  # cross-tokenizer: the divergence only where aligned
            return crosstok.loss_sum(
                distill_loss_sum, hidden, head.weight, head.bias, batch.labels, teacher_signal,
                self.loss_config, batch.token_weights, transform, batch.teacher_rows,
            )  # fmt: skip
        parts = distill_loss_sum(
            hidden,
            head.weight,
            head.bias,
            batch.labels,
            teacher_signal,
            self.loss_config,
            token_weights=batch.token_weights,
            student_logit_transform=transform,
        )
        if self.loss_config.alpha == 1.0 and teacher_signal is not None:
            parts = self._with_logged_divergence(parts, hidden, head, transform, batch, teacher_signal)
        if self.features is not None:
            feature = self.features.loss_sum(
                states, batch.hidden_rows, batch.hidden_cols, batch.teacher_features, batch.token_weights
            )
            parts = dataclasses.replace(parts, total=parts.total + feature, feature=feature.detach())
        return parts

    def _with_logged_divergence(self, parts, hidden, head, transform, batch: Batch, teacher_signal):
        """With --alpha 1 the loss skips the divergence; measure it anyway (no gradient) so the logged
        `divergence` is the real one, not 0. Costs one more pass of the head over these targets."""
        with torch.no_grad():
            measured = distill_loss_sum(
                hidden.detach(),
                head.weight.detach(),
                None if head.bias is None else head.bias.detach(),
                batch.labels,
                teacher_signal,
                dataclasses.replace(self.loss_config, alpha=0.0),
                token_weights=batch.token_weights,
                student_logit_transform=transform,
            )
        return dataclasses.replace(parts, divergence=measured.divergence)


@dataclass
class StepCounts:
    """Global counts of one optimizer step (all micro-batches on all ranks)."""

    normaliser: float
    """Σ token weights (= target tokens without --tag-weight): the loss divisor."""
    targets: float
    real_tokens: float
    padded_tokens: float


def global_counts(data: StepData, env: DistEnv) -> StepCounts:
    """This step's counts over every rank: one tiny all-reduce before the first backward."""
    counts = torch.tensor([data.weight_sum, data.targets, data.real_tokens, data.padded_tokens], dtype=torch.float64)
    return StepCounts(*(float(c) for c in sum_over_ranks(counts, env)))


def forward_backward(
    data: StepData,
    counts: StepCounts,
    module: DistillStep,
    wrapped: torch.nn.Module,
    device: torch.device,
    amp: torch.dtype | None,
    env: DistEnv,
    fsdp: bool,
) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches; gradients are left accumulated.

    Returns the global sums [Σ total, Σ w·CE, Σ w·D, Σ W·feature] over the step, for logging.
    """
    sums = torch.zeros(4, dtype=torch.float64)
    last = len(data.micro_batches) - 1
    for micro, batch in enumerate(data.micro_batches):
        batch = batch.to(device)
        sync = contextlib.nullcontext()
        # Gradients are synchronised over ranks once, on the last micro-batch.
        if fsdp:
            module.set_requires_gradient_sync(micro == last)
        elif env.world_size > 1 and micro != last:
            sync = wrapped.no_sync()
        with sync:
            with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
                parts = wrapped(batch)
            # Each backward adds a gradient sum; dividing by the global token count here means
            # the accumulated gradient is the global mean. DDP averages over ranks, so scale
            # by world_size to turn that average back into a sum.
            (parts.total * (env.world_size / counts.normaliser)).backward()
        sums += torch.tensor(
            [float(parts.total.detach()), float(parts.ce), float(parts.divergence), float(parts.feature)],
            dtype=torch.float64,
        )
    return sum_over_ranks(sums, env)
