"""Teacher log-probabilities with Hugging Face transformers (CPU or GPU, device_map="auto").

The decoder body runs on right-padded batches; only the hidden states of positions before a target
go on to the head (kd.pipeline.engines.head), so on chat data most of the lm_head work is skipped.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from kd.cache.format import SampledTargets, TopKTargets, target_positions
from kd.pipeline.engines.head import head_chunk_rows, score_hidden
from kd.pipeline.engines.hidden import hidden_targets
from kd.pipeline.engines.layer_outputs import decoder_layer_list, layer_outputs
from kd.pipeline.engines.teacher import SequenceToScore, TargetSpec
from kd.pipeline.heads import LogitTransform, split_body_and_head
from kd.pipeline.models import ModelSource, load_causal_lm


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
        self.body, self.head, self.transform = split_body_and_head(self.model)
        self.vocab_size = self.head.weight.shape[0]
        self.chunk_rows = chunk_rows or head_chunk_rows(self.vocab_size, self.head.weight.device.type)
        self.input_device = next(self.body.parameters()).device

    @torch.inference_mode()
    def hidden_at_targets(self, batch: list[SequenceToScore]) -> tuple[torch.Tensor, list[int]]:
        """Run the decoder body on a right-padded batch; hidden states of the positions before each target."""
        hidden, counts, _ = self.states_at_targets(batch)
        return hidden, counts

    @torch.inference_mode()
    def states_at_targets(
        self, batch: list[SequenceToScore]
    ) -> tuple[torch.Tensor, list[int], dict[int, torch.Tensor]]:
        """hidden_at_targets, plus {i: [N, d]} the outputs of spec.hidden_layers at the same positions."""
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
        layers = decoder_layer_list(self.body, "--hidden-layers") if self.spec.hidden_layers else None
        with layer_outputs(layers, self.spec.hidden_layers) if layers is not None else nullcontext({}) as caught:
            out = self.body(input_ids=input_ids.to(self.input_device), attention_mask=attention.to(self.input_device))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        index_rows = torch.from_numpy(np.concatenate(rows)).to(hidden.device)
        index_cols = torch.from_numpy(np.concatenate(cols)).to(hidden.device)
        # device_map="auto" spreads layers over GPUs: each layer's rows are gathered where its output is.
        layer_rows = {
            i: h[index_rows.to(h.device), index_cols.to(h.device)].to(hidden.device) for i, h in caught.items()
        }
        return hidden[index_rows, index_cols], counts, layer_rows

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform.apply(self.head(hidden.to(self.head.weight.device)))

    @torch.inference_mode()
    def score(self, batch: list[SequenceToScore]) -> list[TopKTargets | SampledTargets]:
        hidden, counts, layer_rows = self.states_at_targets(batch)
        if self.spec.mode == "hidden":  # --store hidden: the head's input is the cache's teacher data
            return hidden_targets(hidden, counts, layer_rows if self.spec.hidden_layers else None)
        return score_hidden(self, hidden, counts, self.spec, self.chunk_rows, seed_row=batch[0].row)

    def head_for_cache(self) -> tuple[torch.Tensor, torch.Tensor | None, LogitTransform]:
        """The LM head (weight, bias) and the post-head transform split_body_and_head reports, for a hidden cache."""
        return self.head.weight, self.head.bias, self.transform

    def close(self) -> None:
        del self.model
