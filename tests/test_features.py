"""Feature distillation: intermediate teacher layers in a hidden cache, and the student pulled towards them.

    .venv/bin/python -m pytest tests/test_features.py -q

Covers: the feature losses (mse, cosine) against a hand-written per-token reference, with their
gradients against autograd's of that reference; `kd cache-logits --hidden-layers` storing the output
of each chosen decoder layer exactly (float32 cache against the teacher's own forward), in int8 within
its per-row bound, and resumable; the default student -> teacher layer map; `kd train --feature-loss`
end to end (the projections train, are checkpointed, and the exported student is the plain student
with its own parameter count); kill -9 + `--resume` equal to an uninterrupted run (a real process);
bad input refused in one line. Everything but the killed and resumed runs goes through the CLI in this
process (tests/helpers.py: run_kd_in_process).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kd.cache.reader import CacheReader
from kd.losses.features import feature_loss_sum
from kd.pipeline.training.features import default_feature_map
from tests.helpers import (
    assert_one_line_error,
    kill_train_at_first_checkpoint,
    run_kd,
    run_kd_in_process,
    run_torchrun,
)
from tests.test_cache_logits import cache_files, kill_mid_run, make_corpus

# ----------------------------------------------------------------------------- the losses


def reference_feature_loss(student, teacher, weight, bias, kind, token_weights=None) -> torch.Tensor:
    """The same sum written token by token, coordinate by coordinate (float64)."""
    total = torch.zeros((), dtype=torch.float64)
    for n in range(student.shape[0]):
        projected = torch.stack(
            [
                sum(weight[j, i] * student[n, i] for i in range(student.shape[1])) + bias[j]
                for j in range(weight.shape[0])
            ]
        )
        if kind == "mse":
            loss = sum((projected[j] - teacher[n, j]) ** 2 for j in range(len(projected))) / len(projected)
        else:
            dot = sum(projected[j] * teacher[n, j] for j in range(len(projected)))
            loss = 1 - dot / (projected.norm() * teacher[n].norm())
        total = total + (1.0 if token_weights is None else token_weights[n]) * loss
    return total


def _inputs(seed: int = 0, n: int = 5, ds: int = 4, dt: int = 6):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, ds, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(n, dt, generator=g, dtype=torch.float64) * 3
    weight = torch.randn(dt, ds, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(dt, generator=g, dtype=torch.float64, requires_grad=True)
    token_weights = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return student, teacher, weight, bias, token_weights


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("weighted", [False, True])
def test_feature_loss_and_gradient_match_the_reference(kind, weighted):
    student, teacher, weight, bias, token_weights = _inputs()
    w = token_weights if weighted else None
    got = feature_loss_sum(student, teacher, weight, bias, kind, w)
    expected = reference_feature_loss(student, teacher, weight, bias, kind, w)
    assert got.dtype == torch.float32  # computed in fp32 whatever comes in
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got, (student, weight, bias))
    expected_grads = torch.autograd.grad(expected, (student, weight, bias))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5)


def test_feature_loss_properties():
    student, teacher, weight, bias = (t.detach() for t in _inputs(seed=1, ds=6)[:4])
    eye = torch.eye(6, dtype=torch.float64)
    for kind in ("mse", "cosine"):  # identity projection of the teacher's own states: nothing to learn
        assert float(feature_loss_sum(teacher, teacher, eye, None, kind)) == pytest.approx(0.0, abs=1e-5)
    # cosine ignores the states' scale; mse grows with its square
    base = feature_loss_sum(student, teacher, weight, bias, "cosine")
    assert float(feature_loss_sum(student, teacher * 7, weight, bias, "cosine")) == pytest.approx(float(base), rel=1e-5)
    zero = torch.zeros_like(weight)
    assert float(feature_loss_sum(student, teacher * 2, zero, None, "mse")) == pytest.approx(
        4 * float(feature_loss_sum(student, teacher, zero, None, "mse")), rel=1e-5
    )
    # bf16 autocast does not reach inside: large teacher coordinates keep fp32 precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = feature_loss_sum(student.float(), teacher.float(), weight.float(), bias.float(), "mse")
    plain = feature_loss_sum(student.float(), teacher.float(), weight.float(), bias.float(), "mse")
    assert float(under_autocast) == pytest.approx(float(plain), rel=1e-6)


def test_default_map_pairs_layers_at_the_same_relative_depth():
    assert default_feature_map((7, 15, 29), teacher_depth=30, student_depth=10) == ((2, 7), (4, 15), (9, 29))
    assert default_feature_map((0, 1), teacher_depth=2, student_depth=2) == ((0, 0), (1, 1))
    assert default_feature_map((0, 1), teacher_depth=2, student_depth=1) == ((0, 0), (0, 1))


# ----------------------------------------------------------------------------- stage one: the layers cached


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("feature-corpus") / "corpus.jsonl", rows=12)


def cache_args(teacher: Path, corpus: Path, encoding: str, layers: str | None = "0,1") -> list[str]:
    args = ["--teacher", str(teacher), "--data", str(corpus), "--store", "hidden", "--hidden-encoding", encoding]
    return args + ["--batch-size", "4"] + (["--hidden-layers", layers] if layers else [])


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_model_dir, corpus) -> dict[str, Path]:
    """float32 and int8 caches with both layers of the 2-layer teacher; bf16 without layers."""
    root = tmp_path_factory.mktemp("feature-caches")
    out = {}
    for name, encoding, layers in (("float32", "float32", "0,1"), ("int8", "int8", "1,0"), ("plain", "bf16", None)):
        proc = run_kd_in_process(
            "cache-logits", *cache_args(tiny_model_dir, corpus, encoding, layers), "--out", str(root / name)
        )
        assert proc.returncode == 0, proc.stderr
        out[name] = root / name
    return out


def teacher_states(model, seq) -> tuple[torch.Tensor, ...]:
    """Hugging Face's output_hidden_states of one sequence at the positions before its targets."""
    positions = torch.from_numpy(np.flatnonzero(np.asarray(seq.loss_mask, bool)[1:]))
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(seq.input_ids, np.int64))[None], output_hidden_states=True)
    return tuple(h[0, positions].float() for h in out.hidden_states)


def test_cache_stores_each_layer_output(caches, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    reader = CacheReader(caches["float32"])
    assert reader.hidden_layers == (0, 1) and reader.settings["teacher_layers"] == 2
    assert (
        CacheReader(caches["plain"]).hidden_layers == ()
        and "hidden_layers" not in CacheReader(caches["plain"]).settings
    )
    int8 = CacheReader(caches["int8"])
    assert int8.hidden_layers == (0, 1)  # sorted however given
    worst = 0.0
    for seq, coded in zip(reader.iter_sequences(), int8.iter_sequences(), strict=True):
        states = teacher_states(model, seq)
        assert sorted(seq.teacher.layers) == [0, 1]
        # layer 0: HF's hidden_states[1]; the last layer: its output before the final norm, which the
        # final state (the head's input) is the norm of (HF's hidden_states[-1] is that normed state).
        torch.testing.assert_close(torch.from_numpy(np.array(seq.teacher.layers[0])), states[1], atol=1e-5, rtol=1e-5)
        last = torch.from_numpy(np.array(seq.teacher.layers[1]))
        with torch.no_grad():
            torch.testing.assert_close(
                model.model.norm(last), torch.from_numpy(np.array(seq.teacher.hidden)), atol=1e-5, rtol=1e-5
            )
        assert float((last - states[2]).abs().max()) > 0.1  # stored before the norm, as documented
        for layer in (0, 1):  # int8: each number within half a step of its row's scale max|h|/127
            exact = seq.teacher.layers[layer]
            bound = np.abs(exact).max(axis=1, keepdims=True) / 127 / 2
            error = np.abs(coded.teacher.layers[layer] - exact)
            assert (error <= bound * (1 + 1e-5) + 1e-7).all()
            worst = max(worst, float((error / bound).max()))
    assert 0.5 < worst <= 1.0 + 1e-5  # the bound is reached, not vacuous
    report = json.loads(run_kd_in_process("inspect", str(caches["int8"]), "--json").stdout)
    assert report["hidden_layers"] == [0, 1]
    by_part = report["bytes_per_target_token_by_part"]
    assert by_part["hidden layers"] > 1.5 * by_part["hidden"]  # two layers cost about twice the final state


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_layer_cache(tmp_path, tiny_model_dir):
    corpus = make_corpus(tmp_path / "corpus.jsonl")
    args = [*cache_args(tiny_model_dir, corpus, "bf16", "0"), "--batch-size", "1", "--shard-tokens", "40"]
    args += ["--block-records", "5", "--window-tokens", "150"]
    out, expected, partial = kill_mid_run(tmp_path, args)
    resumed = run_kd("cache-logits", *args, "--out", str(out), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["shards_reused"] == len(partial)
    assert cache_files(out) == expected


# ----------------------------------------------------------------------------- stage two: the feature loss


@pytest.fixture(scope="module")
def student2_config(tmp_path_factory, tiny_model_dir) -> Path:
    """config.json of a 2-layer, hidden-64 student for the tiny teacher (width 128): projections 64 -> 128."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    config.hidden_size, config.intermediate_size = 64, 128
    config.num_attention_heads = config.num_key_value_heads = 1
    path = tmp_path_factory.mktemp("student2") / "config.json"
    config.to_json_file(str(path))
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def checkpoint_state(out: Path) -> dict:
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    return torch.load(newest / "state.pt", map_location="cpu", weights_only=True)


def test_train_with_feature_loss(tmp_path, caches, student2_config):
    out = tmp_path / "student"
    proc = run_kd_in_process(
        "train", "--from-cache", str(caches["int8"]), "--student", str(student2_config), "--out", str(out),
        "--feature-loss", "mse", "--feature-weight", "0.5", "--max-steps", "3", "--batch-size", "4", "--log-every", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    logged = metrics(out)
    assert len(logged) == 3
    for m in logged:  # the loss is α·CE + (1−α)·D + W·feature, each a mean over the same targets
        assert m["feature"] > 0
        assert m["loss"] == pytest.approx(0.5 * m["ce"] + 0.5 * m["divergence"] + m["feature"], rel=1e-5)

    # The projections (default map: (0, 0), (1, 1)) are in the checkpoint, trained by the same AdamW...
    state = checkpoint_state(out)
    assert sorted(state["features"]) == [
        "projections.s0_t0.bias",
        "projections.s0_t0.weight",
        "projections.s1_t1.bias",
        "projections.s1_t1.weight",
    ]
    assert state["features"]["projections.s0_t0.weight"].shape == (128, 64)
    assert len(state["optimizer"]["state"]) == len(state["model"]) - 1 + 4  # tied head: one tensor fewer
    # ...and not in the exported student, which loads with a fresh student's parameter count.
    from transformers import AutoConfig, AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(out))
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(student2_config)))
    assert exported.num_parameters() == fresh.num_parameters()
    assert set(load_file(str(out / "model.safetensors"))) == set(fresh.state_dict()) - {"lm_head.weight"}

    # --init-from carries the projections on; a run without --feature-loss cannot take AdamW's state.
    base = ["train", "--from-cache", str(caches["int8"]), "--student", str(student2_config), "--init-from", str(out)]
    proc = run_kd_in_process(*base, "--out", str(tmp_path / "plain"), "--max-steps", "1")
    assert_one_line_error(proc, "--init-from", "with --feature-loss")
    more = tmp_path / "more"
    flags = ["--feature-loss", "mse", "--feature-weight", "0.5", "--max-steps", "1", "--learning-rate", "1e-12"]
    proc = run_kd_in_process(*base, "--out", str(more), *flags)
    assert proc.returncode == 0, proc.stderr
    continued = checkpoint_state(more)
    assert continued["step"] == 4
    for key, value in state["features"].items():  # lr 1e-12: one more step leaves them where they were
        torch.testing.assert_close(continued["features"][key], value, atol=1e-8, rtol=0)


def test_feature_loss_alone_beside_ce_goes_down(tmp_path, caches, student2_config):
    """--alpha 1: CE and the feature loss only (no logit KD); a few steps bring the cosine loss down."""
    out = tmp_path / "student"
    proc = run_kd_in_process(
        "train", "--from-cache", str(caches["float32"]), "--student", str(student2_config), "--out", str(out),
        "--alpha", "1", "--feature-loss", "cosine", "--feature-map", "1:1", "--learning-rate", "3e-3",
        "--max-steps", "8", "--batch-size", "2", "--log-every", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    logged = metrics(out)
    assert sorted(checkpoint_state(out)["features"]) == ["projections.s1_t1.bias", "projections.s1_t1.weight"]
    assert all(m["loss"] == pytest.approx(m["ce"] + m["feature"], rel=1e-5) for m in logged)
    assert logged[-1]["feature"] < 0.8 * logged[0]["feature"]


def test_feature_loss_follows_the_global_normalisation(tmp_path, caches, student2_config):
    """4 sequences x 1 step == 2 sequences x 2 accumulation steps: the feature sum is divided once, by the
    step's global target count, like the logit loss (micro-batches of unequal target counts)."""
    common = [
        "train", "--from-cache", str(caches["int8"]), "--student", str(student2_config), "--feature-loss", "mse",
        "--feature-weight", "0.1", "--max-steps", "2", "--learning-rate", "1e-3", "--seed", "3", "--log-every", "1",
    ]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_kd_in_process(*common, "--out", str(a), "--batch-size", "4").returncode == 0
    assert run_kd_in_process(*common, "--out", str(b), "--batch-size", "2", "--accumulation-steps", "2").returncode == 0
    assert [m["feature"] for m in metrics(b)] == pytest.approx([m["feature"] for m in metrics(a)], rel=1e-5)
    want, got = checkpoint_state(a), checkpoint_state(b)
    for part in ("model", "features"):
        for key in want[part]:
            torch.testing.assert_close(got[part][key], want[part][key], atol=2e-6, rtol=1e-5)


@pytest.mark.slow
def test_kill_and_resume_with_features_ends_where_an_uninterrupted_run_does(tmp_path, caches, student2_config):
    common = [
        "train", "--from-cache", str(caches["int8"]), "--student", str(student2_config), "--feature-loss", "mse",
        "--feature-map", "0:1,1:1", "--max-steps", "16", "--batch-size", "1", "--save-every", "4",
        "--learning-rate", "1e-3", "--log-every", "1",
    ]  # fmt: skip
    reference = tmp_path / "reference"
    assert run_kd_in_process(*common, "--out", str(reference)).returncode == 0

    out = tmp_path / "killed"
    kill_train_at_first_checkpoint(common, out)

    resumed = run_kd(*common, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    want, got = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    want, got = checkpoint_state(reference)["features"], checkpoint_state(out)["features"]
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [m["step"] for m in metrics(out)] == list(range(1, 17))
    for key in ("loss", "feature"):
        assert [m[key] for m in metrics(out)] == pytest.approx([m[key] for m in metrics(reference)], abs=1e-6)


@pytest.mark.slow
def test_two_ddp_processes_match_one_with_features(tmp_path, caches, student2_config):
    """torchrun, 2 gloo processes x 2 sequences == 1 process x 4: the projections are synchronised like the student."""
    common = [
        "train", "--from-cache", str(caches["int8"]), "--student", str(student2_config), "--feature-loss", "cosine",
        "--max-steps", "3", "--learning-rate", "1e-3", "--seed", "5", "--log-every", "1",
    ]  # fmt: skip
    single, double = tmp_path / "single", tmp_path / "ddp"
    assert run_kd_in_process(*common, "--out", str(single), "--batch-size", "4").returncode == 0
    proc = run_torchrun(*common, "--out", str(double), "--batch-size", "2", port="29537")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("loss", "feature"):
        assert [m[key] for m in metrics(double)] == pytest.approx([m[key] for m in metrics(single)], rel=1e-6)
    want, got = load_file(str(single / "model.safetensors")), load_file(str(double / "model.safetensors"))
    for key in want:  # up to the order of the gloo reduction (as tests/test_train.py's DDP test)
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-5)
    want, got = checkpoint_state(single)["features"], checkpoint_state(double)["features"]
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--feature-loss", "mse", "--feature-map", "2:0"], ["--feature-map 2:0", "2 decoder layers"]),
        (["--feature-loss", "mse", "--feature-map", "0:5"], ["--feature-map 0:5", "teacher layers 0,1"]),
        (["--feature-loss", "mse", "--feature-map", "0-1"], ["--feature-map 0-1", "STUDENT:TEACHER"]),
        (["--feature-loss", "huber"], ["--feature-loss huber"]),
        (["--feature-loss", "mse", "--feature-weight", "-1"], ["--feature-weight must be"]),
        (["--feature-weight", "2"], ["need --feature-loss"]),
        (["--feature-loss", "mse", "--fsdp"], ["--feature-loss with --fsdp"]),
    ],
)
def test_bad_train_flags(tmp_path, caches, student2_config, flags, fragments):
    proc = run_kd_in_process(
        "train",
        "--from-cache",
        str(caches["int8"]),
        "--student",
        str(student2_config),
        "--out",
        str(tmp_path / "o"),
        *flags,
    )
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "o" / "config.yaml").exists()


def test_feature_loss_needs_cached_layers(tmp_path, caches, student2_config):
    proc = run_kd_in_process(
        "train", "--from-cache", str(caches["plain"]), "--student", str(student2_config), "--out", str(tmp_path / "o"),
        "--feature-loss", "cosine",
    )  # fmt: skip
    assert_one_line_error(proc, "--feature-loss", "intermediate layers", str(caches["plain"]))


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--store", "hidden", "--hidden-layers", "2"], ["--hidden-layers 2", "2 decoder layers"]),
        (["--store", "hidden", "--hidden-layers", "a"], ["--hidden-layers a", "layer indices"]),
        (["--hidden-layers", "0"], ["--hidden-layers needs --store hidden"]),
        (
            ["--store", "hidden", "--engine", "vllm", "--hidden-layers", "0"],
            ["--hidden-layers", "--engine transformers"],
        ),
    ],
)
def test_bad_cache_flags(tmp_path, tiny_model_dir, corpus, flags, fragments):
    out = tmp_path / "cache"
    proc = run_kd_in_process(
        "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(out), *flags
    )
    assert_one_line_error(proc, *fragments)
    assert not (out / "manifest.json").exists()
