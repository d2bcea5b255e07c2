"""What each round works on: its prompts, and its share of off-policy records (--mix).

Both are pure functions of (seed, round, sizes), never of what a previous run did, so a killed run
rerun picks exactly the prompts and records it would have picked uninterrupted.

Prompts: passes over the prompt set, each a fresh seeded permutation, laid end to end; round r
takes slots [r·P, (r+1)·P) of that stream (a round may straddle two passes, never repeat a prompt
inside one pass). Off-policy records: the mix corpus read in order and wrapped around, round r
taking records [r·M, (r+1)·M).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kd.errors import KdError
from kd.pipeline.data import iter_examples, tokenize_example


def round_prompt_indices(num_prompts: int, per_round: int, round_index: int, seed: int) -> list[int]:
    """Indices into the prompt list that round `round_index` samples (length `per_round`)."""
    if per_round > num_prompts:
        raise KdError(f"--prompts-per-round {per_round} exceeds the {num_prompts} prompts in --prompts")
    start = round_index * per_round
    out = []
    for slot in range(start, start + per_round):
        epoch, position = divmod(slot, num_prompts)
        order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
        out.append(int(order[position]))
    return out


@dataclass
class MixSource:
    """The off-policy corpus of --mix as token records (ids + loss mask, chat turns beside), read once.

    Tokenized here, with the student's tokenizer (the teacher's too, unless --cross-tokenizer), because
    a round's samples.jsonl is in the ``tokens`` format (the student's exact samples) and one file has one
    format and one tokenization; across tokenizers the whole file is then re-tokenized for the teacher.
    """

    path: str
    records: list[dict[str, Any]]

    @classmethod
    def load(cls, path: str, tokenizer) -> MixSource:
        """Read and convert every record; a record kd cannot turn into chat turns is a one-line error."""
        records = []
        for example in iter_examples(path):
            if example.messages is None:
                raise KdError(
                    f"{example.source}: --mix-data needs chat-shaped records (a plain 'text' or 'tokens' "
                    "record has no prompt/completion split to train on)"
                )
            turns = example.messages
            last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
            # TRL's conversational prompt/completion form: every assistant turn stays a target.
            tokens = tokenize_example(example, tokenizer)
            if tokens is None:
                raise KdError(f"{example.source}: --mix-data record has no target token")
            records.append(
                {
                    "input_ids": tokens.input_ids,
                    "loss_mask": tokens.loss_mask,
                    "prompt": turns[:last],  # TRL's conversational form, for people
                    "completion": turns[last:],
                    "meta": {"kind": "off-policy"},
                }
            )
        if not records:
            raise KdError(f"--mix-data {path}: no records")
        return cls(path, records)

    def for_round(self, count: int, round_index: int) -> list[dict[str, Any]]:
        """Records [round·count, (round+1)·count) of the corpus, wrapping around."""
        n = len(self.records)
        return [self.records[(round_index * count + i) % n] for i in range(count)]
