"""The teacher head of a hidden-state cache, loaded once per run and attached to each batch's hidden rows.

A hidden cache's batches carry DenseTeacher(teacher_hidden=...) only; `CachedTeacherHead.attach`
adds the head (weight, bias, post-head transform) so the fused loss (kd.losses) computes the exact
full-vocabulary teacher logits chunk by chunk, as online KD does. Memory: the head's weights on the
device (one copy per process: replicated under DDP and FSDP2, not sharded) plus one logits chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kd.cache.reader import CacheReader
from kd.cache.teacher_head import checked_head_file
from kd.errors import KdError
from kd.losses import DenseTeacher
from kd.pipeline.heads import IDENTITY, LogitTransform


@dataclass
class CachedTeacherHead:
    """weight[V, d], bias[V] | None and the post-head transform of the teacher that wrote a hidden cache."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: LogitTransform = IDENTITY

    def attach(self, teacher, device: torch.device | str | None = None):
        """A DenseTeacher of hidden rows gets this head; any other signal is returned as it is."""
        if not isinstance(teacher, DenseTeacher) or teacher.teacher_hidden is None:
            return teacher
        if teacher.teacher_hidden.shape[1] != self.weight.shape[1]:
            raise KdError(
                f"hidden rows of width {teacher.teacher_hidden.shape[1]} do not fit the cached teacher head "
                f"({self.weight.shape[1]} inputs)"
            )
        device = device or teacher.teacher_hidden.device
        if self.weight.device != torch.device(device):  # moved once, on first use
            self.weight = self.weight.to(device)
            self.bias = None if self.bias is None else self.bias.to(device)
        return replace(
            teacher,
            teacher_hidden=teacher.teacher_hidden.to(device),
            teacher_head_weight=self.weight,
            teacher_head_bias=self.bias,
            teacher_logit_transform=self.transform,
        )


def load_cached_teacher_head(
    reader: CacheReader, device: torch.device | str = "cpu", flag: str | None = None
) -> CachedTeacherHead | None:
    """The head of a hidden cache (checked against the manifest's sha256), or None for any other cache.

    A missing or corrupted head file is a one-line KdError naming it.
    """
    if reader.mode != "hidden":
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path, entry = checked_head_file(reader.dir, reader.manifest, flag or reader.flag)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise KdError(f"{path}: unreadable teacher head ({exc})") from exc
    if "weight" not in tensors or list(tensors["weight"].shape) != entry["shape"]:
        raise KdError(f"{path}: the teacher head does not hold a weight of shape {entry['shape']}")
    # checked_head_file refused any key LogitTransform does not have; it checks the values (one line).
    transform = LogitTransform(**(entry.get("transforms") or {}))
    return CachedTeacherHead(
        tensors["weight"].to(device), None if "bias" not in tensors else tensors["bias"].to(device), transform
    )
