"""Held-out metrics of a student against the labels and (if cached) the teacher.

* ``ce``: mean cross-entropy of the labels (nats/token); ``ppl`` = exp(ce)
* ``kl``: mean forward KL(teacher || student) over the cached top-k + tail buckets, T = 1 (over the
  whole vocabulary, exactly, for a hidden-state cache)
* ``top1_agreement``: share of tokens where the student's argmax is the teacher's most likely id
* ``accuracy``: share of tokens where the student's argmax is the label
* ``ece``: expected calibration error of the student's top-1 confidence against the label (15 bins)

Each of ce, kl, top1_agreement and accuracy also comes with ``<name>_ci``: a 95% bootstrap interval
over held-out *sequences* (tokens of one sequence are not independent, so sequences are resampled
whole), so a reader can tell a difference from noise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np
import torch

from kd.losses import (
    DenseTeacher,
    SampledTeacher,
    SparseTeacher,
    bucket_divergence,
    fold_out_of_vocab,
    retemper_sparse,
    student_buckets,
)
from kd.losses.fused import checked_teacher_logits
from kd.pipeline.heads import head_logits, split_body_and_head
from kd.pipeline.training.batches import TrainSequence, collate

ECE_BINS = 15
BOOTSTRAP_SAMPLES = 1000
CI_LEVEL = 0.95


def bootstrap_ratio_ci(
    numerator: np.ndarray, denominator: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> list[float] | None:
    """95% percentile-bootstrap interval of sum(numerator) / sum(denominator), resampling the rows.

    numerator[S], denominator[S]: per-sequence sums (e.g. CE summed over a sequence's targets, and
    its number of targets). None when there are fewer than two sequences with a denominator.
    """
    keep = denominator > 0
    numerator, denominator = numerator[keep], denominator[keep]
    if len(numerator) < 2:
        return None
    rng = np.random.default_rng(seed)
    ratios = np.empty(samples)
    for start in range(0, samples, 100):  # 100 resamples at a time bounds memory at 100 x S indices
        idx = rng.integers(0, len(numerator), size=(min(100, samples - start), len(numerator)))
        ratios[start : start + len(idx)] = numerator[idx].sum(axis=1) / denominator[idx].sum(axis=1)
    tail = (1 - CI_LEVEL) / 2 * 100
    return [float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))]


def paired_ratio_difference_ci(
    numerator_a: np.ndarray,
    denominator_a: np.ndarray,
    numerator_b: np.ndarray,
    denominator_b: np.ndarray,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> tuple[float, list[float] | None]:
    """sum(num_a)/sum(den_a) − sum(num_b)/sum(den_b), with a 95% paired bootstrap interval over the rows.

    Row i of every array is the same unit (a held-out sequence, a prompt) scored for model a and for
    model b; each resample draws rows and takes them for both models, so what the two share (the
    unit's difficulty) cancels, and numerators travel with their denominators (the figures are
    token-weighted ratios, not means of per-row ratios). Rows whose denominators are 0 for both are
    dropped. Returns (difference, interval); the interval is None with fewer than two rows.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (numerator_a, denominator_a, numerator_b, denominator_b)]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError("a paired comparison needs the same rows for both models")
    keep = (arrays[1] > 0) | (arrays[3] > 0)
    num_a, den_a, num_b, den_b = (a[keep] for a in arrays)
    difference = float(num_a.sum() / max(den_a.sum(), 1e-300) - num_b.sum() / max(den_b.sum(), 1e-300))
    if len(num_a) < 2:
        return difference, None
    rng = np.random.default_rng(seed)
    diffs = np.empty(samples)
    for start in range(0, samples, 100):  # 100 resamples at a time bounds memory at 100 x S indices
        idx = rng.integers(0, len(num_a), size=(min(100, samples - start), len(num_a)))
        diffs[start : start + len(idx)] = num_a[idx].sum(1) / np.maximum(den_a[idx].sum(1), 1e-300) - num_b[idx].sum(
            1
        ) / np.maximum(den_b[idx].sum(1), 1e-300)
    tail = (1 - CI_LEVEL) / 2 * 100
    return difference, [float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail))]


PER_SEQUENCE = ("ce", "kl", "agree", "correct", "tokens", "kl_tokens", "teacher_tokens")
RATIOS = {
    "ce": ("ce", "tokens"),
    "accuracy": ("correct", "tokens"),
    "kl": ("kl", "kl_tokens"),
    "top1_agreement": ("agree", "teacher_tokens"),
}
"""Each held-out metric as (numerator, denominator) of the per-sequence sums in PER_SEQUENCE."""


def unwrap_causal_lm(model):
    """The plain transformers model under DDP / peft wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def evaluate_sequences(
    model,
    seqs: Iterable[TrainSequence],
    batch_size: int = 8,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    teacher_head=None,
) -> dict[str, float]:
    """Compute the metrics above over `seqs` (teacher metrics only where sequences carry teacher data).

    `seqs` may be a stream (a cache read record batch by record batch): only `batch_size` sequences
    are held at a time. `teacher_head`: the CachedTeacherHead of a hidden-state cache
    (kd.pipeline.training.hidden_teacher), which turns its hidden rows into the teacher's exact logits.
    """
    return score_sequences(model, seqs, batch_size, chunk_size, device, autocast_dtype, teacher_head)[0]


def aligned_rows(chunk: list, device) -> torch.Tensor | None:
    """bool per target of the batch: where a cross-tokenizer sequence has a teacher row (None: everywhere)."""
    if not any(hasattr(s, "teacher_rows") for s in chunk):
        return None
    return torch.from_numpy(np.concatenate([np.asarray(s.teacher_rows, bool) for s in chunk])).to(device)


@torch.no_grad()
def score_sequences(
    model,
    seqs: Iterable[TrainSequence],
    batch_size: int = 8,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    teacher_head=None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """evaluate_sequences' metrics, and the per-sequence sums behind them (PER_SEQUENCE -> array[S],
    in the order of `seqs`): what a paired comparison of two models on the same sequences needs.
    `teacher_head`: as in evaluate_sequences (a hidden-state cache's head)."""
    lm = unwrap_causal_lm(model)
    was_training = lm.training
    lm.eval()
    body, head, transform = split_body_and_head(lm)
    vocab = head.weight.shape[0]
    sums = {"ce": 0.0, "kl": 0.0, "agree": 0.0, "correct": 0.0, "tokens": 0, "teacher_tokens": 0, "kl_tokens": 0}
    conf_bins = np.zeros(ECE_BINS)
    acc_bins = np.zeros(ECE_BINS)
    count_bins = np.zeros(ECE_BINS)
    per_seq: dict[str, list[np.ndarray]] = {k: [] for k in PER_SEQUENCE}
    stream = iter(seqs)
    while chunk := list(itertools.islice(stream, batch_size)):
        batch = collate(chunk).to(device)
        seq_sums = {k: np.zeros(len(chunk)) for k in PER_SEQUENCE}
        seq_of = batch.hidden_rows.cpu().numpy()
        with torch.autocast(
            device_type=torch.device(device).type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ):
            hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        hidden = hidden[batch.hidden_rows, batch.hidden_cols]
        teacher = batch.teacher
        if isinstance(teacher, SparseTeacher):
            teacher = fold_out_of_vocab(teacher, vocab)
        if isinstance(teacher, DenseTeacher) and teacher_head is not None:
            teacher = teacher_head.attach(teacher, hidden.device)
        aligned = aligned_rows(chunk, hidden.device)  # cross-tokenizer: teacher rows at some targets only
        if aligned is not None and isinstance(teacher, DenseTeacher):
            raise ValueError("a cross-tokenizer sequence carries top-k or rs rows, not hidden states")
        teacher_row = None if aligned is None else torch.cumsum(aligned.long(), 0) - 1
        for lo in range(0, hidden.shape[0], chunk_size):
            hi = min(lo + chunk_size, hidden.shape[0])
            logits = head_logits(head, transform, hidden[lo:hi])
            lse = torch.logsumexp(logits, dim=-1)
            labels = batch.labels[lo:hi]
            sums["ce"] += float((lse - logits.gather(1, labels[:, None]).squeeze(1)).sum())
            confidence, top1 = (logits.max(dim=-1).values - lse).exp(), logits.argmax(dim=-1)
            correct = (top1 == labels).float()
            sums["correct"] += float(correct.sum())
            sums["tokens"] += hi - lo
            rows = seq_of[lo:hi]
            np.add.at(seq_sums["ce"], rows, (lse - logits.gather(1, labels[:, None]).squeeze(1)).double().cpu().numpy())
            np.add.at(seq_sums["correct"], rows, correct.double().cpu().numpy())
            np.add.at(seq_sums["tokens"], rows, 1.0)
            bins = torch.clamp((confidence * ECE_BINS).long(), max=ECE_BINS - 1).cpu().numpy()
            np.add.at(conf_bins, bins, confidence.cpu().numpy())
            np.add.at(acc_bins, bins, correct.cpu().numpy())
            np.add.at(count_bins, bins, 1)
            if aligned is not None:  # only the targets with a teacher row; `at` picks each one's row
                keep = aligned[lo:hi]
                at = teacher_row[lo:hi][keep]
                logits, lse, top1, rows = logits[keep], lse[keep], top1[keep], rows[keep.cpu().numpy()]
            else:
                at = slice(lo, hi)
            if isinstance(teacher, SparseTeacher):
                ids = teacher.teacher_ids[at]
                valid = torch.isfinite(teacher.teacher_logprobs[at])
                student_lp, student_tail = student_buckets(logits, lse, ids, valid)
                teacher_lp, teacher_tail = retemper_sparse(
                    teacher.teacher_logprobs[at], teacher.teacher_tail_logmass[at], 1.0
                )
                kl = bucket_divergence(teacher_lp, teacher_tail, student_lp, student_tail, "forward_kl")
                sums["kl"] += float(kl.sum())
                sums["kl_tokens"] += len(kl)
                teacher_top1 = ids.gather(1, teacher.teacher_logprobs[at].argmax(dim=1, keepdim=True)).squeeze(1)
                sums["agree"] += float((top1 == teacher_top1).sum())
                sums["teacher_tokens"] += len(kl)
                np.add.at(seq_sums["kl"], rows, kl.double().cpu().numpy())
                np.add.at(seq_sums["kl_tokens"], rows, 1.0)
                np.add.at(seq_sums["agree"], rows, (top1 == teacher_top1).double().cpu().numpy())
                np.add.at(seq_sums["teacher_tokens"], rows, 1.0)
            elif isinstance(teacher, DenseTeacher) and teacher.teacher_head_weight is not None:
                teacher_logprobs = torch.log_softmax(checked_teacher_logits(teacher, lo, hi, vocab), dim=-1)
                student_logprobs = logits - lse[:, None]
                p = teacher_logprobs.exp()
                kl = (p * (teacher_logprobs - student_logprobs)).sum(dim=-1)
                teacher_top1 = teacher_logprobs.argmax(dim=-1)
                sums["kl"] += float(kl.sum())
                sums["kl_tokens"] += hi - lo
                sums["agree"] += float((top1 == teacher_top1).sum())
                sums["teacher_tokens"] += hi - lo
                np.add.at(seq_sums["kl"], rows, kl.double().cpu().numpy())
                np.add.at(seq_sums["kl_tokens"], rows, 1.0)
                np.add.at(seq_sums["agree"], rows, (top1 == teacher_top1).double().cpu().numpy())
                np.add.at(seq_sums["teacher_tokens"], rows, 1.0)
            elif isinstance(teacher, SampledTeacher):
                ids = teacher.teacher_ids[at]
                teacher_top1 = ids.gather(1, teacher.teacher_counts[at].argmax(dim=1, keepdim=True)).squeeze(1)
                sums["agree"] += float((top1 == teacher_top1).sum())
                sums["teacher_tokens"] += len(teacher_top1)
                np.add.at(seq_sums["agree"], rows, (top1 == teacher_top1).double().cpu().numpy())
                np.add.at(seq_sums["teacher_tokens"], rows, 1.0)
        for key, values in seq_sums.items():
            per_seq[key].append(values)
    if was_training:
        lm.train()
    n = max(sums["tokens"], 1)
    metrics = {
        "ce": sums["ce"] / n,
        "ppl": math.exp(min(sums["ce"] / n, 50.0)),
        "accuracy": sums["correct"] / n,
        "ece": float(np.abs(acc_bins - conf_bins).sum() / n),
        "tokens": sums["tokens"],
    }
    if sums["kl_tokens"]:
        metrics["kl"] = sums["kl"] / sums["kl_tokens"]
    if sums["teacher_tokens"]:
        metrics["top1_agreement"] = sums["agree"] / sums["teacher_tokens"]
    seq = {k: np.concatenate(v) if v else np.zeros(0) for k, v in per_seq.items()}
    metrics["sequences"] = int((seq["tokens"] > 0).sum())
    for name, (num, den) in RATIOS.items():
        if name in metrics and (ci := bootstrap_ratio_ci(seq[num], seq[den])) is not None:
            metrics[f"{name}_ci"] = ci
    return metrics, seq
