"""A `--data` corpus tokenized once into Arrow shards, so SFT and online KD stream like cached KD.

`kd train --data corpus.jsonl` used to tokenize the whole corpus into Python lists before step one.
Now the corpus is read record by record, tokenized, and written in record batches to
``OUT/prepared/<name>/`` (axolotl's ``dataset_prepared_path`` habit): the same shard format as a
logit cache without the teacher columns, with a manifest whose settings fingerprint the corpus,
the tokenizer and the tokenization settings. Training then reads it with the same streaming loader,
shuffle window, resume and rank guarantees as a cache. A rerun (or `--resume`) with the same
settings reuses it; other settings rebuild it. Memory: one record batch of token ids at a time.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kd.cache import format as fmt
from kd.cache.manifest import open_or_create, read_manifest, record_rank_done
from kd.cache.reader import CacheReader
from kd.cache.writer import BackgroundShardWriter
from kd.errors import KdError
from kd.pipeline.data import corpus_fingerprint, iter_examples, tokenize_example
from kd.pipeline.models import tokenizer_fingerprint

SHARD_TARGETS = 4_000_000
"""Target tokens per prepared shard (shards are the unit of the per-shard checksum)."""


def prepared_schema(vocab_size: int, weighted: bool) -> pa.Schema:
    ids = fmt.id_type(vocab_size)
    fields = [
        pa.field("row", pa.uint64()),
        pa.field("input_ids", pa.list_(ids)),
        pa.field("loss_mask", pa.list_(pa.bool_())),
    ]
    if weighted:
        fields.append(pa.field("token_weights", pa.list_(pa.float32())))
    return pa.schema(fields)


def _record_batch(schema: pa.Schema, rows: list[int], ids: list[np.ndarray], masks: list[np.ndarray], weights):
    def list_of(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(arrays), type=value_type))

    columns = [
        pa.array(np.asarray(rows, dtype=np.uint64)),
        list_of(ids, schema.field("input_ids").type.value_type),
        list_of(masks, pa.bool_()),
    ]
    if weights is not None:
        columns.append(list_of(weights, pa.float32()))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def prepared_settings(
    path: str, tokenizer, data_format: str | None, max_seq_len: int, limit: int | None, weights_of
) -> dict[str, Any]:
    """The manifest settings of a prepared corpus: a rerun with the same ones reuses it."""
    return {
        "format_version": fmt.FORMAT_VERSION,
        "mode": "prepared",
        "corpus": {"path": Path(path).name, "fingerprint": corpus_fingerprint(path) if Path(path).is_file() else None},
        "data_format": data_format,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "max_seq_len": max_seq_len,
        "limit": limit,
        "weights": None if weights_of is None else getattr(weights_of, "fingerprint", "custom"),
        "value_encoding": None,
        "world_size": 1,
    }


def prepare_corpus(
    path: str,
    out_dir: Path,
    tokenizer,
    *,
    flag: str,
    data_format: str | None,
    max_seq_len: int,
    limit: int | None,
    weights_of=None,
) -> CacheReader:
    """Tokenize `path` into `out_dir` (or reuse it) and open it for streaming.

    Args:
        weights_of: optional function TokenizedExample -> per-token CE weights (reasoning SFT tags).
    """
    settings = prepared_settings(path, tokenizer, data_format, max_seq_len, limit, weights_of)
    existing = read_manifest(out_dir) if out_dir.is_dir() else None
    if existing is not None and existing.get("settings") == settings and existing.get("complete"):
        return CacheReader(out_dir, flag=flag)
    if out_dir.exists():  # other settings or an interrupted preparation: nothing in it is trusted
        shutil.rmtree(out_dir)
    if not Path(path).is_file():
        raise KdError(f"{flag} {path}: no such file")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    open_or_create(out_dir, settings)
    schema = prepared_schema(len(tokenizer), weights_of is not None)
    writer = BackgroundShardWriter(out_dir, schema)
    shard, shard_rows, shard_targets, shard_tokens = 0, 0, 0, 0
    pending: tuple[list, list, list, list] = ([], [], [], [])
    pending_targets = 0
    written = 0

    def flush() -> None:
        nonlocal pending, pending_targets
        if pending[0]:
            weights = pending[3] if weights_of is not None else None
            writer.submit_batch(0, shard, _record_batch(schema, pending[0], pending[1], pending[2], weights))
        pending, pending_targets = ([], [], [], []), 0

    try:
        for row, example in enumerate(iter_examples(path, data_format, limit)):
            tokenized = tokenize_example(example, tokenizer, max_seq_len)
            if tokenized is None:
                continue
            ids = np.asarray(tokenized.input_ids, dtype=schema.field("input_ids").type.value_type.to_pandas_dtype())
            mask = np.asarray(tokenized.loss_mask, dtype=bool)
            pending[0].append(row)
            pending[1].append(ids)
            pending[2].append(mask)
            if weights_of is not None:
                pending[3].append(np.asarray(weights_of(tokenized), dtype=np.float32))
            targets = tokenized.num_targets
            pending_targets += targets
            shard_rows, shard_targets, shard_tokens = shard_rows + 1, shard_targets + targets, shard_tokens + len(ids)
            written += 1
            if pending_targets >= fmt.BATCH_TARGETS:
                flush()
            if shard_targets >= SHARD_TARGETS:
                flush()
                writer.finish_shard(0, shard, {"rows": shard_rows, "tokens": shard_tokens, "targets": shard_targets})
                shard, shard_rows, shard_targets, shard_tokens = shard + 1, 0, 0, 0
        if written == 0:
            raise KdError(f"{flag} {path}: no usable training sequences")
        flush()
        if shard_rows:
            writer.finish_shard(0, shard, {"rows": shard_rows, "tokens": shard_tokens, "targets": shard_targets})
    finally:
        writer.close()
    record_rank_done(out_dir, 0, {"rows": written})
    return CacheReader(out_dir, flag=flag)
