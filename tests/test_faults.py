"""Faults and bad input (issue 19, item 6): each case as a new user meets it, and what kd must do instead.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/test_faults.py -q

Ctrl-C is a real SIGINT to a real `kd cache-logits` process; damaged caches are real shards deleted or
truncated, then the same command rerun; every refusal is one `kd: error:` line, a non-zero exit and
nothing half-written. The network is never touched (HF_HUB_OFFLINE=1, see tests/helpers.py).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, kd_env, run_kd, start_kd
from tests.test_cache_logits import cache_files, make_corpus


@pytest.fixture()
def corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "corpus.jsonl")


def cache_args(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["cache-logits", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--top-k", "8", *extra]


def wait_for_shards(proc, out: Path, count: int, timeout: float = 300) -> None:
    """Poll until the running stage one has published `count` shards (it is in its main loop)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        manifest = out / "manifest.json"
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= count:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("stage one never reached its main loop")


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_in_cache_logits_says_interrupted_and_exits_130(tmp_path, tiny_model_dir):
    data = make_corpus(tmp_path / "big.jsonl", rows=400)
    out = tmp_path / "cache"
    proc = start_kd(*cache_args(tiny_model_dir, data, out, "--shard-tokens", "40", "--batch-size", "1"))
    wait_for_shards(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.rstrip().splitlines()[-1] == "kd: interrupted", stderr
    assert "Traceback" not in stderr, stderr


def test_ctrl_c_in_any_command_says_interrupted(monkeypatch, capsys):
    """Every command goes through kd.cli.main: a KeyboardInterrupt anywhere is `kd: interrupted`, 130."""
    import kd.cli
    import kd.stages.inspect

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kd.stages.inspect, "CacheReader", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        kd.cli.main(["inspect", "somewhere"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "kd: interrupted"


# ----------------------------------------------------------------------------- damaged caches


def test_rerun_recreates_a_deleted_and_a_truncated_shard(tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "cache"
    args = cache_args(tiny_model_dir, corpus, out, "--shard-tokens", "300", "--json")
    first = run_kd(*args)
    assert first.returncode == 0, first.stderr
    expected = cache_files(out)
    assert len(expected) >= 3
    deleted, truncated = sorted(expected)[1:3]
    (out / deleted).unlink()
    data = (out / truncated).read_bytes()
    (out / truncated).write_bytes(data[:-100])

    again = run_kd(*args, env=kd_env(COLUMNS="1000"))  # log lines unwrapped
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["shards_written"] == 2 and summary["shards_reused"] == len(expected) - 2, summary
    assert deleted in again.stderr and truncated in again.stderr  # said, not silently redone
    verify = run_kd("inspect", str(out), "--verify", "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["verified"], verify.stderr
    assert cache_files(out) == expected  # the same bytes as the uninterrupted run
    assert {p.name for p in out.glob("shard-*")} == set(expected)
