"""Stage two streams the cache: exact order, bounded memory, per-rank decoding, errors mid-run, resume.

    .venv/bin/python -m pytest tests/test_stream.py -q

Caches come from a real `kd cache-logits` run on a tiny random Llama with the real SmolLM2
tokenizer, re-written through kd's own writer (`kd.cache.replicate`) into many small record
batches and several copies, so that windows, shards and units are plentiful.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from kd.cache.reader import CacheReader
from kd.cache.replicate import replicate_cache
from kd.pipeline.training.order import EpochPlan, OrderSettings
from kd.pipeline.training.stream import StepLoader
from tests.helpers import assert_one_line_error, run_kd, run_kd_in_process, run_torchrun, start_kd
from tests.test_cache_logits import make_corpus
from tests.test_train import assert_same_weights, metrics


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory, tiny_model_dir) -> Path:
    corpus = make_corpus(tmp_path_factory.mktemp("data") / "corpus.jsonl", rows=24)
    out = tmp_path_factory.mktemp("caches") / "base"
    proc = run_kd_in_process(
        "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(out), "--top-k", "8"
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def small_units(tmp_path_factory, base_cache) -> Path:
    """3 copies of the base cache in record batches of ~40 targets (a few sequences each)."""
    out = tmp_path_factory.mktemp("caches") / "x3"
    replicate_cache(base_cache, out, copies=3, batch_targets=40)
    return out


def sequences(reader: CacheReader) -> dict[int, np.ndarray]:
    return {s.row: np.asarray(s.input_ids) for s in reader.iter_sequences()}


# ----------------------------------------------------------------------------- the plan


def test_replicated_cache_holds_every_row_of_every_copy(base_cache, small_units):
    base, copy = CacheReader(base_cache), CacheReader(small_units)
    original = sequences(base)
    copied = sequences(copy)
    assert len(copied) == 3 * len(original)
    stride = max(original) + 1
    for row, ids in original.items():
        for c in range(3):
            np.testing.assert_array_equal(copied[row + c * stride], ids)
    assert len(copy.units()) > 3 * len(base.units())  # re-cut into small record batches
    assert all(u.rows >= 1 for u in copy.units())


def same_steps(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x, y) for sa, sb in zip(a, b, strict=True) for x, y in zip(sa, sb, strict=True)
    )


@pytest.mark.parametrize("window", [1, 7, 64, 10_000])
def test_plan_visits_each_sequence_once_per_epoch_deterministically(window):
    rows = [5, 3, 9, 1, 7, 4, 6]
    settings = OrderSettings(seed=3, shuffle_window=window, micro_per_step=2, batch_size=3)
    plan = EpochPlan(rows, settings)
    steps = list(plan.steps(0))
    assert len(steps) == plan.steps_in_epoch(0) == sum(rows) // 6
    seen = np.concatenate([m[:, 1:] for step in steps for m in step])
    assert len({tuple(x) for x in seen}) == len(seen)  # nothing twice
    assert all((0 <= r < rows[u]) for u, r in seen)
    again = list(EpochPlan(rows, settings).steps(0))
    assert same_steps(steps, again)
    other_epoch = np.concatenate([m[:, 1:] for step in plan.steps(1) for m in step])
    assert not np.array_equal(seen, other_epoch)
    # Resuming at step k replays exactly the tail of the epoch.
    tail = list(plan.steps(0, start=2))
    assert all(
        np.array_equal(a, b) for sa, sb in zip(steps[2:], tail, strict=True) for a, b in zip(sa, sb, strict=True)
    )


def test_token_budget_packs_within_the_budget_and_covers_the_window():
    rng = np.random.default_rng(0)
    rows = [6, 4, 8, 5]
    lengths = [rng.integers(3, 40, size=n) for n in rows]
    plan = EpochPlan(rows, OrderSettings(seed=1, shuffle_window=10, micro_per_step=1, batch_tokens=64), lengths)
    micro = list(plan.micro_batches(0))
    seen = np.concatenate([m[:, 1:] for m in micro])
    assert sorted(map(tuple, seen)) == sorted((u, r) for u, n in enumerate(rows) for r in range(n))
    for m in micro:
        sizes = [lengths[u][r] for _, u, r in m]
        assert max(sizes) * len(sizes) <= 64
    assert plan.steps_in_epoch(0) == len(micro)


# ----------------------------------------------------------------------------- the loader


def _run_loader(cache: Path, window: int, world_size: int = 1, rank: int = 0, accumulation: int = 2):
    reader = CacheReader(cache)
    units = reader.units()
    settings = OrderSettings(seed=0, shuffle_window=window, micro_per_step=accumulation * world_size, batch_size=2)
    plan = EpochPlan([u.rows for u in units], settings)
    loader = StepLoader(reader, plan, units, rank, world_size, accumulation, prefetch=2)
    steps = list(loader.iterate(0, plan.steps_in_epoch(0)))
    return loader, steps, max(u.rows for u in units)


@pytest.mark.parametrize("copies", [1, 16])
def test_loader_holds_a_window_not_the_cache(tmp_path, base_cache, copies):
    """Held record batches and decoded sequences stay under bounds set by the window and prefetch alone."""
    cache = tmp_path / f"x{copies}"
    replicate_cache(base_cache, cache, copies=copies, batch_targets=40)
    window = 8
    loader, steps, biggest_unit = _run_loader(cache, window)
    assert steps, "no step"
    per_step = 2 * 2  # batch 2 x accumulation 2
    assert loader.stats.max_held_rows <= 2 * (window + 2 * biggest_unit)
    assert loader.stats.max_decoded <= (loader.prefetch + 2) * per_step
    assert loader.stats.decoded == 0  # everything released at the end
    total = CacheReader(cache).num_rows
    if copies == 16:
        assert loader.stats.max_held_rows < total / 4  # far from holding the cache


def test_each_rank_decodes_only_its_share(small_units):
    _, whole, _ = _run_loader(small_units, window=10, world_size=1, accumulation=2)
    _, rank0, _ = _run_loader(small_units, window=10, world_size=2, rank=0, accumulation=1)
    _, rank1, _ = _run_loader(small_units, window=10, world_size=2, rank=1, accumulation=1)
    assert len(whole) == len(rank0) == len(rank1)
    for one, r0, r1 in zip(whole, rank0, rank1, strict=True):
        assert r0.sequences == r1.sequences == one.sequences // 2
        assert r0.targets + r1.targets == one.targets
        assert len(r0.micro_batches) == len(r1.micro_batches) == 1
        for mine, full in ((r0.micro_batches[0], one.micro_batches[0]), (r1.micro_batches[0], one.micro_batches[1])):
            assert mine.input_ids.equal(full.input_ids) and mine.labels.equal(full.labels)


# ----------------------------------------------------------------------------- kd train end to end


def _train_args(cache: Path, student: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--from-cache",
        str(cache),
        "--student",
        str(student),
        "--out",
        str(out),
        "--learning-rate",
        "1e-3",
        "--log-every",
        "1",
        *extra,
    ]


def test_batch_tokens_reports_padding_and_rejects_a_too_small_budget(tmp_path, small_units, student_config):
    out = tmp_path / "tokens"
    proc = run_kd_in_process(
        *_train_args(small_units, student_config, out, "--batch-tokens", "600", "--max-steps", "3")
    )
    assert proc.returncode == 0, proc.stderr
    rows = [m for m in metrics(out) if "loss" in m]
    assert len(rows) == 3
    assert all(0.0 <= m["padding"] < 1.0 for m in rows)
    assert all("data_wait_share" in m for m in rows)
    proc = run_kd_in_process(*_train_args(small_units, student_config, tmp_path / "small", "--batch-tokens", "10"))
    assert_one_line_error(proc, "--batch-tokens 10", "raise --batch-tokens to at least")
    proc = run_kd_in_process(*_train_args(small_units, student_config, tmp_path / "w0", "--shuffle-window", "0"))
    assert_one_line_error(proc, "--shuffle-window must be >= 1")


def test_old_and_future_cache_versions(tmp_path, base_cache, student_config):
    """A v1 cache (one record batch per shard, no batch list) still trains; an unknown version is refused."""
    v1 = tmp_path / "v1"
    shutil.copytree(base_cache, v1)
    manifest = json.loads((v1 / "manifest.json").read_text())
    manifest["settings"]["format_version"] = 1
    for shard in manifest["shards"]:
        assert len(shard.pop("batches")) == 1  # the base cache is small: one record batch per shard
    (v1 / "manifest.json").write_text(json.dumps(manifest))
    proc = run_kd_in_process(*_train_args(v1, student_config, tmp_path / "o1", "--max-steps", "2"))
    assert proc.returncode == 0, proc.stderr
    manifest["settings"]["format_version"] = 99
    (v1 / "manifest.json").write_text(json.dumps(manifest))
    proc = run_kd_in_process(*_train_args(v1, student_config, tmp_path / "o2", "--max-steps", "2"))
    assert_one_line_error(proc, "format version 99", "re-create it")


def _first_use(cache: Path, window: int, batch_size: int) -> dict[int, int]:
    """Step at which each shard is first read, for a 1-process run with these settings (kd's own plan)."""
    reader = CacheReader(cache)
    units = reader.units()
    plan = EpochPlan([u.rows for u in units], OrderSettings(0, window, 1, batch_size=batch_size))
    first: dict[int, int] = {}
    for step, micro in enumerate(plan.steps(0)):
        for _, unit, _ in np.concatenate(micro):
            first.setdefault(units[unit].shard, step)
    return first


@pytest.mark.slow
def test_a_shard_corrupted_mid_run_stops_with_one_line_and_resume_works(tmp_path, base_cache, student_config):
    cache = tmp_path / "cache"
    replicate_cache(base_cache, cache, copies=6, batch_targets=40)  # 6 shards
    first = _first_use(cache, window=6, batch_size=2)
    shard_index, step = max(first.items(), key=lambda kv: kv[1])
    assert step >= 3, first
    shard = cache / CacheReader(cache).shards[shard_index]["file"]
    pristine = shard.read_bytes()
    damaged = bytearray(pristine)
    damaged[len(damaged) // 2] ^= 0xFF  # same size: only the checksum at first open can tell
    shard.write_bytes(bytes(damaged))
    out = tmp_path / "student"
    extra = ["--shuffle-window", "6", "--batch-size", "2", "--save-every", "1", "--prefetch", "1"]
    args = _train_args(cache, student_config, out, *extra)
    proc = run_kd_in_process(*args)
    assert_one_line_error(proc, shard.name, "corrupted")
    logged = [m["step"] for m in metrics(out) if "loss" in m]
    assert logged and max(logged) >= step - 2, logged  # training ran until the data was needed
    assert not (out / "model.safetensors").exists()
    shard.write_bytes(pristine)  # the shard re-created
    resumed = run_kd_in_process(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    reference = tmp_path / "reference"
    assert run_kd_in_process(*_train_args(cache, student_config, reference, *extra)).returncode == 0
    assert_same_weights(reference, out)


@pytest.mark.slow
def test_kill_and_resume_with_a_shuffle_window_and_token_batches(tmp_path, small_units, student_config):
    extra = ["--shuffle-window", "5", "--batch-tokens", "500", "--max-steps", "16", "--save-every", "3"]
    reference = tmp_path / "reference"
    assert run_kd_in_process(*_train_args(small_units, student_config, reference, *extra)).returncode == 0
    out = tmp_path / "killed"
    proc = start_kd(*_train_args(small_units, student_config, out, *extra))
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "checkpoints").glob("step-*/state.pt")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "killed too late"
    resumed = run_kd(*_train_args(small_units, student_config, out, *extra, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(reference, out)
    got = [m["loss"] for m in metrics(out) if "loss" in m]
    want = [m["loss"] for m in metrics(reference) if "loss" in m]
    assert [m["step"] for m in metrics(out) if "loss" in m] == list(range(1, 17))
    assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.slow
def test_two_processes_with_token_batches_match_one(tmp_path, small_units, student_config):
    """2 ranks x 1 micro-batch == 1 rank x 2 accumulated micro-batches, with unequal token counts per rank:
    the loss is normalised by the all-reduced global target count."""
    extra = ["--shuffle-window", "7", "--batch-tokens", "400", "--max-steps", "3", "--seed", "2"]
    single = tmp_path / "single"
    assert (
        run_kd_in_process(
            *_train_args(small_units, student_config, single, *extra, "--accumulation-steps", "2")
        ).returncode
        == 0
    )
    double = tmp_path / "double"
    proc = run_torchrun(*_train_args(small_units, student_config, double, *extra), port="29537")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = [m["loss"] for m in metrics(single) if "loss" in m]
    got = [m["loss"] for m in metrics(double) if "loss" in m]
    assert len(want) == 3 and got == pytest.approx(want, rel=1e-6)
    assert_same_weights(single, double, atol=2e-5)


@pytest.mark.slow
def test_data_corpus_streams_the_same_way(tmp_path, tiny_model_dir, student_config):
    """--data is tokenized once into OUT/prepared/ and streamed: 2 ranks == 1 rank, a rerun reuses it,
    a bad record names its line."""
    corpus = make_corpus(tmp_path / "corpus.jsonl", rows=20)
    common = [
        "train",
        "--data",
        str(corpus),
        "--student",
        str(student_config),
        "--teacher",
        str(tiny_model_dir),
        "--alpha",
        "1.0",
        "--shuffle-window",
        "4",
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--log-every",
        "1",
        "--learning-rate",
        "1e-3",
    ]
    single = tmp_path / "single"
    proc = run_kd_in_process(*common, "--out", str(single), "--accumulation-steps", "2")
    assert proc.returncode == 0, proc.stderr
    prepared = single / "prepared" / "train"
    assert CacheReader(prepared, flag="--data").num_rows == 20
    stamp = (prepared / "manifest.json").stat().st_mtime_ns
    double = tmp_path / "double"
    proc = run_torchrun(*common, "--out", str(double), port="29547")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = [m["loss"] for m in metrics(single) if "loss" in m]
    assert [m["loss"] for m in metrics(double) if "loss" in m] == pytest.approx(want, rel=1e-6)
    assert_same_weights(single, double, atol=2e-5)
    rerun = run_kd_in_process(*common, "--out", str(single), "--accumulation-steps", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert (prepared / "manifest.json").stat().st_mtime_ns == stamp  # reused, not re-tokenized
    assert_same_weights(single, double, atol=2e-5)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(corpus.read_text() + "{not json\n")
    proc = run_kd_in_process(
        *[bad if a == str(corpus) else a for a in map(str, common)], "--out", str(tmp_path / "bad")
    )
    assert_one_line_error(proc, "bad.jsonl:21", "malformed JSON")


def test_init_from_continues_weights_optimizer_and_schedule(tmp_path, base_cache, student_config):
    """Run B starts where run A ended: global step count, learning-rate schedule and weights carry over."""
    schedule = ["--schedule-steps", "6", "--learning-rate", "1e-3", "--warmup-steps", "2"]
    first = tmp_path / "first"
    assert (
        run_kd_in_process(*_train_args(base_cache, student_config, first, "--max-steps", "3", *schedule)).returncode
        == 0
    )
    second = tmp_path / "second"
    proc = run_kd_in_process(
        *_train_args(base_cache, student_config, second, "--max-steps", "3", "--init-from", str(first), *schedule)
    )
    assert proc.returncode == 0, proc.stderr
    whole = tmp_path / "whole"
    assert (
        run_kd_in_process(*_train_args(base_cache, student_config, whole, "--max-steps", "6", *schedule)).returncode
        == 0
    )
    rows = [m for m in metrics(second) if "loss" in m]
    assert [m["step"] for m in rows] == [4, 5, 6]
    assert [m["lr"] for m in rows] == pytest.approx([m["lr"] for m in metrics(whole) if "loss" in m][3:])
    # Started from the first run's weights: its first loss is far below a fresh student's.
    fresh = [m["loss"] for m in metrics(first) if "loss" in m][0]
    assert rows[0]["loss"] < fresh
    assert (second / "checkpoints" / "step-0000006").is_dir()


def test_config_yaml_in_out_reruns_the_training(tmp_path, base_cache, student_config):
    first = tmp_path / "first"
    proc = run_kd_in_process(*_train_args(base_cache, student_config, first, "--max-steps", "2", "--seed", "4"))
    assert proc.returncode == 0, proc.stderr
    assert (first / "config.yaml").is_file()
    second = tmp_path / "second"
    proc = run_kd_in_process("train", "--config", str(first / "config.yaml"), "--out", str(second))
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(first, second)


def test_limit_cuts_inside_a_record_batch(tmp_path, small_units, student_config):
    """--limit N ends in the middle of a record batch: training reads only the first N sequences."""
    units = CacheReader(small_units).units()
    limit = units[0].rows + units[1].rows + 1
    proc = run_kd_in_process(*_train_args(small_units, student_config, tmp_path / "o", "--limit", str(limit), "--json"))
    assert proc.returncode == 0, proc.stderr
    assert f"{limit} sequences" in proc.stderr.replace("\n", " ")
