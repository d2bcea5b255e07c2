"""Faults and bad input (issue 19, item 6): each case as a new user meets it, and what kd must do instead.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/test_faults.py -q

Ctrl-C is a real SIGINT to a real `kd cache-logits` process, and the run a second one collides with is
a real process too; damaged caches are real shards deleted or truncated, then the same command rerun;
every refusal is one `kd: error:` line, a non-zero exit and nothing half-written. Commands other than
those two real processes run through the same CLI in this process (tests/helpers.py: run_kd_in_process).
The network is never touched (HF_HUB_OFFLINE=1, see tests/helpers.py).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from kd.errors import KdError
from tests.helpers import assert_one_line_error, kd_env, run_kd_in_process, start_kd
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
    first = run_kd_in_process(*args)
    assert first.returncode == 0, first.stderr
    expected = cache_files(out)
    assert len(expected) >= 3
    deleted, truncated = sorted(expected)[1:3]
    (out / deleted).unlink()
    data = (out / truncated).read_bytes()
    (out / truncated).write_bytes(data[:-100])

    again = run_kd_in_process(*args, env=kd_env(COLUMNS="1000"))  # log lines unwrapped
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["shards_written"] == 2 and summary["shards_reused"] == len(expected) - 2, summary
    assert deleted in again.stderr and truncated in again.stderr  # said, not silently redone
    verify = run_kd_in_process("inspect", str(out), "--verify", "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["verified"], verify.stderr
    assert cache_files(out) == expected  # the same bytes as the uninterrupted run
    assert {p.name for p in out.glob("shard-*")} == set(expected)


# ----------------------------------------------------------------------------- settings checked up front


@pytest.mark.parametrize(
    "flag, value, named",
    [
        ("distill_temperature", 0.0, "--distill-temperature"),
        ("learning_rate", -1.0, "--learning-rate"),
        ("alpha", 2.0, "--alpha"),
    ],
)
def test_on_policy_training_flags_are_checked_before_anything_runs(tmp_path, flag, value, named):
    from kd.pipeline.onpolicy import OnPolicyConfig

    with pytest.raises(KdError, match=f"^{named} ") as info:
        OnPolicyConfig(out=str(tmp_path / "run"), prompts="p.jsonl", student_from_teacher=True, **{flag: value})
    assert "--temperature" not in str(info.value).replace("--distill-temperature", "")
    assert not (tmp_path / "run").exists()


def test_on_policy_bad_distill_temperature_writes_nothing(tmp_path):
    out = tmp_path / "run"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    proc = run_kd_in_process(
        "on-policy", "--prompts", str(prompts), "--student-from-teacher", "--out", str(out),
        "--prompts-per-round", "4", "--distill-temperature", "0",
    )  # fmt: skip
    assert_one_line_error(proc, "--distill-temperature must be > 0")
    assert not out.exists()


def test_cache_logits_bad_dtype_writes_nothing(tmp_path, corpus):
    out = tmp_path / "cache"
    proc = run_kd_in_process("cache-logits", "--data", str(corpus), "--out", str(out), "--dtype", "foo")
    assert_one_line_error(proc, "--dtype foo")
    assert not out.exists()


def test_a_manifest_without_shards_does_not_bind_settings(tmp_path, tiny_model_dir):
    """What a run refused or killed before its first shard left behind does not refuse the corrected command."""
    data = make_corpus(tmp_path / "small.jsonl", rows=3)
    out = tmp_path / "cache"
    out.mkdir()
    stale = {"kd_version": "0", "settings": {"dtype": "foo", "mode": "topk"}, "shards": [], "ranks": {}}
    (out / "manifest.json").write_text(json.dumps({**stale, "complete": False}))
    proc = run_kd_in_process(*cache_args(tiny_model_dir, data, out, "--dtype", "float32"))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["settings"]["dtype"] == "float32" and manifest["shards"]


# ----------------------------------------------------------------------------- models


def test_missing_local_path_with_one_slash_is_not_a_hub_id(tmp_path, monkeypatch):
    from kd.pipeline.models import resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "students").mkdir()
    for offline in ("1", "0"):  # a local parent directory decides it even with the hub reachable
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", offline)
        with pytest.raises(KdError, match="--model students/nope: no such file or directory"):
            resolve_model("students/nope", "--model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, and not in the hub cache: no such file either
    with pytest.raises(KdError, match="no such file or directory"):
        resolve_model("some-org/some-model", "--model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")  # online: left to the hub (resolving asks nothing yet)
    assert resolve_model("some-org/some-model", "--model").kind == "hub"


def test_eval_of_a_missing_student_is_one_line_at_once(tmp_path, corpus):
    start = time.time()
    proc = run_kd_in_process("eval", "--model", "students/nope", "--data", str(corpus))
    assert_one_line_error(proc, "students/nope: no such file or directory")
    assert time.time() - start < 60


# ----------------------------------------------------------------------------- one line, not "internal error"


@pytest.mark.parametrize("out", ["file", "/sys/kd-cache"])
def test_cache_logits_out_that_cannot_be_a_cache(tmp_path, corpus, tiny_model_dir, out):
    if out == "file":
        out = tmp_path / "taken"
        out.write_text("not a directory\n")
        expected = "exists and is not a directory"
    else:  # /sys refuses every mkdir, even root's (tests may run as root, where chmod would not)
        expected = "not writable"
    proc = run_kd_in_process(*cache_args(tiny_model_dir, corpus, Path(out)))
    assert_one_line_error(proc, f"--out {out}", expected)


def test_device_cuda_without_cuda_is_one_line(tmp_path, corpus):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_kd_in_process("cache-logits", "--data", str(corpus), "--out", str(tmp_path / "c"), "--device", "cuda")
    assert_one_line_error(proc, "--device cuda", "CUDA is not available")
    assert not (tmp_path / "c").exists()
    with pytest.raises(KdError, match="--device cuda:0: CUDA is not available"):
        from kd.pipeline.evaluation.model_eval import EvalConfig

        EvalConfig(model="m", data="d.jsonl", device="cuda:0")


@pytest.mark.parametrize("content", ["[]", "{}", '{"settings": {}, "complete": true}', "{not json"])
def test_a_manifest_that_is_not_a_cache_is_one_line(tmp_path, content):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(content)
    line = assert_one_line_error(run_kd_in_process("inspect", str(cache)), "manifest.json: corrupt manifest")
    assert "internal error" not in line
    student = tmp_path / "student.json"
    train = run_kd_in_process(
        "train", "--from-cache", str(cache), "--student", str(student), "--out", str(tmp_path / "s")
    )
    assert_one_line_error(train, "manifest.json: corrupt manifest")


def test_inspect_names_no_flag_it_does_not_have(tmp_path):
    line = assert_one_line_error(run_kd_in_process("inspect", str(tmp_path)), "kd inspect", "not a kd cache")
    assert "--from-cache" not in line


def test_broken_yaml_config_is_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("top_k: 8\n  data: [unclosed\n")
    proc = run_kd_in_process("cache-logits", "--config", str(config), "--print-config")
    line = assert_one_line_error(proc, f"--config {config}: not valid YAML (line 2")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert line


# ----------------------------------------------------------------------------- concurrency and clobbering


def test_refused_non_empty_out_is_left_untouched(tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert_one_line_error(run_kd_in_process(*cache_args(tiny_model_dir, corpus, out)), "not empty")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_two_cache_logits_into_one_out_at_once_are_refused(tmp_path, tiny_model_dir):
    data = make_corpus(tmp_path / "big.jsonl", rows=400)
    out = tmp_path / "cache"
    args = cache_args(tiny_model_dir, data, out, "--shard-tokens", "40", "--batch-size", "1")
    first = start_kd(*args)
    try:
        wait_for_shards(first, out, 1)
        second = run_kd_in_process(*args)
        assert_one_line_error(second, f"--out {out}", "another kd cache-logits")
        assert first.poll() is None  # the first run carries on
    finally:
        first.kill()
        first.wait()


# ----------------------------------------------------------------------------- data


def _gsm8k(i: int) -> str:
    return json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})


def test_utf8_bom_is_not_part_of_line_1(tmp_path):
    from kd.pipeline.data import iter_examples

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{_gsm8k(1)}\n{_gsm8k(2)}\n".encode())
    assert [e.source for e in iter_examples(path)] == [f"{path}:1", f"{path}:2"]


def test_a_directory_as_data_says_so(tmp_path):
    from kd.pipeline.data import iter_examples

    with pytest.raises(KdError, match="is a directory"):
        list(iter_examples(tmp_path))


def test_mixed_record_formats_name_the_line_and_where_the_format_came_from(tmp_path):
    from kd.pipeline.data import iter_examples

    path = tmp_path / "mixed.jsonl"
    path.write_text(f"{_gsm8k(1)}\n{_gsm8k(2)}\n" + json.dumps({"text": "plain text"}) + "\n")
    with pytest.raises(KdError) as info:
        list(iter_examples(path))
    assert str(info.value).startswith(
        f"{path}:3: a text record, but this file's format is gsm8k (detected from {path}:1)"
    )
    assert list(iter_examples(path, limit=2))  # the records before it are fine


def test_a_truncated_zstd_corpus_is_refused_naming_the_line(tmp_path):
    import zstandard

    from kd.pipeline.data import iter_raw_records

    text = "".join(f"{_gsm8k(i)}\n" for i in range(20000)).encode()
    whole = tmp_path / "whole.jsonl.zst"
    frames = [zstandard.ZstdCompressor().compress(part) for part in (text[: len(text) // 2], text[len(text) // 2 :])]
    whole.write_bytes(b"".join(frames))  # two frames, the split inside a record
    assert [r for _, r in iter_raw_records(whole)] == [json.loads(line) for line in text.decode().splitlines()]
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(whole.read_bytes()[:-1000])
    with pytest.raises(KdError, match=r"cut.jsonl.zst: truncated zstd stream \(.*after line \d+\)"):
        list(iter_raw_records(cut))
    small = tmp_path / "small.jsonl.zst"  # one short frame cut: it used to read as an empty corpus
    small.write_bytes(zstandard.ZstdCompressor().compress(text[:500])[:-20])
    with pytest.raises(KdError, match="truncated zstd stream"):
        list(iter_raw_records(small))


def test_on_policy_out_that_cannot_be_a_run_directory(tmp_path):
    from kd.pipeline.onpolicy.state import RunDirectory

    taken = tmp_path / "taken"
    taken.write_text("a file\n")
    with pytest.raises(KdError, match="exists and is not a directory"):
        RunDirectory(taken)
    with pytest.raises(KdError, match="--out /sys/kd-run: not writable"):
        RunDirectory(Path("/sys/kd-run"))
