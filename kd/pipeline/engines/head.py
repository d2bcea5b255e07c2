"""The teacher's LM head at target positions: hidden states in, top-k or sampled targets out.

Both stage-one engines end here. The transformers engine runs the decoder body itself; the vLLM
engine gets the same final hidden states from vLLM's pooling runner. Either way the head only ever
sees the hidden states of positions that precede a target (prompt tokens never get [vocab]-sized
logits), in chunks sized in bytes.

Hot-path notes (this is the head's whole cost):
* No full fp32 log-softmax: top-k of the raw logits, one logsumexp for the normaliser and one
  masked logsumexp for the tail. A naive log_softmax + topk cost 27% of SmolLM2's forward on CPU.
* Logits are made in chunks of `chunk_rows` targets to bound the [rows, vocab] fp32 peak.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd.cache.format import SampledTargets, TopKTargets
from kd.errors import KdError
from kd.pipeline.engines.teacher import TargetSpec
from kd.pipeline.heads import IDENTITY, LogitTransform, logit_transform

HEAD_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
"""Bytes of one [rows, vocab] fp32 logits chunk. topk_with_tail holds about two such blocks at once,
so this, not the corpus, bounds the head's share of stage one's peak memory: with 1,024 rows of
SmolLM2's 49,152 logits the transient was ~400 MB, and the longest batches of a larger corpus
filled the chunk more often, which made peak RSS grow with the corpus (issue 10). On a GPU larger
chunks keep the head's matmul efficient."""


def head_chunk_rows(vocab_size: int, device_type: str) -> int:
    """Target rows per logits chunk: as many as fit HEAD_CHUNK_BYTES, between 64 and 4,096."""
    budget = HEAD_CHUNK_BYTES.get(device_type, HEAD_CHUNK_BYTES["cuda"])
    return int(min(4096, max(64, budget // (4 * vocab_size))))


def topk_with_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs of logits[N, V] without a full log_softmax.

    Returns ids[N, k] (sorted by probability), logprobs[N, k] and tail[N] = log of the mass outside
    the top-k, computed as a masked logsumexp (exact even when the top-k holds almost all mass,
    where log(1 - sum) would cancel catastrophically). `logits` is overwritten.
    """
    ids, logprobs, tail, _ = topk_with_tails(logits, k, ())
    return ids, logprobs, tail


def topk_with_tails(
    logits: torch.Tensor, k: int, temperatures: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`topk_with_tail` plus tempered[N, M]: per T of `temperatures`, log Σ_{j outside the top-k} softmax(z/T)_j.

    Exact from the full row (the one place that sees it): a masked logsumexp of z/T over the ids
    outside the top-k, against the whole row's, which is the logaddexp of that and the top-k's own
    logsumexp, so each T costs one more [N, V] pass (exp + sum), no extra [N, V] buffer: the masked
    logits are rescaled in place from one T to the next. `logits` is overwritten.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    values, ids = logits.topk(k, dim=-1, sorted=True)
    logprobs = values - lse[:, None]
    logits.scatter_(1, ids, float("-inf"))
    tail = torch.logsumexp(logits, dim=-1) - lse
    tempered = torch.empty((logits.shape[0], len(temperatures)), dtype=torch.float32, device=logits.device)
    scale = 1.0
    for m, temperature in enumerate(temperatures):
        logits.mul_(scale / temperature)  # now z/T outside the top-k (-inf stays -inf)
        scale = temperature
        outside = torch.logsumexp(logits, dim=-1)
        tempered[:, m] = outside - torch.logaddexp(outside, torch.logsumexp(values / temperature, dim=-1))
    return ids, logprobs, tail, tempered


def sample_counts(
    logits: torch.Tensor, num_samples: int, generator: torch.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random-sampling KD: N draws per row from softmax(logits), returned as unique ids + counts."""
    probs = torch.softmax(logits.float(), dim=-1)
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    counts = torch.zeros_like(probs, dtype=torch.int32).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=torch.int32)
    )
    rows, ids = counts.nonzero(as_tuple=True)
    values = counts[rows, ids]
    splits = torch.bincount(rows, minlength=logits.shape[0]).tolist()
    ids_np, values_np = ids.cpu().numpy(), values.cpu().numpy()
    bounds = np.cumsum([0] + splits)
    return (
        [ids_np[bounds[i] : bounds[i + 1]] for i in range(len(splits))],
        [values_np[bounds[i] : bounds[i + 1]] for i in range(len(splits))],
    )


def batch_seed(seed: int, first_row: int) -> int:
    """A per-batch RNG seed that depends only on the data, so reruns draw the same samples."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{first_row}".encode()).digest()[:8], "little") % (2**63)


@dataclass
class LmHead:
    """hidden -> logits: the output projection (and bias), then the model's post-head transform (scale, soft-cap)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transform: LogitTransform = IDENTITY

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden.to(self.weight.device, self.weight.dtype), self.weight, self.bias)
        return self.transform.apply(logits)


@torch.inference_mode()
def score_hidden(
    head, hidden: torch.Tensor, counts: list[int], spec: TargetSpec, chunk_rows: int, seed_row: int
) -> list[TopKTargets | SampledTargets]:
    """Targets of len(counts) sequences from the hidden states before their targets, concatenated.

    `head` is anything with `logits(hidden)`; rs draws are seeded by `seed_row` (the first row of the
    batch), so they depend on the data and the batching, never on the run.
    """
    bounds = np.cumsum([0] + list(counts))
    if spec.mode == "topk":
        ids, logprobs, tails, tempered = [], [], [], []
        for chunk in hidden.split(chunk_rows):
            i, lp, tail, tt = topk_with_tails(head.logits(chunk), spec.k, spec.temperatures)
            ids.append(i.to(torch.int32).cpu())  # half of int64's bytes while a window waits to be written
            logprobs.append(lp.cpu())
            tails.append(tail.cpu())
            tempered.append(tt.cpu())
        m = len(spec.temperatures)
        all_ids = torch.cat(ids).numpy() if ids else np.empty((0, spec.k), np.int32)
        all_lp = torch.cat(logprobs).numpy() if ids else np.empty((0, spec.k), np.float32)
        all_tail = torch.cat(tails).numpy() if ids else np.empty(0, np.float32)
        all_tt = torch.cat(tempered).numpy() if ids else np.empty((0, m), np.float32)
        return [
            TopKTargets(
                all_ids[a:b],
                all_lp[a:b],
                all_tail[a:b],
                all_tt[a:b] if m else None,
                spec.temperatures if m else (),
            )
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
    generator = None
    sampled_ids: list[np.ndarray] = []
    sampled_counts: list[np.ndarray] = []
    for chunk in hidden.split(chunk_rows):
        logits = head.logits(chunk)
        if generator is None:  # on the device the logits are on (the head's)
            generator = torch.Generator(device=logits.device)
            generator.manual_seed(batch_seed(spec.seed, seed_row))
        got_ids, got_counts = sample_counts(logits, spec.num_samples, generator)
        sampled_ids += got_ids
        sampled_counts += got_counts
    return [SampledTargets(sampled_ids[a:b], sampled_counts[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(model_dir.glob("*.safetensors"))


def head_parameter_names(model_dir: str) -> tuple[list[str], list[str], LogitTransform]:
    """Checkpoint names the output projection's weight (and bias) may be stored under, and the post-head transform.

    Built from the model's own class on the meta device (no weights, no memory): with tied
    embeddings the head's weight is the input embedding, stored under that name only.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear):
        raise KdError(f"{model_dir}: {type(model).__name__} has no plain linear LM head")
    try:
        transform = logit_transform(config, head.bias is not None)
    except KdError as e:
        raise KdError(f"{model_dir}: {e}") from None
    named = list(model.named_parameters(remove_duplicate=False))
    weights = [name for name, p in named if p is head.weight]
    biases = [name for name, p in named if head.bias is not None and p is head.bias]
    return weights, biases, transform


def load_lm_head(model_dir: str, device: str, dtype: torch.dtype) -> LmHead:
    """The LM head of a Hugging Face checkpoint, read from its safetensors without loading the model.

    For engines that produce hidden states but not logits (vLLM's pooling runner): a 70B teacher's
    head is ~2 GB in bf16, its body ~140 GB.
    """
    from safetensors import safe_open

    weights, biases, transform = head_parameter_names(model_dir)
    found: dict[str, torch.Tensor] = {}
    for path in _checkpoint_files(Path(model_dir)):
        with safe_open(str(path), "pt") as f:
            for name in set(f.keys()) & set(weights + biases):
                found[name] = f.get_tensor(name)
    weight = next((found[n] for n in weights if n in found), None)
    if weight is None:
        raise KdError(
            f"{model_dir}: no LM head weight ({' or '.join(weights)}) in its safetensors files; "
            "use --vllm-scoring logprobs"
        )
    bias = next((found[n] for n in biases if n in found), None)
    return LmHead(
        weight.to(device=device, dtype=dtype),
        None if bias is None else bias.to(device=device, dtype=dtype),
        transform,
    )
