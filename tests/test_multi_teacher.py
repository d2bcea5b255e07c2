"""`kd train` with several teachers: `--from-cache A --from-cache B --teacher-weights 0.7,0.3 --teacher-mix ...`.

    .venv/bin/python -m pytest tests/test_multi_teacher.py -q

Two tiny random teachers (different weights, the real SmolLM2 tokenizer) cache the same corpus.
Checked: the sum mode's loss at the first step is the weighted sum of the single-teacher runs'
(fp32), and each teacher's logged divergence is its single run's; a mixture of a cache with itself
is that cache; the loader reads the caches side by side in the single cache's order with bounded
memory; RS and top-k caches combine in either mode; a mixture of a cache with itself across
tokenizers is that cache's cross-tokenizer run; the one-line refusals; kill -9 and --resume equal
an uninterrupted run (a real process) and 2 DDP ranks equal 1 process, both with the teachers aligned
onto a Gemma-3-tokenizer student.
The losses themselves: tests/test_multi_teacher_losses.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kd.cache.reader import CacheReader
from kd.errors import KdError
from kd.pipeline.training.multiteacher import CacheSet, TeacherCollator, check_student_tokenizer
from kd.pipeline.training.order import EpochPlan, OrderSettings
from kd.pipeline.training.stream import StepLoader
from tests.conftest import build_tiny_model_dir
from tests.helpers import (
    assert_one_line_error,
    kill_train_at_first_checkpoint,
    run_kd,
    run_kd_in_process,
    run_torchrun,
)
from tests.test_cache_logits import make_corpus
from tests.test_crosstok import maps  # noqa: F401 - fixtures
from tests.test_train import assert_same_weights, metrics


def make_cache(out: Path, teacher: Path, corpus: Path, *extra: str) -> Path:
    proc = run_kd_in_process(
        "cache-logits", "--teacher", str(teacher), "--data", str(corpus), "--out", str(out), *extra
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("mt-data") / "corpus.jsonl", rows=24)


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory, smollm2_dir) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("teacher-b"), smollm2_dir, seed=1)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, corpus, tiny_model_dir, second_teacher) -> dict[str, Path]:
    """Top-k caches of two teachers, an RS cache, one of another corpus, one of teacher B in another layout."""
    root = tmp_path_factory.mktemp("mt-caches")
    other = make_corpus(root / "other.jsonl", rows=8)
    # A small --shard-tokens cuts the corpus into more shards: the same rows in another layout.
    return {
        "a": make_cache(root / "a", tiny_model_dir, corpus, "--top-k", "16"),
        "b": make_cache(root / "b", second_teacher, corpus, "--top-k", "8"),
        "rs": make_cache(root / "rs", second_teacher, corpus, "--sampling", "rs", "--samples", "16"),
        "other_corpus": make_cache(root / "other", tiny_model_dir, other, "--top-k", "16"),
        "other_layout": make_cache(root / "layout", second_teacher, corpus, "--top-k", "8", "--shard-tokens", "200"),
    }


def train_args(student_config: Path, out: Path, *caches: Path, steps: int = 1) -> list[str]:
    args = ["train", *(x for c in caches for x in ("--from-cache", str(c))), "--student", str(student_config)]
    return args + ["--out", str(out), "--max-steps", str(steps), "--batch-size", "4", "--log-every", "1", "--json"]


def first_step(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_sum_mode_is_the_weighted_sum_of_single_teacher_runs(tmp_path, caches, student_config):
    alone = [
        first_step(run_kd_in_process(*train_args(student_config, tmp_path / name, caches[name]), "--alpha", "0.3"))
        for name in ("a", "b")
    ]
    both = first_step(
        run_kd_in_process(
            *train_args(student_config, tmp_path / "both", caches["a"], caches["b"]),
            *("--alpha", "0.3", "--teacher-weights", "3,1"),
        )
    )
    # Step 1's loss is taken before any update: the same student, the same batch, the weights normalised.
    assert both["loss"] == pytest.approx(0.75 * alone[0]["loss"] + 0.25 * alone[1]["loss"], rel=1e-5)
    assert both["divergence"] == pytest.approx(0.75 * alone[0]["divergence"] + 0.25 * alone[1]["divergence"], rel=1e-5)
    assert both["ce"] == pytest.approx(alone[0]["ce"], rel=1e-6)
    assert both["divergence_teacher_1"] == pytest.approx(alone[0]["divergence"], rel=1e-5)
    assert both["divergence_teacher_2"] == pytest.approx(alone[1]["divergence"], rel=1e-5)
    # The two teachers' divergences differ by more than the tolerance, so each is told from the other.
    assert abs(alone[0]["divergence"] - alone[1]["divergence"]) > 5e-5 * alone[0]["divergence"]
    config = (tmp_path / "both" / "config.yaml").read_text()
    assert "teacher_weights: 3,1" in config and str(caches["b"]) in config
    # config.yaml reruns the same two-teacher training (the list of caches round-trips).
    again = run_kd_in_process(
        "train", "--config", str(tmp_path / "both" / "config.yaml"), "--out", str(tmp_path / "again")
    )
    assert again.returncode == 0, again.stderr
    assert [m["loss"] for m in metrics(tmp_path / "again") if "loss" in m] == [both["loss"]]


def test_a_mixture_of_a_cache_with_itself_is_that_cache(tmp_path, caches, student_config):
    alone = run_kd_in_process(*train_args(student_config, tmp_path / "alone", caches["a"], steps=3))
    assert alone.returncode == 0, alone.stderr
    mixed = run_kd_in_process(
        *train_args(student_config, tmp_path / "mixed", caches["a"], caches["a"], steps=3),
        *("--teacher-mix", "mixture", "--teacher-weights", "0.4,0.6"),
    )
    assert mixed.returncode == 0, mixed.stderr
    want = [m["loss"] for m in metrics(tmp_path / "alone") if "loss" in m]
    got = [m["loss"] for m in metrics(tmp_path / "mixed") if "loss" in m]
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-5)
    assert_same_weights(tmp_path / "alone", tmp_path / "mixed", atol=1e-5)


def test_mixture_of_two_teachers_and_rs_with_top_k_train(tmp_path, caches, student_config):
    mixed = first_step(
        run_kd_in_process(
            *train_args(student_config, tmp_path / "mixed", caches["a"], caches["b"], caches["rs"], steps=2),
            *("--teacher-mix", "mixture"),
        )
    )
    assert np.isfinite(mixed["loss"]) and mixed["divergence"] > 0
    assert "divergence_teacher_1" not in mixed, "one divergence in mixture mode"
    summed = first_step(
        run_kd_in_process(*train_args(student_config, tmp_path / "rs", caches["a"], caches["rs"], steps=2))
    )
    assert np.isfinite(summed["loss"]) and summed["divergence_teacher_2"] > 0


def loader_steps(reader, collator=None, steps: int = 4):
    plan = EpochPlan(
        [u.rows for u in reader.units()], OrderSettings(seed=3, shuffle_window=8, micro_per_step=2, batch_size=2)
    )
    loader = StepLoader(reader, plan, reader.units(), accumulation_steps=2, prefetch=1, align=collator)
    return list(loader.iterate(0, steps)), loader.stats


def test_the_loader_reads_the_caches_side_by_side_in_one_order(caches):
    readers = [CacheReader(caches["a"]), CacheReader(caches["rs"])]
    both, stats = loader_steps(CacheSet(readers), TeacherCollator((0.5, 0.5), "sum"))
    for j, reader in enumerate(readers):
        alone, single_stats = loader_steps(reader)
        for got, want in zip(both, alone, strict=True):
            for g, w in zip(got.micro_batches, want.micro_batches, strict=True):
                assert g.input_ids.equal(w.input_ids) and g.labels.equal(w.labels)
                for key, value in vars(w.teacher).items():
                    mine = getattr(g.teacher.teachers[j], key)
                    assert mine.equal(value) if hasattr(value, "equal") else mine == value, key
        # Memory: each cache's copy of the rows one cache holds, no more.
        assert 0 < stats.max_held_rows <= 2 * single_stats.max_held_rows


def test_a_cache_in_another_layout_follows_the_first_by_corpus_row(tmp_path, caches, student_config):
    assert len(CacheReader(caches["other_layout"]).shards) > len(CacheReader(caches["b"]).shards)
    same, other = (
        first_step(run_kd_in_process(*train_args(student_config, tmp_path / name, caches["a"], caches[key], steps=2)))
        for name, key in (("same", "b"), ("other", "other_layout"))
    )
    assert other["loss"] == pytest.approx(same["loss"], rel=1e-6)
    assert other["divergence_teacher_2"] == pytest.approx(same["divergence_teacher_2"], rel=1e-6)
    assert_same_weights(tmp_path / "same", tmp_path / "other")
    # The loader holds the other cache's record batches that meet the first's: bounded, a few per batch.
    _, equal = loader_steps(
        CacheSet([CacheReader(caches["a"]), CacheReader(caches["b"])]), TeacherCollator((0.5, 0.5), "sum")
    )
    _, shifted = loader_steps(
        CacheSet([CacheReader(caches["a"]), CacheReader(caches["other_layout"])]), TeacherCollator((0.5, 0.5), "sum")
    )
    assert 0 < shifted.max_held_rows <= 2 * equal.max_held_rows


def test_a_cache_missing_rows_is_refused_in_one_line(tmp_path, caches, student_config):
    cut = tmp_path / "cut"
    shutil.copytree(caches["other_layout"], cut)
    manifest = json.loads((cut / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:-1]  # a cache that lost its last shard's rows
    (cut / "manifest.json").write_text(json.dumps(manifest))
    refused = run_kd_in_process(*train_args(student_config, tmp_path / "s", caches["a"], cut))
    assert_one_line_error(refused, f"--from-cache {cut} lacks", "corpus rows")


def test_refusals_are_one_line(tmp_path, caches, student_config):
    out = tmp_path / "student"
    refused = run_kd_in_process(*train_args(student_config, out, caches["a"], caches["other_corpus"]))
    assert_one_line_error(refused, "--from-cache", "different corpora", "fingerprint")
    pair = train_args(student_config, out, caches["a"], caches["b"])
    assert_one_line_error(run_kd_in_process(*pair, "--teacher-weights", "0.5"), "--teacher-weights", "1 weights for 2")
    assert_one_line_error(run_kd_in_process(*pair, "--teacher-weights", "0.5,-1"), "--teacher-weights", "> 0")
    assert_one_line_error(run_kd_in_process(*pair, "--teacher-weights", "a,b"), "--teacher-weights", "numbers")
    assert_one_line_error(run_kd_in_process(*pair, "--teacher-mix", "avg"), "--teacher-mix avg")
    # The mixture is refused only where one cache would be: a temperature it did not record, RS beyond forward KL.
    assert_one_line_error(
        run_kd_in_process(*pair, "--teacher-mix", "mixture", "--temperature", "2"),
        "--temperature 2 vs the cache's temperatures",
    )
    rs_pair = train_args(student_config, out, caches["a"], caches["rs"])
    assert_one_line_error(
        run_kd_in_process(*rs_pair, "--teacher-mix", "mixture", "--divergence", "reverse_kl"),
        "--divergence reverse_kl",
        "RS cache",
    )
    assert not (out / "config.yaml").exists(), "a refused run writes nothing"
    # A cache in another tokenization than the student's needs --cross-tokenizer (either mode).
    from types import SimpleNamespace

    readers = CacheSet([CacheReader(caches["a"]), CacheReader(caches["b"])])
    cfg = SimpleNamespace(caches=[str(caches["a"]), str(caches["b"])], cross_tokenizer=False, teacher_mix="sum")
    with pytest.raises(KdError, match="pass --cross-tokenizer"):
        check_student_tokenizer(cfg, readers, "another-tokenizer")
    cfg.cross_tokenizer = True
    for cfg.teacher_mix in ("sum", "mixture"):
        check_student_tokenizer(cfg, readers, "another-tokenizer")  # accepted: each cache is aligned


def test_teachers_across_tokenizers_sum_their_cross_tokenizer_runs(tmp_path, caches, tiny_gemma_dir, maps):  # noqa: F811
    """SmolLM2 caches -> a student with Gemma-3's tokenizer: each teacher aligned by text, then summed."""

    def run(name: str, *cache_keys: str, extra: tuple[str, ...] = ()) -> dict:
        args = ["train", *(x for k in cache_keys for x in ("--from-cache", str(caches[k])))]
        args += ["--student", str(tiny_gemma_dir), "--out", str(tmp_path / name), "--cross-tokenizer", "--alpha", "0.3"]
        return first_step(
            run_kd_in_process(*args, "--max-steps", "1", "--batch-size", "4", "--log-every", "1", "--json", *extra)
        )

    # Teacher B's rows come from a cache in another layout; each single run reads cache A's layout
    # (B's "b" cache holds the same rows in it), so all four runs see the same first batch.
    alone = [run("a", "a"), run("b", "b"), run("rs", "rs")]
    three = run("three", "a", "other_layout", "rs", extra=("--teacher-weights", "2,1,1"))
    want = 0.5 * alone[0]["loss"] + 0.25 * alone[1]["loss"] + 0.25 * alone[2]["loss"]
    assert three["loss"] == pytest.approx(want, rel=1e-5)
    for j in range(3):  # top-k, top-k in another layout, RS: each aligned as its single run
        assert three[f"divergence_teacher_{j + 1}"] == pytest.approx(alone[j]["divergence"], rel=1e-5)
        coverage = three[f"crosstok_target_coverage_teacher_{j + 1}"]
        assert coverage == pytest.approx(alone[j]["crosstok_target_coverage"]) and 0.5 < coverage <= 1.0
    # The mixture across tokenizers: of a cache with itself, the single cross-tokenizer run (each
    # target aligned to it has that teacher alone; the others CE only). Mixtures of teachers with
    # other coverage: tests/test_multi_teacher_losses.py against a dense reference.
    itself = run("itself", "a", "a", extra=("--teacher-mix", "mixture", "--teacher-weights", "0.4,0.6"))
    assert itself["loss"] == pytest.approx(alone[0]["loss"], rel=1e-5)
    assert itself["divergence"] == pytest.approx(alone[0]["divergence"], rel=1e-5)


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, caches, tiny_gemma_dir):
    """Two SmolLM2 caches aligned onto a Gemma-3-tokenizer student: the loader's alignment resumes exactly."""
    common = [
        "train",
        "--from-cache",
        str(caches["a"]),
        "--from-cache",
        str(caches["b"]),
        "--teacher-weights",
        "0.7,0.3",
        "--cross-tokenizer",
    ]
    common += ["--student", str(tiny_gemma_dir), "--max-steps", "16", "--batch-size", "1", "--save-every", "4"]
    common += ["--learning-rate", "1e-3", "--log-every", "1"]
    reference = tmp_path / "reference"
    assert run_kd_in_process(*common, "--out", str(reference)).returncode == 0

    out = tmp_path / "killed"
    kill_train_at_first_checkpoint(common, out)

    resumed = run_kd(*common, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert_same_weights(reference, out)
    assert [m["step"] for m in metrics(out) if "loss" in m] == list(range(1, 17))
    want = [m["loss"] for m in metrics(reference) if "loss" in m]
    assert [m["loss"] for m in metrics(out) if "loss" in m] == pytest.approx(want, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("sharding, port", [("ddp", "29537"), ("fsdp", "29538")])
def test_two_processes_match_one(tmp_path, caches, tiny_gemma_dir, sharding, port):
    """torchrun, 2 gloo processes x 2 sequences == 1 process x 4 sequences, a top-k and an RS teacher in sum
    mode, both aligned onto a Gemma-3-tokenizer student (DDP and FSDP2 across tokenizers): the losses, the
    weights and each teacher's logged divergence."""
    common = ["train", "--from-cache", str(caches["a"]), "--from-cache", str(caches["rs"]), "--student"]
    common += [str(tiny_gemma_dir), "--max-steps", "3", "--learning-rate", "1e-3", "--seed", "5", "--log-every", "1"]
    common += ["--teacher-weights", "0.6,0.4", "--cross-tokenizer"]
    single = tmp_path / "single"
    assert run_kd_in_process(*common, "--out", str(single), "--batch-size", "4").returncode == 0
    double = tmp_path / "ddp"
    extra = ["--fsdp"] if sharding == "fsdp" else []
    proc = run_torchrun(*common, *extra, "--out", str(double), "--batch-size", "2", port=port)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = [m["loss"] for m in metrics(single) if "loss" in m]
    assert len(want) == 3
    assert [m["loss"] for m in metrics(double) if "loss" in m] == pytest.approx(want, rel=1e-6)
    assert_same_weights(single, double, atol=2e-5)
    # Each teacher's logged divergence is over both ranks' targets, as `divergence` is.
    for key in ("divergence", "divergence_teacher_1", "divergence_teacher_2"):
        want = [m[key] for m in metrics(single) if "loss" in m]
        assert [m[key] for m in metrics(double) if "loss" in m] == pytest.approx(want, rel=1e-6), key
