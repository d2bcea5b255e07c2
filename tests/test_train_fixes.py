"""`kd train` fixes of issue 19: truthful metrics, per-rank RNG, a resume that keeps its schedule, bad flags
refused before anything is written.

    .venv/bin/python -m pytest tests/test_train_fixes.py -q

The CLI runs in this process (tests/helpers.py: run_kd_in_process): a real `kd train` process, killed,
resumed and under torchrun, is tests/test_train.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd.errors import KdError
from kd.pipeline.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kd.pipeline.training.config import TrainConfig
from kd.pipeline.training.distributed import DistEnv
from kd.pipeline.training.resume import rng_for_rank
from tests.helpers import assert_one_line_error, run_kd_in_process
from tests.test_reasoning_sft import RECORDS
from tests.test_train import cache, corpus, metrics  # noqa: F401  (fixtures)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0, got nan"),
        (["--epochs", "nan"], "--epochs must be a finite number > 0, got nan"),
        (["--log-every", "0"], "--log-every must be >= 1, got 0"),
        (["--grad-clip", "nan"], "--grad-clip must be >= 0, got nan"),
        (["--limit", "-1"], "--limit must be >= 1, got -1"),
    ],
)
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, student_config, flags, fragment):
    out = tmp_path / "o"
    proc = run_kd_in_process(
        "train", "--from-cache", str(tmp_path / "c"), "--student", str(student_config), "--out", str(out), *flags
    )
    assert_one_line_error(proc, fragment)
    assert not out.exists()


def test_out_inside_the_cache_is_refused(tmp_path, cache, student_config):  # noqa: F811
    before = {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file()}
    for out in (cache, cache / "student"):
        proc = run_kd_in_process(
            "train", "--from-cache", str(cache), "--student", str(student_config), "--out", str(out)
        )
        assert_one_line_error(proc, "--from-cache", "or inside it")
    assert {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file()} == before
    assert not (cache / "student").exists()
    with pytest.raises(KdError, match="--eval-cache"):
        TrainConfig(out=str(cache), data="d.jsonl", student="s", eval_cache=str(cache))


def test_a_refused_run_leaves_no_config_yaml(tmp_path, cache, student_config):  # noqa: F811
    out = tmp_path / "o"
    proc = run_kd_in_process(
        "train", "--from-cache", str(cache), "--student", str(student_config), "--out", str(out), "--batch-size", "64"
    )
    assert_one_line_error(proc, "fewer than one global batch")
    assert not (out / "config.yaml").exists()


def test_resume_refuses_another_schedule(tmp_path, cache, student_config):  # noqa: F811
    """--max-steps sets the cosine schedule's length: resuming with another one would bend the schedule."""
    out = tmp_path / "o"
    common = ["train", "--from-cache", str(cache), "--student", str(student_config), "--out", str(out)]
    common += ["--batch-size", "4", "--save-every", "1"]
    assert run_kd_in_process(*common, "--max-steps", "2").returncode == 0
    proc = run_kd_in_process(*common, "--max-steps", "3", "--resume")
    assert_one_line_error(proc, "--resume", "schedule of 2 steps", "this run's is 3", "--max-steps")
    state = load_checkpoint(out / "checkpoints" / "step-0000002")
    assert state["schedule_steps"] == 2
    assert len(state["rng_per_rank"]) == 1
    assert torch.equal(state["rng_per_rank"][0]["torch"], state["rng"]["torch"])
    proc = run_kd_in_process(*common, "--max-steps", "2", "--resume")  # the same schedule resumes
    assert proc.returncode == 0, proc.stderr


def test_every_rank_gets_its_own_rng_state_back(tmp_path):
    """Two ranks' RNG states go through a checkpoint; each rank restores its own, not rank 0's."""
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(rng_state())
    draws = []
    for state in states:
        set_rng_state(state)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])
    path = save_checkpoint(tmp_path, 7, {"step": 7, "rng": states[0], "rng_per_rank": states})
    loaded = load_checkpoint(path)  # weights_only=True must load the per-rank list
    for rank in (0, 1):
        set_rng_state(rng_for_rank(loaded, DistEnv(rank=rank, world_size=2)))
        assert torch.equal(torch.rand(4), draws[rank])
    # A checkpoint from another world size (or from before per-rank states) falls back to rank 0's.
    set_rng_state(rng_for_rank(loaded, DistEnv(rank=1, world_size=4)))
    assert torch.equal(torch.rand(4), draws[0])
    set_rng_state(rng_for_rank({"rng": states[0]}, DistEnv(rank=1, world_size=2)))
    assert torch.equal(torch.rand(4), draws[0])


def test_alpha_one_logs_the_divergence(tmp_path, cache, student_config):  # noqa: F811
    """With --alpha 1 the divergence has no weight in the loss, but the logged figure is the real one:
    at step 1 (before any update) it equals what --alpha 0.5 logs on the same data."""
    logged = {}
    for alpha in ("1", "0.5"):
        out = tmp_path / alpha
        proc = run_kd_in_process(
            "train", "--from-cache", str(cache), "--student", str(student_config), "--out", str(out),
            "--alpha", alpha, "--max-steps", "1", "--batch-size", "4", "--log-every", "1",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        logged[alpha] = [m for m in metrics(out) if "loss" in m][0]
    assert logged["1"]["divergence"] > 0
    assert logged["1"]["divergence"] == pytest.approx(logged["0.5"]["divergence"], rel=1e-5)
    assert logged["1"]["loss"] == pytest.approx(logged["1"]["ce"], rel=1e-6)


def test_tag_weighted_ce_is_logged_as_a_weighted_mean(tmp_path: Path, student_config, tiny_model_dir):
    """SFT's loss is Σw·CE/Σw; the logged CE is the same weighted mean, not Σw·CE over the token count."""
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "o"
    proc = run_kd_in_process(
        "train", "--data", str(data), "--student", str(student_config), "--teacher", str(tiny_model_dir),
        "--out", str(out), "--alpha", "1", "--tag-weight", "10", "--max-steps", "1", "--batch-size", "2",
        "--log-every", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (step,) = [m for m in metrics(out) if "loss" in m]
    assert step["ce"] == pytest.approx(step["loss"], rel=1e-6)


def test_resume_accepts_a_checkpoint_from_before_a_setting_existed(tmp_path, cache, student_config):  # noqa: F811
    """A run checkpointed by an older kd (its settings lack one added since) resumes when the new setting is
    at its default, and is still refused when the new setting is not: an upgrade mid-run keeps its steps."""
    out = tmp_path / "o"
    common = ["train", "--from-cache", str(cache), "--student", str(student_config), "--out", str(out)]
    common += ["--batch-size", "2", "--save-every", "1"]
    assert run_kd_in_process(*common, "--max-steps", "1").returncode == 0
    path = out / "checkpoints" / "step-0000001" / "state.pt"
    state = torch.load(path, weights_only=True)
    settings = json.loads(state["config_fingerprint"])

    def save_without(*keys: str) -> None:
        state["config_fingerprint"] = json.dumps({k: v for k, v in settings.items() if k not in keys}, sort_keys=True)
        torch.save(state, path)

    save_without("batch_size")  # missing, and this run's --batch-size 2 is not the default: not the same run
    proc = run_kd_in_process(*common, "--max-steps", "1", "--resume")
    assert_one_line_error(proc, "--resume", "different settings")
    save_without("teacher_mix", "teacher_weights", "feature_loss")  # a checkpoint of kd before these existed
    proc = run_kd_in_process(*common, "--max-steps", "1", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stderr
