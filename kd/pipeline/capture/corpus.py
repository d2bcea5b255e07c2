"""The corpus as a stream of tokenized blocks, read one block ahead on a background thread.

Stage one used to tokenize a rank's whole corpus into Python lists before the teacher started:
minutes of waiting and gigabytes resident for a 10 M-record corpus. Here records are read
`block_records` at a time, this rank's rows (r, r+W, r+2W...) are tokenized in one fast-tokenizer
call per block, and at most `PREFETCH_BLOCKS` finished blocks wait in a queue while the teacher
works. A bad record raises where it is met, naming its file and line; everything before it has
already been handed over.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from kd.pipeline.capture.config import CacheConfig
from kd.pipeline.data import encode_examples, iter_examples
from kd.pipeline.engines.teacher import SequenceToScore

PREFETCH_BLOCKS = 1
"""Tokenized blocks queued ahead of the teacher: one hides tokenization behind scoring."""


class Residency:
    """How many tokenized sequences (and their target tokens) stage one holds right now, and the peak.

    Every sequence is counted when it is tokenized and released once it is in a record batch handed
    to the writer (or dropped because its shard was already written). The peak is the memory bound
    the tests check: it depends on block, window and record-batch sizes, never on the corpus size.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sequences = self.targets = 0
        self.peak_sequences = self.peak_targets = 0

    def add(self, sequences: int, targets: int) -> None:
        with self._lock:
            self.sequences += sequences
            self.targets += targets
            self.peak_sequences = max(self.peak_sequences, self.sequences)
            self.peak_targets = max(self.peak_targets, self.targets)

    def release(self, sequences: int, targets: int) -> None:
        with self._lock:
            self.sequences -= sequences
            self.targets -= targets


@dataclass
class Block:
    """One block of the corpus: this rank's usable rows in corpus order, plus counts for the summary."""

    sequences: list[SequenceToScore]
    records: int
    """Records read in this block (every rank's)."""
    skipped: int = 0
    truncated: int = 0
    next_row: int = 0
    """Corpus row index just after this block (progress)."""


def num_targets(seq: SequenceToScore) -> int:
    return int(np.count_nonzero(seq.loss_mask[1:]))


def iter_blocks(cfg: CacheConfig, tokenizer, residency: Residency) -> Iterator[Block]:
    """Read and tokenize the corpus block by block (this rank's rows only; every rank reads every record)."""
    examples = iter_examples(cfg.data, cfg.data_format, cfg.limit)
    row = 0
    while True:
        chunk = list(islice(examples, cfg.block_records))
        if not chunk:
            return
        mine = [(row + i, ex) for i, ex in enumerate(chunk) if (row + i) % cfg.world_size == cfg.rank]
        encoded = encode_examples([ex for _, ex in mine], tokenizer, cfg.max_seq_len, cfg.overflow)
        block = Block([], len(chunk), next_row=row + len(chunk))
        for (r, _), enc in zip(mine, encoded, strict=True):
            if enc is None:
                block.skipped += 1
                continue
            block.truncated += enc.truncated
            block.sequences.append(SequenceToScore(r, enc.input_ids, enc.loss_mask))
        residency.add(len(block.sequences), sum(num_targets(s) for s in block.sequences))
        row += len(chunk)
        yield block


class Prefetcher:
    """Runs an iterator on a daemon thread, `depth` items ahead; its exceptions re-raise in the consumer.

    Tokenizing overlaps the teacher: the fast tokenizer and torch both release the GIL for their
    heavy parts. `close` stops the thread at its next hand-over (it never blocks the consumer).
    """

    _END = object()

    def __init__(self, items: Iterator, depth: int = PREFETCH_BLOCKS) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="kd-corpus-reader", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it with its message intact
            self._put(_Failure(exc))
            return
        self._put(self._END)

    def __iter__(self) -> Iterator:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class _Failure:
    exc: BaseException


class RecordCounter:
    """Counts the corpus's records on a background thread, for the progress bar's ETA.

    A pre-pass would make the time to the first teacher forward grow with the corpus; counting
    newlines beside the teacher costs a fraction of a core for a few seconds per GB. Parquet files
    carry their row count in the footer. `total` is None until the count is known.
    """

    def __init__(self, path: str, limit: int | None) -> None:
        self.total: int | None = None
        self._path, self._limit = Path(path), limit
        self._thread = threading.Thread(target=self._run, name="kd-record-counter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            count = _count_records(self._path)
        except Exception:  # a corrupt file is reported by the reader, with its line; the ETA just stays unknown
            return
        self.total = count if self._limit is None else min(count, self._limit)


def _count_records(path: Path) -> int:
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if name.endswith((".zst", ".zstd")):
        import zstandard

        with open(path, "rb") as raw:
            return _count_lines(zstandard.ZstdDecompressor().stream_reader(raw))
    with open(path, "rb") as f:
        return _count_lines(f)


def _count_lines(stream) -> int:
    """Lines, read in 4 MiB pieces: the record count up to blank lines, close enough for an ETA."""
    count, last = 0, b"\n"
    for piece in iter(lambda: stream.read(1 << 22), b""):
        count += piece.count(b"\n")
        last = piece[-1:]
    return count + (last != b"\n")


class RowsHash:
    """Running sha256 over a rank's usable rows (row number, token ids, loss mask), in corpus order.

    A shard's content is a pure function of the rows up to its end (its own rows, and the earlier
    rows' target counts that place its boundaries), so the hash at a shard's end, stored in the
    manifest, proves on resume that the shard is what this corpus would give now. It is what lets a
    user fix a bad record further down the file and keep every shard written before it.
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, seq: SequenceToScore) -> None:
        ids = np.ascontiguousarray(seq.input_ids, dtype=np.int32)
        self._h.update(np.array([seq.row, len(ids)], dtype=np.int64).tobytes())
        self._h.update(ids.tobytes())
        self._h.update(np.packbits(np.asarray(seq.loss_mask, dtype=bool)).tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()
