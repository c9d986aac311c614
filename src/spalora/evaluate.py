"""Evaluation: batched greedy generation with the KV cache scored by the task's metric, or, for
loss-only tasks, the completion loss and perplexity."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .data import collate, encode_examples, end_of_turn_ids, prompt_ids
from .tasks import Example


def _eval_mode(model, tokenizer) -> tuple[bool, int, torch.device]:
    """Put `model` in eval mode; returns whether it was training, the pad id and its device."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return was_training, pad, next(model.parameters()).device


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "evaluating",
    histories: list[tuple[tuple[str, str], ...]] | None = None,
) -> list[str]:
    """Greedy completions of chat-templated prompts (after optional earlier turns), left-padded
    in batches of similar length."""
    was_training, pad, device = _eval_mode(model, tokenizer)
    stop = end_of_turn_ids(tokenizer) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id else [])
    histories = histories or [()] * len(prompts)
    encoded = [prompt_ids(tokenizer, p, h) for p, h in zip(prompts, histories, strict=True)]
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
    return [by_index[i] for i in range(len(prompts))]


@torch.no_grad()
def completion_loss_of(
    model,
    tokenizer,
    examples: list[Example],
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
    desc: str = "loss",
) -> dict:
    """Mean loss per completion token over `examples` (summed over tokens, not batch means)."""
    from .losses import completion_loss

    was_training, pad, device = _eval_mode(model, tokenizer)
    encoded, report = encode_examples(tokenizer, examples, max_length, "truncate")
    if report:
        tqdm.write(f"[spalora] {desc}: {report}")
    total, tokens = 0.0, 0
    for start in tqdm(range(0, len(encoded), batch_size), desc=desc, disable=not progress):
        batch = collate(encoded[start : start + batch_size], pad)
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss = completion_loss(model, {k: v.to(device) for k, v in batch.items()})
        total += float(loss) * n
        tokens += n
    model.train(was_training)
    mean = total / max(1, tokens)
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 50.0)),
        "tokens": tokens,
        "n": len(encoded),  # examples scored (an over-long completion is dropped, and reported)
    }


@torch.no_grad()
def completion_nll(
    model,
    tokenizer,
    examples: list[Example],
    batch_size: int = 32,
    max_length: int = 512,
    progress: bool = True,
    desc: str = "nll",
) -> dict[str, list]:
    """Each example's mean next-token NLL over its completion tokens, given its prompt (the
    `loss` metric's computation, kept per example so that methods can be paired by example),
    and whether greedy decoding would reproduce the completion token for token (the argmax is
    the target at every completion position: exact match without generating).

    Returns {"nll": [...], "greedy_match": [...]} in the order of `examples`. Prompts longer
    than `max_length` are cut from their start, as in training. Batches are formed by length;
    the LM head runs only on completion positions.
    """
    import inspect

    import torch.nn.functional as F

    from .data import encode_example

    was_training, pad, device = _eval_mode(model, tokenizer)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    slice_head = "logits_to_keep" in inspect.signature(base.forward).parameters
    encoded = [encode_example(tokenizer, e, max_length) for e in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    nlls: list[float] = [math.nan] * len(encoded)
    matches: list[bool] = [False] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad).items()}
        shifted = batch.pop("labels")[:, 1:]
        keep = (shifted != -100).any(0).nonzero().squeeze(1)
        if slice_head:
            logits = model(**batch, logits_to_keep=keep).logits
        else:
            logits = model(**batch).logits[:, :-1][:, keep]
        target = shifted[:, keep]
        nll = F.cross_entropy(
            logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none"
        )
        labelled = target != -100
        per_row = nll.sum(1) / labelled.sum(1).clamp(min=1)
        greedy = ((logits.argmax(-1) == target) | ~labelled).all(1)
        for row, i in enumerate(idx):
            nlls[i] = float(per_row[row])
            matches[i] = bool(greedy[row])
    model.train(was_training)
    return {"nll": nlls, "greedy_match": matches}


def evaluate_task(
    model,
    tokenizer,
    task,
    examples: list[Example] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "evaluating",
    max_length: int = 512,
) -> dict:
    """`task`'s metric on `examples` (default: its test split).

    Returns {"metric": name, "value": number, "n": count, "predictions": rows}; a loss-only task
    (score None) reports perplexity and has no predictions.
    """
    examples = task.test if examples is None else examples
    if task.score is None:
        result = completion_loss_of(
            model, tokenizer, examples, max_length=max_length, progress=progress, desc=desc
        )
        return {
            "metric": task.metric,
            "value": result["perplexity"],
            "loss": result["loss"],
            "n": result["n"],
            "predictions": [],
        }
    preds = generate(
        model,
        tokenizer,
        [e.prompt for e in examples],
        task.max_new_tokens,
        batch_size,
        progress,
        desc,
        histories=[e.history for e in examples],
    )
    correct = [task.score(p, e.target) for p, e in zip(preds, examples, strict=True)]
    return {
        "metric": task.metric,
        "value": sum(correct) / max(1, len(correct)),
        "n": len(correct),
        "predictions": [
            {"prompt": e.prompt, "target": e.target, "prediction": p, "correct": c}
            for e, p, c in zip(examples, preds, correct, strict=True)
        ],
    }


def format_value(metric: str, value: float) -> str:
    """0.85 -> '85.00%' for rate metrics; perplexity as a plain number."""
    return f"{value:.2f}" if metric == "perplexity" else f"{value:.2%}"


def validation_scores(
    model, tokenizer, task, examples: list[Example], max_length: int, batch_size: int
) -> dict[str, float]:
    """The completion loss and, unless the task is loss-only, its metric on `examples`
    (quietly: it runs inside the training bar)."""
    values = {
        "loss": completion_loss_of(
            model, tokenizer, examples, max_length=max_length, progress=False
        )["loss"]
    }
    if task.score is not None:
        result = evaluate_task(model, tokenizer, task, examples, batch_size, False, "validation")
        values[task.metric] = result["value"]
    return values
