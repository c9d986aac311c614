"""Generation-based evaluation: batched greedy decoding with the KV cache, then the task metric."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .data import end_of_turn_ids, prompt_ids
from .tasks import Example


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "evaluating",
) -> list[str]:
    """Greedy completions of chat-templated prompts, left-padded in batches."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = end_of_turn_ids(tokenizer) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id else [])
    device = next(model.parameters()).device
    outputs: list[str] = []
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    # Sort by length so batches pad little; restore the order at the end.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    by_index: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        idx = order[start : start + batch_size]
        n = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), n), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        for row, i in enumerate(idx):
            k = len(encoded[i])
            ids[row, n - k :] = torch.tensor(encoded[i])
            mask[row, n - k :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=stop or None,
        )
        for row, i in enumerate(idx):
            by_index[i] = tokenizer.decode(out[row, n:], skip_special_tokens=True)
    model.train(was_training)
    outputs = [by_index[i] for i in range(len(prompts))]
    return outputs


def evaluate_task(
    model,
    tokenizer,
    task,
    examples: list[Example] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "evaluating",
) -> dict:
    """Metric of `task` on `examples` (default: its test split), with the predictions."""
    examples = task.test if examples is None else examples
    preds = generate(
        model,
        tokenizer,
        [e.prompt for e in examples],
        task.max_new_tokens,
        batch_size,
        progress,
        desc,
    )
    correct = [task.score(p, e.target) for p, e in zip(preds, examples, strict=True)]
    return {
        "accuracy": sum(correct) / max(1, len(correct)),
        "n": len(correct),
        "predictions": [
            {"prompt": e.prompt, "target": e.target, "prediction": p, "correct": c}
            for e, p, c in zip(examples, preds, correct, strict=True)
        ],
    }
