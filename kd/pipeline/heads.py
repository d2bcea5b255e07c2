"""From a model's final hidden states to its logits: the one place that knows how a model's head is applied.

Every wing that turns hidden states into log-probs (both capture engines, the online teacher, the
student's loss, `kd eval`, on-policy judging) separates the decoder body from the head here and
applies the model's post-head transform with `LogitTransform`, so the head and whatever the model
does to its logits after it are handled once, and tested once against the model's own ``forward``
(tests/test_head_transforms.py).

The transforms transformers defines (read from each ``*ForCausalLM.forward``, transformers 5.x):

==========================================================  ==========================================
model_type                                                  forward
==========================================================  ==========================================
granite, granite_swa, granitemoe, granitemoe_swa,           ``logits / config.logits_scaling``
granitemoehybrid, granitemoeshared, granite4_vision_text
hyperclovax                                                 ``logits * config.logits_scaling``
minicpm3                                                    ``lm_head(hidden / config.logits_scaling)``
                                                            (= hidden_size / dim_model_base)
falcon_h1                                                   ``logits * config.lm_head_multiplier``
cohere, cohere2, cohere2_moe, cohere_compass_text           ``logits * config.logit_scale``
gemma2, gemma3_text, gemma3n_text, gemma4_text,             ``c · tanh(logits / c)``,
gemma4_unified_text, vaultgemma, nanochat, diffusion_gemma  c = ``config.final_logit_softcapping``
recurrent_gemma                                             c = ``config.logits_soft_cap``
xlstm                                                       c = ``config.output_logit_soft_cap``
muse_glimmer_text                                           ``c · tanh(logits · output_multiplier / c)``
==========================================================  ==========================================

The multimodal wrappers gemma3n, gemma4, gemma4_unified, granite4_vision, cohere_compass and
muse_glimmer apply their text config's transform; gemma3's applies none (its cap is None anyway).

A config of any other architecture that carries a field looking like a logit transform (a name
matching `_LOGIT_FIELD`, with a non-neutral value) is refused in one line naming the field: kd never
scores a model differently from its own ``forward``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from kd.errors import KdError


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to its LM head's output: ``z = softcap · tanh(scale · logits / softcap)``.

    ``scale`` multiplies (an architecture that divides by d has scale 1/d); ``softcap`` None means no
    cap. Every architecture transformers ships applies the scale before the cap (the one that has
    both, MuseGlimmer, does too). Falsy when it is the identity, so ``if transform:`` skips the work.
    """

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise KdError(f"logit scale must be a finite number > 0, got {self.scale}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise KdError(f"final logit soft-cap must be a finite number > 0, got {self.softcap}")

    def __bool__(self) -> bool:
        return self.scale != 1.0 or self.softcap is not None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """z[..., V] from the head's logits[..., V]: fp32 (fp64 stays fp64) unless the identity (then unchanged)."""
        if not self:
            return logits
        z = logits if logits.dtype == torch.float64 else logits.float()
        if self.softcap is not None:  # one fused multiply: scale / cap
            return torch.tanh(z * (self.scale / self.softcap)) * self.softcap
        return z * self.scale

    def slope(self, transformed: torch.Tensor) -> torch.Tensor | float:
        """dz/dlogits, elementwise, from the transformed logits z: scale·(1 − (z/c)²) under a cap, else scale.

        Used by the fused student head to carry d loss/dz back to the head's own logits.
        """
        if self.softcap is None:
            return self.scale
        return (1.0 - (transformed / self.softcap).square()) * self.scale


IDENTITY = LogitTransform()

_SCALE_FIELDS: dict[str, tuple[str, bool]] = {
    # model_type: (config field, True if forward divides by it)
    **dict.fromkeys(
        ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared"),
        ("logits_scaling", True),
    ),
    "hyperclovax": ("logits_scaling", False),
    "minicpm3": ("logits_scaling", True),  # divides the hidden states before a bias-free head
    "falcon_h1": ("lm_head_multiplier", False),
    "granite4_vision_text": ("logits_scaling", True),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass_text"), ("logit_scale", False)),
    "muse_glimmer_text": ("output_multiplier", False),  # then the soft-cap
}
_SOFTCAP_FIELDS: dict[str, str] = {
    **dict.fromkeys(
        (
            "gemma2",
            "gemma3_text",
            "gemma3n_text",
            "gemma4_text",
            "gemma4_unified_text",
            "vaultgemma",
            "nanochat",
            "diffusion_gemma",
        ),
        "final_logit_softcapping",
    ),
    "muse_glimmer_text": "final_logit_softcapping",
    "recurrent_gemma": "logits_soft_cap",
    "xlstm": "output_logit_soft_cap",
}
_TEXT_WRAPPERS = frozenset({"gemma3n", "gemma4", "gemma4_unified", "granite4_vision", "cohere_compass", "muse_glimmer"})
"""Multimodal wrappers whose ``forward`` applies their text config's transform (``get_text_config()``)."""
_PRE_HEAD_SCALE = {"minicpm3"}
"""Architectures whose scale divides the hidden states: a post-head scale only while the head has no bias."""

_LOGIT_FIELD = re.compile(
    r"logit|soft_?cap|lm_head_mult|output_mult|dim_model_base|scale_width|mup_width|width_mult", re.IGNORECASE
)
"""Config field names that look like a transform of the logits (the fields above, MiniCPM 1/2's remote
code ``dim_model_base``/``scale_width``, muP output multipliers, MPT's ``logit_scale``...)."""

_BODY_FIELDS = frozenset(
    {
        "attn_logit_softcapping",  # Gemma-2's attention scores: inside the body
        "attention_logit_cap",
        "conf_attention_logit_cap",
        "gate_soft_cap",  # xLSTM's gates
        "moe_router_logit_softcapping",
        "router_logit_softcapping",
        "output_router_logits",
        "router_aux_loss_coef",
        "num_logits_to_keep",
        "lm_head_bias",  # the head's own bias: applied with the head
        "attention_invalid_logits_value",
        "tie_word_embeddings",
    }
)
"""Matching field names that do not touch the LM head's output."""


def _neutral(value) -> bool:
    return value is None or value is False or (isinstance(value, int | float) and value in (0, 1))


def _positive(model_type: str, field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise KdError(f"{model_type}: config.{field} = {value!r} is not a positive number")
    return float(value)


def _unknown_field(fields: dict, prefix: str = "") -> tuple[str, object] | None:
    """The first field (nested configs included) that looks like a logit transform and is not neutral."""
    for name, value in sorted(fields.items(), key=lambda item: str(item[0])):
        if not isinstance(name, str):  # a table keyed by ids (id2label, per-layer maps)
            continue
        if isinstance(value, dict):
            found = _unknown_field(value, f"{prefix}{name}.")
            if found is not None:
                return found
        elif _LOGIT_FIELD.search(name) and name not in _BODY_FIELDS and not _neutral(value):
            return f"{prefix}{name}", value
    return None


def _is_config_of(value, config) -> bool:
    return isinstance(value, dict) and value.get("model_type") == config.model_type


def _config_fields(config) -> dict:
    try:
        return dict(config.to_dict())
    except AttributeError:  # a plain namespace
        return dict(vars(config))


def logit_transform(config, head_has_bias: bool = False) -> LogitTransform:
    """The post-head transform a model's ``forward`` applies, from its config; KdError if kd does not know it.

    `head_has_bias`: whether the LM head has a bias (a pre-head scale then is no post-head scale).
    A multimodal wrapper in `_TEXT_WRAPPERS` applies its text config's transform; any other wrapper
    whose nested configs carry a non-neutral logit field is refused like a top-level one (Cohere2Vision's
    forward ignores its text config's ``logit_scale``, Cohere2's applies it: kd does not guess).
    """
    model_type = getattr(config, "model_type", None) or type(config).__name__
    fields = _config_fields(config)
    if model_type in _TEXT_WRAPPERS:
        text = config.get_text_config()
        transform = logit_transform(text, head_has_bias)
        # The other nested configs (vision, audio) are still scanned.
        fields = {k: v for k, v in fields.items() if not _is_config_of(v, text)}
        if (found := _unknown_field(fields)) is None:
            return transform
        raise _refusal(model_type, *found)
    scale, softcap = 1.0, None
    if model_type in _SCALE_FIELDS:
        field, divides = _SCALE_FIELDS[model_type]
        fields.pop(field, None)
        value = getattr(config, field, None)
        if value is None and model_type == "cohere_compass_text":  # its forward skips a None scale
            value = 1.0
        value = _positive(model_type, field, value)
        scale = 1.0 / value if divides else value
        if model_type in _PRE_HEAD_SCALE:
            fields.pop("dim_model_base", None)
            if head_has_bias and scale != 1.0:
                raise KdError(f"{model_type}: config.{field} scales the hidden states before an LM head with a bias")
    if model_type in _SOFTCAP_FIELDS:
        field = _SOFTCAP_FIELDS[model_type]
        fields.pop(field, None)
        value = getattr(config, field, None)
        softcap = None if value is None else _positive(model_type, field, value)
    if (found := _unknown_field(fields)) is not None:
        raise _refusal(model_type, *found)
    return LogitTransform(scale, softcap)


def _refusal(model_type: str, name: str, value) -> KdError:
    return KdError(
        f"{model_type}: config.{name} = {value!r} looks like a transform of the logits that kd does not "
        "know; kd refuses rather than score the model differently from its own forward"
    )


def split_body_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module, LogitTransform]:
    """The decoder body (returns hidden states), the LM head, and the model's post-head `LogitTransform`."""
    body = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if body is None or head is None:
        raise KdError(f"{type(model).__name__}: cannot separate the decoder from its LM head")
    return body, head, logit_transform(model.config, getattr(head, "bias", None) is not None)


def head_logits(head: torch.nn.Module, transform: LogitTransform, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits[N, V] exactly as the model's forward makes them from its final hidden states[N, H]."""
    logits = head(hidden)
    return transform.apply(logits) if transform else logits.float()
