"""`kd cache-logits` and `kd inspect` end to end, through the real CLI in subprocesses.

    .venv/bin/python -m pytest tests/test_cache_logits.py -q

Covers: a verified cache, kill -9 and resume (byte-identical to an uninterrupted run), two ranks
writing one cache, refusal of different settings, and bad input (one line, non-zero exit, no
traceback, nothing half-written).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from kd.cache.reader import CacheReader
from tests.helpers import assert_one_line_error, run_kd, start_kd


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
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["shards_written"] >= 3
    report = json.loads(run_kd("inspect", str(out), "--verify", "--json").stdout)
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
        run_kd(
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
    proc = run_kd(
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
    proc = run_kd(
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
    ]
    reference = tmp_path / "reference"
    assert run_kd("cache-logits", *args, "--out", str(reference)).returncode == 0
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
    # An interrupted cache is refused by readers until resumed.
    from kd.pipeline.errors import KdError

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
    ]
    procs = [start_kd("cache-logits", *args, "--rank", str(r)) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    report = json.loads(run_kd("inspect", str(out), "--verify", "--json").stdout)
    assert report["complete"] and report["verified"] and report["rows"] == 24
    rows = sorted(seq.row for seq in CacheReader(out).iter_sequences())
    assert rows == list(range(24))
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["rank"] for s in manifest["shards"]} == {0, 1}


def test_different_settings_are_refused(tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "cache"
    assert (
        run_kd(
            "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(out), "--top-k", "8"
        ).returncode
        == 0
    )
    proc = run_kd(
        "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(out), "--top-k", "16"
    )
    assert_one_line_error(proc, "different settings", "k: 8 -> 16")


def test_corrupted_shard_fails_verify(tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "cache"
    assert (
        run_kd(
            "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(out), "--top-k", "8"
        ).returncode
        == 0
    )
    shard = sorted(out.glob("shard-*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert_one_line_error(run_kd("inspect", str(out), "--verify"), shard.name, "sha256 mismatch")


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
    proc = run_kd("cache-logits", *teacher, "--data", str(corpus), "--out", str(out), *flags)
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
    proc = run_kd(
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
    inspect = run_kd("inspect", str(out), "--verify", "--json")
    assert inspect.returncode == 0, inspect.stderr
    report = json.loads(inspect.stdout)
    assert report["complete"] and report["rows"] == 200 and report["k"] == 64
    assert report["teacher"]["name"].lower().startswith("smollm2-135m-instruct")
    # GSM8K answers are ~100+ tokens each; a real teacher covers most of its mass with 64 ids.
    assert report["targets"] > 200 * 50
    assert 0.8 < report["topk_mass_mean"] <= 1.0
    assert report["bytes_per_target_token"] < 400
