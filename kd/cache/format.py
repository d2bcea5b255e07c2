"""The shard format of kd's teacher-logit cache.

A cache is a directory::

    cache/
      manifest.json            settings + every finished shard (rows, tokens, bytes, sha256, batches)
      shard-r000-00000.arrow   Arrow IPC file, zstd-compressed buffers
      shard-r000-00001.arrow   (r000 = the rank that wrote it; one cache can hold many ranks)
      ...

Format version 2 (this one) writes each shard as many Arrow **record batches** of about
``BATCH_TARGETS`` target tokens each (whole sequences; a batch is cut once it reaches that many
targets), and the manifest lists every batch's rows and targets. A record batch is the unit that
stage two reads, decodes and shuffles: a reader never needs a whole shard in memory, and it can
plan an epoch from the manifest alone. Version 1 wrote one record batch per shard; such caches
still read (the shard is then one unit).

Each shard row is one training sequence, rows in corpus order:

==================  ============================================  =====================================
column              type                                          meaning
==================  ============================================  =====================================
``row``             uint64                                        index of the record in the corpus
``input_ids``       list<uint16|uint32>                           tokens (narrowest type for the vocab)
``loss_mask``       list<bool>                                    True where the token is a target
``teacher_ids``     list<fixed_size_list<uint16|uint32, K>>       top-k mode: the K most likely ids
``teacher_values``  list<fixed_size_list<uint16|float32, K>>      top-k mode: their log-probs (T=1)
``teacher_tail``    list<uint16|float32>                          top-k mode: log(1 - sum of top-k p)
``teacher_ids``     list<uint16|uint32>                           rs mode: unique sampled ids, all targets
``teacher_counts``  list<uint8|uint16>                            rs mode: how often each was drawn
``teacher_sizes``   list<uint8|uint16>                            rs mode: unique ids of each target
                                                                  (caches before the sorted coding
                                                                  nest ids/counts per target instead)
==================  ============================================  =====================================

With ``kd cache-logits --temperatures`` a top-k shard has one more column, ``teacher_tempered_tail``:
list<fixed_size_list<float16|float32, M>>, per target the log of the tail mass of softmax(z / T) for
each of the M recorded temperatures T != 1 (see "Tempered tails" below).

The teacher lists hold one entry per *target*: each position t >= 1 with ``loss_mask[t]`` set, in
order. Entry j describes the teacher's distribution over token t given tokens [0, t), i.e. the
logits at position t - 1. Position 0 is never a target. Stage two therefore never re-tokenizes.

Hidden-state caches (``mode = "hidden"``, ``kd cache-logits --store hidden``) store, instead of any
teacher distribution, the teacher's final hidden state at every target (the LM head's input, after
the final norm; entry j again belongs to the j-th target and is the state at position t - 1):

========================  ======================================  ====================================
column                    type                                    meaning
========================  ======================================  ====================================
``teacher_hidden``        list<fixed_size_list<uint16|int8|       hidden mode: one row of d numbers per
                          float32, d>>                            target (bf16 bits, int8 codes, fp32)
``teacher_hidden_scale``  list<float32>                           hidden mode, int8: each row's scale
                                                                  (row = codes x scale)
========================  ======================================  ====================================

With ``--hidden-layers 8,15`` a hidden shard also holds the teacher's hidden states at those intermediate
layers (for feature distillation), one column per layer, encoded as ``teacher_hidden``:

=============================  =================================  =========================================
column                         type                               meaning
=============================  =================================  =========================================
``teacher_layer_<i>``          as ``teacher_hidden``              the output of decoder layer i (0-based:
                                                                  the residual stream after block i, before
                                                                  any final norm) at the same positions
``teacher_layer_<i>_scale``    list<float32>                      int8: each row's scale
=============================  =================================  =========================================

The manifest's ``settings.hidden_layers`` lists them (absent: none) and ``settings.teacher_layers`` the
teacher's depth.

and, once per cache, the teacher's LM head (weight, bias) in ``teacher_head.safetensors`` beside the
shards, its sha256 and the post-head logit transform (``{"scale": s, "softcap": c}``, the fields of
kd.pipeline.heads.LogitTransform) in the manifest (kd/cache/teacher_head.py). Stage two recomputes
the exact full-vocabulary logits from the two.

Id coding (``kd.id_coding`` in each shard file's schema metadata): ``sorted`` (default since format
2) stores each row's ids ordered by a per-shard frequency rank and delta-coded, values permuted
with them; ``raw`` (older caches) stores them as the teacher ranked them. See kd/cache/coding.py.
Readers get top-k rows in probability order either way.

Tempered tails (``manifest.settings.temperatures``, e.g. ``[1.0, 2.0, 4.0]``; absent = ``[1.0]``):
the top-k log-probs at T = 1 give the cached ids' tempered ratios exactly (p_T(i) ∝ p(i)^(1/T)), but
not the tail's tempered mass, which depends on how the tail's mass is spread over its ids. Stage one
computes it from the full logits row, log Σ_{j outside the top-k} softmax(z/T)_j, for each requested
T != 1, one fixed-size list entry per T in the manifest's order (T = 1 excluded). Stored as float16
in sqrt8 and q64 caches (2 bytes per target and temperature before compression; relative error of the
log at most 2^-11, which moves KL(exact || target) by < 1e-5 nats) and float32 in float32 caches.

Value encodings (``manifest.value_encoding``):

* ``sqrt8`` (default): the square root of each probability on 180 levels, one byte
  (``round(180 sqrt p)``; 255 marks an empty slot), then the row (with the tail) renormalised on
  reading. Equal steps in sqrt(p) cost equal KL, so precision follows the probability. The bound, to
  second order: with u_i = sqrt(p_i), KL(p || q) ≈ 2 Σ_i (u_i − û_i)² (4 x the squared Hellinger
  distance; the Fisher metric in sqrt coordinates is flat), and rounding to a 1/180 grid moves each
  u_i by at most 1/360, so KL ≤ 2k / 360² = ``sqrt8_kl_bound(k)``: **9.9e-4 nats per token at k = 64,
  1.98e-3 at k = 128, 3.95e-3 at k = 256** (renormalising can only lower it). An adversarial row
  (every sqrt p half a step off, signs alternating so that renormalising undoes nothing) reaches it;
  real teacher rows stay below (embedded teacher on GSM8K, bench/tempered_tail.py: mean 2.8e-4 /
  max 5.0e-4 at k = 64, mean 5.0e-4 / max 9.7e-4 at k = 128, mean 8.8e-4 / max 1.8e-3 at k = 256).
  Where the bound matters (k > 64 with a tight KL budget), ``q64`` costs a second byte per value and
  is bounded by ~3e-5 whatever k (½ (1/128)²). The tail stays q64.

* ``q64``: a log-prob ``v <= 0`` is stored as ``q = round(-64 v)`` in uint16 (so values down to
  -1023.98 nats), and along each top-k row as the difference to the previous entry (top-k rows are
  sorted by probability, so differences are small non-negative numbers that zstd packs well).
  Maximum absolute error 1/128 = 0.0078 nats. ``q = 65535`` encodes log 0 (an empty tail).
* ``float32``: exact, 2x the bytes before compression.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
BATCH_TARGETS = 4096
"""Target tokens per record batch: small enough that decoding one is cheap (a few MB as float32),
large enough that zstd and Arrow's per-batch overhead stay negligible (measured: < 1% of the bytes)."""
Q_SCALE = 64.0
Q_EMPTY = 65535  # log 0
Q_MAX_FINITE = 65534
VALUE_ENCODINGS = ("sqrt8", "q64", "float32")
SQRT_LEVELS = 180
SQRT_EMPTY = 255
TEMPERED_TAIL_COLUMN = "teacher_tempered_tail"


def sqrt8_kl_bound(k: int) -> float:
    """Second-order worst case of KL(exact || sqrt8-decoded) over k stored values, nats per token: 2k / 360²."""
    return 2.0 * k / (2.0 * SQRT_LEVELS) ** 2


def tempered_tail_type(value_encoding: str) -> pa.DataType:
    """float32 in float32 caches (exact), float16 otherwise (a quantised cache gains nothing from more)."""
    return pa.float32() if value_encoding == "float32" else pa.float16()


def parse_temperatures(text: str | list | tuple, flag: str = "--temperatures") -> tuple[float, ...]:
    """'1,2,4' -> (1.0, 2.0, 4.0): sorted, unique, each > 0 and finite, always including 1."""
    from kd.errors import KdError

    parts = text.split(",") if isinstance(text, str) else list(text)
    values = set()
    for part in parts:
        try:
            value = float(part)
        except (TypeError, ValueError):
            raise KdError(f"{flag} {text}: expected comma-separated numbers such as 1,2,4") from None
        if not (value > 0 and np.isfinite(value)):
            raise KdError(f"{flag} {text}: every temperature must be > 0 and finite, got {part}")
        values.add(value)
    return tuple(sorted(values | {1.0}))


MODES = ("topk", "rs", "hidden")
IPC_COMPRESSION = ("zstd", 9)


def id_type(vocab_size: int) -> pa.DataType:
    """Narrowest unsigned Arrow type that holds every token id."""
    if vocab_size <= 1 << 16:
        return pa.uint16()
    return pa.uint32()


def count_type(num_samples: int) -> pa.DataType:
    return pa.uint8() if num_samples <= 255 else pa.uint16()


def schema(
    mode: str,
    vocab_size: int,
    k: int,
    value_encoding: str,
    num_samples: int = 0,
    id_coding: str = "sorted",
    hidden_size: int = 0,
    hidden_encoding: str = "bf16",
    tempered: int = 0,
    hidden_layers: tuple[int, ...] = (),
) -> pa.Schema:
    """The Arrow schema of a shard for these settings (the id coding travels as schema metadata).

    `tempered`: how many temperatures T != 1 get a tempered-tail column entry (top-k mode).
    `hidden_layers`: intermediate teacher layers stored beside the final hidden state (hidden mode).
    """
    ids = id_type(vocab_size)
    fields = [
        pa.field("row", pa.uint64()),
        pa.field("input_ids", pa.list_(ids)),
        pa.field("loss_mask", pa.list_(pa.bool_())),
    ]
    if mode == "hidden":
        return pa.schema(fields + hidden_fields(hidden_size, hidden_encoding, hidden_layers))
    if mode == "topk":
        value = {"q64": pa.uint16(), "sqrt8": pa.uint8(), "float32": pa.float32()}[value_encoding]
        tail = pa.float32() if value_encoding == "float32" else pa.uint16()
        fields += [
            pa.field("teacher_ids", pa.list_(pa.list_(ids, k))),
            pa.field("teacher_values", pa.list_(pa.list_(value, k))),
            pa.field("teacher_tail", pa.list_(tail)),
        ]
        if tempered:
            fields.append(
                pa.field(TEMPERED_TAIL_COLUMN, pa.list_(pa.list_(tempered_tail_type(value_encoding), tempered)))
            )
    elif id_coding == "sorted":
        # RS, flat: each sequence's unique ids and counts as one list, and per target how many of
        # them it has. Nested lists would store two int32 offset arrays per target (~5 B/token).
        fields += [
            pa.field("teacher_ids", pa.list_(ids)),
            pa.field("teacher_counts", pa.list_(count_type(num_samples))),
            pa.field("teacher_sizes", pa.list_(count_type(num_samples))),
        ]
    else:
        fields += [
            pa.field("teacher_ids", pa.list_(pa.list_(ids))),
            pa.field("teacher_counts", pa.list_(pa.list_(count_type(num_samples)))),
        ]
    return pa.schema(fields, metadata={b"kd.id_coding": id_coding.encode()})


# ----------------------------------------------------------------------------- value codec


def quantize_logprobs(values: np.ndarray) -> np.ndarray:
    """float log-probs (<= 0, may be -inf) -> uint16 q64 codes (absolute, not yet delta-coded)."""
    v = np.asarray(values, dtype=np.float64)
    q = np.where(np.isfinite(v), np.rint(np.clip(-v, 0.0, Q_MAX_FINITE / Q_SCALE) * Q_SCALE), Q_EMPTY)
    return q.astype(np.uint16)


def dequantize_logprobs(q: np.ndarray) -> np.ndarray:
    """uint16 q64 codes (absolute) -> float32 log-probs, -inf for the empty code."""
    q = np.asarray(q)
    out = -(q.astype(np.float32) / np.float32(Q_SCALE))
    out[q == Q_EMPTY] = -np.inf
    return out


def encode_sqrt8(logprobs: np.ndarray) -> np.ndarray:
    """log-probs -> round(180 sqrt p) in uint8; 255 for an empty slot (-inf)."""
    v = np.asarray(logprobs, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        codes = np.rint(np.sqrt(np.exp(np.minimum(v, 0.0))) * SQRT_LEVELS)
    return np.where(np.isfinite(v), np.clip(codes, 0, SQRT_LEVELS), SQRT_EMPTY).astype(np.uint8)


def decode_sqrt8(codes: np.ndarray, tail_logprobs: np.ndarray) -> np.ndarray:
    """uint8 codes [T, K] + decoded tail [T] -> log-probs renormalised with the tail to sum to 1.

    Code 0 (sqrt p below half a step) decodes to a quarter step, not to 0, so a stored id keeps a
    small finite probability; 255 decodes to -inf (an empty slot).
    """
    codes = np.asarray(codes)
    p = _SQRT8_PROB[codes]  # table lookups, not transcendental functions per entry: this is the reader's hot path
    total = p.sum(axis=1, dtype=np.float64) + np.exp(np.asarray(tail_logprobs, dtype=np.float64))
    return _SQRT8_LOGPROB[codes] - np.log(total).astype(np.float32)[:, None]


def _sqrt8_tables() -> tuple[np.ndarray, np.ndarray]:
    codes = np.arange(256, dtype=np.float64)
    u = np.where(codes == 0, 0.25, codes) / SQRT_LEVELS
    p = np.where((codes > SQRT_LEVELS), 0.0, u * u)
    with np.errstate(divide="ignore"):
        return p.astype(np.float32), np.log(p).astype(np.float32)


_SQRT8_PROB, _SQRT8_LOGPROB = _sqrt8_tables()


def probability_order(stored: np.ndarray, encoding: str) -> np.ndarray:
    """Per-row permutation putting stored values in descending probability (empty slots last).

    Sorts the stored integer codes where it can: numpy radix-sorts small integer keys, several
    times faster than sorting float log-probs.
    """
    if encoding == "sqrt8":
        key = np.where(stored == SQRT_EMPTY, 255, SQRT_LEVELS - stored.astype(np.int16)).astype(np.uint8)
    elif encoding == "q64":  # absolute codes: larger = less likely; 65535 (empty) sorts last by itself
        key = stored
    else:
        key = -stored
    return np.argsort(key, axis=1, kind="stable")


def encode_topk_values(logprobs: np.ndarray, encoding: str, delta: bool = True) -> np.ndarray:
    """[T, K] sorted-descending log-probs -> stored values (q64 delta-coded unless `delta` is False,
    sqrt8 codes, or float32)."""
    if encoding == "float32":
        return np.asarray(logprobs, dtype=np.float32)
    if encoding == "sqrt8":
        return encode_sqrt8(logprobs)
    q = quantize_logprobs(logprobs)
    if not delta:
        return q
    delta = q.astype(np.int32)
    delta[:, 1:] = np.diff(delta, axis=1)
    if (delta < 0).any():
        raise ValueError("top-k log-probs must be sorted in descending order before q64 delta coding")
    return delta.astype(np.uint16)


def decode_topk_values(
    stored: np.ndarray, encoding: str, delta: bool = True, tail_logprobs: np.ndarray | None = None
) -> np.ndarray:
    """Inverse of encode_topk_values: [T, K] -> float32 log-probs (sqrt8 needs the decoded tail)."""
    if encoding == "float32":
        return np.asarray(stored, dtype=np.float32)
    if encoding == "sqrt8":
        assert tail_logprobs is not None, "sqrt8 values are renormalised with the tail"
        return decode_sqrt8(stored, tail_logprobs)
    if not delta:
        return dequantize_logprobs(np.asarray(stored))
    q = np.cumsum(np.asarray(stored, dtype=np.int64), axis=1)
    return dequantize_logprobs(np.minimum(q, Q_EMPTY).astype(np.uint16))


def encode_tail(tail: np.ndarray, encoding: str) -> np.ndarray:
    """Tail log-mass: float32 stays exact; q64 and sqrt8 caches store it as q64."""
    if encoding == "float32":
        return np.asarray(tail, dtype=np.float32)
    return quantize_logprobs(tail)


def decode_tail(stored: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "float32":
        return np.asarray(stored, dtype=np.float32)
    return dequantize_logprobs(stored)


# ----------------------------------------------------------------------------- rows


@dataclass
class TopKTargets:
    """Teacher data for the targets of one sequence: ids[T, K], logprobs[T, K] (desc), tail[T].

    tempered_tails[T, M] (optional): for each of `temperatures` (all != 1), log of the mass of
    softmax(z / temperature) outside the stored ids.
    """

    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray
    tempered_tails: np.ndarray | None = None
    temperatures: tuple[float, ...] = ()


@dataclass
class SampledTargets:
    """RS teacher data for the targets of one sequence: per target, unique ids and their counts."""

    ids: list[np.ndarray]
    counts: list[np.ndarray]


def truncate_to_mass(targets: TopKTargets, epsilon: float) -> TopKTargets:
    """Adaptive top-k: per token keep the fewest leading ids holding >= 1 - epsilon of the mass.

    The dropped ids' mass joins the tail, so the cached distribution over ids + tail still sums to 1
    and the loss treats the dropped slots like any id outside the top-k. Dropped slots become empty
    (id 0, log-prob -inf), which zstd stores almost for free: a confident teacher (most tokens of a
    worked solution) then costs a few ids instead of k.
    """
    logprobs = np.asarray(targets.logprobs, dtype=np.float64)
    probs = np.exp(logprobs)
    before = np.cumsum(probs, axis=1) - probs  # mass of the slots ahead of each slot
    keep = before < 1.0 - epsilon
    keep[:, 0] = True
    dropped = np.where(keep, 0.0, probs).sum(axis=1)
    with np.errstate(divide="ignore"):
        tail = np.logaddexp(np.asarray(targets.tail, dtype=np.float64), np.log(dropped))
    tempered = targets.tempered_tails
    if tempered is not None:
        # The dropped ids' tempered mass joins each tempered tail: the stored ids share 1 − tail_T in
        # proportion to p^(1/T), so an id's tempered mass is (1 − tail_T) · p^(1/T) / Σ_stored p^(1/T).
        columns = []
        for m, temperature in enumerate(targets.temperatures):
            tail_t = np.asarray(tempered[:, m], dtype=np.float64)
            scaled = logprobs / temperature
            with np.errstate(divide="ignore", invalid="ignore"):
                head_t = np.log(-np.expm1(np.minimum(tail_t, 0.0)))  # log(1 − tail_T)
                lse = np.logaddexp.reduce(scaled, axis=1)
                dropped_t = np.logaddexp.reduce(np.where(keep, -np.inf, scaled), axis=1) - lse + head_t
            columns.append(np.logaddexp(tail_t, dropped_t))
        tempered = np.stack(columns, axis=1).astype(np.float32)
    return TopKTargets(
        np.where(keep, targets.ids, 0).astype(targets.ids.dtype),
        np.where(keep, logprobs, -np.inf).astype(np.float32),
        tail.astype(np.float32),
        tempered,
        targets.temperatures,
    )


def cut_points(targets: list[int] | np.ndarray, per_batch: int) -> list[int]:
    """Where to end each record batch: after the row whose running target count reaches `per_batch`.

    Returns exclusive end indices (the last one is len(targets)). A pure function of the counts, so
    a shard's batch layout never depends on how the teacher batched its forwards.
    """
    ends, running = [], 0
    for i, n in enumerate(targets):
        running += int(n)
        if running >= per_batch:
            ends.append(i + 1)
            running = 0
    if not ends or ends[-1] != len(targets):
        ends.append(len(targets))
    return ends if len(targets) else []


def target_positions(loss_mask: np.ndarray) -> np.ndarray:
    """Positions t >= 1 whose token is a target (the teacher entry j belongs to the j-th of these)."""
    mask = np.asarray(loss_mask, dtype=bool).copy()
    mask[:1] = False
    return np.flatnonzero(mask)


def build_batch(
    schema_: pa.Schema,
    rows: list[int],
    input_ids: list[np.ndarray],
    loss_masks: list[np.ndarray],
    targets: list[TopKTargets] | list[SampledTargets],
    value_encoding: str,
) -> pa.RecordBatch:
    """Assemble one Arrow record batch from per-sequence arrays (vectorised: no per-token Python)."""
    ids_type = schema_.field("input_ids").type.value_type

    def list_of(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))

    columns = [
        pa.array(np.asarray(rows, dtype=np.uint64)),
        list_of([np.asarray(a) for a in input_ids], ids_type),
        list_of([np.asarray(m, dtype=bool) for m in loss_masks], pa.bool_()),
    ]
    sorted_coding = (schema_.metadata or {}).get(b"kd.id_coding") == b"sorted"
    if isinstance(targets[0], HiddenTargets):
        return pa.RecordBatch.from_arrays(columns + hidden_columns(schema_, targets), schema=schema_)
    if isinstance(targets[0], TopKTargets):
        k = schema_.field("teacher_ids").type.value_type.list_size
        value_type = schema_.field("teacher_values").type.value_type.value_type
        tail_type = schema_.field("teacher_tail").type.value_type

        def list_of_fixed(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
            offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
            np.cumsum([len(a) for a in arrays], out=offsets[1:])
            flat = np.concatenate([a.reshape(-1) for a in arrays])
            inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), k)
            return pa.ListArray.from_arrays(pa.array(offsets), inner)

        columns += [
            list_of_fixed([t.ids for t in targets], ids_type),
            # Sorted coding permutes each row later (kd.cache.coding), so values go absolute, not delta-coded.
            list_of_fixed(
                [encode_topk_values(t.logprobs, value_encoding, delta=not sorted_coding) for t in targets], value_type
            ),
            list_of([encode_tail(t.tail, value_encoding) for t in targets], tail_type),
        ]
        if TEMPERED_TAIL_COLUMN in schema_.names:
            m = schema_.field(TEMPERED_TAIL_COLUMN).type.value_type.list_size
            tempered_type = schema_.field(TEMPERED_TAIL_COLUMN).type.value_type.value_type
            for t in targets:
                if t.tempered_tails is None or t.tempered_tails.shape[1:] != (m,):
                    raise ValueError(
                        f"the schema stores {m} tempered tails per target; the teacher gave none or others"
                    )
            offsets = np.zeros(len(targets) + 1, dtype=np.int32)
            np.cumsum([len(t.tempered_tails) for t in targets], out=offsets[1:])
            flat = np.concatenate([t.tempered_tails.reshape(-1) for t in targets]).astype(
                tempered_type.to_pandas_dtype()
            )
            inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=tempered_type), m)
            columns.append(pa.ListArray.from_arrays(pa.array(offsets), inner))
    elif "teacher_sizes" in schema_.names:
        counts_type = schema_.field("teacher_counts").type.value_type
        empty = np.zeros(0, dtype=np.int64)
        columns += [
            list_of([np.concatenate([*t.ids, empty]) for t in targets], ids_type),
            list_of([np.concatenate([*t.counts, empty]) for t in targets], counts_type),
            list_of([np.array([len(i) for i in t.ids], dtype=np.int64) for t in targets], counts_type),
        ]
    else:
        counts_type = schema_.field("teacher_counts").type.value_type.value_type

        def list_of_lists(per_seq: list[list[np.ndarray]], value_type: pa.DataType) -> pa.Array:
            inner = list_of([a for seq in per_seq for a in seq], value_type)
            outer_offsets = np.zeros(len(per_seq) + 1, dtype=np.int32)
            np.cumsum([len(seq) for seq in per_seq], out=outer_offsets[1:])
            return pa.ListArray.from_arrays(pa.array(outer_offsets), inner)

        columns += [
            list_of_lists([t.ids for t in targets], ids_type),
            list_of_lists([t.counts for t in targets], counts_type),
        ]
    return pa.RecordBatch.from_arrays(columns, schema=schema_)


# ----------------------------------------------------------------------------- hidden-state rows
# (kept in a block of their own: the columns of `kd cache-logits --store hidden`)

HIDDEN_ENCODINGS = ("bf16", "int8", "float32")
"""How hidden rows are stored: bf16 (2 B/number; relative error <= 2^-8 per number, round to nearest
even), int8 (1 B/number + a float32 scale per row: symmetric, scale = max|h| / 127, absolute error
<= scale / 2 per number) or float32 (exact)."""
INT8_LEVELS = 127
_HIDDEN_TYPES = {"bf16": pa.uint16(), "int8": pa.int8(), "float32": pa.float32()}


@dataclass
class HiddenTargets:
    """Hidden-state teacher data for the targets of one sequence: hidden[T, d] float32 (decoded).

    layers: {i: [T, d] float32}, the outputs of intermediate decoder layers i at the same positions
    (caches made with --hidden-layers; None otherwise)."""

    hidden: np.ndarray
    layers: dict[int, np.ndarray] | None = None


def layer_column(layer: int) -> str:
    """The column holding intermediate layer `layer`'s states (its int8 scales: + ``_scale``)."""
    return f"teacher_layer_{layer}"


def hidden_fields(hidden_size: int, encoding: str, layers: tuple[int, ...] = ()) -> list[pa.Field]:
    """The teacher columns of a hidden-state shard (final state, then each intermediate layer's)."""
    if encoding not in HIDDEN_ENCODINGS:
        raise ValueError(f"hidden encoding {encoding!r}: expected one of {HIDDEN_ENCODINGS}")
    if hidden_size < 1:
        raise ValueError(f"hidden size must be >= 1, got {hidden_size}")
    fields = []
    for name in ("teacher_hidden", *(layer_column(i) for i in layers)):
        fields.append(pa.field(name, pa.list_(pa.list_(_HIDDEN_TYPES[encoding], hidden_size))))
        if encoding == "int8":
            fields.append(pa.field(f"{name}_scale", pa.list_(pa.float32())))
    return fields


def hidden_encoding_of(value_type: pa.DataType) -> str:
    """The encoding a stored teacher_hidden value type stands for."""
    for name, stored in _HIDDEN_TYPES.items():
        if value_type == stored:
            return name
    raise ValueError(f"teacher_hidden values of type {value_type} are not a hidden encoding kd knows")


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> the upper 16 bits of the nearest bfloat16 (round to nearest, ties to even), as uint16.

    numpy has no bfloat16; this is torch's rounding (NaN is not expected in hidden states)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode_hidden(hidden: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray | None]:
    """hidden[T, d] float -> (stored[T, d], scale[T] for int8 else None)."""
    hidden = np.asarray(hidden, dtype=np.float32)
    if encoding == "float32":
        return hidden, None
    if encoding == "bf16":
        return float32_to_bf16_bits(hidden), None
    peak = np.abs(hidden).max(axis=1) if hidden.size else np.zeros(len(hidden), np.float32)
    scale = np.where(peak > 0, peak / INT8_LEVELS, 1.0).astype(np.float32)
    codes = np.clip(np.rint(hidden / scale[:, None]), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return codes, scale


def decode_hidden(stored: np.ndarray, encoding: str, scale: np.ndarray | None = None) -> np.ndarray:
    """Inverse of encode_hidden: [T, d] float32."""
    if encoding == "float32":
        return np.asarray(stored, dtype=np.float32)
    if encoding == "bf16":
        return bf16_bits_to_float32(stored)
    assert scale is not None, "int8 hidden rows need their scales"
    return np.asarray(stored, dtype=np.float32) * np.asarray(scale, dtype=np.float32)[:, None]


def hidden_columns(schema_: pa.Schema, targets: list[HiddenTargets]) -> list[pa.Array]:
    """The teacher_hidden (and teacher_hidden_scale) columns of one record batch, then each stored layer's."""
    row_type = schema_.field("teacher_hidden").type.value_type
    d = row_type.list_size
    encoding = hidden_encoding_of(row_type.value_type)
    offsets = np.zeros(len(targets) + 1, dtype=np.int32)
    np.cumsum([len(t.hidden) for t in targets], out=offsets[1:])

    def encoded(per_sequence: list[np.ndarray]) -> list[pa.Array]:
        rows = np.concatenate([np.asarray(h, dtype=np.float32).reshape(-1, d) for h in per_sequence])
        stored, scale = encode_hidden(rows, encoding)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1), type=row_type.value_type), d)
        columns = [pa.ListArray.from_arrays(pa.array(offsets), inner)]
        if scale is not None:
            columns.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(scale, type=pa.float32())))
        return columns

    columns = encoded([t.hidden for t in targets])
    for layer in stored_layers(schema_):
        if any(t.layers is None or layer not in t.layers for t in targets):
            raise ValueError(f"the schema stores layer {layer}; the teacher gave no states for it")
        columns += encoded([t.layers[layer] for t in targets])
    return columns


def stored_layers(schema_: pa.Schema) -> tuple[int, ...]:
    """The intermediate layers a hidden shard's schema holds, in column order."""
    prefix = layer_column(0)[:-1]
    return tuple(
        int(name[len(prefix) :]) for name in schema_.names if name.startswith(prefix) and not name.endswith("_scale")
    )
