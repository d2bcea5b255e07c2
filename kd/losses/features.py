"""Feature (hidden-state) distillation: the student's hidden states, projected, pulled towards the teacher's.

``kd train --feature-loss mse|cosine`` adds W · Σ_tokens mean_pairs loss(P h_s, h_t) to the logit loss,
where each mapped pair (student layer → cached teacher layer) has its own learned linear projection
P: student width → teacher width. Like every loss in kd.losses these return **sums** over target
tokens; the trainer divides once by the global target count (kd.pipeline.training.step).

Computed in fp32 with autocast off: intermediate residual streams carry a few very large coordinates
("massive activations"), whose squares overflow bf16's precision long before they overflow its range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_LOSSES = ("mse", "cosine")


def feature_loss_sum(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    projection_weight: torch.Tensor,
    projection_bias: torch.Tensor | None,
    kind: str,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_n w_n · loss(W h_s[n] + b, h_t[n]) for one mapped layer pair.

    student_hidden[N, ds], teacher_hidden[N, dt], projection_weight[dt, ds], projection_bias[dt] | None,
    token_weights[N] | None (None: 1) -> 0-dim sum over N, fp32.

    ``mse``: the mean over the dt coordinates of the squared error (so W does not scale with the width).
    ``cosine``: 1 − cos(W h_s + b, h_t), insensitive to the states' scale; a zero vector counts as cos 0.
    """
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"feature loss {kind!r}: expected one of {FEATURE_LOSSES}")
    with torch.autocast(device_type=student_hidden.device.type, enabled=False):
        projected = F.linear(
            student_hidden.float(),
            projection_weight.float(),
            None if projection_bias is None else projection_bias.float(),
        )
        teacher = teacher_hidden.to(projected.device, torch.float32)
        if kind == "mse":
            per_token = (projected - teacher).pow(2).mean(dim=-1)
        else:
            per_token = 1.0 - F.cosine_similarity(projected, teacher, dim=-1, eps=1e-8)
        if token_weights is not None:
            per_token = per_token * token_weights.to(per_token.dtype)
        return per_token.sum()
