"""The shard format's value codec and record layout.

    .venv/bin/python -m pytest tests/test_cache_format.py -q

The q64 quantisation is used only because this test shows its error stays under 0.01 nats, on
random log-probs and on the real embedded teacher's distributions.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from kd.cache import format as fmt
from kd.cache.reader import decode_table
from kd.pipeline.engines.head import topk_with_tail


def bucket_kl(p_lp: np.ndarray, p_tail: np.ndarray, q_lp: np.ndarray, q_tail: np.ndarray) -> np.ndarray:
    """KL between two (K+1)-bucket distributions, each renormalised (as stage two does)."""

    def norm(lp, tail):
        allp = np.concatenate([lp, tail[:, None]], axis=1).astype(np.float64)
        return allp - np.logaddexp.reduce(allp, axis=1, keepdims=True)

    a, b = norm(p_lp, p_tail), norm(q_lp, q_tail)
    pa_ = np.exp(a)
    return np.where(pa_ > 0, pa_ * (a - b), 0.0).sum(axis=1)


def roundtrip(logprobs: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stored = fmt.encode_topk_values(logprobs, "q64")
    return fmt.decode_topk_values(stored, "q64"), fmt.decode_tail(fmt.encode_tail(tail, "q64"), "q64")


def test_q64_error_under_001_nats_on_random_logits():
    torch.manual_seed(0)
    logits = torch.randn(2000, 5000) * 4
    ids, lp, tail = topk_with_tail(logits.clone(), 64)
    dlp, dtail = roundtrip(lp.numpy(), tail.numpy())
    assert np.abs(dlp - lp.numpy()).max() < 0.01
    assert np.abs(dlp - lp.numpy()).max() <= 1 / 128 + 1e-6
    assert np.abs(dtail - tail.numpy()).max() < 0.01
    assert bucket_kl(lp.numpy(), tail.numpy(), dlp, dtail).max() < 1e-4


def test_q64_error_under_001_nats_on_the_embedded_teacher(smollm2_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir)).eval()
    text = smollm2_tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "Tom has 3 apples and buys 5 more. How many?"},
            {"role": "assistant", "content": "Tom has 3 + 5 = 8 apples. The answer is 8."},
        ],
        tokenize=False,
    )
    ids = torch.tensor([smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    for k in (16, 64, 128):
        _, lp, tail = topk_with_tail(logits.clone(), k)
        dlp, dtail = roundtrip(lp.numpy(), tail.numpy())
        assert np.abs(dlp - lp.numpy()).max() < 0.01, k
        assert np.abs(dtail - tail.numpy()).max() < 0.01, k


def test_topk_with_tail_matches_dense_log_softmax():
    torch.manual_seed(1)
    logits = torch.randn(50, 300) * 3
    ids, lp, tail = topk_with_tail(logits.clone(), 10)
    dense = torch.log_softmax(logits, dim=-1)
    ref_lp, ref_ids = dense.topk(10, dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(tail, torch.log1p(-ref_lp.exp().sum(-1)), atol=1e-5, rtol=1e-5)
    # k = V: the tail is empty (log 0) and encodes as the empty code.
    _, _, empty = topk_with_tail(logits.clone(), 300)
    assert torch.isinf(empty).all()
    assert (fmt.encode_tail(empty.numpy(), "q64") == fmt.Q_EMPTY).all()


def test_narrowest_id_type():
    assert fmt.id_type(49152) == pa.uint16()
    assert fmt.id_type(65536) == pa.uint16()
    assert fmt.id_type(151936) == pa.uint32()


def test_build_batch_and_decode_roundtrip():
    rng = np.random.default_rng(0)
    schema = fmt.schema("topk", 1000, 4, "float32")
    seqs, masks, targets = [], [], []
    for n in (5, 9):
        ids = rng.integers(0, 1000, n)
        mask = np.zeros(n, bool)
        mask[2:] = True
        t = len(fmt.target_positions(mask))
        lp = -np.sort(rng.random((t, 4)).astype(np.float32), axis=1)
        targets.append(fmt.TopKTargets(rng.integers(0, 1000, (t, 4)), lp, np.full(t, -3.0, np.float32)))
        seqs.append(ids)
        masks.append(mask)
    batch = fmt.build_batch(schema, [7, 8], seqs, masks, targets, "float32")
    decoded = list(decode_table(pa.Table.from_batches([batch]), "topk", "float32"))
    for got, ids, mask, t in zip(decoded, seqs, masks, targets, strict=True):
        assert np.array_equal(got.input_ids, ids) and np.array_equal(got.loss_mask, mask)
        assert np.array_equal(got.teacher.ids, t.ids) and np.array_equal(got.teacher.logprobs, t.logprobs)
    assert [d.row for d in decoded] == [7, 8]


def test_rs_roundtrip():
    schema = fmt.schema("rs", 1000, 0, "q64", num_samples=64)
    mask = np.array([0, 1, 1, 1], bool)
    t = fmt.SampledTargets(
        [np.array([3, 9]), np.array([1]), np.array([4, 5, 6])],
        [np.array([60, 4]), np.array([64]), np.array([1, 2, 61])],
    )
    batch = fmt.build_batch(schema, [0], [np.array([1, 2, 3, 4])], [mask], [t], "q64")
    (got,) = decode_table(pa.Table.from_batches([batch]), "rs", "q64")
    assert [list(x) for x in got.teacher.ids] == [[3, 9], [1], [4, 5, 6]]
    assert [list(x) for x in got.teacher.counts] == [[60, 4], [64], [1, 2, 61]]


def test_adaptive_topk_keeps_the_mass_and_moves_the_rest_to_the_tail():
    from kd.cache.format import TopKTargets, truncate_to_mass

    probs = np.array([[0.9, 0.0995, 0.0004, 0.0001], [0.4, 0.3, 0.2, 0.05]])
    tail = np.log(1 - probs.sum(axis=1))
    targets = TopKTargets(np.array([[5, 6, 7, 8], [1, 2, 3, 4]]), np.log(probs).astype(np.float32), tail)
    cut = truncate_to_mass(targets, 1e-3)
    # Row 0: 0.9 + 0.0995 = 0.9995 >= 1 - 1e-3, so two ids stay; row 1 keeps all four.
    assert list(cut.ids[0]) == [5, 6, 0, 0] and np.isneginf(cut.logprobs[0, 2:]).all()
    assert list(cut.ids[1]) == [1, 2, 3, 4]
    total = np.logaddexp.reduce(np.concatenate([cut.logprobs, cut.tail[:, None]], axis=1).astype(np.float64), axis=1)
    np.testing.assert_allclose(np.exp(total), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.exp(cut.tail[0]), 0.0005, rtol=1e-3)
    # The q64 codec stores the empty slots and decodes them back as empty.
    stored = fmt.encode_topk_values(cut.logprobs, "q64")
    assert np.isneginf(fmt.decode_topk_values(stored, "q64")[0, 2:]).all()
