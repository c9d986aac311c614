"""Tokenization: chat-templated prompts, loss on the completion tokens only, padded batches."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from .tasks.base import Example


def prompt_ids(tokenizer, prompt: str, history: tuple[tuple[str, str], ...] = ()) -> list[int]:
    """Token ids of a user prompt (after earlier chat turns `history`), with the model's chat
    template when it has one, else as "role: content" lines."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": r, "content": c} for r, c in history]
        messages.append({"role": "user", "content": prompt})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    context = "".join(f"{role}: {content}\n" for role, content in history)
    return tokenizer(context + prompt + "\n", add_special_tokens=True)["input_ids"]


def end_of_turn_ids(tokenizer) -> list[int]:
    """What closes an assistant turn: <|im_end|> for ChatML models, else EOS."""
    if getattr(tokenizer, "chat_template", None):
        # convert_tokens_to_ids, not get_vocab(): that builds a 49k-entry dict on every call
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            return [im_end]
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def encode_example(tokenizer, ex: Example, max_length: int = 256) -> dict[str, list[int]]:
    """input_ids and labels (-100 on the prompt), truncated from the left of the prompt."""
    p = prompt_ids(tokenizer, ex.prompt, ex.history)
    t = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + end_of_turn_ids(tokenizer)
    ids = (p + t)[-max_length:]
    labels = ([-100] * len(p) + t)[-max_length:]
    return {"input_ids": ids, "labels": labels}


OVERLONG_RULES = ("truncate", "drop")
MIN_PROMPT_TOKENS = 8  # a truncated example keeps at least this much of its prompt


def encode_examples(
    tokenizer, examples: list[Example], max_length: int, overlong: str = "truncate"
) -> tuple[list[dict[str, list[int]]], str | None]:
    """Encode examples under one explicit rule for those longer than `max_length` tokens.

    "truncate": the prompt is cut from its start so that the end of the prompt and the whole
    completion fit; an example whose completion leaves fewer than 8 prompt tokens is dropped.
    "drop": every over-long example is dropped. Returns the encoded rows and a report line
    (None when nothing was over-long).
    """
    if overlong not in OVERLONG_RULES:
        raise ValueError(f"overlong must be one of {OVERLONG_RULES}, got {overlong!r}")
    encoded, truncated, dropped = [], 0, 0
    for ex in examples:
        row = encode_example(tokenizer, ex, max_length=10**9)
        n = len(row["input_ids"])
        if n > max_length:
            n_target = sum(label != -100 for label in row["labels"])
            if overlong == "drop" or n_target > max_length - MIN_PROMPT_TOKENS:
                dropped += 1
                continue
            truncated += 1
            row = {k: v[-max_length:] for k, v in row.items()}
        encoded.append(row)
    if not encoded:
        raise ValueError(
            f"all {len(examples)} examples are longer than max_length={max_length} tokens "
            f"(rule {overlong!r}); raise max_length"
        )
    if not truncated and not dropped:
        return encoded, None
    report = (
        f"{truncated + dropped} of {len(examples)} examples exceed {max_length} tokens: "
        f"{truncated} truncated (prompt cut from its start), {dropped} dropped "
        f"(rule {overlong!r})"
    )
    return encoded, report


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and loss."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(
    encoded: list[dict[str, list[int]]],
    batch_size: int,
    pad_id: int,
    seed: int,
    skip: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches, reshuffled each epoch with a seeded generator.

    `skip` drops the first batches without building them (to resume a run at its data position).
    With several processes every rank walks the same stream and keeps the batches whose index
    (counted from the stream's start, skipped ones included) is `rank` modulo `world_size`, so
    the ranks together see exactly the batches one process would.
    """
    if len(encoded) < batch_size:
        raise ValueError(
            f"{len(encoded)} training examples are fewer than one batch ({batch_size})"
        )
    rng = random.Random(seed)
    index = 0
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            index += 1
            if index <= skip or (index - 1) % world_size != rank:
                continue
            yield collate([encoded[j] for j in order[i : i + batch_size]], pad_id)
