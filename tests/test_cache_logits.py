"""`kd cache-logits` and `kd inspect` end to end, through the real CLI.

    .venv/bin/python -m pytest tests/test_cache_logits.py -q

Covers: a verified cache, kill -9 and resume (byte-identical to an uninterrupted run), two ranks
writing one cache, both on a corpus streamed in several blocks; the memory stage one holds (counted
sequences, bounded by block/window/shard settings, not by the corpus); a bad record met mid-stream
(named, earlier shards kept and reused once it is fixed); batched tokenization equal to the
per-record path; refusal of different settings, and bad input (one line, non-zero exit, no
traceback, nothing half-written). Real processes: the end-to-end run, kill -9 and resume, two ranks
and the inspect of their cache, --debug and the GSM8K acceptance run; the rest runs the same CLI in
this process (tests/helpers.py: run_kd_in_process).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from kd.cache.reader import CacheReader
from tests.helpers import assert_one_line_error, kd_env, run_kd, run_kd_in_process, start_kd


def make_corpus(path: Path, rows: int = 24) -> Path:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(rows):
            a, b = rng.integers(2, 50, 2)
            words = " ".join(["then"] * int(rng.integers(1, 30)))
            f.write(
                json.dumps(
                    {
                        "question": f"Sam has {a} pens and gets {b} more. How many? {words}",
                        "answer": f"Sam has {a} + {b} = {a + b} pens. {words}\n#### {a + b}",
                    }
                )
                + "\n"
            )
    return path


@pytest.fixture()
def corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "corpus.jsonl")


def cache_files(cache: Path) -> dict[str, str]:
    manifest = json.loads((cache / "manifest.json").read_text())
    return {s["file"]: s["sha256"] for s in manifest["shards"]}


def test_cache_then_inspect_verify(tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "cache"
    proc = run_kd(
        "cache-logits",
        "--teacher",
        str(tiny_model_dir),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--top-k",
        "16",
        "--shard-tokens",
        "300",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # --json: stdout is exactly one JSON object
    assert summary["complete"] and summary["shards_written"] >= 3
    assert summary["tokens"] > summary["targets"] > 0 and 0 < summary["teacher_share"] <= 1
    assert summary["tokens_per_second"] > 0 and summary["targets_per_second"] > 0
    report = json.loads(run_kd_in_process("inspect", str(out), "--verify", "--json").stdout)
    assert report["verified"] and report["complete"]
    assert report["rows"] == 24 and report["targets"] == summary["targets"]
    assert 0 < report["bytes_per_target_token"] < 16 * 8
    assert 0 < report["topk_mass_mean"] <= 1.01  # q64 rounding can push a near-1 sum just over 1
    # Every stored sequence has one teacher entry per target, ids within the vocab, sorted values.
    reader = CacheReader(out)
    for seq in reader.iter_sequences():
        n_targets = int(seq.loss_mask[1:].sum())
        assert seq.teacher.ids.shape == (n_targets, 16)
        assert (np.diff(seq.teacher.logprobs, axis=1) <= 0).all()
        total = np.exp(seq.teacher.logprobs.astype(np.float64)).sum(1) + np.exp(seq.teacher.tail.astype(np.float64))
        np.testing.assert_allclose(total, 1.0, atol=0.02)
    # Rerunning the finished command writes nothing new.
    again = json.loads(
        run_kd_in_process(
            "cache-logits",
            "--teacher",
            str(tiny_model_dir),
            "--data",
            str(corpus),
            "--out",
            str(out),
            "--top-k",
            "16",
            "--shard-tokens",
            "300",
            "--json",
        ).stdout.splitlines()[-1]
    )
    assert again["shards_written"] == 0 and again["shards_reused"] == summary["shards_written"]


def test_rs_mode_cache(tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "cache-rs"
    proc = run_kd_in_process(
        "cache-logits",
        "--teacher",
        str(tiny_model_dir),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--sampling",
        "rs",
        "--samples",
        "32",
    )
    assert proc.returncode == 0, proc.stderr
    reader = CacheReader(out)
    assert reader.mode == "rs"
    for seq in reader.iter_sequences():
        assert all(int(c.sum()) == 32 for c in seq.teacher.counts)
        assert len(seq.teacher.ids) == int(seq.loss_mask[1:].sum())


def test_adaptive_topk_cache(tmp_path, corpus, tiny_model_dir):
    """--mass-epsilon stores only the leading ids holding 1 - eps of the mass; the rest is tail."""
    out = tmp_path / "cache-adaptive"
    proc = run_kd_in_process(
        "cache-logits",
        "--teacher",
        str(tiny_model_dir),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--top-k",
        "32",
        "--mass-epsilon",
        "0.5",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["settings"]["mass_epsilon"] == 0.5
    kept = []
    for seq in CacheReader(out).iter_sequences():
        valid = np.isfinite(seq.teacher.logprobs)
        kept += list(valid.sum(axis=1))
        probs = np.exp(seq.teacher.logprobs.astype(np.float64))  # 0 on empty slots
        smallest_kept = np.where(valid, probs, np.inf).min(axis=1)
        # Every kept id was needed: without the smallest, the kept ids hold less than 1 - eps.
        assert (probs.sum(axis=1) - smallest_kept < 0.5 + 1e-3).all()
        np.testing.assert_allclose(probs.sum(axis=1) + np.exp(seq.teacher.tail.astype(np.float64)), 1.0, atol=0.02)
    assert min(kept) >= 1 and max(kept) <= 32


@pytest.mark.slow
def kill_mid_run(tmp_path: Path, args: list[str]) -> tuple[Path, dict[str, str], dict[str, str]]:
    """Cache `args` uninterrupted (the reference), then again in a real process killed -9 once two shards
    are done; returns (the killed cache, the reference's files, the files the kill left)."""
    reference = tmp_path / "reference"
    assert run_kd_in_process("cache-logits", *args, "--out", str(reference)).returncode == 0
    expected = cache_files(reference)
    assert len(expected) >= 8

    out = tmp_path / "killed"
    proc = start_kd("cache-logits", *args, "--out", str(out))
    deadline = time.time() + 300
    while time.time() < deadline:
        manifest = out / "manifest.json"
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = cache_files(out)
    assert 2 <= len(partial) < len(expected), "the kill should land mid-run"
    return out, expected, partial


def test_kill_and_resume_gives_the_same_cache(tmp_path, corpus, tiny_model_dir):
    args = [
        "--teacher",
        str(tiny_model_dir),
        "--data",
        str(corpus),
        "--top-k",
        "8",
        "--shard-tokens",
        "40",
        "--batch-size",
        "1",
        "--block-records",
        "5",  # 24 records: the corpus streams in 5 blocks
        "--window-tokens",
        "150",
    ]
    out, expected, partial = kill_mid_run(tmp_path, args)
    # An interrupted cache is refused by readers until resumed.
    from kd.errors import KdError

    with pytest.raises(KdError, match="incomplete"):
        CacheReader(out)

    resumed = run_kd("cache-logits", *args, "--out", str(out), "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.splitlines()[-1])
    assert summary["shards_reused"] == len(partial)
    assert cache_files(out) == expected
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_two_ranks_write_one_cache(tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "cache"
    args = [
        "--teacher",
        str(tiny_model_dir),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--top-k",
        "8",
        "--world-size",
        "2",
        "--shard-tokens",
        "200",
        "--block-records",
        "5",
        "--batch-tokens",
        "2048",
    ]
    # One OpenMP thread each: two processes of two threads on CI's two cores spin in OpenMP barriers.
    procs = [start_kd("cache-logits", *args, "--rank", str(r), env=kd_env(OMP_NUM_THREADS="1")) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    report = json.loads(run_kd("inspect", str(out), "--verify", "--json").stdout)  # the one real kd inspect
    assert report["complete"] and report["verified"] and report["rows"] == 24
    rows = sorted(seq.row for seq in CacheReader(out).iter_sequences())
    assert rows == list(range(24))
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["rank"] for s in manifest["shards"]} == {0, 1}


def test_different_settings_are_refused(tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "cache"
    assert (
        run_kd_in_process(
            "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(out), "--top-k", "8"
        ).returncode
        == 0
    )
    proc = run_kd_in_process(
        "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(out), "--top-k", "16"
    )
    assert_one_line_error(proc, "different settings", "k: 8 -> 16")


def test_corrupted_shard_fails_verify(tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "cache"
    assert (
        run_kd_in_process(
            "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(out), "--top-k", "8"
        ).returncode
        == 0
    )
    shard = sorted(out.glob("shard-*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert_one_line_error(run_kd_in_process("inspect", str(out), "--verify"), shard.name, "sha256 mismatch")


@pytest.mark.parametrize(
    "records, flags, fragments",
    [
        (['{"question": "a", "answer": "b"}', "{oops"], [], ["corpus.jsonl:2", "malformed JSON"]),
        (['{"foo": "bar"}'], [], ["corpus.jsonl:1", "unknown record format"]),
        (['{"conversations": [{"role": "user", "content": "hi"}]}'], [], ["corpus.jsonl:1", "no assistant turn"]),
        ([], [], ["empty corpus"]),
        (['{"question": "a", "answer": "b"}'], ["--data-format", "nope"], ["--data-format nope"]),
        (['{"question": "a", "answer": "b"}'], ["--top-k", "100000"], ["--top-k 100000", "vocabulary"]),
        (['{"question": "a", "answer": "b"}'], ["--teacher", "/no/such/model"], ["--teacher /no/such/model"]),
        (['{"question": "a", "answer": "b"}'], ["--engine", "magic"], ["--engine magic"]),
        (['{"question": "a", "answer": "b"}'], ["--batch-tokens", "100"], ["--batch-tokens 100", "--max-seq-len"]),
        (['{"question": "a", "answer": "b"}'], ["--block-records", "0"], ["--block-records"]),
        (['{"question": "a", "answer": "b"}'], ["--mass-epsilon", "1.5"], ["--mass-epsilon must be in [0, 1)"]),
        (['{"question": "a", "answer": "b"}'], ["--mass-epsilon", "0.1", "--sampling", "rs"], ["--mass-epsilon"]),
        (
            ['{"question": "' + "long " * 300 + '", "answer": "b"}'],
            ["--max-seq-len", "64", "--overflow", "skip"],
            ["no usable records", "skipped"],
        ),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_cache(tmp_path, tiny_model_dir, records, flags, fragments):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(r + "\n" for r in records))
    out = tmp_path / "cache"
    teacher = [] if "--teacher" in flags else ["--teacher", str(tiny_model_dir)]
    proc = run_kd_in_process("cache-logits", *teacher, "--data", str(corpus), "--out", str(out), *flags)
    assert_one_line_error(proc, *fragments)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("shard-*")) if out.exists() else True


def test_debug_shows_the_traceback(tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("{oops\n")
    proc = run_kd(
        "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(tmp_path / "c"), "--debug"
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_truncation_is_counted(tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        json.dumps({"question": "q " * 10, "answer": "long answer " * 100})
        + "\n"
        + json.dumps({"question": "short", "answer": "ok"})
        + "\n"
    )
    proc = run_kd_in_process(
        "cache-logits",
        "--teacher",
        str(tiny_model_dir),
        "--data",
        str(corpus),
        "--out",
        str(tmp_path / "c"),
        "--max-seq-len",
        "64",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["rows_truncated"] == 1 and summary["rows_skipped"] == 0
    assert "truncated" in proc.stderr


@pytest.mark.slow
def test_embedded_teacher_on_gsm8k(tmp_path, gsm8k_train):
    """The issue's acceptance run: the embedded SmolLM2 teacher over the first 200 GSM8K problems."""
    out = tmp_path / "gsm8k-cache"
    proc = run_kd(
        "cache-logits", "--data", str(gsm8k_train), "--limit", "200", "--out", str(out), "--json", timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    inspect = run_kd_in_process("inspect", str(out), "--verify", "--json")
    assert inspect.returncode == 0, inspect.stderr
    report = json.loads(inspect.stdout)
    assert report["complete"] and report["rows"] == 200 and report["k"] == 64
    assert report["teacher"]["name"].lower().startswith("smollm2-135m-instruct")
    # GSM8K answers are ~100+ tokens each; a real teacher covers most of its mass with 64 ids.
    assert report["targets"] > 200 * 50
    assert 0.8 < report["topk_mass_mean"] <= 1.0
    assert report["bytes_per_target_token"] < 400


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_stage_one_memory_is_bounded_by_settings(tmp_path, tiny_model_dir):
    """Sequences held at once (tokenized, not yet handed to the writer) are bounded by block and shard
    sizes, however long the corpus: counted by the pipeline itself, not inferred from timings."""
    from kd.cache.format import cut_points
    from kd.pipeline.capture.corpus import PREFETCH_BLOCKS

    corpus = make_corpus(tmp_path / "long.jsonl", rows=96)
    out = tmp_path / "cache"
    block = 4
    summary = _summary(
        run_kd_in_process(
            "cache-logits",
            "--teacher",
            str(tiny_model_dir),
            "--data",
            str(corpus),
            "--out",
            str(out),
            "--top-k",
            "4",
            "--shard-tokens",
            "150",
            "--window-tokens",
            "120",
            "--block-records",
            str(block),
            "--batch-tokens",
            "2048",
            "--json",
        )
    )
    manifest = json.loads((out / "manifest.json").read_text())
    # The window and the record batch being filled both lie inside the current shard; the reader
    # holds the block it tokenizes, PREFETCH_BLOCKS queued and the one being consumed.
    bound = (PREFETCH_BLOCKS + 2) * block + max(s["rows"] for s in manifest["shards"])
    assert summary["rows_read"] == 96
    assert 0 < summary["peak_sequences_held"] <= bound < 96 // 2, (summary["peak_sequences_held"], bound)
    # Record batches were cut while streaming exactly where cut_points cuts the whole shard.
    targets_of = {seq.row: int(seq.loss_mask[1:].sum()) for seq in CacheReader(out).iter_sequences()}
    for shard in manifest["shards"]:
        counts = [targets_of[r] for r in range(shard["first_row"], shard["last_row"] + 1)]
        ends = cut_points(counts, 4096)
        assert [b[0] for b in shard["batches"]] == list(np.diff([0, *ends]))


def test_bad_record_mid_stream_keeps_earlier_shards(tmp_path, tiny_model_dir):
    """A bad record past the first block is named by line; the shards before it are kept and, once
    the record is fixed, reused: the result equals a clean run byte for byte."""
    good = make_corpus(tmp_path / "good.jsonl", rows=24)
    lines = good.read_text().splitlines()
    bad = tmp_path / "corpus.jsonl"
    bad.write_text("\n".join(lines[:20] + ["{oops"] + lines[21:]) + "\n")
    args = ["--teacher", str(tiny_model_dir), "--top-k", "4", "--shard-tokens", "100", "--block-records", "4"]
    out = tmp_path / "cache"
    assert_one_line_error(
        run_kd_in_process("cache-logits", *args, "--data", str(bad), "--out", str(out)), "corpus.jsonl:21"
    )
    kept = cache_files(out)
    assert kept, "shards finished before the bad record stay written"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    bad.write_text(good.read_text())  # the user fixes the record
    summary = _summary(run_kd_in_process("cache-logits", *args, "--data", str(bad), "--out", str(out), "--json"))
    assert summary["shards_reused"] == len(kept) and summary["complete"]
    reference = tmp_path / "reference"
    _summary(run_kd_in_process("cache-logits", *args, "--data", str(good), "--out", str(reference), "--json"))
    assert cache_files(out) == cache_files(reference)

    # Changing a record that a written shard holds is refused, naming the shard.
    bad.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    assert_one_line_error(
        run_kd_in_process("cache-logits", *args, "--data", str(bad), "--out", str(out)),
        "changed since",
        "shard-r000-00000",
    )


def test_batched_tokenization_equals_per_record(smollm2_tokenizer):
    from kd.pipeline.data import Example, encode_examples, tokenize_example

    chat = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 + 3 = 5."}]
    examples = [
        Example("a:1", messages=chat),
        Example("a:2", text="plain pre-training text " * 20),
        Example("a:3", messages=chat + [{"role": "user", "content": "And 4?"}, {"role": "assistant", "content": "9"}]),
        Example("a:4", messages=[{"role": "user", "content": "long " * 80}, {"role": "assistant", "content": "ok"}]),
    ]
    for max_len, overflow in ((2048, "truncate"), (40, "truncate"), (40, "skip")):
        expected = [tokenize_example(e, smollm2_tokenizer, max_len, overflow) for e in examples]
        got = encode_examples(examples, smollm2_tokenizer, max_len, overflow)
        for e, g in zip(expected, got, strict=True):
            assert (e is None) == (g is None)
            if e is not None:
                assert g.input_ids.tolist() == e.input_ids and g.loss_mask.astype(int).tolist() == e.loss_mask
                assert g.truncated == e.truncated


def test_token_budget_batches_and_streamed_cuts():
    from kd.cache.format import cut_points
    from kd.pipeline.capture.plan import RunningCut, length_sorted_batches
    from kd.pipeline.engines.teacher import SequenceToScore

    rng = np.random.default_rng(0)
    seqs = [
        SequenceToScore(i, np.zeros(int(n), np.int32), np.ones(int(n), bool))
        for i, n in enumerate(rng.integers(2, 300, 200))
    ]
    batches = length_sorted_batches(seqs, 8, batch_tokens=1024)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        assert len(b) * max(len(seqs[i].input_ids) for i in b) <= 1024
    assert all(len(b) == 8 for b in length_sorted_batches(seqs, 8)[:-1])  # --batch-size still works
    counts = rng.integers(0, 900, 500)
    cut = RunningCut(4096)
    ends = [i + 1 for i, n in enumerate(counts) if cut.add(int(n))]
    assert ends + ([500] if ends[-1] != 500 else []) == cut_points(counts, 4096)
