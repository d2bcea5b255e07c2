"""From a model's final hidden states to its logits: the one place that knows how a model's head is applied.

Every wing that turns hidden states into log-probs (capture, training, evaluation, on-policy
judging) separates the decoder body from the head here, so the head and whatever the model does to
its logits after it are handled once.
"""

from __future__ import annotations

import torch

from kd.errors import KdError


def split_body_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """The decoder body (returns hidden states), the LM head, and the final logit soft-cap if any."""
    body = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if body is None or head is None:
        raise KdError(f"{type(model).__name__}: cannot separate the decoder from its LM head")
    if getattr(model.config, "logit_scale", None) not in (None, 1.0):
        raise KdError(f"{type(model).__name__}: models with a logit_scale are not supported yet")
    return body, head, getattr(model.config, "final_logit_softcapping", None)
