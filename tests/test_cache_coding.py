"""The dense cache coding: ids sorted by a per-shard rank and delta-coded, sqrt8 values with a KL bound.

    .venv/bin/python -m pytest tests/test_cache_coding.py -q

Everything goes through kd's real writer and reader (shard files on disk), and the KL bound is
checked on the embedded SmolLM2 teacher's own distributions over a GSM8K-style answer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kd.cache import coding
from kd.cache import format as fmt
from kd.cache.manifest import open_or_create, record_rank_done
from kd.cache.reader import CacheReader
from kd.cache.writer import BackgroundShardWriter
from kd.pipeline.engines.head import topk_with_tail
from tests.test_cache_format import bucket_kl


def write_cache(out: Path, mode: str, targets: list, encoding: str, k: int, vocab: int = 49152) -> CacheReader:
    settings = {
        "format_version": fmt.FORMAT_VERSION,
        "mode": mode,
        "vocab_size": vocab,
        "k": k,
        "value_encoding": encoding,
        "num_samples": 64,
        "world_size": 1,
        "tokenizer_fingerprint": "test",
        "teacher": {"name": "random logits", "kind": "none", "path": None, "weights_fingerprint": "none"},
        "corpus": {"path": "none", "fingerprint": "none"},
    }
    open_or_create(out, settings)
    schema = fmt.schema(mode, vocab, k, encoding, num_samples=64)
    writer = BackgroundShardWriter(out, schema)
    seqs = []
    for row, t in enumerate(targets):
        n = len(t.ids) if mode == "topk" else len(t.ids)
        mask = np.ones(n + 1, dtype=bool)
        seqs.append((row, np.arange(n + 1) % vocab, mask, t))
    for start in range(0, len(seqs), 3):  # several record batches per shard
        part = seqs[start : start + 3]
        batch = fmt.build_batch(
            schema, [s[0] for s in part], [s[1] for s in part], [s[2] for s in part], [s[3] for s in part], encoding
        )
        writer.submit_batch(0, 0, batch)
    writer.finish_shard(0, 0, {"rows": len(seqs), "tokens": 0, "targets": sum(len(s[3].ids) for s in seqs)})
    writer.close()
    record_rank_done(out, 0, {})
    return CacheReader(out)


def random_topk(rng, rows: int, k: int, vocab: int) -> list[fmt.TopKTargets]:
    out = []
    for _ in range(rows):
        n = int(rng.integers(1, 30))
        logits = torch.from_numpy(rng.normal(size=(n, vocab)).astype(np.float32) * 3)
        ids, lp, tail = topk_with_tail(logits, k)
        out.append(fmt.TopKTargets(ids.numpy(), lp.numpy(), tail.numpy()))
    return out


def test_rank_is_a_bijection_over_seen_and_unseen_ids():
    order = coding.id_order_from(np.array([7, 7, 3, 9, 9, 9, 100, 3, 3, 3]))
    assert list(order) == [3, 9, 7, 100]  # by frequency, ties by id
    packed = coding.pack_order(order)
    ids = np.arange(0, 200)
    ranks = coding.ranks_of(ids, packed)
    assert sorted(ranks) == list(range(200))  # every id gets its own rank
    assert list(ranks[[3, 9, 7, 100]]) == [0, 1, 2, 3]
    np.testing.assert_array_equal(coding.ids_of(ranks, packed), ids)


@pytest.mark.parametrize("encoding", ["float32", "q64", "sqrt8"])
def test_topk_rows_survive_the_sorted_coding(tmp_path, encoding):
    rng = np.random.default_rng(0)
    targets = random_topk(rng, 10, 16, 3000)
    reader = write_cache(tmp_path / "c", "topk", targets, encoding, 16, vocab=3000)
    shard = reader.shards[0]
    assert shard["batches"] and len(shard["batches"]) == 4
    got = {s.row: s.teacher for s in reader.iter_sequences()}
    for row, t in enumerate(targets):
        g = got[row]
        # The same id set per token, back in probability order.
        assert all(set(a) == set(b) for a, b in zip(g.ids, t.ids, strict=True))
        assert (np.diff(g.logprobs, axis=1) <= 0).all()
        by_id = [dict(zip(a, b, strict=True)) for a, b in zip(g.ids, g.logprobs, strict=True)]
        want = [dict(zip(a, b, strict=True)) for a, b in zip(t.ids, t.logprobs, strict=True)]
        err = max(abs(by_id[i][j] - want[i][j]) for i in range(len(want)) for j in want[i] if want[i][j] > -5)
        assert err < {"float32": 1e-7, "q64": 1 / 128 + 1e-6, "sqrt8": 0.2}[encoding]


def test_rs_rows_survive_the_sorted_coding(tmp_path):
    rng = np.random.default_rng(1)
    targets = []
    for _ in range(8):
        n = int(rng.integers(1, 20))
        ids = [np.unique(rng.integers(0, 500, int(rng.integers(1, 12)))) for _ in range(n)]
        counts = [rng.integers(1, 64, len(i)) for i in ids]
        targets.append(fmt.SampledTargets(ids, counts))
    reader = write_cache(tmp_path / "rs", "rs", targets, "q64", 0, vocab=500)
    got = {s.row: s.teacher for s in reader.iter_sequences()}
    for row, t in enumerate(targets):
        for gi, gc, ti, tc in zip(got[row].ids, got[row].counts, t.ids, t.counts, strict=True):
            assert dict(zip(gi.tolist(), gc.tolist(), strict=True)) == dict(zip(ti.tolist(), tc.tolist(), strict=True))


def test_empty_slots_stay_empty(tmp_path):
    """Adaptive top-k (--mass-epsilon) leaves -inf slots with id 0; they must decode as -inf."""
    rng = np.random.default_rng(2)
    targets = [fmt.truncate_to_mass(t, 0.05) for t in random_topk(rng, 4, 16, 2000)]
    for encoding in ("sqrt8", "q64"):
        reader = write_cache(tmp_path / encoding, "topk", targets, encoding, 16, vocab=2000)
        for seq in reader.iter_sequences():
            want = targets[seq.row]
            assert (np.isinf(seq.teacher.logprobs).sum(1) == np.isinf(want.logprobs).sum(1)).all()


def test_sqrt8_kl_to_the_exact_teacher_is_under_1e3_nats(smollm2_dir, smollm2_tokenizer):
    """Issue 11's bound, on the embedded teacher over a worked answer, for k = 16, 64, 128."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir)).eval()
    text = smollm2_tokenizer.apply_chat_template(
        [
            {
                "role": "user",
                "content": "Natalia sold clips to 48 of her friends in April, and then she sold half "
                "as many clips in May. How many clips did Natalia sell altogether in April and May?",
            },
            {
                "role": "assistant",
                "content": "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips "
                "altogether in April and May. #### 72",
            },
        ],
        tokenize=False,
    )
    ids = torch.tensor([smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    for k in (16, 64, 128):
        _, lp, tail = topk_with_tail(logits.clone(), k)
        codes = fmt.encode_topk_values(lp.numpy(), "sqrt8")
        dtail = fmt.decode_tail(fmt.encode_tail(tail.numpy(), "sqrt8"), "sqrt8")
        dlp = fmt.decode_topk_values(codes, "sqrt8", tail_logprobs=dtail)
        kl = bucket_kl(lp.numpy(), tail.numpy(), dlp, dtail)
        assert kl.max() <= 1e-3, (k, kl.max())


def test_inspect_splits_the_bytes_per_target_token(tmp_path):
    import json

    from tests.helpers import run_kd_in_process

    rng = np.random.default_rng(3)
    write_cache(tmp_path / "c", "topk", random_topk(rng, 12, 16, 3000), "sqrt8", 16, vocab=3000)
    report = json.loads(run_kd_in_process("inspect", str(tmp_path / "c"), "--json").stdout)
    parts = report["bytes_per_target_token_by_part"]
    assert set(parts) == {"ids", "values", "tail", "tokens"}
    assert all(v > 0 for v in parts.values())
    assert sum(parts.values()) == pytest.approx(report["bytes_per_target_token"], rel=1e-6)
    assert parts["ids"] > parts["tail"]
