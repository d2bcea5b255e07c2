"""`kd compare`: paired differences over held-out sequences, verdicts, JSON, compare.md, bad input.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/test_compare.py -q

Tiny random Llama models with the real SmolLM2 tokenizer. The JSON-and-markdown test is the one real
`kd compare` process; the held-out cache, the console table, the live teacher, the checkpoints and
the refusals run the same CLI in this process (tests/helpers.py: run_kd_in_process).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kd.pipeline.evaluation.compare import verdict
from kd.pipeline.evaluation.sequences import bootstrap_ratio_ci, paired_ratio_difference_ci
from tests.conftest import build_tiny_model_dir
from tests.helpers import assert_one_line_error, kd_env, run_kd, run_kd_in_process
from tests.test_cache_logits import make_corpus


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("heldout") / "heldout.jsonl", rows=8)


@pytest.fixture(scope="module")
def heldout_cache(tmp_path_factory, heldout, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("caches") / "heldout"
    proc = run_kd_in_process(
        "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(heldout), "--out", str(out), "--top-k", "16"
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A byte-identical copy of the tiny teacher under another name."""
    out = tmp_path_factory.mktemp("twin") / "twin"
    shutil.copytree(tiny_model_dir, out)
    return out


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory, smollm2_dir) -> Path:
    """Another tiny random model (other weights, same tokenizer)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("other"), smollm2_dir, seed=1)


# ----------------------------------------------------------------------------- the paired interval


def test_a_constant_shift_per_sequence_gives_a_zero_width_interval():
    """Models that differ by the same amount on every sequence differ by exactly that, with no doubt, however
    much the sequences themselves vary: the interval is paired over sequences (an unpaired one is wide)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 60, size=40).astype(float)
    ce_a = tokens * rng.gamma(2.0, 1.0, size=40)  # sequences of very different difficulty
    ce_b = ce_a + 0.25 * tokens  # model b: 0.25 nats/token worse on every sequence
    difference, (lo, hi) = paired_ratio_difference_ci(ce_b, tokens, ce_a, tokens)
    assert difference == pytest.approx(0.25)
    assert lo == pytest.approx(0.25, abs=1e-9) and hi == pytest.approx(0.25, abs=1e-9)
    unpaired_a, unpaired_b = bootstrap_ratio_ci(ce_a, tokens), bootstrap_ratio_ci(ce_b, tokens)
    assert unpaired_a[1] > unpaired_b[0]  # each model's own interval would call this noise
    assert verdict([lo, hi], "lower") == "worse" and verdict([-hi, -lo], "lower") == "better"


def test_the_paired_interval_resamples_sequences_with_their_token_counts():
    """Ratios are token-weighted: a long sequence counts by its tokens, in the estimate and in every resample."""
    tokens = np.array([1.0, 1.0, 98.0])
    num_a = np.array([0.0, 0.0, 98.0])  # a is right on the long sequence
    num_b = np.array([1.0, 1.0, 0.0])  # b is right on the two short ones
    difference, (lo, hi) = paired_ratio_difference_ci(num_a, tokens, num_b, tokens, samples=2000)
    assert difference == pytest.approx(0.98 - 0.02)
    assert lo <= difference <= hi
    # Per-sequence means would give 1/3 - 2/3 < 0; token weighting gives a positive difference.
    assert hi > 0


def test_verdicts():
    assert verdict([0.0, 0.0], "lower") == "within noise"
    assert verdict([-0.1, 0.2], "higher") == "within noise"
    assert verdict([0.01, 0.2], "higher") == "better"
    assert verdict([-0.3, -0.01], "higher") == "worse"
    assert verdict(None, "lower") == "within noise"


# ----------------------------------------------------------------------------- the command


def test_identical_models_differ_by_exactly_zero_json_and_markdown(tmp_path, tiny_model_dir, twin_dir, other_dir,
                                                                   heldout, heldout_cache):  # fmt: skip
    out = tmp_path / "cmp"
    proc = run_kd(
        "compare", str(tiny_model_dir), str(twin_dir), str(other_dir), "--cache", str(heldout_cache),
        "--data", str(heldout), "--generate", "3", "--samples-at", "0.1,1.2", "--sample-prompts", "2",
        "--max-new-tokens", "8", "--out", str(out), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert result["baseline"] == str(tiny_model_dir)
    assert result["interval"] == {"level": 0.95, "bootstrap": 1000, "unit": "sequence", "paired": True}
    assert result["held_out"]["sequences"] == 8 and result["held_out"]["prompts"] == 3
    assert [m["model"] for m in result["models"]] == [str(tiny_model_dir), str(twin_dir), str(other_dir)]
    for row in result["models"]:
        for key in ("ce", "kl", "top1_agreement", "answer_accuracy", "parameters", "ce_ci", "tokens"):
            assert key in row
    assert [c["model"] for c in result["comparisons"]] == [str(twin_dir), str(other_dir)]
    twin, other = result["comparisons"]
    assert set(twin["metrics"]) == {"ce", "kl", "top1_agreement", "answer_accuracy"}
    for key, m in twin["metrics"].items():
        assert m["difference"] == 0.0, key
        assert m["difference_ci"] == [0.0, 0.0], key
        assert m["verdict"] == "within noise"
        assert set(m) == {"baseline", "value", "difference", "difference_ci", "better", "verdict"}
    # Another random model is measurably further from the teacher (the baseline here IS the teacher).
    kl = other["metrics"]["kl"]
    assert kl["difference"] > 0 and kl["difference_ci"][0] > 0 and kl["verdict"] == "worse"
    assert result["models"][0]["kl"] == pytest.approx(0.0, abs=0.02)

    samples = result["samples"]
    assert [s["temperature"] for s in samples] == [0.1, 1.2]
    for block in samples:
        assert len(block["prompts"]) == 2
        for prompt in block["prompts"]:
            assert [a["model"] for a in prompt["answers"]] == [m["model"] for m in result["models"]]
            for answer in prompt["answers"]:
                assert 1 <= answer["tokens"] <= 8 and isinstance(answer["correct"], bool)

    assert json.loads((out / "compare.json").read_text()) == result
    report = (out / "compare.md").read_text()
    assert "| model | metric | baseline | model | difference | 95% interval | verdict |" in report
    assert report.count("within noise") >= 4 and "**worse**" in report
    assert "## Samples at temperature 0.1" in report and "## Samples at temperature 1.2" in report
    assert "Reference: `" in report and " tokens" in report and ("✗" in report or "✓" in report)


def test_console_table(tiny_model_dir, twin_dir, heldout_cache):
    wide = kd_env(COLUMNS="250")
    proc = run_kd_in_process("compare", str(tiny_model_dir), str(twin_dir), "--cache", str(heldout_cache), env=wide)
    assert proc.returncode == 0, proc.stderr
    assert "within noise" in proc.stderr and "held-out CE" in proc.stderr and "+0.000" in proc.stderr  # rich: stderr


def test_live_teacher_over_data(tiny_model_dir, other_dir, heldout):
    proc = run_kd_in_process(
        "compare", str(other_dir), str(tiny_model_dir), "--data", str(heldout), "--teacher", str(tiny_model_dir),
        "--top-k", "16", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    kl = result["comparisons"][0]["metrics"]["kl"]
    assert kl["value"] == pytest.approx(0.0, abs=0.02) and kl["verdict"] == "better"


def test_models_given_as_kd_train_checkpoints(tmp_path, tiny_model_dir, student_config, heldout_cache):
    corpus = make_corpus(tmp_path / "train.jsonl", rows=8)
    run = tmp_path / "student"
    proc = run_kd_in_process(
        "train", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--student", str(student_config),
        "--out", str(run), "--max-steps", "4", "--batch-size", "4", "--save-every", "2", "--learning-rate", "1e-2",
        "--keep-checkpoints", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    early, last = sorted((run / "checkpoints").glob("step-*"))
    proc = run_kd_in_process("compare", str(run), str(last), str(early), "--cache", str(heldout_cache), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    same, before = result["comparisons"]
    assert same["model"] == str(last) and before["model"] == str(early)
    assert same["metrics"]["ce"]["difference"] == pytest.approx(0.0, abs=1e-6)  # the last checkpoint is the model
    assert before["metrics"]["ce"]["difference"] != 0.0


def test_bad_input_is_one_line(tmp_path, tiny_model_dir, twin_dir, heldout, heldout_cache):
    proc = run_kd_in_process("compare", str(tiny_model_dir), "--cache", str(heldout_cache))
    assert_one_line_error(proc, "at least two models")

    proc = run_kd_in_process("compare", str(tiny_model_dir), str(tmp_path / "missing"), "--cache", str(heldout_cache))
    assert_one_line_error(proc, "missing", "no such file")

    other_tokenizer = tmp_path / "other-tokenizer"
    shutil.copytree(twin_dir, other_tokenizer)
    config = json.loads((other_tokenizer / "tokenizer_config.json").read_text())
    template = other_tokenizer / "chat_template.jinja"
    if template.is_file():
        template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    else:
        config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (other_tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    proc = run_kd_in_process("compare", str(tiny_model_dir), str(other_tokenizer), "--cache", str(heldout_cache))
    assert_one_line_error(proc, "other-tokenizer", "another tokenizer", "--cache")
    proc = run_kd_in_process("compare", str(tiny_model_dir), str(other_tokenizer), "--data", str(heldout))
    assert_one_line_error(proc, "other-tokenizer", "another tokenizer")

    no_targets = tmp_path / "prompts.jsonl"
    no_targets.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(3)))
    proc = run_kd_in_process("compare", str(tiny_model_dir), str(twin_dir), "--data", str(no_targets))
    assert_one_line_error(proc, "prompts.jsonl")

    proc = run_kd_in_process(
        "compare", str(tiny_model_dir), str(twin_dir), "--cache", str(heldout_cache), "--generate", "2"
    )
    assert_one_line_error(proc, "--generate", "--data")
