"""Teacher log-probabilities with vLLM, in one of two ways (`--vllm-scoring`).

``hidden`` (the default where the installed vLLM allows it): vLLM's pooling runner returns the final
hidden state of every position (`token_embed` pooling, no activation), and kd applies the teacher's
LM head itself, read from the checkpoint, at target positions only (kd.pipeline.engines.head, the
same code as the transformers engine). The head then costs what the targets need, and random-sampling
KD (`--sampling rs`) works, with draws seeded per sequence row.

``logprobs``: `SamplingParams(prompt_logprobs=k)`. vLLM computes the log-softmax over the whole
vocabulary and ranks it at every prompt position, targets or not (vLLM has no way to restrict that),
and returns the prompt token's own log-prob followed by the top-k in descending order. The tail mass
is then log(1 - sum of top-k probabilities). Measured on the embedded 135M teacher, asking vLLM for
any prompt log-prob at all (`prompt_logprobs=0`) cut its own throughput to 0.72 of prompt-only.
Top-k only: vLLM exposes no way to sample from a prompt position's distribution.

Feeding (this is where the throughput is): vLLM reaches its speed by scheduling many requests at
once, so `score` takes a whole window of sequences (thousands; the caller's --window-tokens),
enqueues them all and steps the engine, converting each request as soon as it finishes. Only
finished-and-unconverted outputs exist as vLLM's objects (a hidden state per position, or ~5 KB of
log-probs per position at k = 64), the converted ones as [targets, k] arrays (~0.5 KB per target).

Cheapest log-prob form: `detokenize=False` (no strings per log-prob) and, where the installed vLLM
has it, `flat_logprobs=True` (one flat list per request instead of a dict of `Logprob` objects per
position). Conversion is vectorised: the flat lists of each run of consecutive target positions are
sliced (positions that are not targets are never converted) and packed with `struct` into one
buffer that numpy reshapes to [positions, k + 1], dropping the prompt-token column. `struct.pack`
reads a list of Python numbers at ~6 ns each, `np.asarray` at ~16 and `array.array` at ~13.
The tail comes from a float64 sum of exp(top-k), not a `logaddexp` reduction (20x slower).

Engine creation (CPU adjustments, context cap) is shared with generation: see vllm_setup.py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from kd.cache.format import SampledTargets, TopKTargets, target_positions
from kd.errors import KdError
from kd.pipeline.engines.head import head_chunk_rows, head_parameter_names, load_lm_head, score_hidden
from kd.pipeline.engines.hidden import hidden_targets
from kd.pipeline.engines.teacher import VLLM_SCORINGS, SequenceToScore, TargetSpec
from kd.pipeline.engines.vllm_setup import (
    engine_args,
    import_llm,
    supports_flat_logprobs,
    supports_token_pooling,
)
from kd.pipeline.heads import LogitTransform
from kd.pipeline.models import ModelSource, hf_dir_for


def resolve_scoring(requested: str, model_dir: str, mode: str) -> tuple[str, str]:
    """The scoring --vllm-scoring `requested` comes to here, and why (for the log).

    ``auto`` is ``hidden`` when the installed vLLM has token-level pooling and the checkpoint's LM
    head is a plain linear layer stored in safetensors, else ``logprobs``.
    """
    if requested not in VLLM_SCORINGS:
        raise KdError(f"--vllm-scoring {requested}: expected one of {', '.join(VLLM_SCORINGS)}")
    if requested == "logprobs":
        if mode == "rs":
            raise KdError("--sampling rs with --engine vllm needs --vllm-scoring hidden (prompt log-probs: top-k only)")
        if mode == "hidden":
            raise KdError("--store hidden with --engine vllm needs --vllm-scoring hidden (prompt log-probs: no states)")
        return "logprobs", "as requested"
    problem = None
    if not supports_token_pooling():
        problem = "the installed vLLM has no token-level pooling (token_embed)"
    elif not any(Path(model_dir).glob("*.safetensors")):
        problem = f"{model_dir} has no safetensors weights to read the LM head from"
    else:
        try:
            head_parameter_names(model_dir)
        except KdError as exc:
            problem = str(exc)
    if problem is None:
        return "hidden", "vLLM returns hidden states; kd applies the LM head at target positions"
    if requested == "hidden" or mode in ("rs", "hidden"):
        flag = {"rs": "--sampling rs with --engine vllm", "hidden": "--store hidden with --engine vllm"}.get(
            mode, "--vllm-scoring hidden"
        )
        raise KdError(f"{flag}: {problem}")
    return "logprobs", f"{problem}; using vLLM's prompt log-probs"


def target_runs(positions: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs of sorted target positions as [start, end) pairs (chat data: one per answer)."""
    if not len(positions):
        return []
    first, last = int(positions[0]), int(positions[-1])
    if last - first + 1 == len(positions):  # one run (a single answer): no numpy calls needed
        return [(first, last + 1)]
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(positions)]])
    return [(int(positions[a]), int(positions[b - 1]) + 1) for a, b in zip(starts, ends, strict=True)]


TAIL_FLOOR = float(np.log(1e-6))
"""Smallest tail log-mass kept: vLLM's float32 top-k log-probs sum to 1 only within ~1e-6, so a
computed 1 - sum below that is rounding, not information. A tail of exactly zero mass (-inf) would
make reverse KL infinite for any student that gives the tail any mass."""


def tail_logmass(logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum exp(top-k)) per row, float32, floored at TAIL_FLOOR.

    exp in float32 (the log-probs' own precision), summed in float64: the mass is then exact to ~1e-7,
    below the floor.
    """
    top_mass = np.exp(logprobs).sum(axis=1, dtype=np.float64)
    return np.log(np.maximum(1.0 - top_mass, np.exp(TAIL_FLOOR))).astype(np.float32)


def _as_int32(values: list) -> np.ndarray:
    return np.frombuffer(struct.pack(f"{len(values)}i", *values), dtype=np.int32)


def _as_float32(values: list) -> np.ndarray:
    return np.frombuffer(struct.pack(f"{len(values)}f", *values), dtype=np.float32)


def topk_from_flat(flat, loss_mask: np.ndarray, k: int) -> TopKTargets:
    """TopKTargets of one request from vLLM's FlatLogprobs, touching only target positions.

    Each scored position p >= 1 holds k + 1 entries (the prompt token first, then the top-k in
    descending order; vLLM keeps the prompt token even when it is also in the top-k), so the entries
    of a run of positions [a, b) are one contiguous slice of the flat lists.
    """
    positions = target_positions(loss_mask)
    width = k + 1
    ids = np.empty((len(positions), k), dtype=np.int32)
    logprobs = np.empty((len(positions), k), dtype=np.float32)
    done = 0
    for a, b in target_runs(positions):
        lo, hi = flat.start_indices[a], flat.end_indices[b - 1]
        if hi - lo != (b - a) * width:
            raise KdError(f"vLLM returned {hi - lo} prompt log-probs for {b - a} positions, expected {width} each")
        n = b - a
        ids[done : done + n] = _as_int32(flat.token_ids[lo:hi]).reshape(n, width)[:, 1:]
        logprobs[done : done + n] = _as_float32(flat.logprobs[lo:hi]).reshape(n, width)[:, 1:]
        done += n
    return TopKTargets(ids, logprobs, tail_logmass(logprobs))


def topk_from_dicts(prompt_logprobs: list, loss_mask: np.ndarray, k: int) -> TopKTargets:
    """The same from vLLM's list of {token id: Logprob} per position (vLLM without flat log-probs).

    A position's dict holds k or k + 1 entries (the prompt token is merged when it is in the top-k);
    rows are padded to k + 1 and ordered with one vectorised argsort.
    """
    positions = target_positions(loss_mask)
    ids = np.full((len(positions), k + 1), -1, dtype=np.int64)
    values = np.full((len(positions), k + 1), -np.inf, dtype=np.float32)
    for j, t in enumerate(positions):
        entries = prompt_logprobs[t]
        ids[j, : len(entries)] = list(entries.keys())
        values[j, : len(entries)] = [lp.logprob for lp in entries.values()]
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    top_values = np.take_along_axis(values, order, axis=1)
    if not np.isfinite(top_values).all():
        raise KdError(f"vLLM returned fewer than {k} log-probs for a position")
    return TopKTargets(np.take_along_axis(ids, order, axis=1).astype(np.int32), top_values, tail_logmass(top_values))


CPU_HEAD_THREADS = 1
"""Threads of kd's head on CPU beside vLLM. vLLM's CPU worker binds its threads to all cores but the
one it reserves for its front end; a head on more threads preempts the worker. Measured on 2 cores,
200 GSM8K problems: 1.06x vLLM's own prompt-only throughput with one thread, 1.00x with two."""


class VllmTeacher:
    """Stage-one engine on vLLM (`--engine vllm`, `--tensor-parallel-size`, `--vllm-scoring`)."""

    schedules_itself = True
    """Stage one hands this engine a whole window per call instead of cutting it into batches."""

    def __init__(
        self,
        source: ModelSource,
        spec: TargetSpec,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.85,
        seed: int = 0,
        scoring: str = "auto",
        head_device: str = "cpu",
    ) -> None:
        LLM = import_llm()
        path = hf_dir_for(source)
        self.spec = spec
        self.scoring, _ = resolve_scoring(scoring, path, spec.mode)
        common = dict(
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=False,  # every position's output is needed, cached prefixes have none
        )
        self._submitted = 0
        self.head_threads: int | None = None
        if self.scoring == "hidden":
            from vllm.config import PoolerConfig

            pooler = PoolerConfig(task="token_embed", use_activation=False)
            self.llm = LLM(**engine_args(path, runner="pooling", convert="embed", pooler_config=pooler, **common))
            model_dtype = self.llm.llm_engine.model_config.dtype
            self.head = load_lm_head(path, head_device, model_dtype if isinstance(model_dtype, torch.dtype) else None)
            self.vocab_size = self.head.vocab_size
            self.chunk_rows = head_chunk_rows(self.vocab_size, torch.device(head_device).type)
            self.head_threads = CPU_HEAD_THREADS if torch.device(head_device).type == "cpu" else None
        else:
            self.llm = LLM(**engine_args(path, max_logprobs=spec.k, **common))
            self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
            self.flat = supports_flat_logprobs()

    def sampling_params(self):
        from vllm import SamplingParams

        extra = {"flat_logprobs": True} if self.flat else {}
        return SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=self.spec.k, detokenize=False, **extra)

    def score(self, batch: list[SequenceToScore]) -> list[TopKTargets | SampledTargets]:
        """Targets of every sequence in `batch` (one vLLM schedule for all), converted as each finishes."""
        if self.scoring == "logprobs" and not hasattr(self.llm, "enqueue"):
            # older vLLM: one generate call, outputs converted at the end
            outputs = self.llm.generate(self._prompts(batch), self.sampling_params(), use_tqdm=False)
            return [self._convert(o, seq) for o, seq in zip(outputs, batch, strict=True)]
        engine = self.llm.llm_engine
        slot = self._submit(batch)
        results: list[TopKTargets | SampledTargets | None] = [None] * len(batch)
        threads_before = torch.get_num_threads()
        if self.head_threads:
            torch.set_num_threads(self.head_threads)
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if not output.finished:
                        continue
                    i = slot[output.request_id]
                    results[i] = self._convert(output, batch[i])
        finally:
            torch.set_num_threads(threads_before)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise KdError(f"vLLM finished without scoring {len(missing)} of {len(batch)} sequences")
        return results  # type: ignore[return-value]

    @staticmethod
    def _prompts(batch: list[SequenceToScore]) -> list[dict]:
        return [{"prompt_token_ids": np.asarray(seq.input_ids).tolist()} for seq in batch]

    def _submit(self, batch: list[SequenceToScore]) -> dict[str, int]:
        """Enqueue the whole batch; output request id -> index in `batch`."""
        prompts = self._prompts(batch)
        if self.scoring == "hidden":
            from vllm import PoolingParams

            params = PoolingParams(task="token_embed", use_activation=False)
            base, self._submitted = self._submitted, self._submitted + len(batch)
            for i, prompt in enumerate(prompts):
                self.llm.llm_engine.add_request(f"kd-{base + i}", prompt, params)
            return {f"kd-{base + i}": i for i in range(len(batch))}
        request_ids = self.llm.enqueue(prompts, self.sampling_params(), use_tqdm=False)
        # enqueue returns vLLM's internal ids ("<id>-<8 random chars>"); outputs carry the external "<id>".
        slot = {rid: i for i, rid in enumerate(request_ids)}
        slot.update({rid.rsplit("-", 1)[0]: i for i, rid in enumerate(request_ids)})
        return slot

    def _convert(self, output, seq: SequenceToScore) -> TopKTargets | SampledTargets:
        if self.scoring == "hidden":
            return self._from_hidden(output.outputs.data, seq)
        if self.flat:
            return topk_from_flat(output.prompt_logprobs, seq.loss_mask, self.spec.k)
        return topk_from_dicts(output.prompt_logprobs, seq.loss_mask, self.spec.k)

    def _from_hidden(self, hidden: torch.Tensor, seq: SequenceToScore) -> TopKTargets | SampledTargets:
        """The head at the positions before each target (hidden[t - 1] predicts token t)."""
        positions = target_positions(seq.loss_mask)
        if hidden.shape[0] != len(seq.input_ids):
            raise KdError(f"vLLM returned {hidden.shape[0]} hidden states for a {len(seq.input_ids)}-token sequence")
        before = hidden[torch.from_numpy(positions - 1)]
        if self.spec.mode == "hidden":  # --store hidden: the states themselves are the cache's teacher data
            return hidden_targets(before, [len(positions)])[0]
        return score_hidden(self.head, before, [len(positions)], self.spec, self.chunk_rows, seed_row=seq.row)[0]

    def head_for_cache(self) -> tuple[torch.Tensor, torch.Tensor | None, LogitTransform]:
        """The LM head kd applies (weight, bias) and its post-head transform, for a hidden cache."""
        return self.head.weight, self.head.bias, self.head.transform

    def close(self) -> None:
        del self.llm
