"""Tokenization: chat-templated prompts, loss on the completion tokens only, padded batches."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from .tasks import Example


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a user prompt, with the model's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]


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
    p = prompt_ids(tokenizer, ex.prompt)
    t = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + end_of_turn_ids(tokenizer)
    ids = (p + t)[-max_length:]
    labels = ([-100] * len(p) + t)[-max_length:]
    return {"input_ids": ids, "labels": labels}


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
    encoded: list[dict[str, list[int]]], batch_size: int, pad_id: int, seed: int, skip: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches, reshuffled each epoch with a seeded generator.

    `skip` drops the first batches without building them (to resume a run at its data position).
    """
    if len(encoded) < batch_size:
        raise ValueError(
            f"{len(encoded)} training examples are fewer than one batch ({batch_size})"
        )
    rng = random.Random(seed)
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            if skip > 0:
                skip -= 1
                continue
            yield collate([encoded[j] for j in order[i : i + batch_size]], pad_id)
