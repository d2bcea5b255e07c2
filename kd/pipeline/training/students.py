"""Building the student: pretrained, random from a config, or cut from the teacher's layers.

--student DIR|FILE.gguf        a pretrained Hugging Face model (or GGUF, converted once)
--student config.json          random initialisation from a config
--student-from-teacher --layers 0,10,20,29
                               DistilBERT-style: the teacher's embeddings, the chosen layers,
                               final norm and head, copied into a shallower model
--lora R                       train LoRA adapters (peft) instead of all weights
"""

from __future__ import annotations

import copy

import torch

from kd.errors import KdError
from kd.pipeline.models import ModelSource, load_causal_lm, resolve_model


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'0,10,20,29' -> [0, 10, 20, 29]; also 'first:8' style 'even:8' = 8 evenly spaced layers."""
    spec = spec.strip()
    if spec.startswith("even:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError as exc:
            raise KdError(f"--layers {spec}: expected even:N") from exc
        if not 1 <= n <= num_layers:
            raise KdError(f"--layers {spec}: N must be in [1, {num_layers}]")
        if n == 1:
            return [0]
        return sorted({round(i * (num_layers - 1) / (n - 1)) for i in range(n)})
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as exc:
        raise KdError(f"--layers {spec}: expected comma-separated layer indices like 0,10,20,29") from exc
    if not layers:
        raise KdError("--layers: no layer given")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise KdError(
            f"--layers {spec}: layer(s) {bad} out of range; the teacher has {num_layers} layers (0..{num_layers - 1})"
        )
    if len(set(layers)) != len(layers):
        raise KdError(f"--layers {spec}: repeated layer index")
    return layers


def decoder_layers(model) -> torch.nn.ModuleList:
    body = getattr(model, model.base_model_prefix, None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise KdError(f"{type(model).__name__}: --student-from-teacher supports decoder models with .layers")
    return layers


def student_from_teacher(teacher, layers: list[int]):
    """A shallower copy of `teacher` keeping `layers` (in order), embeddings, final norm and head."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    prefix = f"{teacher.base_model_prefix}.layers."
    teacher_state = teacher.state_dict()
    state = {}
    for key, value in teacher_state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) in layers:
                state[f"{prefix}{layers.index(int(index))}.{rest}"] = value.clone()
        else:
            state[key] = value.clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise KdError(f"cannot cut the teacher into a student (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        student.tie_weights()
    return student


def build_student(
    student: str | None,
    from_teacher: ModelSource | None,
    layers: str | None,
    device: str,
):
    """Return the student model (fp32 master weights on `device`) and the source its tokenizer comes from."""
    if from_teacher is not None:
        teacher = load_causal_lm(from_teacher, dtype="float32", device="cpu")
        chosen = parse_layers(layers or "even:8", len(decoder_layers(teacher)))
        model = student_from_teacher(teacher, chosen)
        del teacher
        return model.to(device), from_teacher, chosen
    if student is None:
        raise KdError("--student is required (a model dir, .gguf, config.json) unless --student-from-teacher is given")
    source = resolve_model(student, "--student")
    model = load_causal_lm(source, dtype="float32", device=device)
    return model, source, None


def apply_lora(model, rank: int, alpha: float | None = None, dropout: float = 0.0):
    """Wrap every linear layer of the decoder in LoRA adapters (peft); the head stays frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise KdError("--lora needs peft: `pip install peft`") from exc
    if rank < 1:
        raise KdError(f"--lora must be >= 1, got {rank}")
    config = LoraConfig(
        r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
