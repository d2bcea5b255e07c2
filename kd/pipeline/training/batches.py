"""Training sequences and their collation into padded tensors plus a flat list of targets.

Every loss in kd works on a flat list of N target tokens (the loss-masked positions of the whole
micro-batch, row-major), so the student's hidden states are gathered at positions t-1 for each
target t, and the teacher signal (top-k ids/log-probs, RS counts) is concatenated in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kd.cache.format import HiddenTargets, SampledTargets, TopKTargets, target_positions
from kd.losses import DenseTeacher, SampledTeacher, SparseTeacher, TeacherSet


@dataclass
class TrainSequence:
    """One training sequence: tokens, targets, optional teacher data and per-token loss weights."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    teacher: TopKTargets | SampledTargets | HiddenTargets | None = None
    token_weights: np.ndarray | None = None
    """Per-position CE weight (reasoning SFT weights the <think> tags); None means 1."""

    @property
    def num_targets(self) -> int:
        return int(np.asarray(self.loss_mask[1:], dtype=bool).sum())


@dataclass
class Batch:
    """A padded micro-batch. hidden_rows/hidden_cols index the positions whose hidden state predicts each target."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    hidden_rows: torch.Tensor
    hidden_cols: torch.Tensor
    labels: torch.Tensor
    teacher: SparseTeacher | SampledTeacher | DenseTeacher | TeacherSet | None
    """A hidden-state cache gives a DenseTeacher of hidden rows only: the head is attached where the
    loss runs (kd.pipeline.training.hidden_teacher), loaded once per run, never per batch."""
    token_weights: torch.Tensor | None
    teacher_rows: torch.Tensor | None = None
    """bool[N]: targets that have a teacher row (cross-tokenizer); None means all of them."""
    teacher_features: torch.Tensor | None = None
    """[M, N, d] float32: a hidden cache's intermediate layers (--hidden-layers, ascending) at each target's
    position, for the feature loss; None when the cache has none."""

    @property
    def num_targets(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device | str) -> Batch:
        teacher = self.teacher
        if isinstance(teacher, TeacherSet):  # several teachers (training/multiteacher.py)
            teacher = teacher.to(device)
        elif teacher is not None:
            teacher = type(teacher)(
                **{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(teacher).items()}
            )
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.hidden_rows.to(device),
            self.hidden_cols.to(device),
            self.labels.to(device),
            teacher,
            None if self.token_weights is None else self.token_weights.to(device),
            None if self.teacher_rows is None else self.teacher_rows.to(device),
            None if self.teacher_features is None else self.teacher_features.to(device),
        )


def collate(seqs: list[TrainSequence], pad_id: int = 0) -> Batch:
    """Right-pad a list of sequences and flatten their targets (and teacher data) in row-major order."""
    length = max(len(s.input_ids) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), length), dtype=torch.long)
    rows, cols, labels, weights = [], [], [], []
    for b, seq in enumerate(seqs):
        n = len(seq.input_ids)
        ids = torch.from_numpy(np.asarray(seq.input_ids, dtype=np.int64))
        input_ids[b, :n] = ids
        attention[b, :n] = 1
        positions = target_positions(seq.loss_mask)
        rows.append(np.full(len(positions), b, dtype=np.int64))
        cols.append(positions - 1)
        labels.append(np.asarray(seq.input_ids, dtype=np.int64)[positions])
        if seq.token_weights is not None:
            weights.append(np.asarray(seq.token_weights, dtype=np.float32)[positions])
        else:
            weights.append(np.ones(len(positions), dtype=np.float32))
    token_weights = None
    if any(s.token_weights is not None for s in seqs):
        token_weights = torch.from_numpy(np.concatenate(weights))
    batch = Batch(
        input_ids,
        attention,
        torch.from_numpy(np.concatenate(rows)),
        torch.from_numpy(np.concatenate(cols)),
        torch.from_numpy(np.concatenate(labels)),
        collate_teacher([s.teacher for s in seqs]),
        token_weights,
    )
    batch.teacher_features = _collate_features([s.teacher for s in seqs])  # --hidden-layers caches only
    return batch


def collate_teacher(teachers: list) -> SparseTeacher | SampledTeacher | DenseTeacher | None:
    """One teacher's rows of a micro-batch's sequences, concatenated in target order."""
    if teachers[0] is None:
        return None
    if isinstance(teachers[0], HiddenTargets):
        return DenseTeacher(teacher_hidden=torch.from_numpy(np.concatenate([t.hidden for t in teachers])))
    if isinstance(teachers[0], TopKTargets):
        # Tempered tails only when every sequence has them (one cache: all or none).
        temperatures = teachers[0].temperatures if all(t.tempered_tails is not None for t in teachers) else ()
        return SparseTeacher(
            teacher_ids=torch.from_numpy(np.concatenate([t.ids for t in teachers]).astype(np.int64)),
            teacher_logprobs=torch.from_numpy(np.concatenate([t.logprobs for t in teachers]).astype(np.float32)),
            teacher_tail_logmass=torch.from_numpy(np.concatenate([t.tail for t in teachers]).astype(np.float32)),
            teacher_tempered_tails=(
                torch.from_numpy(np.concatenate([t.tempered_tails for t in teachers]).astype(np.float32))
                if temperatures
                else None
            ),
            teacher_temperatures=temperatures,
        )
    # RS: a ragged number of unique ids per token, padded with count 0.
    per_token_ids = [ids for t in teachers for ids in t.ids]
    per_token_counts = [c for t in teachers for c in t.counts]
    width = max((len(i) for i in per_token_ids), default=1)
    ids = np.zeros((len(per_token_ids), width), dtype=np.int64)
    counts = np.zeros((len(per_token_ids), width), dtype=np.float32)
    for j, (i, c) in enumerate(zip(per_token_ids, per_token_counts, strict=True)):
        ids[j, : len(i)] = i
        counts[j, : len(c)] = c
    num_samples = int(counts[0].sum()) if len(counts) else 0
    return SampledTeacher(
        teacher_ids=torch.from_numpy(ids), teacher_counts=torch.from_numpy(counts), num_samples=num_samples
    )


def _collate_features(teachers: list) -> torch.Tensor | None:
    """[M, N, d]: each cached intermediate layer's rows, sequences concatenated (hidden caches with layers)."""
    if not teachers or not isinstance(teachers[0], HiddenTargets) or not teachers[0].layers:
        return None
    layers = sorted(teachers[0].layers)
    return torch.from_numpy(np.stack([np.concatenate([t.layers[i] for t in teachers]) for i in layers]))
