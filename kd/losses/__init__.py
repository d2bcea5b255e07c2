"""kd.losses — the distillation loss: α·CE + (1−α)·T²·D(teacher_T ‖ student_T), summed over target tokens.

Everything here works on a flat list of N target tokens (see kd.pipeline.training.batches) and returns
**sums**: the trainer divides once by the number of target tokens in the whole accumulated,
all-rank batch (TRL's ``num_items_in_batch`` fix; torchtitan's ``global_valid_tokens``).

Teacher signals:

- ``SparseTeacher`` (a top-k cache): K ids with log-probabilities at T=1 plus the tail log-mass
  log(1 − Σ top-k). Divergences are taken over K+1 *buckets*: each cached id, and "everything
  else" for teacher and student alike. With K = V and an empty tail this is exactly the dense loss.
- ``SampledTeacher`` (an RS cache): unique ids and counts of N draws from the teacher. The loss is
  the cross-entropy of the student against the empirical distribution counts/N, an unbiased
  estimate of CE(teacher, student) = KL + H(teacher), whose gradient is the KL's (Anshumann et al.).
- ``DenseTeacher`` (online KD): the teacher's hidden states and head, turned into full-vocabulary
  logits one chunk at a time.

Memory and speed: the student's [N, V] logits are never materialised for the whole batch.
``FusedHeadLoss`` walks over chunks of tokens, computes the loss and its gradient with respect to
the chunk's logits in the forward pass, folds that into gradients for the hidden states and head
weight right away (the approach of Liger's fused linear cross-entropy), and frees the chunk; no
logits are recomputed in backward. ``fused_chunk_loss`` does the loss in closed form: the CE's
softmax pass also yields the student's tail bucket and the gradient, softmax · (scalar per row)
plus [chunk, K] sparse terms, written over the logits buffer itself, so a cached-KD chunk costs
what a CE chunk costs plus O(chunk · K) (measured in bench/head_loss_speed.py; BENCHMARKS.md).
``autograd_chunk_loss`` is the same loss through autograd, kept as the tests' reference.

Layout: ``signals`` (teacher signals, LossConfig), ``divergences`` (bucket divergences and maps),
``fused`` (the closed-form per-chunk loss), ``reference`` (the autograd reference), ``head`` (the
fused head over chunks), ``multi`` (several teachers: a weighted sum of divergences, or a mixture),
``mixture`` (the mixture of several teachers as one sparse teacher).
Imports: torch and ``kd.errors`` only — nothing of ``kd.pipeline`` or ``kd.stages``
(tests/test_layering.py checks it): losses are pure functions.
"""

from kd.losses.divergences import (
    bucket_divergence,
    divergence,
    fold_out_of_vocab,
    retemper_sparse,
    student_buckets,
)
from kd.losses.fused import ChunkLoss, ChunkSums, fused_chunk_loss, tail_guard
from kd.losses.head import FusedHeadLoss, distill_loss_sum, head_loss_sum
from kd.losses.mixture import mix_topk
from kd.losses.multi import TEACHER_MIXES, TeacherSet, normalised_weights, teachers_loss_sum
from kd.losses.reference import autograd_chunk_loss
from kd.losses.signals import (
    DIVERGENCES,
    LOG_FLOOR,
    MAX_FOREIGN_TEACHER_MASS,
    DenseTeacher,
    LogitMap,
    LossConfig,
    LossParts,
    SampledTeacher,
    SparseTeacher,
    TeacherSignal,
)

__all__ = [
    "DIVERGENCES",
    "LOG_FLOOR",
    "MAX_FOREIGN_TEACHER_MASS",
    "TEACHER_MIXES",
    "ChunkLoss",
    "ChunkSums",
    "DenseTeacher",
    "FusedHeadLoss",
    "LogitMap",
    "LossConfig",
    "LossParts",
    "SampledTeacher",
    "SparseTeacher",
    "TeacherSet",
    "TeacherSignal",
    "autograd_chunk_loss",
    "bucket_divergence",
    "distill_loss_sum",
    "divergence",
    "fold_out_of_vocab",
    "fused_chunk_loss",
    "head_loss_sum",
    "mix_topk",
    "normalised_weights",
    "retemper_sparse",
    "student_buckets",
    "tail_guard",
    "teachers_loss_sum",
]
