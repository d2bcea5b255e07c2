"""Teacher log-probabilities with Hugging Face transformers (CPU or GPU, device_map="auto").

Hot-path notes (this is the whole cost of stage one):
* The head is applied only to the hidden states of target positions: prompt tokens never get
  [vocab]-sized logits. On chat data that skips most of the lm_head work.
* No full fp32 log-softmax: top-k of the raw logits, one logsumexp for the normaliser and one
  masked logsumexp for the tail. A naive log_softmax + topk cost 27% of SmolLM2's forward on CPU.
* Logits are made in chunks of `chunk_rows` targets to bound the [rows, vocab] fp32 peak.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from kd.cache.format import SampledTargets, TopKTargets, target_positions
from kd.pipeline.engines.teacher import SequenceToScore, TargetSpec
from kd.pipeline.errors import KdError
from kd.pipeline.models import ModelSource, load_causal_lm


def split_body_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """The decoder body (returns hidden states), the LM head, and the final logit soft-cap if any."""
    body = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if body is None or head is None:
        raise KdError(f"{type(model).__name__}: cannot separate the decoder from its LM head")
    if getattr(model.config, "logit_scale", None) not in (None, 1.0):
        raise KdError(f"{type(model).__name__}: models with a logit_scale are not supported yet")
    return body, head, getattr(model.config, "final_logit_softcapping", None)


def topk_with_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs of logits[N, V] without a full log_softmax.

    Returns ids[N, k] (sorted by probability), logprobs[N, k] and tail[N] = log of the mass outside
    the top-k, computed as a masked logsumexp (exact even when the top-k holds almost all mass,
    where log(1 - sum) would cancel catastrophically). `logits` is overwritten.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    values, ids = logits.topk(k, dim=-1, sorted=True)
    logprobs = values - lse[:, None]
    logits.scatter_(1, ids, float("-inf"))
    tail = torch.logsumexp(logits, dim=-1) - lse
    return ids, logprobs, tail


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


class TransformersTeacher:
    """Stage-one engine on transformers.

    Args:
        source: the teacher.
        spec: what to record.
        device: ``cpu``, ``cuda``, ``cuda:1``...; ignored with device_map.
        dtype: model dtype flag (``auto`` = bf16 on CUDA, fp32 on CPU).
        device_map: ``auto`` spreads a teacher too big for one GPU across all visible GPUs.
        chunk_rows: targets per logits chunk; default: as many as fit HEAD_CHUNK_BYTES.
    """

    def __init__(
        self,
        source: ModelSource,
        spec: TargetSpec,
        device: str = "cpu",
        dtype: str = "auto",
        device_map: str | None = None,
        chunk_rows: int | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.model = load_causal_lm(source, dtype=dtype, device=device, device_map=device_map).eval()
        self.body, self.head, self.softcap = split_body_and_head(self.model)
        self.vocab_size = self.head.weight.shape[0]
        self.chunk_rows = chunk_rows or head_chunk_rows(self.vocab_size, self.head.weight.device.type)
        self.input_device = next(self.body.parameters()).device

    @torch.inference_mode()
    def hidden_at_targets(self, batch: list[SequenceToScore]) -> tuple[torch.Tensor, list[int]]:
        """Run the decoder body on a right-padded batch; hidden states of the positions before each target."""
        length = max(len(s.input_ids) for s in batch)
        pad = 0
        input_ids = torch.full((len(batch), length), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), length), dtype=torch.long)
        rows, cols, counts = [], [], []
        for b, seq in enumerate(batch):
            n = len(seq.input_ids)
            input_ids[b, :n] = torch.from_numpy(np.asarray(seq.input_ids, dtype=np.int64))
            attention[b, :n] = 1
            positions = target_positions(seq.loss_mask)
            rows.append(np.full(len(positions), b))
            cols.append(positions - 1)  # logits at t-1 predict token t
            counts.append(len(positions))
        out = self.body(input_ids=input_ids.to(self.input_device), attention_mask=attention.to(self.input_device))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        index_rows = torch.from_numpy(np.concatenate(rows)).to(hidden.device)
        index_cols = torch.from_numpy(np.concatenate(cols)).to(hidden.device)
        return hidden[index_rows, index_cols], counts

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden.to(self.head.weight.device))
        if self.softcap:
            logits = torch.tanh(logits.float() / self.softcap) * self.softcap
        return logits

    @torch.inference_mode()
    def score(self, batch: list[SequenceToScore]) -> list[TopKTargets | SampledTargets]:
        hidden, counts = self.hidden_at_targets(batch)
        if self.spec.mode == "topk":
            ids, logprobs, tails = [], [], []
            for chunk in hidden.split(self.chunk_rows):
                i, lp, tail = topk_with_tail(self.logits(chunk), self.spec.k)
                ids.append(i.to(torch.int32).cpu())  # half of int64's bytes while a window waits to be written
                logprobs.append(lp.cpu())
                tails.append(tail.cpu())
            all_ids = torch.cat(ids).numpy()
            all_lp = torch.cat(logprobs).numpy()
            all_tail = torch.cat(tails).numpy()
            bounds = np.cumsum([0] + counts)
            return [
                TopKTargets(
                    all_ids[bounds[i] : bounds[i + 1]],
                    all_lp[bounds[i] : bounds[i + 1]],
                    all_tail[bounds[i] : bounds[i + 1]],
                )
                for i in range(len(batch))
            ]
        generator = torch.Generator(device=self.head.weight.device)
        generator.manual_seed(batch_seed(self.spec.seed, batch[0].row))
        sampled_ids: list[np.ndarray] = []
        sampled_counts: list[np.ndarray] = []
        for chunk in hidden.split(self.chunk_rows):
            ids, cnt = sample_counts(self.logits(chunk), self.spec.num_samples, generator)
            sampled_ids += ids
            sampled_counts += cnt
        bounds = np.cumsum([0] + counts)
        return [
            SampledTargets(sampled_ids[bounds[i] : bounds[i + 1]], sampled_counts[bounds[i] : bounds[i + 1]])
            for i in range(len(batch))
        ]

    def close(self) -> None:
        del self.model
