"""`kd train`: cached KD, online KD, SFT; accumulation and DDP invariance; kill and resume; bad input.

    .venv/bin/python -m pytest tests/test_train.py -q

Tiny random Llama teachers/students with the real SmolLM2 tokenizer; the CLI runs in real
subprocesses (torchrun for DDP, SIGKILL for resume).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    REPO,
    assert_one_line_error,
    kd_env,
    kill_train_at_first_checkpoint,
    run_kd,
    run_kd_in_process,
)
from tests.test_cache_logits import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data") / "corpus.jsonl", rows=32)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("heldout") / "heldout.jsonl", rows=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, corpus, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("caches") / "train"
    proc = run_kd_in_process(
        "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(out), "--top-k", "16"
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory, heldout, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("caches") / "eval"
    proc = run_kd_in_process(
        "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(heldout), "--out", str(out), "--top-k", "16"
    )
    assert proc.returncode == 0, proc.stderr
    return out


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=key)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cached_kd_end_to_end(tmp_path, cache, eval_cache, student_config, tiny_model_dir):
    out = tmp_path / "student"
    proc = run_kd(
        "train",
        "--from-cache",
        str(cache),
        "--student",
        str(student_config),
        "--out",
        str(out),
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--eval-cache",
        str(eval_cache),
        "--eval-every",
        "3",
        "--save-every",
        "3",
        "--log-every",
        "1",
        "--learning-rate",
        "1e-3",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["steps"] == 6
    logged = metrics(out)
    train_rows = [m for m in logged if "loss" in m]
    eval_rows = [m for m in logged if "eval_kl" in m]
    assert [m["step"] for m in train_rows] == list(range(1, 7))
    assert [m["step"] for m in eval_rows] == [3, 6]
    assert eval_rows[-1]["eval_kl"] < eval_rows[0]["eval_kl"] or eval_rows[-1]["eval_ce"] < eval_rows[0]["eval_ce"]
    for key in ("eval_ce", "eval_kl", "eval_top1_agreement", "eval_ece"):
        assert key in eval_rows[-1]
    # The student is a Hugging Face directory that transformers loads and runs.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template
    ids = tokenizer("Hello", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tokenizer)
    assert (out / "checkpoints").is_dir()


def test_accumulation_is_invariant(tmp_path, cache, student_config):
    """4 sequences x 1 step == 2 sequences x 2 accumulation steps (global token normalisation)."""
    common = [
        "train",
        "--from-cache",
        str(cache),
        "--student",
        str(student_config),
        "--max-steps",
        "3",
        "--learning-rate",
        "1e-3",
        "--seed",
        "3",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_kd_in_process(*common, "--out", str(a), "--batch-size", "4").returncode == 0
    assert run_kd_in_process(*common, "--out", str(b), "--batch-size", "2", "--accumulation-steps", "2").returncode == 0
    assert_same_weights(a, b, atol=2e-6)


def sharded_common(cache: Path, student_config: Path) -> list[str]:
    return [
        "train",
        "--from-cache",
        str(cache),
        "--student",
        str(student_config),
        "--max-steps",
        "3",
        "--learning-rate",
        "1e-3",
        "--seed",
        "5",
        "--log-every",
        "1",
    ]


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache, student_config) -> Path:
    """1 process x 4 sequences: the run both torchrun tests (DDP, FSDP2) compare with, trained once."""
    out = tmp_path_factory.mktemp("single") / "single"
    assert (
        run_kd_in_process(*sharded_common(cache, student_config), "--out", str(out), "--batch-size", "4").returncode
        == 0
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("sharding", "port"), [("ddp", "29517"), ("fsdp", "29527")])
def test_two_processes_match_one(tmp_path, cache, eval_cache, student_config, single, sharding, port):
    """torchrun with 2 gloo processes x 2 sequences == 1 process x 4 sequences, with DDP and with FSDP2."""
    common = sharded_common(cache, student_config)
    double = tmp_path / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            port,
            "-m",
            "kd.cli",
            *common,
            "--out",
            str(double),
            "--batch-size",
            "2",
            *(["--fsdp", "--save-every", "2", "--eval-cache", str(eval_cache)] if sharding == "fsdp" else []),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=kd_env(OMP_NUM_THREADS="1"),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Same losses at every step, and the same weights up to the order of the gloo reduction (Adam
    # turns a last-bit difference in a near-zero gradient into a few-1e-6 step for that element).
    single_losses = [m["loss"] for m in metrics(single) if "loss" in m]
    ddp_losses = [m["loss"] for m in metrics(double) if "loss" in m]
    assert len(single_losses) == 3
    assert ddp_losses == pytest.approx(single_losses, rel=1e-6)
    assert_same_weights(single, double, atol=2e-5)
    if sharding == "fsdp":  # the gathered checkpoint holds full weights; eval ran on the gathered head
        assert (double / "checkpoints").is_dir()
        assert any("eval_kl" in m for m in metrics(double))


@pytest.mark.slow
def test_kill_and_resume_ends_where_an_uninterrupted_run_does(tmp_path, cache, student_config):
    common = [
        "train",
        "--from-cache",
        str(cache),
        "--student",
        str(student_config),
        "--max-steps",
        "24",
        "--batch-size",
        "1",
        "--save-every",
        "4",
        "--learning-rate",
        "1e-3",
        "--log-every",
        "1",
    ]
    reference = tmp_path / "reference"
    assert run_kd_in_process(*common, "--out", str(reference)).returncode == 0

    out = tmp_path / "killed"
    kill_train_at_first_checkpoint(common, out)

    resumed = run_kd(*common, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert_same_weights(reference, out)
    assert [m["step"] for m in metrics(out) if "loss" in m] == list(range(1, 25))
    ref_losses = [m["loss"] for m in metrics(reference) if "loss" in m]
    got_losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert got_losses == pytest.approx(ref_losses, abs=1e-6)


def test_student_from_teacher_copies_the_chosen_layers(tmp_path, cache, tiny_model_dir):
    out = tmp_path / "cut"
    proc = run_kd_in_process(
        "train",
        "--from-cache",
        str(cache),
        "--student-from-teacher",
        "--layers",
        "1",
        "--out",
        str(out),
        "--max-steps",
        "1",
        "--learning-rate",
        "1e-12",
    )
    assert proc.returncode == 0, proc.stderr
    student, teacher = weights(out), load_file(str(tiny_model_dir / "model.safetensors"))
    torch.testing.assert_close(
        student["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.1.mlp.up_proj.weight"], atol=1e-6, rtol=0
    )
    assert not any(k.startswith("model.layers.1.") for k in student)


def test_online_kd_and_sft_run(tmp_path, corpus, tiny_model_dir, student_config):
    online = tmp_path / "online"
    proc = run_kd_in_process(
        "train",
        "--teacher",
        str(tiny_model_dir),
        "--data",
        str(corpus),
        "--student",
        str(student_config),
        "--out",
        str(online),
        "--max-steps",
        "3",
        "--log-every",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert all(m["divergence"] > 0 for m in metrics(online) if "loss" in m)
    sft = tmp_path / "sft"
    proc = run_kd_in_process(
        "train",
        "--data",
        str(corpus),
        "--student",
        str(student_config),
        "--teacher",
        str(tiny_model_dir),
        "--out",
        str(sft),
        "--max-steps",
        "2",
        "--alpha",
        "1.0",
        "--log-every",
        "1",
    )
    assert proc.returncode == 0, proc.stderr


def test_rs_cache_trains(tmp_path, corpus, tiny_model_dir, student_config):
    rs = tmp_path / "rs-cache"
    assert (
        run_kd_in_process(
            "cache-logits",
            "--teacher",
            str(tiny_model_dir),
            "--data",
            str(corpus),
            "--out",
            str(rs),
            "--sampling",
            "rs",
            "--samples",
            "16",
        ).returncode
        == 0
    )
    out = tmp_path / "student"
    proc = run_kd_in_process(
        "train",
        "--from-cache",
        str(rs),
        "--student",
        str(student_config),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--log-every",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    proc = run_kd_in_process(
        "train",
        "--from-cache",
        str(rs),
        "--student",
        str(student_config),
        "--out",
        str(out),
        "--divergence",
        "reverse_kl",
    )
    assert_one_line_error(proc, "--divergence reverse_kl", "RS cache")


def test_lora_student_is_saved_merged(tmp_path, cache, tiny_model_dir):
    out = tmp_path / "lora"
    proc = run_kd_in_process(
        "train",
        "--from-cache",
        str(cache),
        "--student",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--lora",
        "4",
        "--learning-rate",
        "1e-2",
    )
    assert proc.returncode == 0, proc.stderr
    saved = weights(out)
    assert not any("lora" in k for k in saved)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    changed = [k for k in base if "q_proj" in k and not torch.equal(base[k], saved[k])]
    assert changed, "merged LoRA deltas should change the attention projections"


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--alpha", "1.5"], ["--alpha must be in [0, 1]"]),
        (["--temperature", "0"], ["--temperature must be > 0"]),
        (["--divergence", "hellinger"], ["--divergence hellinger"]),
        (["--batch-size", "0"], ["--batch-size must be >= 1"]),
        (["--batch-size", "64"], ["fewer than one global batch"]),
        (["--fsdp", "--lora", "4"], ["--fsdp with --lora"]),
    ],
)
def test_bad_flags(tmp_path, cache, student_config, flags, fragments):
    proc = run_kd_in_process(
        "train", "--from-cache", str(cache), "--student", str(student_config), "--out", str(tmp_path / "o"), *flags
    )
    assert_one_line_error(proc, *fragments)


def test_bad_caches_are_refused(tmp_path, cache, student_config, smollm2_dir):
    # A student whose tokenizer differs from the cache's.
    other = tmp_path / "other-tokenizer"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(str(other))
    shutil.copy(student_config, other / "config.json")
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(other))).save_pretrained(str(other))
    proc = run_kd_in_process("train", "--from-cache", str(cache), "--student", str(other), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "another tokenizer")

    # A corrupted shard.
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    shard = sorted(broken.glob("shard-*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    proc = run_kd_in_process(
        "train", "--from-cache", str(broken), "--student", str(student_config), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(proc, shard.name, "corrupted or truncated")

    # Not a cache at all, and an incomplete one.
    proc = run_kd_in_process(
        "train", "--from-cache", str(tmp_path), "--student", str(student_config), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(proc, "not a kd cache")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(cache, incomplete)
    manifest = json.loads((incomplete / "manifest.json").read_text())
    manifest["complete"] = False
    manifest["ranks"] = {}
    (incomplete / "manifest.json").write_text(json.dumps(manifest))
    proc = run_kd_in_process(
        "train", "--from-cache", str(incomplete), "--student", str(student_config), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(proc, "incomplete")
