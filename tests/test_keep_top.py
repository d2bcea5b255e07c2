"""A smaller top-k cache from a larger one (`replicate_cache(keep_top=K)`) equals a `--top-k K` teacher pass.

.venv/bin/python -m pytest tests/test_keep_top.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from kd.cache.reader import CacheReader
from kd.cache.replicate import replicate_cache
from kd.errors import KdError
from tests.helpers import run_kd_in_process
from tests.test_train import corpus  # noqa: F401  (fixture)


def _targets(cache) -> dict[int, object]:
    reader = CacheReader(cache)
    try:
        return {seq.row: seq.teacher for seq in reader.iter_sequences()}
    finally:
        reader.close()


@pytest.mark.parametrize("encoding", ["float32", "sqrt8"])
def test_keep_top_equals_a_top_k_pass(tmp_path, corpus, tiny_model_dir, encoding):  # noqa: F811
    def cache(k: int):
        out = tmp_path / f"top{k}"
        args = ["cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--limit", "6"]
        proc = run_kd_in_process(*args, "--out", str(out), "--top-k", str(k), "--value-encoding", encoding)
        assert proc.returncode == 0, proc.stderr
        return out

    wide, direct = cache(16), cache(4)
    derived = tmp_path / "derived"
    replicate_cache(wide, derived, keep_top=4)
    assert CacheReader(derived).settings["k"] == 4 and CacheReader(derived).verify() == []
    got, want = _targets(derived), _targets(direct)
    assert got.keys() == want.keys()
    # float32 values are exact; sqrt8 rounds each probability (and stage one rounds the tail from exact values).
    tolerance = 1e-6 if encoding == "float32" else 2e-3
    for row, expected in want.items():
        actual = got[row]
        if encoding == "float32":  # sqrt8 rounds the tiny model's small probabilities to one level: ties
            assert np.array_equal(np.sort(actual.ids, axis=1), np.sort(expected.ids, axis=1)), row
        np.testing.assert_allclose(np.sort(np.exp(actual.logprobs)), np.sort(np.exp(expected.logprobs)), atol=tolerance)
        np.testing.assert_allclose(np.exp(actual.tail), np.exp(expected.tail), atol=tolerance * 4)
        total = np.exp(actual.logprobs).sum(axis=1) + np.exp(actual.tail)
        np.testing.assert_allclose(total, 1.0, atol=tolerance * 8)


def test_keep_top_wider_than_the_cache_is_refused(tmp_path, corpus, tiny_model_dir):  # noqa: F811
    out = tmp_path / "top4"
    args = ["cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--limit", "2", "--top-k", "4"]
    assert run_kd_in_process(*args, "--out", str(out)).returncode == 0
    with pytest.raises(KdError, match="k >= 8"):
        replicate_cache(out, tmp_path / "wider", keep_top=8)
