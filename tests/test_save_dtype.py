"""`kd train --save-dtype`: the exported student in the dtype asked for, head still tied, loadable as float32.

.venv/bin/python -m pytest tests/test_save_dtype.py -q
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from tests.helpers import assert_one_line_error, run_kd_in_process
from tests.test_train import cache, corpus  # noqa: F401  (fixtures)


def _weights(out) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)


def test_bfloat16_export_halves_the_student_and_keeps_its_weights(tmp_path, cache, student_config):  # noqa: F811
    from transformers import AutoModelForCausalLM

    common = ["train", "--from-cache", str(cache), "--student", str(student_config), "--max-steps", "1"]
    common += ["--batch-size", "4"]
    as_trained, halved = tmp_path / "fp32", tmp_path / "bf16"
    assert run_kd_in_process(*common, "--out", str(as_trained)).returncode == 0
    proc = run_kd_in_process(*common, "--out", str(halved), "--save-dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr

    full, half = _weights(as_trained), _weights(halved)
    assert full.keys() == half.keys()  # the tied head is not written twice
    assert {t.dtype for t in full.values()} == {torch.float32}
    assert {t.dtype for t in half.values()} == {torch.bfloat16}
    for name, tensor in full.items():  # the same training, rounded once to bfloat16
        assert torch.equal(half[name], tensor.to(torch.bfloat16)), name
    size = (halved / "model.safetensors").stat().st_size / (as_trained / "model.safetensors").stat().st_size
    assert 0.45 < size < 0.55
    assert json.loads((halved / "config.json").read_text())["dtype"] == "bfloat16"

    model = AutoModelForCausalLM.from_pretrained(str(halved), dtype=torch.float32)  # as kd eval loads it on CPU
    assert next(model.parameters()).dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_an_unknown_save_dtype_is_refused_before_anything_is_written(tmp_path, cache, student_config):  # noqa: F811
    out = tmp_path / "o"
    proc = run_kd_in_process(
        "train", "--from-cache", str(cache), "--student", str(student_config), "--out", str(out), "--save-dtype", "int4"
    )
    assert_one_line_error(proc, "--save-dtype int4", "bfloat16")
    assert not out.exists()
