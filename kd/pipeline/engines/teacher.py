"""What a teacher engine must do for stage one, whatever runs it.

An engine takes a batch of tokenized sequences and returns, for every target position of each
(see kd.cache.format.target_positions), either the top-k ids and log-probabilities at temperature 1
plus the tail log-mass, or the unique ids and counts of N draws from the teacher's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kd.cache.format import SampledTargets, TopKTargets

VLLM_SCORINGS = ("auto", "hidden", "logprobs")
"""How the vLLM engine gets the teacher's distribution (--vllm-scoring; see logits_vllm.py)."""


@dataclass(frozen=True)
class TargetSpec:
    """What to record per target token."""

    mode: str
    """``topk`` (K most likely ids + tail mass), ``rs`` (random-sampling KD: N draws, counted) or ``hidden``
    (the final hidden states themselves, for the cache's own head file)."""
    k: int = 64
    """Top-k size in topk mode."""
    num_samples: int = 64
    """Draws per token in rs mode."""
    seed: int = 0
    """Base seed of the rs draws (each batch derives its own from its first row)."""
    temperatures: tuple[float, ...] = ()
    """Temperatures T != 1 whose tempered tail log-mass to record per target (topk mode, head scoring)."""
    hidden_layers: tuple[int, ...] = ()
    """Intermediate decoder layers whose outputs to record beside the final state (hidden mode)."""


@dataclass
class SequenceToScore:
    row: int
    input_ids: np.ndarray
    loss_mask: np.ndarray


class TeacherEngine(Protocol):
    """Any teacher runtime: transformers (CPU/GPU, device_map) or vLLM (prompt log-probs)."""

    vocab_size: int

    def score(self, batch: list[SequenceToScore]) -> list[TopKTargets | SampledTargets]: ...

    def close(self) -> None: ...
