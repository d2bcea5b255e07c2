"""Decontamination of training prompts against held-out sets (kd/pipeline/traces/decontaminate.py).

    .venv/bin/python -m pytest tests/test_decontaminate.py -q

The n-gram rule (open-r1's: lowercase, whitespace words, 8 in a row), the 7-word near miss, short
held-out texts, which fields of kd's data formats are read, and a missing file. `kd gen-traces
--decontaminate` end to end is in tests/test_gen_traces.py (it needs that file's tiny teacher).
"""

from __future__ import annotations

import json

import pytest

from kd.errors import KdError
from kd.pipeline.traces.decontaminate import HeldOutNgrams, ngrams, record_texts

HELD_OUT = "A farmer plants seven rows of corn with twelve plants in each row. How many plants are there?"


def held_out(*texts: str, n: int = 8) -> HeldOutNgrams:
    grams = HeldOutNgrams(n)
    for text in texts:
        grams.add(text)
    return grams


def test_ngrams_are_lowercased_whitespace_words():
    assert ngrams("The  Cat\nsat.", 2) == {("the", "cat"), ("cat", "sat.")}
    assert ngrams("too short", 3) == set()


def test_eight_shared_words_overlap_seven_do_not():
    grams = held_out(HELD_OUT)
    eight = "Story time: farmer plants seven rows of corn with TWELVE trees. What now?"  # 8 words, case differs
    seven = "Story time: farmer plants seven rows of corn with eleven plants in each row."  # 7, then "eleven"
    assert grams.overlaps(eight)
    assert not grams.overlaps(seven)
    assert held_out(HELD_OUT, n=7).overlaps(seven)  # --decontaminate-ngram 7 catches it
    assert grams.overlaps(" ".join(HELD_OUT.split()).upper())  # the very question, shouted


def test_short_held_out_texts_are_compared_whole():
    grams = held_out("What is 2 + 2?")  # 5 words: no 8-gram
    assert grams.overlaps("what  is 2 + 2?")
    assert not grams.overlaps("What is 2 + 2? Explain why, in full sentences, please.")


def test_record_texts_read_the_prompt_side_of_every_format():
    records = {
        "gsm8k": ({"question": "Q", "answer": "A"}, ["Q"]),
        "prompt": ({"prompt": "P", "completion": "C"}, ["P"]),
        "alpaca": ({"instruction": "I", "input": "X", "output": "O"}, ["I", "X"]),
        "text": ({"text": "T"}, ["T"]),
        "messages": (
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "U"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            ["S", "U"],
        ),
        "conversations": (
            {"conversations": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]},
            ["U"],
        ),
        "trl": (
            {"prompt": [{"role": "user", "content": "U"}], "completion": [{"role": "assistant", "content": "A"}]},
            ["U"],
        ),
    }
    for name, (record, expected) in records.items():
        assert list(record_texts(record)) == expected, name


def test_from_files_reads_every_file_and_refuses_a_missing_one(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"question": HELD_OUT, "answer": "#### 84"}) + "\n")
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2 + 2?"}]}) + "\n")
    grams = HeldOutNgrams.from_files([str(a), str(b)], n=8)
    assert grams.overlaps(HELD_OUT) and grams.overlaps("What is 2 + 2?")
    with pytest.raises(KdError, match="--decontaminate .*missing.jsonl: no such file"):
        HeldOutNgrams.from_files([str(a), str(tmp_path / "missing.jsonl")], n=8)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"answer": "#### 4"}) + "\n")
    with pytest.raises(KdError, match="empty.jsonl: no question"):
        HeldOutNgrams.from_files([str(empty)], n=8)
