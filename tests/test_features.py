"""Feature distillation: intermediate teacher layers in a hidden cache, and the student pulled towards them.

    .venv/bin/python -m pytest tests/test_features.py -q

Covers: the feature losses (mse, cosine) against a hand-written per-token reference, with their
gradients against autograd's of that reference; `kd cache-logits --hidden-layers` storing the output
of each chosen decoder layer exactly (float32 cache against the teacher's own forward), in int8 within
its per-row bound, and resumable; the default student -> teacher layer map; `kd train --feature-loss`
end to end (the projections train, are checkpointed, and the exported student is the plain student
with its own parameter count); kill -9 + `--resume` equal to an uninterrupted run (a real process);
bad input refused in one line. Everything but the killed and resumed runs goes through the CLI in this
process (tests/helpers.py: run_kd_in_process).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kd.cache.reader import CacheReader
from kd.losses.features import feature_loss_sum
from kd.pipeline.training.features import default_feature_map
from tests.helpers import assert_one_line_error, run_kd, run_kd_in_process, start_kd
from tests.test_cache_logits import cache_files, kill_mid_run, make_corpus

# ----------------------------------------------------------------------------- the losses


def reference_feature_loss(student, teacher, weight, bias, kind, token_weights=None) -> torch.Tensor:
    """The same sum written token by token, coordinate by coordinate (float64)."""
    total = torch.zeros((), dtype=torch.float64)
    for n in range(student.shape[0]):
        projected = torch.stack(
            [sum(weight[j, i] * student[n, i] for i in range(student.shape[1])) + bias[j] for j in range(weight.shape[0])]
        )
        if kind == "mse":
            loss = sum((projected[j] - teacher[n, j]) ** 2 for j in range(len(projected))) / len(projected)
        else:
            dot = sum(projected[j] * teacher[n, j] for j in range(len(projected)))
            loss = 1 - dot / (projected.norm() * teacher[n].norm())
        total = total + (1.0 if token_weights is None else token_weights[n]) * loss
    return total


def _inputs(seed: int = 0, n: int = 5, ds: int = 4, dt: int = 6):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, ds, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(n, dt, generator=g, dtype=torch.float64) * 3
    weight = torch.randn(dt, ds, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(dt, generator=g, dtype=torch.float64, requires_grad=True)
    token_weights = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return student, teacher, weight, bias, token_weights


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("weighted", [False, True])
def test_feature_loss_and_gradient_match_the_reference(kind, weighted):
    student, teacher, weight, bias, token_weights = _inputs()
    w = token_weights if weighted else None
    got = feature_loss_sum(student, teacher, weight, bias, kind, w)
    expected = reference_feature_loss(student, teacher, weight, bias, kind, w)
    assert got.dtype == torch.float32  # computed in fp32 whatever comes in
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got, (student, weight, bias))
    expected_grads = torch.autograd.grad(expected, (student, weight, bias))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5)


def test_feature_loss_properties():
    student, teacher, weight, bias = (t.detach() for t in _inputs(seed=1, ds=6)[:4])
    eye = torch.eye(6, dtype=torch.float64)
    for kind in ("mse", "cosine"):  # identity projection of the teacher's own states: nothing to learn
        assert float(feature_loss_sum(teacher, teacher, eye, None, kind)) == pytest.approx(0.0, abs=1e-5)
    # cosine ignores the states' scale; mse grows with its square
    base = feature_loss_sum(student, teacher, weight, bias, "cosine")
    assert float(feature_loss_sum(student, teacher * 7, weight, bias, "cosine")) == pytest.approx(float(base), rel=1e-5)
    zero = torch.zeros_like(weight)
    assert float(feature_loss_sum(student, teacher * 2, zero, None, "mse")) == pytest.approx(
        4 * float(feature_loss_sum(student, teacher, zero, None, "mse")), rel=1e-5
    )
    # bf16 autocast does not reach inside: large teacher coordinates keep fp32 precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = feature_loss_sum(student.float(), teacher.float(), weight.float(), bias.float(), "mse")
    plain = feature_loss_sum(student.float(), teacher.float(), weight.float(), bias.float(), "mse")
    assert float(under_autocast) == pytest.approx(float(plain), rel=1e-6)


def test_default_map_pairs_layers_at_the_same_relative_depth():
    assert default_feature_map((7, 15, 29), teacher_depth=30, student_depth=10) == ((2, 7), (4, 15), (9, 29))
    assert default_feature_map((0, 1), teacher_depth=2, student_depth=2) == ((0, 0), (1, 1))
    assert default_feature_map((0, 1), teacher_depth=2, student_depth=1) == ((0, 0), (0, 1))
