"""Stage one's loop: corpus blocks -> shards -> windows -> teacher -> record batches -> writer.

Determinism is what makes resume and scale-out safe: rank r takes corpus rows r, r+W, r+2W...;
a shard ends after the row whose running target count reaches --shard-tokens, a record batch after
the row whose count reaches BATCH_TARGETS, a window after --window-tokens sequence tokens or at its
shard's end. All are decided row by row from the data alone, so every shard is a pure function of
(corpus, settings): a rerun skips the shards the manifest lists (after checking that the rows they
hold are unchanged) and the result equals an uninterrupted run, byte for byte.

Memory held at once (bounded by settings, not by the corpus; `Residency` counts it): the block being
tokenized plus PREFETCH_BLOCKS queued, one window of sequences and its teacher results, the scored
rows of the record batch being filled, and the writer's few queued record batches.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import IO, Any

from kd.cache import format as fmt
from kd.cache.manifest import claim_rank, open_or_create, read_manifest, record_rank_done
from kd.cache.reader import shard_problem
from kd.cache.writer import BackgroundShardWriter
from kd.errors import KdError
from kd.pipeline.capture.config import CacheConfig
from kd.pipeline.capture.corpus import Block, Prefetcher, RecordCounter, Residency, RowsHash, iter_blocks, num_targets
from kd.pipeline.capture.heap import fix_mmap_threshold
from kd.pipeline.capture.meter import Meter, make_stage_one_progress
from kd.pipeline.capture.plan import RunningCut, length_sorted_batches
from kd.pipeline.engines.teacher import SequenceToScore, TargetSpec
from kd.pipeline.models import (
    file_fingerprint,
    load_tokenizer,
    resolve_model,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from kd.pipeline.progress import log


def run_cache_logits(cfg: CacheConfig) -> dict[str, Any]:
    """Run stage one for this rank. Returns a summary (counts, throughput, memory held)."""
    held: list[IO[Any]] = []  # this rank's lock on --out, released however the run ends
    try:
        return _run(cfg, held)
    finally:
        for lock in held:
            lock.close()


def _run(cfg: CacheConfig, held: list[IO[Any]]) -> dict[str, Any]:
    fix_mmap_threshold()  # else peak RSS creeps up with the run's length (see kd.pipeline.capture.heap)
    meter = Meter()
    source = resolve_model(cfg.teacher, "--teacher")
    tokenizer = load_tokenizer(source)
    vocab_size = _teacher_vocab_size(source)
    hidden_size = _teacher_hidden_size(source) if cfg.mode == "hidden" else 0
    teacher_layers = _teacher_depth(source, cfg.layers) if cfg.layers else 0
    if cfg.mode == "topk" and cfg.top_k > vocab_size:
        raise KdError(f"--top-k {cfg.top_k} exceeds the teacher's vocabulary size ({vocab_size})")
    tokenizer_id = tokenizer_fingerprint(tokenizer)  # before the reader thread owns the tokenizer

    residency = Residency()
    blocks = Prefetcher(iter_blocks(cfg, tokenizer, residency))
    try:
        stream = iter(blocks)
        # Fail fast where it is cheap: the first block with a usable row (or the whole corpus, if
        # none has one) is read and checked before any cache directory or teacher exists.
        first: list[Block] = []
        for block in stream:
            first.append(block)
            if block.sequences:
                break
        read = sum(b.records for b in first)
        if read == 0:
            raise KdError(f"--data {cfg.data}: empty corpus (no records)")
        if not any(b.sequences for b in first) and cfg.world_size == 1:
            skipped = sum(b.skipped for b in first)
            raise KdError(
                f"--data {cfg.data}: no usable records ({read} read, {skipped} skipped as too long or without targets)"
            )

        if cfg.engine == "vllm":
            cfg = _resolve_vllm_scoring(cfg, source)
        out = Path(cfg.out)
        settings = _settings(cfg, source, tokenizer_id, vocab_size, hidden_size, teacher_layers)
        held.append(claim_rank(out, cfg.rank))  # a second writer of this rank is refused, not interleaved
        manifest = open_or_create(out, _adopt_fingerprint(out, settings))
        done = {s["index"]: s for s in manifest["shards"] if s["rank"] == cfg.rank}
        if done:
            log(f"resuming: {len(done)} shards of rank {cfg.rank} already in {out} (checked row by row as they pass)")

        counter = RecordCounter(cfg.data, cfg.limit)
        meter.total_records = lambda: counter.total
        schema = fmt.schema(
            cfg.mode,
            vocab_size,
            cfg.top_k,
            cfg.value_encoding,
            cfg.samples,
            hidden_size=hidden_size,
            hidden_encoding=cfg.hidden_encoding,
            tempered=len(cfg.tempered),
            hidden_layers=cfg.layers,
        )
        writer = BackgroundShardWriter(out, schema)
        capture = _Capture(cfg, source, schema, vocab_size, done, writer, residency, meter)
        stats = {"rows_read": 0, "rows_skipped": 0, "rows_truncated": 0}
        try:
            with make_stage_one_progress() as progress:
                task = progress.add_task(f"teacher pass (rank {cfg.rank})", total=None, total_text="?", meter="")
                capture.on_progress = lambda: progress.update(
                    task,
                    completed=meter.position,
                    total=counter.total,
                    total_text="?" if counter.total is None else f"{counter.total:,}",
                    meter=meter.line(),
                )

                def all_blocks():
                    yield from first
                    yield from stream

                for block in all_blocks():
                    stats["rows_read"] += block.records
                    stats["rows_skipped"] += block.skipped
                    stats["rows_truncated"] += block.truncated
                    for seq in block.sequences:
                        capture.feed(seq)
                    block.sequences = []  # the capture holds what it still needs
                    if not capture.holds_rows():  # every row of the block is scored or reused
                        meter.reached(block.next_row)
                    capture.on_progress()
                capture.end()
                meter.reached(stats["rows_read"])
                capture.on_progress()
        finally:
            writer.close()
            capture.close()
    finally:
        blocks.close()

    if stats["rows_skipped"] or stats["rows_truncated"]:
        action = "skipped" if cfg.overflow == "skip" else "truncated"
        count = stats["rows_truncated"] if cfg.overflow == "truncate" else stats["rows_skipped"]
        log(
            f"[yellow]{count} sequences longer than --max-seq-len {cfg.max_seq_len} were {action}; "
            f"{stats['rows_skipped']} skipped in all[/yellow]"
        )
    manifest = record_rank_done(out, cfg.rank, stats)
    return {
        "cache": str(out),
        "rank": cfg.rank,
        "shards_written": capture.written,
        "shards_reused": capture.reused,
        "targets": capture.targets_written,
        **meter.summary(),
        "peak_sequences_held": residency.peak_sequences,
        "peak_targets_held": residency.peak_targets,
        "complete": manifest["complete"],
        **stats,
    }


class _Capture:
    """Turns the stream of tokenized rows into shards: windows scored, record batches submitted in row order."""

    def __init__(self, cfg, source, schema, vocab_size: int, done, writer, residency, meter) -> None:
        self.cfg, self.source, self.schema, self.vocab_size = cfg, source, schema, vocab_size
        self.done: dict[int, dict[str, Any]] = done
        self.writer: BackgroundShardWriter = writer
        self.residency: Residency = residency
        self.meter: Meter = meter
        self.engine = None
        self.on_progress = lambda: None
        self.index = 0
        self.rows_hash = RowsHash()
        self.shard_cut = RunningCut(cfg.shard_tokens)
        self.batch_cut = RunningCut(fmt.BATCH_TARGETS)
        self.window: list[SequenceToScore] = []
        self.window_tokens = 0
        self.pending: list[tuple[SequenceToScore, Any]] = []
        self.shard = _empty_stats()
        self.written = self.reused = self.targets_written = 0

    def holds_rows(self) -> bool:
        return bool(self.window or self.pending)

    # ------------------------------------------------------------------ the row stream

    def feed(self, seq: SequenceToScore) -> None:
        n = num_targets(seq)
        self.rows_hash.update(seq)
        stats = self.shard
        stats["rows"] += 1
        stats["first_row"] = seq.row if stats["first_row"] is None else stats["first_row"]
        stats["last_row"] = seq.row
        stats["tokens"] += len(seq.input_ids)
        stats["targets"] += n
        ends = self.shard_cut.add(n)
        if stats["rows"] == 1 and self.index in self.done:
            self._check_done_file()
        if self.index in self.done:  # written by an earlier run: only check it
            self.residency.release(1, n)
            if ends:
                self._close_done_shard()
            return
        self.window.append(seq)
        self.window_tokens += len(seq.input_ids)
        if ends:
            self._finish_shard()
        elif self.window_tokens >= self.cfg.window_tokens:
            self._score_window()

    def end(self) -> None:
        """The corpus is exhausted: the last, partial shard (if any)."""
        if self.shard["rows"]:
            if self.index in self.done:
                self._close_done_shard()
            else:
                self._finish_shard()

    # ------------------------------------------------------------------ shards

    def _finish_shard(self) -> None:
        self._score_window()
        self._submit_pending()
        self.batch_cut.reset()
        self.writer.finish_shard(self.cfg.rank, self.index, {**self.shard, "rows_sha256": self.rows_hash.hexdigest()})
        self.written += 1
        self.targets_written += self.shard["targets"]
        self._next_shard()

    def _check_done_file(self) -> None:
        """A listed shard whose file is missing or damaged is scored again, not counted as reused.

        Checked as the stream reaches the shard (size, then sha256: one read of the file), so the
        cost is spread over the resume instead of a pre-pass; the re-created file replaces the entry.
        """
        problem = shard_problem(Path(self.cfg.out), self.done[self.index])
        if problem:
            log(f"{problem}: re-creating it")
            del self.done[self.index]

    def _close_done_shard(self) -> None:
        entry = self.done[self.index]
        mine = {**self.shard, "rows_sha256": self.rows_hash.hexdigest()}
        keys = [k for k in ("rows", "first_row", "last_row", "tokens", "targets", "rows_sha256") if k in entry]
        if any(entry[k] != mine[k] for k in keys):
            raise KdError(
                f"--data {self.cfg.data}: records {mine['first_row']}..{mine['last_row']} (or earlier ones of rank "
                f"{self.cfg.rank}) changed since {entry['file']} was written; use another --out or delete it"
            )
        self.reused += 1
        self.meter.reached(mine["last_row"] + 1)
        self._next_shard()

    def _next_shard(self) -> None:
        self.index += 1
        self.shard = _empty_stats()

    # ------------------------------------------------------------------ teacher

    def _score_window(self) -> None:
        if not self.window:
            return
        window, self.window, self.window_tokens = self.window, [], 0
        engine = self._engine()
        self.meter.teacher_starts()
        t0 = time.perf_counter()
        if getattr(engine, "schedules_itself", False):
            results = engine.score(window)  # vLLM: the whole window in one call, scheduled by vLLM
        else:
            results: list[Any] = [None] * len(window)
            for batch in length_sorted_batches(window, self.cfg.batch_size, self.cfg.batch_tokens):
                for i, targets in zip(batch, engine.score([window[i] for i in batch]), strict=True):
                    results[i] = targets
        if self.cfg.mass_epsilon:
            results = [fmt.truncate_to_mass(t, self.cfg.mass_epsilon) for t in results]
        self.meter.scored(
            time.perf_counter() - t0, sum(len(s.input_ids) for s in window), sum(num_targets(s) for s in window)
        )
        self.meter.reached(window[-1].row + 1)
        for seq, targets in zip(window, results, strict=True):
            self.pending.append((seq, targets))
            if self.batch_cut.add(num_targets(seq)):
                self._submit_pending()
        self.on_progress()

    def _submit_pending(self) -> None:
        """One record batch from the scored rows waiting, in row order; then they are the writer's."""
        if not self.pending:
            return
        seqs = [s for s, _ in self.pending]
        batch = fmt.build_batch(
            self.schema,
            [s.row for s in seqs],
            [s.input_ids for s in seqs],
            [s.loss_mask for s in seqs],
            [t for _, t in self.pending],
            self.cfg.value_encoding,
        )
        self.writer.submit_batch(self.cfg.rank, self.index, batch)
        self.residency.release(len(seqs), sum(num_targets(s) for s in seqs))
        self.pending = []

    def _engine(self):
        """The teacher, loaded when the first window needs it (a fully reused cache never loads it)."""
        if self.engine is None:
            spec = TargetSpec(
                self.cfg.mode, self.cfg.top_k, self.cfg.samples, self.cfg.seed, self.cfg.tempered, self.cfg.layers
            )
            self.engine = _make_engine(self.cfg, self.source, spec)
            if self.engine.vocab_size != self.vocab_size:
                raise KdError(
                    f"--teacher: model head has {self.engine.vocab_size} outputs but its config says {self.vocab_size}"
                )
            if self.cfg.mode == "hidden":
                _store_teacher_head(self.engine, Path(self.cfg.out), self.schema)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _empty_stats() -> dict[str, Any]:
    return {"rows": 0, "first_row": None, "last_row": None, "tokens": 0, "targets": 0}


def _store_teacher_head(engine, out: Path, schema) -> None:
    """--store hidden: the head the engine applies, written once beside the shards (before any shard)."""
    from kd.pipeline.engines.hidden import save_teacher_head

    weight, bias, transform = engine.head_for_cache()
    hidden_size = schema.field("teacher_hidden").type.value_type.list_size
    if weight.shape[1] != hidden_size:
        raise KdError(f"--teacher: LM head takes {weight.shape[1]} inputs, the config's hidden size is {hidden_size}")
    save_teacher_head(out, weight, bias, transform)


def _settings(
    cfg: CacheConfig, source, tokenizer_id: str, vocab_size: int, hidden_size: int = 0, teacher_layers: int = 0
) -> dict[str, Any]:
    hidden = {"hidden_encoding": cfg.hidden_encoding, "hidden_size": hidden_size} if cfg.mode == "hidden" else {}
    # Only when asked for, as --temperatures: caches without intermediate layers keep their settings (and resume).
    layers = {"hidden_layers": list(cfg.layers), "teacher_layers": teacher_layers} if cfg.layers else {}
    return {
        **hidden,
        **layers,
        "format_version": fmt.FORMAT_VERSION,
        "teacher": {
            "name": source.display_name,
            "kind": source.kind,
            "path": source.path,
            "weights_fingerprint": weights_fingerprint(source),
        },
        "tokenizer_fingerprint": tokenizer_id,
        "vocab_size": vocab_size,
        "mode": cfg.mode,
        "k": cfg.top_k if cfg.mode == "topk" else None,
        "num_samples": cfg.samples if cfg.mode == "rs" else None,
        "seed": cfg.seed if cfg.mode == "rs" else None,
        "value_encoding": cfg.value_encoding if cfg.mode == "topk" else None,
        "mass_epsilon": cfg.mass_epsilon if cfg.mode == "topk" else None,
        # Only when asked for: a cache without the key is exact at T = 1 alone, and old caches resume.
        **({"temperatures": [1.0, *cfg.tempered]} if cfg.tempered else {}),
        "engine": cfg.engine,
        **({"vllm_scoring": cfg.vllm_scoring} if cfg.engine == "vllm" else {}),
        "dtype": cfg.dtype,
        "corpus": {
            "path": os.path.basename(cfg.data),
            # Size + first and last MiB: hashing every byte would make the time to the first teacher
            # forward grow with the corpus. The exact check is per shard (rows_sha256).
            "fingerprint": file_fingerprint(Path(cfg.data))[:16],
            "format": cfg.data_format,
            "limit": cfg.limit,
            "max_seq_len": cfg.max_seq_len,
            "overflow": cfg.overflow,
        },
        "world_size": cfg.world_size,
        "shard_tokens": cfg.shard_tokens,
    }


def _adopt_fingerprint(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Resume into a cache whose corpus file changed, when nothing else did.

    The file fingerprint in the settings changes when a user fixes a bad record that stopped an
    earlier run. The shards written before that record are still right, and each one is checked
    row by row (rows_sha256) as the corpus streams past, so the cache keeps its original settings
    and a shard whose rows did change is refused then, with the records named.
    """
    manifest = read_manifest(out) if (out / "manifest.json").is_file() else None
    if manifest is None:
        return settings
    old = manifest.get("settings", {})
    old_corpus, new_corpus = dict(old.get("corpus") or {}), dict(settings["corpus"])
    if old_corpus.pop("fingerprint", None) == new_corpus.pop("fingerprint", None):
        return settings
    if old_corpus == new_corpus and {**old, "corpus": None} == {**settings, "corpus": None}:
        log(f"--data {settings['corpus']['path']}: the file changed since {out} was started; written shards are kept")
        return {**settings, "corpus": old["corpus"]}
    return settings


def _teacher_vocab_size(source) -> int:
    """The teacher's output vocabulary (its config), which may exceed the tokenizer's (padding)."""
    from transformers import AutoConfig

    from kd.pipeline.models import hf_dir_for

    config = AutoConfig.from_pretrained(hf_dir_for(source))
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


def _teacher_hidden_size(source) -> int:
    """The width of the teacher's final hidden state (the LM head's input)."""
    from transformers import AutoConfig

    from kd.pipeline.models import hf_dir_for

    config = AutoConfig.from_pretrained(hf_dir_for(source))
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)


def _teacher_depth(source, layers: tuple[int, ...]) -> int:
    """The teacher's number of decoder layers, once --hidden-layers is checked against it."""
    from transformers import AutoConfig

    from kd.pipeline.models import hf_dir_for

    config = AutoConfig.from_pretrained(hf_dir_for(source))
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    depth = int(text_config.num_hidden_layers)
    if max(layers) >= depth:
        raise KdError(
            f"--hidden-layers {','.join(map(str, layers))}: the teacher has {depth} decoder layers (0..{depth - 1})"
        )
    return depth


def _resolve_vllm_scoring(cfg: CacheConfig, source) -> CacheConfig:
    """--vllm-scoring auto made definite (it is part of the cache's settings: resume keeps it)."""
    from kd.pipeline.engines.logits_vllm import resolve_scoring
    from kd.pipeline.models import hf_dir_for

    scoring, why = resolve_scoring(cfg.vllm_scoring, hf_dir_for(source), cfg.mode)
    if scoring == "logprobs" and cfg.tempered:
        raise KdError(
            f"--temperatures with --engine vllm needs hidden scoring, and --vllm-scoring auto came to logprobs ({why})"
        )
    if cfg.vllm_scoring == "auto":
        log(f"--vllm-scoring auto: {scoring} ({why})")
    return dataclasses.replace(cfg, vllm_scoring=scoring)


def _make_engine(cfg: CacheConfig, source, spec: TargetSpec):
    if cfg.engine == "vllm":
        from kd.pipeline.engines.logits_vllm import VllmTeacher

        return VllmTeacher(
            source,
            spec,
            cfg.tensor_parallel_size,
            cfg.dtype,
            cfg.max_seq_len + 1,
            seed=cfg.seed,
            scoring=cfg.vllm_scoring,
            head_device=cfg.device or default_device(),
        )
    from kd.pipeline.engines.logits_hf import TransformersTeacher

    return TransformersTeacher(
        source, spec, device=cfg.device or default_device(), dtype=cfg.dtype, device_map=cfg.device_map
    )


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"
