"""The teacher's LM head beside a hidden-state cache: one safetensors file, checksummed in the manifest.

A hidden cache (``kd cache-logits --store hidden``) holds the teacher's final hidden states; the
logits are ``transform(hidden @ weight.T + bias)``. The head is stored once per cache as
``teacher_head.safetensors`` (tensors ``weight`` [V, d] and, if the head has one, ``bias`` [V], in
the teacher's dtype), and the manifest's ``teacher_head`` entry records its size, sha256, shape and
the post-head transform as a dict of kd.pipeline.heads.LogitTransform's fields (``{"scale": 1.0,
"softcap": 30.0}``, softcap null when the model has none; new kinds are new keys, and a reader
refuses a key it does not know rather than compute other logits than the teacher's).

This module only names, records and checks the file (model-free); writing and loading the tensors
is kd.pipeline.engines.hidden / kd.pipeline.training.hidden_teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd.cache.manifest import _write as write_manifest
from kd.cache.manifest import locked, read_manifest
from kd.cache.writer import sha256_file
from kd.errors import KdError

HEAD_FILE = "teacher_head.safetensors"
TRANSFORMS = ("scale", "softcap")
"""The fields of kd.pipeline.heads.LogitTransform: z = softcap * tanh(scale * logits / softcap) (no cap: z =
scale * logits)."""


def record_teacher_head(cache_dir: Path, entry: dict[str, Any]) -> None:
    """Put the head's entry (file, bytes, sha256, shape, dtype, transforms) into the manifest."""
    with locked(cache_dir):
        manifest = read_manifest(cache_dir)
        assert manifest is not None
        manifest["teacher_head"] = entry
        write_manifest(cache_dir, manifest)


def head_entry_ok(cache_dir: Path, manifest: dict[str, Any]) -> bool:
    """Whether the manifest lists a head whose file is there with the recorded sha256."""
    entry = manifest.get("teacher_head")
    path = cache_dir / HEAD_FILE
    return bool(entry) and path.is_file() and sha256_file(path) == entry["sha256"]


def checked_head_file(cache_dir: Path, manifest: dict[str, Any], flag: str) -> tuple[Path, dict[str, Any]]:
    """The head file of a hidden cache and its manifest entry, after checking size and sha256.

    Raises a one-line KdError if the entry or the file is missing or the file does not match.
    """
    entry = manifest.get("teacher_head")
    path = cache_dir / HEAD_FILE
    if not entry:
        raise KdError(f"{flag} {cache_dir}: hidden-state cache without a teacher_head entry in its manifest")
    if not path.is_file():
        raise KdError(f"{flag} {cache_dir}: the teacher's LM head {path.name} is missing; re-create the cache")
    if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise KdError(
            f"{path}: the teacher's LM head is corrupted (size or sha256 differs from the manifest); "
            "re-create the cache"
        )
    unknown = sorted(set(entry.get("transforms") or {}) - set(TRANSFORMS))
    if unknown:
        raise KdError(f"{flag} {cache_dir}: logit transform(s) {', '.join(unknown)} unknown to this kd; upgrade kd")
    return path, entry
