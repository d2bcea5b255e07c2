"""How kd configures vLLM for the machine it runs on (no vLLM import needed for these checks).

The CPU adjustments matter for speed and for starting at all: bf16 on an AVX2-only CPU made
generation 3.7x slower, the GPU memory default fails beside other processes, and a context
longer than the model's refuses to start.
"""

from __future__ import annotations

import pytest

from kd.pipeline.engines.vllm_setup import (
    CPU_MEMORY_UTILIZATION,
    engine_args,
    has_cuda,
    vllm_dtype,
)

pytestmark = pytest.mark.skipif(has_cuda(), reason="checks the CPU adjustments")


def test_auto_dtype_is_float32_on_cpu_and_explicit_spellings_map_to_vllm_names():
    assert vllm_dtype("auto") == "float32"
    assert vllm_dtype("bf16") == "bfloat16"
    assert vllm_dtype("fp16") == "float16"
    assert vllm_dtype("fp32") == "float32"
    assert vllm_dtype("bfloat16") == "bfloat16"


def test_engine_args_on_cpu_are_eager_modest_and_capped_to_the_model_context(tiny_model_dir):
    kwargs = engine_args(
        str(tiny_model_dir),
        seed=3,
        tensor_parallel_size=1,
        dtype="auto",
        gpu_memory_utilization=0.9,
        max_model_len=100_000,
    )
    assert kwargs["dtype"] == "float32"
    assert kwargs["enforce_eager"] is True
    assert kwargs["gpu_memory_utilization"] == CPU_MEMORY_UTILIZATION
    assert kwargs["max_model_len"] == 1024  # the tiny model's max_position_embeddings
    assert kwargs["seed"] == 3
    short = engine_args(
        str(tiny_model_dir), seed=0, tensor_parallel_size=1, dtype="bf16", gpu_memory_utilization=0.1, max_model_len=256
    )
    assert (short["max_model_len"], short["dtype"], short["gpu_memory_utilization"]) == (256, "bfloat16", 0.1)
