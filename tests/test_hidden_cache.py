"""Hidden-state caches (`kd cache-logits --store hidden`): exact KD from the teacher's final hidden states.

    .venv/bin/python -m pytest tests/test_hidden_cache.py -q

Covers: the distribution rebuilt from a float32 / bf16 / int8 hidden cache against the live teacher's
own logits, within the bound each encoding implies (derived below); every divergence at T = 1 and 2
from the cache equal to online KD (live teacher) and to a dense reference; the fused hidden-KD
gradient against autograd; a teacher with a final-logit soft-cap (Gemma 2); `kd train --from-cache`
and `kd eval --cache` end to end (the teacher against its own cache: KL ~ 0, agreement 1); kill -9 +
resume of stage one gives byte-identical shards; a missing or corrupted head file is a one-line error.
The killed and the resumed stage one are real processes; the other commands run the same CLI in this
process (tests/helpers.py: run_kd_in_process).

Error bounds (h the exact hidden row, h' the stored one, e = h' - h, W the head, z = W h):
every log-prob moves by |Δ log p_v| = |Δz_v - Δ logsumexp z| <= 2 max_v |Δz_v|, and a soft-cap
(tanh, slope <= 1) does not enlarge Δz. Δz_v = W_v · e, so
* bf16 (round to nearest, 8 significant bits): |e_i| <= 2^-8 |h_i|, hence
  |Δ log p| <= 2 * 2^-8 * max_v sum_i |W_vi| |h_i|;
* int8 with scale s = max|h| / 127: |e_i| <= s / 2, hence |Δ log p| <= s * max_v ||W_v||_1.
(The KL to the exact teacher is then at most (2 max|Δz|)^2 / 8, Hoeffding's lemma.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.cache.reader import CacheReader
from kd.losses import DenseTeacher, LossConfig, autograd_chunk_loss, distill_loss_sum, head_loss_sum
from kd.pipeline.capture import CacheConfig, run_cache_logits
from kd.pipeline.training.batches import TrainSequence, collate
from kd.pipeline.training.hidden_teacher import load_cached_teacher_head
from tests.helpers import (
    assert_one_line_error,
    kill_train_at_first_checkpoint,
    run_kd,
    run_kd_in_process,
    run_torchrun,
)
from tests.test_cache_logits import cache_files, kill_mid_run, make_corpus
from tests.test_losses import dense_reference
from tests.test_train import assert_same_weights, metrics, sharded_common

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
FP32_SLACK = 1e-4
"""fp32 rounding of a full forward vs the batched body + head of stage one (log-probs of ~10-20 nats)."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("hidden-corpus") / "corpus.jsonl", rows=12)


def build_cache(out: Path, teacher: Path, corpus: Path, encoding: str) -> Path:
    run_cache_logits(
        CacheConfig(
            data=str(corpus),
            out=str(out),
            teacher=str(teacher),
            store="hidden",
            hidden_encoding=encoding,
            device="cpu",
            batch_size=4,
        )
    )
    return out


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_model_dir, corpus) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hidden-caches")
    return {e: build_cache(root / e, tiny_model_dir, corpus, e) for e in ("float32", "bf16", "int8")}


def live_logprobs(model, seq) -> torch.Tensor:
    """The teacher's own forward (all positions, one sequence), log-probs at the positions before targets."""
    positions = np.flatnonzero(np.asarray(seq.loss_mask, bool)[1:]) + 1
    with torch.no_grad():
        logits = model(torch.from_numpy(np.asarray(seq.input_ids, np.int64))[None]).logits[0].float()
    return torch.log_softmax(logits[torch.from_numpy(positions - 1)], dim=-1)


def cached_logprobs(head, hidden: np.ndarray) -> torch.Tensor:
    teacher = head.attach(DenseTeacher(teacher_hidden=torch.from_numpy(np.array(hidden))))
    return torch.log_softmax(teacher.logits(0, len(hidden)), dim=-1)


def load_teacher(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()


def test_cache_holds_the_head_and_the_rows(caches, tiny_model_dir):
    reader = CacheReader(caches["bf16"])
    assert reader.mode == "hidden" and reader.settings["hidden_size"] == 128
    entry = reader.manifest["teacher_head"]
    assert entry["shape"] == [reader.vocab_size, 128] and entry["transforms"] == {"scale": 1.0, "softcap": None}
    head = load_cached_teacher_head(reader)
    model = load_teacher(tiny_model_dir)
    assert torch.equal(head.weight, model.get_output_embeddings().weight)
    seqs = list(reader.iter_sequences())
    assert sum(len(s.teacher.hidden) for s in seqs) == sum(s["targets"] for s in reader.shards)
    assert all(s.teacher.hidden.dtype == np.float32 and s.teacher.hidden.shape[1] == 128 for s in seqs)


@pytest.mark.parametrize("encoding", ["float32", "bf16", "int8"])
def test_distribution_matches_the_live_teacher(caches, tiny_model_dir, encoding):
    model = load_teacher(tiny_model_dir)
    exact_reader = CacheReader(caches["float32"])
    reader = CacheReader(caches[encoding])
    head = load_cached_teacher_head(reader)
    abs_w = head.weight.abs().double()
    worst_ratio = 0.0
    for exact, seq in zip(exact_reader.iter_sequences(), reader.iter_sequences(), strict=True):
        live = live_logprobs(model, seq)
        got = cached_logprobs(head, seq.teacher.hidden)
        error = (got - live).abs().max(dim=1).values.double()
        h = torch.from_numpy(exact.teacher.hidden).double()
        if encoding == "float32":
            bound = torch.full_like(error, 0.0)
        elif encoding == "bf16":
            bound = 2 * 2.0**-8 * (h.abs() @ abs_w.T).max(dim=1).values
        else:
            scale = h.abs().max(dim=1).values / 127
            bound = scale * abs_w.sum(dim=1).max()
        assert bool((error <= bound + FP32_SLACK).all()), (encoding, float((error - bound).max()))
        if encoding != "float32":
            worst_ratio = max(worst_ratio, float((error / bound).max()))
    if encoding != "float32":
        assert 0 < worst_ratio < 1  # the bound holds and is not vacuous


def _student(seed: int, vocab: int, width: int = 64, n: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64) * 0.3
    return hidden, weight


@pytest.fixture(scope="module")
def batch_and_live(caches, tiny_model_dir):
    """One collated batch of the float32 cache, and the live teacher's hidden states and logits for it.

    Two sequences of different lengths (59 targets): padding in the batch, and a ragged last chunk at
    the chunk sizes 5 and 7 used below. Four (130 targets) doubled the time of these twelve
    full-vocabulary checks, and had no ragged chunk at 5.
    """
    reader = CacheReader(caches["float32"])
    seqs = [TrainSequence(s.input_ids, s.loss_mask, s.teacher) for s in list(reader.iter_sequences())[:2]]
    batch = collate(seqs)
    model = load_teacher(tiny_model_dir)
    with torch.no_grad():
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    live_hidden = hidden[batch.hidden_rows, batch.hidden_cols]
    live_logits = model.lm_head(live_hidden)
    return batch, load_cached_teacher_head(reader), live_hidden, live_logits, model.lm_head.weight


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_every_divergence_equals_online_kd(batch_and_live, name, temperature):
    batch, head, live_hidden, live_logits, live_weight = batch_and_live
    n, vocab = batch.num_targets, live_weight.shape[0]
    student_hidden, student_weight = _student(0, vocab, n=n)
    student_hidden, student_weight = student_hidden.float(), student_weight.float()
    config = LossConfig(alpha=0.3, temperature=temperature, divergence=name, chunk_size=7)
    from_cache = distill_loss_sum(
        student_hidden, student_weight, None, batch.labels, head.attach(batch.teacher), config
    )
    online = distill_loss_sum(
        student_hidden,
        student_weight,
        None,
        batch.labels,
        DenseTeacher(teacher_hidden=live_hidden, teacher_head_weight=live_weight),
        config,
    )
    total, ce, div = dense_reference(
        student_hidden.double() @ student_weight.double().T,
        live_logits.double(),
        batch.labels,
        name,
        temperature,
        alpha=0.3,
    )
    for got, want in ((from_cache.total, online.total), (from_cache.divergence, online.divergence)):
        assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    assert float(from_cache.total) == pytest.approx(float(total), rel=1e-4)
    assert float(from_cache.divergence) == pytest.approx(float(div), rel=1e-4, abs=1e-5)
    assert float(from_cache.ce) == pytest.approx(float(ce), rel=1e-4)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_fused_hidden_kd_gradient_matches_autograd(batch_and_live, name):
    batch, head, *_ = batch_and_live
    teacher = head.attach(batch.teacher)
    teacher = DenseTeacher(
        teacher_hidden=teacher.teacher_hidden.double(), teacher_head_weight=teacher.teacher_head_weight.double()
    )
    student_hidden, student_weight = _student(1, teacher.teacher_head_weight.shape[0], n=batch.num_targets)
    config = LossConfig(alpha=0.4, temperature=1.5, divergence=name, chunk_size=5)
    grads = []
    for chunk_loss in (None, autograd_chunk_loss):
        h = student_hidden.clone().requires_grad_(True)
        w = student_weight.clone().requires_grad_(True)
        if chunk_loss is None:
            parts = distill_loss_sum(h, w, None, batch.labels, teacher, config)
        else:
            parts = head_loss_sum(h, w, None, batch.labels, teacher, config, None, chunk_loss)
        parts.total.backward()
        grads.append((h.grad, w.grad, float(parts.total)))
    (gh, gw, total), (rh, rw, reference) = grads
    assert total == pytest.approx(reference, rel=1e-10)
    torch.testing.assert_close(gh, rh, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gw, rw, rtol=1e-8, atol=1e-10)


@pytest.fixture(scope="module")
def softcap_teacher(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny Gemma 2 (final_logit_softcapping 5.0, so the cap binds) on the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        final_logit_softcapping=5.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # logits well beyond the cap
    out = tmp_path_factory.mktemp("gemma2-softcap")
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def test_softcapped_teacher_from_its_hidden_cache(tmp_path, softcap_teacher, corpus):
    cache = build_cache(tmp_path / "cache", softcap_teacher, corpus, "float32")
    reader = CacheReader(cache)
    assert reader.manifest["teacher_head"]["transforms"] == {"scale": 1.0, "softcap": 5.0}
    head = load_cached_teacher_head(reader)
    model = load_teacher(softcap_teacher)
    for seq in list(reader.iter_sequences())[:4]:
        live = live_logprobs(model, seq)
        got = cached_logprobs(head, seq.teacher.hidden)
        assert float((got - live).abs().max()) <= FP32_SLACK
        uncapped = torch.log_softmax(F.linear(torch.from_numpy(seq.teacher.hidden), head.weight), dim=-1)
        assert float((uncapped - live).abs().max()) > 1.0  # the cap matters here


@pytest.mark.slow
def test_train_and_eval_from_a_hidden_cache(tmp_path, caches, tiny_model_dir, student_config):
    """A student of another width (64 vs the teacher's 128) trains from the cache; the teacher scores itself."""
    out = tmp_path / "student"
    args = ["--student", str(student_config), "--out", str(out), "--max-steps", "2", "--batch-size", "4"]
    proc = run_kd_in_process(
        "train", "--from-cache", str(caches["bf16"]), *args, "--divergence", "reverse_kl", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["steps"] == 2 and np.isfinite(summary["divergence"]) and summary["divergence"] > 0
    proc = run_kd_in_process("eval", "--model", str(tiny_model_dir), "--cache", str(caches["float32"]), "--json")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["kl"] < 1e-5 and metrics["top1_agreement"] == 1.0
    proc = run_kd_in_process("inspect", str(caches["int8"]), "--verify", "--json")
    report = json.loads(proc.stdout)
    assert report["verified"] and report["bytes_per_target_token_by_part"]["hidden"] > 0
    assert report["teacher_head"]["shape"] == [report["vocab_size"], 128]


@pytest.mark.parametrize("damage", ["missing", "corrupted"])
def test_bad_head_file_is_a_one_line_error(tmp_path, caches, student_config, damage):
    cache = tmp_path / "cache"
    shutil.copytree(caches["int8"], cache)
    head = cache / "teacher_head.safetensors"
    if damage == "missing":
        head.unlink()
    else:
        data = bytearray(head.read_bytes())
        data[len(data) // 2] ^= 0xFF
        head.write_bytes(bytes(data))
    proc = run_kd_in_process(
        "train", "--from-cache", str(cache), "--student", str(student_config), "--out", str(tmp_path / "s")
    )
    assert_one_line_error(proc, "teacher_head.safetensors", damage)


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_hidden_cache(tmp_path, tiny_model_dir):
    corpus = make_corpus(tmp_path / "corpus.jsonl")
    args = [
        "--teacher",
        str(tiny_model_dir),
        "--data",
        str(corpus),
        "--store",
        "hidden",
        "--hidden-encoding",
        "int8",
        "--shard-tokens",
        "40",
        "--batch-size",
        "1",
        "--block-records",
        "5",
        "--window-tokens",
        "150",
    ]
    out, expected, partial = kill_mid_run(tmp_path, args)
    resumed = run_kd("cache-logits", *args, "--out", str(out), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["shards_reused"] == len(partial)
    assert cache_files(out) == expected
    head = json.loads((out / "manifest.json").read_text())["teacher_head"]
    assert head == json.loads((tmp_path / "reference" / "manifest.json").read_text())["teacher_head"]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
@pytest.mark.parametrize(("sharding", "port"), [("ddp", "29557"), ("fsdp", "29567")])
def test_two_processes_match_one_from_a_hidden_cache(tmp_path, caches, student_config, sharding, port):
    """torchrun, 2 gloo processes x 2 sequences == 1 process x 4, from a hidden cache: every rank holds the
    whole teacher head (replicated, frozen, outside the wrapped module) and rebuilds its own rows' logits."""
    common = sharded_common(caches["bf16"], student_config)
    single, double = tmp_path / "single", tmp_path / "double"
    assert run_kd_in_process(*common, "--out", str(single), "--batch-size", "4").returncode == 0
    extra = ["--fsdp"] if sharding == "fsdp" else []
    proc = run_torchrun(*common, "--out", str(double), "--batch-size", "2", *extra, port=port)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single_losses = [m["loss"] for m in metrics(single) if "loss" in m]
    assert len(single_losses) == 3
    assert [m["loss"] for m in metrics(double) if "loss" in m] == pytest.approx(single_losses, rel=1e-6)
    assert_same_weights(single, double, atol=2e-5)


@pytest.mark.slow
def test_kill_and_resume_of_stage_two_from_a_hidden_cache(tmp_path, caches, student_config):
    """kill -9 mid-run, then --resume: the same losses and weights as an uninterrupted run."""
    common = ["train", "--from-cache", str(caches["int8"]), "--student", str(student_config), "--max-steps", "12",
              "--batch-size", "1", "--save-every", "4", "--learning-rate", "1e-3", "--log-every", "1"]  # fmt: skip
    reference = tmp_path / "reference"
    assert run_kd_in_process(*common, "--out", str(reference)).returncode == 0
    out = tmp_path / "killed"
    kill_train_at_first_checkpoint(common, out)
    resumed = run_kd(*common, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert [m["step"] for m in metrics(out) if "loss" in m] == list(range(1, 13))
    ref_losses = [m["loss"] for m in metrics(reference) if "loss" in m]
    assert [m["loss"] for m in metrics(out) if "loss" in m] == pytest.approx(ref_losses, abs=1e-6)
    assert_same_weights(reference, out)
