"""Temperature with a top-k cache is exact, and the sqrt8 bound holds as stated (issue 19, items 2 and 3).

    .venv/bin/python -m pytest tests/test_tempered_tail.py -q

Stage one records, per target and per T != 1 of `--temperatures`, log Σ_{j outside the top-k}
softmax(z/T)_j from the full logits; stage two re-tempers the cached ids exactly and gives the tail
that mass. Checked here: the head's tempered tail equals a dense fp64 reference; shards round-trip
it (float16 / float32) and adaptive top-k folds dropped ids into it; on the embedded SmolLM2
teacher (k = 64) the T = 2 target equals the exact tempered distribution bucketed (KL ≤ 1e-3
nats/token, where kd's old even spreading was ~0.1); a T the cache lacks is refused in one line; a
cache without tempered tails still trains at T = 1; `kd inspect` shows the temperatures. sqrt8: an
adversarial row reaches the stated bound 2k/360², real teacher rows stay under it. The CLI runs in
this process (tests/helpers.py: run_kd_in_process).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.cache import format as fmt
from kd.cache.manifest import open_or_create, record_rank_done
from kd.cache.reader import CacheReader
from kd.cache.writer import BackgroundShardWriter
from kd.errors import KdError
from kd.losses import SparseTeacher, retemper_sparse
from kd.pipeline.capture import CacheConfig, run_cache_logits
from kd.pipeline.engines.head import topk_with_tail, topk_with_tails
from kd.pipeline.training.batches import TrainSequence, collate
from tests.helpers import assert_one_line_error, run_kd_in_process

# ----------------------------------------------------------------------------- references


def dense_tempered_tail(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp64: log of softmax(z/T)'s mass outside `ids`, per row."""
    logp = F.log_softmax(logits.double() / temperature, dim=-1)
    return torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1)


def bucket_kl(exact_lp, exact_tail, lp, tail) -> torch.Tensor:
    """KL(exact ‖ target) over K + 1 buckets per row, fp64."""
    a = torch.cat([exact_lp, exact_tail[:, None]], dim=1).double()
    b = torch.cat([lp, tail[:, None]], dim=1).double()
    return torch.where(torch.isfinite(a), a.exp() * (a - b.clamp(min=-1e3)), torch.zeros_like(a)).sum(dim=1)


def even_spread_retemper(logp, tail, temperature, vocab):
    """kd's re-tempering before issue 19 (tail spread evenly over the uncached ids), to show the test bites."""
    log_ids = math.log(vocab - logp.shape[1])
    logp, tail = logp / temperature, (tail - log_ids) / temperature + log_ids
    norm = torch.logsumexp(torch.cat([logp, tail[:, None]], dim=1), dim=1, keepdim=True)
    return logp - norm, tail - norm[:, 0]


# ----------------------------------------------------------------------------- stage one's head


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_head_tempered_tail_equals_the_dense_fp64_reference(scale):
    g = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(37, 5000, generator=g) * scale
    temperatures = (0.5, 2.0, 4.0)
    ids, lp, tail, tempered = topk_with_tails(logits.clone(), 64, temperatures)
    ids1, lp1, tail1 = topk_with_tail(logits.clone(), 64)
    assert torch.equal(ids, ids1) and torch.equal(lp, lp1) and torch.equal(tail, tail1)
    for m, temperature in enumerate(temperatures):
        want = dense_tempered_tail(logits, ids, temperature)
        torch.testing.assert_close(tempered[:, m].double(), want, rtol=1e-5, atol=1e-5)


def test_tempered_tail_of_a_confident_row_keeps_its_precision():
    """A top-k holding all but 1e-30 of the mass at T = 2: a masked logsumexp, not log(1 − Σ top-k)."""
    logits = torch.full((2, 1000), -60.0)
    logits[:, :8] = torch.linspace(10, 3, 8)
    _, _, _, tempered = topk_with_tails(logits.clone(), 8, (2.0,))
    torch.testing.assert_close(tempered[:, 0].double(), dense_tempered_tail(logits, torch.arange(8).expand(2, 8), 2.0))


# ----------------------------------------------------------------------------- shards


def write_cache(out: Path, targets: list[fmt.TopKTargets], encoding: str, temperatures: tuple[float, ...], k: int):
    settings = {
        "format_version": fmt.FORMAT_VERSION,
        "mode": "topk",
        "vocab_size": 3000,
        "k": k,
        "value_encoding": encoding,
        "world_size": 1,
        "tokenizer_fingerprint": "test",
        "teacher": {"name": "random logits", "kind": "none", "path": None, "weights_fingerprint": "none"},
        "corpus": {"path": "none", "fingerprint": "none"},
        **({"temperatures": [1.0, *temperatures]} if temperatures else {}),
    }
    open_or_create(out, settings)
    schema = fmt.schema("topk", 3000, k, encoding, tempered=len(temperatures))
    writer = BackgroundShardWriter(out, schema)
    for row, t in enumerate(targets):
        n = len(t.ids)
        batch = fmt.build_batch(schema, [row], [np.arange(n + 1)], [np.ones(n + 1, dtype=bool)], [t], encoding)
        writer.submit_batch(0, 0, batch)
    writer.finish_shard(0, 0, {"rows": len(targets), "tokens": 0, "targets": sum(len(t.ids) for t in targets)})
    writer.close()
    record_rank_done(out, 0, {})
    return CacheReader(out)


def random_targets(seed: int, rows: int, k: int, temperatures: tuple[float, ...]) -> list[fmt.TopKTargets]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        logits = torch.randn(int(torch.randint(1, 9, (1,), generator=g)), 3000, generator=g) * 4
        ids, lp, tail, tempered = topk_with_tails(logits, k, temperatures)
        out.append(fmt.TopKTargets(ids.numpy(), lp.numpy(), tail.numpy(), tempered.numpy(), temperatures))
    return out


@pytest.mark.parametrize("encoding", ["q64", "sqrt8", "float32"])
def test_tempered_tails_round_trip_through_shards(tmp_path, encoding):
    temperatures = (0.5, 2.0, 4.0)
    targets = random_targets(1, 7, 16, temperatures)
    reader = write_cache(tmp_path / "c", targets, encoding, temperatures, 16)
    assert reader.temperatures == (1.0, *temperatures) and reader.tempered == temperatures
    for seq in reader.iter_sequences():
        want = targets[seq.row]
        assert seq.teacher.temperatures == temperatures
        if encoding == "float32":
            np.testing.assert_array_equal(seq.teacher.tempered_tails, want.tempered_tails)
        else:  # float16: relative error of the log at most 2^-11
            np.testing.assert_allclose(seq.teacher.tempered_tails, want.tempered_tails, rtol=2**-11, atol=1e-7)
    # Collated for the loss: the SparseTeacher carries them, one column per recorded T.
    batch = collate([TrainSequence(s.input_ids, s.loss_mask, s.teacher) for s in reader.iter_sequences()])
    assert batch.teacher.teacher_temperatures == temperatures
    assert batch.teacher.tempered_tail_logmass(2.0).shape == (batch.num_targets,)
    assert batch.teacher.tempered_tail_logmass(3.0) is None


def test_a_cache_without_tempered_tails_reads_as_before(tmp_path):
    targets = [fmt.TopKTargets(t.ids, t.logprobs, t.tail) for t in random_targets(2, 4, 8, ())]
    reader = write_cache(tmp_path / "c", targets, "sqrt8", (), 8)
    assert reader.temperatures == (1.0,) and "temperatures" not in reader.settings
    teacher = collate([TrainSequence(s.input_ids, s.loss_mask, s.teacher) for s in reader.iter_sequences()]).teacher
    assert teacher.teacher_tempered_tails is None
    with pytest.raises(KdError, match="--temperature 2 vs the cache's temperatures 1"):
        reader.require_temperature(2.0)
    reader.require_temperature(1.0)


def test_adaptive_topk_moves_dropped_ids_into_every_tempered_tail():
    logits = torch.randn(6, 3000, generator=torch.Generator().manual_seed(3)) * 5
    temperatures = (0.5, 2.0)
    ids, lp, tail, tempered = topk_with_tails(logits.clone(), 32, temperatures)
    cut = fmt.truncate_to_mass(
        fmt.TopKTargets(ids.numpy(), lp.numpy(), tail.numpy(), tempered.numpy(), temperatures), 0.1
    )
    kept = torch.from_numpy(np.isfinite(cut.logprobs))
    assert (~kept).any()  # something was dropped
    for m, temperature in enumerate(temperatures):
        logp = F.log_softmax(logits.double() / temperature, dim=-1)
        covered = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, torch.where(kept, ids, ids[:, :1]), True)
        want = torch.logsumexp(logp.masked_fill(covered, float("-inf")), dim=-1)
        torch.testing.assert_close(torch.from_numpy(cut.tempered_tails[:, m]).double(), want, rtol=1e-5, atol=1e-5)


def test_config_refusals():
    with pytest.raises(KdError, match="--temperatures with --vllm-scoring logprobs"):
        CacheConfig(data="x", out="y", engine="vllm", vllm_scoring="logprobs", temperatures="1,2")
    with pytest.raises(KdError, match="--temperatures applies to top-k caches"):
        CacheConfig(data="x", out="y", sampling="rs", temperatures="2")
    with pytest.raises(KdError, match="must be > 0"):
        CacheConfig(data="x", out="y", temperatures="1,0")
    with pytest.raises(KdError, match="comma-separated numbers"):
        CacheConfig(data="x", out="y", temperatures="1,two")
    assert CacheConfig(data="x", out="y").value_encoding == "sqrt8"
    assert CacheConfig(data="x", out="y", temperatures="2").value_encoding == "q64"  # auto: sqrt8 is coarse at T != 1
    assert CacheConfig(data="x", out="y", temperatures="4,2").tempered == (2.0, 4.0)
    assert CacheConfig(data="x", out="y", temperatures="2", value_encoding="sqrt8").value_encoding == "sqrt8"


def test_loss_refuses_a_temperature_without_its_tail():
    teacher = SparseTeacher(
        torch.tensor([[1, 2]]), torch.log(torch.tensor([[0.5, 0.3]])), torch.log(torch.tensor([0.2]))
    )
    with pytest.raises(KdError, match="--temperature 2: the cache holds no tempered tail"):
        retemper_sparse(teacher.teacher_logprobs, teacher.teacher_tail_logmass, 2.0)


# ----------------------------------------------------------------------------- the embedded teacher

RECORDS = [
    (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72",
    ),
    (
        "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10",
    ),
    (
        "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. "
        "Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. "
        "How much more money does Betty need to buy the wallet?",
        "In the beginning, Betty has only 100 / 2 = $50.\nBetty's grandparents gave her 15 * 2 = $30.\n"
        "This means, Betty needs 100 - 50 - 30 - 15 = $5 more.\n#### 5",
    ),
]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, smollm2_dir):
    """A T = 1, 2 cache of the embedded SmolLM2 at k = 64 (auto values: q64), and the teacher's own fp32 logits."""
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("embedded")
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in RECORDS))
    out = work / "cache"
    run_cache_logits(CacheConfig(data=str(corpus), out=str(out), teacher=str(smollm2_dir), temperatures="1,2"))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    reader = CacheReader(out)
    rows = []
    for seq in reader.iter_sequences():
        positions = fmt.target_positions(seq.loss_mask)
        with torch.inference_mode():
            logits = model(torch.from_numpy(seq.input_ids.astype(np.int64))[None]).logits[0]
        rows.append((seq.teacher, logits[torch.from_numpy(positions - 1)].float()))
    return reader, rows, model.config.vocab_size


def test_embedded_teacher_records_the_exact_tempered_tail(embedded):
    reader, rows, _ = embedded
    assert reader.temperatures == (1.0, 2.0) and reader.value_encoding == "q64"
    for teacher, logits in rows:
        ids = torch.from_numpy(teacher.ids.astype(np.int64))
        want = dense_tempered_tail(logits, ids, 2.0)
        np.testing.assert_allclose(teacher.tempered_tails[:, 0], want.numpy(), rtol=2**-10, atol=1e-6)


def test_embedded_teacher_t2_target_is_the_exact_tempered_distribution(embedded):
    """KL(exact_T=2 bucketed ‖ kd's T=2 target) ≤ 1e-3 nats/token (the even spread gave ~0.1)."""
    _, rows, vocab = embedded
    new, old = [], []
    for teacher, logits in rows:
        ids = torch.from_numpy(teacher.ids.astype(np.int64))
        logp = F.log_softmax(logits.double() / 2.0, dim=-1)
        exact_lp, exact_tail = logp.gather(1, ids), dense_tempered_tail(logits, ids, 2.0)
        lp, tail = torch.from_numpy(teacher.logprobs).double(), torch.from_numpy(teacher.tail).double()
        tempered = torch.from_numpy(teacher.tempered_tails[:, 0]).double()
        new.append(bucket_kl(exact_lp, exact_tail, *retemper_sparse(lp, tail, 2.0, tempered)))
        old.append(bucket_kl(exact_lp, exact_tail, *even_spread_retemper(lp, tail, 2.0, vocab)))
    new, old = torch.cat(new), torch.cat(old)
    assert len(new) > 100
    assert float(new.mean()) <= 1e-3 and float(new.max()) <= 1e-3, (float(new.mean()), float(new.max()))
    assert float(old.mean()) > 1e-2  # what the test would have caught


def test_sqrt8_real_rows_stay_under_the_bound(embedded):
    _, rows, _ = embedded
    logits = torch.cat([z for _, z in rows])
    for k in (64, 128, 256):
        _, lp, tail = topk_with_tail(logits.clone(), k)
        stored_tail = fmt.decode_tail(fmt.encode_tail(tail.numpy(), "sqrt8"), "sqrt8")
        decoded = fmt.decode_topk_values(
            fmt.encode_topk_values(lp.numpy(), "sqrt8"), "sqrt8", tail_logprobs=stored_tail
        )
        got = retemper_sparse(torch.from_numpy(decoded).double(), torch.from_numpy(stored_tail).double(), 1.0)
        kl = bucket_kl(lp.double(), tail.double(), *got)
        assert float(kl.max()) <= fmt.sqrt8_kl_bound(k), (k, float(kl.max()))


@pytest.mark.parametrize("k", [16, 64, 128, 256])
def test_sqrt8_adversarial_row_reaches_the_stated_bound(k):
    """Every sqrt p just under half a step, rounding alternately up and down (so renormalising undoes nothing)."""
    half = math.floor(fmt.SQRT_LEVELS / math.sqrt(k) - 0.5) + 0.5
    u = np.where(np.arange(k) % 2 == 0, half - 1e-6, half + 1e-6) / fmt.SQRT_LEVELS
    p = u**2
    lp = np.log(p)[None, :]
    tail = np.log(np.array([max(1.0 - p.sum(), 1e-300)]))
    stored_tail = fmt.decode_tail(fmt.encode_tail(tail, "sqrt8"), "sqrt8")
    decoded = fmt.decode_topk_values(fmt.encode_topk_values(lp, "sqrt8"), "sqrt8", tail_logprobs=stored_tail)
    got = retemper_sparse(torch.from_numpy(decoded).double(), torch.from_numpy(stored_tail).double(), 1.0)
    kl = float(bucket_kl(torch.from_numpy(lp), torch.from_numpy(tail), *got)[0])
    assert 0.97 * fmt.sqrt8_kl_bound(k) <= kl <= 1.01 * fmt.sqrt8_kl_bound(k), (k, kl, fmt.sqrt8_kl_bound(k))


# ----------------------------------------------------------------------------- stage two and inspect, end to end


@pytest.fixture(scope="module")
def tiny_caches(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("tiny")
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in RECORDS * 3))
    caches = {}
    for name, flags in {"plain": (), "tempered": ("--temperatures", "1,2")}.items():
        caches[name] = work / name
        proc = run_kd_in_process(
            "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(caches[name]),
            "--top-k", "16", *flags,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    return caches


def train(cache: Path, student_config: Path, out: Path, temperature: str):
    return run_kd_in_process(
        "train", "--from-cache", str(cache), "--student", str(student_config), "--out", str(out),
        "--max-steps", "2", "--batch-size", "2", "--temperature", temperature, "--alpha", "0.5", "--json",
    )  # fmt: skip


def test_training_at_a_temperature_the_cache_lacks_is_refused(tiny_caches, student_config, tmp_path):
    proc = train(tiny_caches["plain"], student_config, tmp_path / "s", "2")
    assert_one_line_error(proc, "--temperature 2 vs the cache's temperatures 1", "--temperatures 1,2")
    proc = train(tiny_caches["tempered"], student_config, tmp_path / "s4", "4")
    assert_one_line_error(proc, "--temperature 4 vs the cache's temperatures 1,2")


def test_old_cache_trains_at_t1_and_tempered_cache_at_t2(tiny_caches, student_config, tmp_path):
    for name, temperature in (("plain", "1"), ("tempered", "2")):
        proc = train(tiny_caches[name], student_config, tmp_path / name, temperature)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert math.isfinite(summary["final_loss"] if "final_loss" in summary else 0.0)


def test_inspect_shows_the_temperatures(tiny_caches):
    report = json.loads(run_kd_in_process("inspect", str(tiny_caches["tempered"]), "--json").stdout)
    assert report["temperatures"] == [1.0, 2.0] and report["value_encoding"] == "q64"
    assert report["bytes_per_target_token_by_part"]["tempered tails"] > 0
    plain = json.loads(run_kd_in_process("inspect", str(tiny_caches["plain"]), "--json").stdout)
    assert plain["temperatures"] == [1.0] and "tempered tails" not in plain["bytes_per_target_token_by_part"]
    proc = run_kd_in_process("inspect", str(tiny_caches["tempered"]))
    text = proc.stdout + proc.stderr  # the table goes to kd's console
    assert "temperatures" in text and "1, 2" in text
