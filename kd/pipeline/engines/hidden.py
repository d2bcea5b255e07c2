"""Hidden-state capture (`kd cache-logits --store hidden`): the rows to store and the head to store once.

Both engines already hold the teacher's final hidden state at every position before a target (the
tensor they hand to the LM head). In hidden mode that tensor itself is the cache's teacher data, and
the head is written once beside the shards, so stage two can recompute the exact logits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd.cache.format import HiddenTargets
from kd.cache.manifest import _fsync_dir, read_manifest
from kd.cache.teacher_head import HEAD_FILE, head_entry_ok, record_teacher_head
from kd.cache.writer import sha256_file
from kd.pipeline.heads import LogitTransform


def hidden_targets(
    hidden: torch.Tensor, counts: list[int], layers: dict[int, torch.Tensor] | None = None
) -> list[HiddenTargets]:
    """Split hidden[N, d] (the states before each target, sequences concatenated) per sequence, as float32,
    with the intermediate layers' rows {i: [N, d]} (--hidden-layers) split alike.

    float32 holds any bf16/fp16 state exactly; the cache's encoding rounds it (kd.cache.format)."""
    rows = hidden.detach().float().cpu().numpy()
    layer_rows = {i: h.detach().float().cpu().numpy() for i, h in (layers or {}).items()}
    bounds = np.cumsum([0, *counts])
    return [
        HiddenTargets(rows[a:b], {i: h[a:b] for i, h in layer_rows.items()} if layers else None)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def save_teacher_head(
    cache_dir: Path, weight: torch.Tensor, bias: torch.Tensor | None, transform: LogitTransform
) -> dict[str, Any]:
    """Write the head once (atomically) and record it in the manifest; a valid one already there is kept.

    `transform`: what the model does to its logits after the head (split_body_and_head's), recorded as
    its fields, e.g. {"scale": 1.0, "softcap": 30.0}. Returns the manifest entry.
    """
    manifest = read_manifest(cache_dir) or {}
    if head_entry_ok(cache_dir, manifest):
        return manifest["teacher_head"]
    from safetensors.torch import save_file

    tensors = {"weight": weight.detach().to("cpu").contiguous()}
    if bias is not None:
        tensors["bias"] = bias.detach().to("cpu").contiguous()
    path = cache_dir / HEAD_FILE
    tmp = cache_dir / f".{HEAD_FILE}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; the head is as readable as the shards
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(cache_dir)
    entry = {
        "file": HEAD_FILE,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "bias": bias is not None,
        "transforms": {"scale": transform.scale, "softcap": transform.softcap},
    }
    record_teacher_head(cache_dir, entry)
    return entry
