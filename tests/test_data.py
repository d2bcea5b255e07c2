"""Corpus reading, format detection and loss masks, on the real SmolLM2 tokenizer.

.venv/bin/python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from kd.errors import KdError
from kd.pipeline.data import detect_format, encode_examples, iter_examples, tokenize_example

CHAT = {
    "conversations": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "2+3 = 5."},
        {"role": "user", "content": "And 4+4?"},
        {"role": "assistant", "content": "It is 8."},
    ]
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def masked_text(tokenizer, tokenized):
    return tokenizer.decode([t for t, m in zip(tokenized.input_ids, tokenized.loss_mask, strict=True) if m])


@pytest.mark.parametrize(
    "record, fmt, assistant",
    [
        (CHAT, "conversations", ["2+3 = 5.", "It is 8."]),
        ({"messages": CHAT["conversations"]}, "messages", ["2+3 = 5.", "It is 8."]),
        ({"instruction": "Add.", "input": "1 and 2", "output": "3"}, "alpaca", ["3"]),
        ({"prompt": "Say hi", "completion": "Hi!"}, "prompt_completion", ["Hi!"]),
        ({"question": "1+1?", "answer": "It is 2.\n#### 2"}, "gsm8k", ["It is 2.\n#### 2"]),
    ],
)
def test_loss_mask_covers_exactly_the_assistant_turns(tmp_path, smollm2_tokenizer, record, fmt, assistant):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    (example,) = iter_examples(path)
    assert detect_format(record, "x") == fmt
    tokenized = tokenize_example(example, smollm2_tokenizer)
    eos = smollm2_tokenizer.eos_token
    assert masked_text(smollm2_tokenizer, tokenized) == "".join(a + eos for a in assistant)
    # Each masked run decodes to one assistant turn followed by its end-of-turn token.
    runs, current = [], []
    for token, m in zip(tokenized.input_ids, tokenized.loss_mask, strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [smollm2_tokenizer.decode(r) for r in runs] == [a + eos for a in assistant]


def test_text_format_targets_every_token(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "The quick brown fox."}])
    (example,) = iter_examples(path)
    tokenized = tokenize_example(example, smollm2_tokenizer)
    assert all(tokenized.loss_mask)
    assert tokenized.input_ids[-1] == smollm2_tokenizer.eos_token_id
    assert tokenized.num_targets == len(tokenized.input_ids) - 1


def test_tokens_format_uses_the_ids_as_given(tmp_path, smollm2_tokenizer):
    """Pre-tokenized records (how kd on-policy hands over the student's exact samples): no template,
    no special tokens added, the mask as written; both tokenizer paths agree; ids outside the
    tokenizer are a one-line error naming the line."""
    ids = [1, 9690, 198, 45, 2, 2428]  # any ids: nothing is decoded or re-encoded
    records = [{"input_ids": ids, "loss_mask": [0, 0, 0, 1, 1, 1], "prompt": "ignored"}, {"input_ids": [5, 6, 7]}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert detect_format(records[0], "x") == "tokens"  # input_ids wins over prompt/completion keys
    first, second = iter_examples(path)
    tokenized = tokenize_example(first, smollm2_tokenizer)
    assert tokenized.input_ids == ids and tokenized.loss_mask == [0, 0, 0, 1, 1, 1]
    assert tokenize_example(second, smollm2_tokenizer).loss_mask == [1, 1, 1]  # no mask: every token
    encoded = encode_examples([first, second], smollm2_tokenizer)
    assert encoded[0].input_ids.tolist() == ids and encoded[0].loss_mask.tolist() == [0, 0, 0, 1, 1, 1]
    assert encoded[1].input_ids.tolist() == [5, 6, 7]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1, len(smollm2_tokenizer)]}])
    with pytest.raises(KdError, match=r"bad.jsonl:1: token id 49152 is outside the tokenizer's vocabulary"):
        encode_examples(list(iter_examples(bad)), smollm2_tokenizer)


def test_zstd_and_parquet_read_the_same_records(tmp_path):
    records = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(50)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    zst = tmp_path / "d.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(jsonl.read_bytes()))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    expected = [e.messages for e in iter_examples(jsonl)]
    assert [e.messages for e in iter_examples(zst)] == expected
    assert [e.messages for e in iter_examples(parquet)] == expected
    assert len(expected) == 50


def test_truncate_and_skip(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "word " * 40, "answer": "answer " * 40}])
    (example,) = iter_examples(path)
    full = tokenize_example(example, smollm2_tokenizer)
    cut = tokenize_example(example, smollm2_tokenizer, max_seq_len=100, overflow="truncate")
    assert cut.truncated and len(cut.input_ids) == 100 and cut.input_ids == full.input_ids[:100]
    assert tokenize_example(example, smollm2_tokenizer, max_seq_len=100, overflow="skip") is None
    # Truncated before the answer starts: nothing left to learn, so it is skipped.
    assert tokenize_example(example, smollm2_tokenizer, max_seq_len=20, overflow="truncate") is None


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"question": "a", "answer": "b"}\n{not json}\n', "d.jsonl:2: malformed JSON"),
        ('{"conversations": [{"role": "user", "content": "hi"}]}\n', "d.jsonl:1: conversation has no assistant turn"),
        ('{"foo": 1}\n', "d.jsonl:1: unknown record format"),
        ('{"question": 3, "answer": "b"}\n', "d.jsonl:1: field 'question' must be a string"),
        ("[1, 2]\n", "d.jsonl:1: expected a JSON object"),
        ('{"input_ids": [1, -2]}\n', "d.jsonl:1: 'input_ids' must be a non-empty list of non-negative integers"),
        ('{"input_ids": [1, 2], "loss_mask": [1]}\n', "d.jsonl:1: 'loss_mask' must be a list of 0/1 as long"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, content, fragment):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(KdError, match=fragment.replace("(", r"\(").replace("'", "'")):
        list(iter_examples(path))


def test_forced_format_and_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "question": "q", "answer": "a"}])
    assert next(iter_examples(path, "text")).text == "x"
    with pytest.raises(KdError, match="--data-format bogus"):
        list(iter_examples(path, "bogus"))
    with pytest.raises(KdError, match="unknown file type"):
        list(iter_examples(write_jsonl(tmp_path / "d.csv", [])))
    with pytest.raises(KdError, match="--data .*missing.jsonl: no such file"):
        list(iter_examples(tmp_path / "missing.jsonl"))
