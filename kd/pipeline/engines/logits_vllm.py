"""Teacher log-probabilities with vLLM's prompt log-probabilities (`SamplingParams(prompt_logprobs=k)`).

vLLM computes the log-softmax over the whole vocabulary and returns, for each prompt position, the
top-k tokens (plus the actual token, which we drop unless it is in the top-k). The tail mass is
then log(1 - sum of top-k probabilities). RS mode is not available here: vLLM exposes only the
top-k of a prompt position, not a way to sample from its full distribution.

Engine creation (CPU adjustments, context cap) is shared with generation: see vllm_setup.py.
"""

from __future__ import annotations

import numpy as np

from kd.cache.format import TopKTargets, target_positions
from kd.pipeline.engines.teacher import SequenceToScore, TargetSpec
from kd.pipeline.engines.vllm_setup import engine_args, import_llm
from kd.pipeline.errors import KdError
from kd.pipeline.models import ModelSource, hf_dir_for


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
        LLM = import_llm()
        self.spec = spec
        kwargs = engine_args(
            hf_dir_for(source),
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            max_logprobs=spec.k,
            enable_prefix_caching=False,
        )
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
