"""Reasoning SFT on traces (`kd train --data traces.jsonl --tag-weight W`), checked by hand.

MiniMind's `train_distill_reason.py` got two things wrong that kd must get right: its ×10 weight
fell on every token id that also appears in the tags ('<', 'think', '>' in ordinary text), and it
divided the weighted sum by the unweighted token count. Here the expected weights come from an
independent method (the tags' own token runs, found in the sequence) and the expected loss from
the model's logits computed in the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd.pipeline.data import Example, TokenizedExample, iter_examples, tokenize_example
from kd.pipeline.training.trainer import tag_token_weights
from tests.helpers import run_kd_in_process

TRACE = "<think>\nIs 3 < 4? I think so, and 5 > 2, so 3 + 4 = 7.\n</think>\n\nThe answer is \\boxed{7}."
RECORDS = [
    {"conversations": [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": TRACE}]},
    {
        "conversations": [
            {"role": "user", "content": "What is 10 - 6?"},
            {"role": "assistant", "content": "<think>\nthink: 10 > 6, 10 - 6 = 4\n</think>\n\nThe answer is 4."},
        ]
    },
]
WEIGHT = 10.0


def tag_runs(tokenizer, ids: list[int]) -> set[int]:
    """Positions covered by the token run of '<think>' or '</think>' tokenized on its own."""
    covered: set[int] = set()
    for tag in ("<think>", "</think>"):
        run = tokenizer(tag, add_special_tokens=False)["input_ids"]
        for start in range(len(ids) - len(run) + 1):
            if ids[start : start + len(run)] == run:
                covered.update(range(start, start + len(run)))
    return covered


def tokenized_trace(tokenizer) -> TokenizedExample:
    return tokenize_example(Example(source="trace", text=TRACE), tokenizer)


def test_tag_weight_lands_on_the_tags_only(smollm2_tokenizer):
    tokenized = tokenized_trace(smollm2_tokenizer)
    ids = tokenized.input_ids
    weights = tag_token_weights(tokenized, WEIGHT)
    weighted = {t for t, w in enumerate(weights) if w == WEIGHT}
    assert weighted == tag_runs(smollm2_tokenizer, ids)
    assert set(weights.tolist()) == {1.0, WEIGHT}
    tags_text = "".join(smollm2_tokenizer.decode([ids[t]]) for t in sorted(weighted))
    assert tags_text.replace("\n", "") == "<think></think>"
    # The same pieces in ordinary text ('<' in "3 < 4", 'think' in "I think", '>' in "5 > 2") keep weight 1.
    plain = smollm2_tokenizer.decode([i for t, i in enumerate(ids) if t not in weighted])
    assert "3 < 4" in plain and "I think" in plain and "5 > 2" in plain


def test_weight_one_changes_nothing(smollm2_tokenizer):
    tokenized = tokenized_trace(smollm2_tokenizer)
    assert tag_token_weights(tokenized, 1.0).tolist() == [1.0] * len(tokenized.input_ids)


@pytest.mark.slow
def test_sft_loss_is_the_tag_weighted_ce_over_the_weighted_count(tmp_path: Path, tiny_model_dir, smollm2_tokenizer):
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "student"
    proc = run_kd_in_process(
        "train",
        "--data",
        str(data),
        "--student",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--alpha",
        "1",
        "--tag-weight",
        str(WEIGHT),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--log-every",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    reported = json.loads(proc.stdout)["loss"]

    # The expected loss from the untouched model: the first step's loss is computed before any update.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32).eval()
    weighted_sum = weight_total = plain_sum = count = 0.0
    tagged_targets = 0
    for example in iter_examples(str(data)):
        tokenized = tokenize_example(example, smollm2_tokenizer)
        ids = tokenized.input_ids
        tags = tag_runs(smollm2_tokenizer, ids)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        for t in range(1, len(ids)):
            if not tokenized.loss_mask[t]:
                continue
            ce = -float(logprobs[t - 1, ids[t]])
            w = WEIGHT if t in tags else 1.0
            tagged_targets += t in tags
            weighted_sum += w * ce
            weight_total += w
            plain_sum += ce
            count += 1
    assert tagged_targets >= 4, "the tags must be among the assistant targets for this test to mean anything"
    expected = weighted_sum / weight_total
    assert reported == pytest.approx(expected, rel=1e-4)
    # The two wrong normalisations give other numbers, so the check above tells them apart.
    assert abs(weighted_sum / count - expected) > 1e-2 * expected
    assert abs(plain_sum / count - expected) > 1e-3 * expected
