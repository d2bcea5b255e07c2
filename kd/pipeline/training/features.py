"""Feature distillation in stage two: which student layer goes to which cached teacher layer, and the
learned projections between them (`kd train --feature-loss mse|cosine --feature-weight W --feature-map S:T,…`).

The teacher side is a hidden cache made with ``kd cache-logits --store hidden --hidden-layers …``
(its rows: the outputs of those decoder layers at every target's position, kd.pipeline.engines.layer_outputs).
The student side is the output of its own decoder layer S at the same positions, caught by a forward
hook during the ordinary forward. Each pair (S, T) has a linear projection, student width → teacher
width, in `FeatureProjections`: a small module beside the student inside the loss module, so the same
AdamW trains it, DDP synchronises it, checkpoints keep it (resume.py) and the exported student, which
is `module.student` alone, never contains it.

Default map (no --feature-map): each cached teacher layer t goes to the student layer at the same
relative depth, round((t + 1) · L_s / L_t) − 1 (L_s, L_t the student's and teacher's depths), so the
last cached layer of a 30-layer teacher, 29, meets the last student layer whatever its depth.
"""

from __future__ import annotations

import torch

from kd.cache.reader import CacheReader
from kd.errors import KdError
from kd.losses.features import feature_loss_sum
from kd.pipeline.engines.layer_outputs import decoder_layer_list, layer_outputs
from kd.pipeline.heads import split_body_and_head


def parse_feature_map(text: str) -> tuple[tuple[int, int], ...]:
    """'0:8,1:15' -> ((0, 8), (1, 15)): student layer S onto cached teacher layer T, each pair once."""
    pairs = []
    for part in str(text).split(","):
        student, sep, teacher = part.partition(":")
        try:
            pair = (int(student), int(teacher))
        except ValueError:
            pair = None
        if not sep or pair is None or min(pair) < 0:
            raise KdError(f"--feature-map {text}: expected STUDENT:TEACHER layer pairs such as 0:8,1:15")
        pairs.append(pair)
    if len(set(pairs)) != len(pairs):
        raise KdError(f"--feature-map {text}: a pair is given twice")
    return tuple(pairs)


def default_feature_map(cached: tuple[int, ...], teacher_depth: int, student_depth: int) -> tuple[tuple[int, int], ...]:
    """Each cached teacher layer t onto the student layer at the same relative depth (module docstring)."""
    pairs = []
    for t in cached:
        s = min(max(round((t + 1) * student_depth / teacher_depth) - 1, 0), student_depth - 1)
        pairs.append((s, t))
    return tuple(pairs)


class FeatureProjections(torch.nn.Module):
    """One Linear(student width → teacher width) per mapped pair, and the feature loss over all pairs.

    forward is not used: `loss_sum` is called inside DistillStep.forward (under DDP, the wrapped module).
    """

    def __init__(
        self, pairs: tuple[tuple[int, int], ...], cached: tuple[int, ...], student_width: int, teacher_width: int,
        kind: str, weight: float,
    ) -> None:  # fmt: skip
        super().__init__()
        self.pairs = pairs
        self.kind = kind
        self.weight = weight
        self.slot = {t: cached.index(t) for _, t in pairs}
        """Teacher layer -> its index in Batch.teacher_features (the cache's layers, ascending)."""
        self.projections = torch.nn.ModuleDict(
            {self.key(s, t): torch.nn.Linear(student_width, teacher_width) for s, t in pairs}
        )

    @staticmethod
    def key(student_layer: int, teacher_layer: int) -> str:
        return f"s{student_layer}_t{teacher_layer}"

    @property
    def student_layers(self) -> tuple[int, ...]:
        return tuple(sorted({s for s, _ in self.pairs}))

    def catch(self, body: torch.nn.Module):
        """Context manager: during it the student body's forward fills a dict {S: [B, L, d]}."""
        return layer_outputs(decoder_layer_list(body, "--feature-map"), self.student_layers)

    def loss_sum(
        self,
        student_states: dict[int, torch.Tensor],
        rows: torch.Tensor,
        cols: torch.Tensor,
        teacher_features: torch.Tensor | None,
        token_weights: torch.Tensor | None,
    ) -> torch.Tensor:
        """W · Σ_tokens mean over pairs of the feature loss (a SUM over targets, normalised by the trainer).

        student_states: {S: [B, L, ds]} from `catch`; rows/cols[N]: the positions before each target;
        teacher_features[M, N, dt]: the batch's cached layers.
        """
        if teacher_features is None:
            raise KdError("--feature-loss: a batch came without the cache's intermediate layers")
        total = 0.0
        for s, t in self.pairs:
            projection = self.projections[self.key(s, t)]
            student = student_states[s][rows, cols]
            teacher = teacher_features[self.slot[t]]
            total = total + feature_loss_sum(
                student, teacher, projection.weight, projection.bias, self.kind, token_weights
            )
        return total * (self.weight / len(self.pairs))


def build_feature_projections(cfg, reader: CacheReader | None, student_lm: torch.nn.Module):
    """The projections --feature-loss asks for, checked against the cache and the student (None without it).

    `student_lm`: the plain causal LM (unwrapped from peft); its body's layers and head width are read."""
    if cfg.feature_loss is None:
        return None
    if reader is None or reader.mode != "hidden" or not reader.hidden_layers:
        raise KdError(
            f"--feature-loss needs a hidden cache with intermediate layers; --from-cache {cfg.from_cache} has "
            "none (make one with `kd cache-logits --store hidden --hidden-layers 8,15`)"
        )
    cached = reader.hidden_layers
    body, head, _ = split_body_and_head(student_lm)
    student_depth = len(decoder_layer_list(body, "--feature-loss"))
    teacher_depth = int(reader.settings.get("teacher_layers") or max(cached) + 1)
    if cfg.feature_map:
        pairs = parse_feature_map(cfg.feature_map)
        for s, t in pairs:
            if s >= student_depth:
                raise KdError(
                    f"--feature-map {cfg.feature_map}: the student has {student_depth} decoder layers "
                    f"(0..{student_depth - 1}), no layer {s}"
                )
            if t not in cached:
                raise KdError(
                    f"--feature-map {cfg.feature_map}: the cache holds teacher layers {','.join(map(str, cached))}, "
                    f"not {t}"
                )
    else:
        pairs = default_feature_map(cached, teacher_depth, student_depth)
    student_width = int(head.weight.shape[1])  # the residual stream's width (the head's input)
    teacher_width = int(reader.settings["hidden_size"])
    return FeatureProjections(pairs, cached, student_width, teacher_width, cfg.feature_loss, cfg.feature_weight)
