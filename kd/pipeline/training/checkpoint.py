"""Training checkpoints: full-precision state, written atomically, loaded with weights_only=True.

A checkpoint is a directory ``out/checkpoints/step-0000100/state.pt`` holding the model's trainable
state (fp32), the optimizer, the step, and the RNG states. It is built under a temp name and
renamed into place, so a kill -9 during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd.errors import KdError

STATE_FILE = "state.pt"


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop can touch, as weights_only-loadable objects (tensors, lists)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write `state` as the checkpoint of `step`, keeping only the newest `keep`."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", dir=root))
    try:
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    complete = sorted(p for p in checkpoint_dir(out).glob("step-*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by save_checkpoint (no arbitrary pickles: weights_only=True)."""
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise KdError(f"--resume: no checkpoint at {path}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KdError(f"{file}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
