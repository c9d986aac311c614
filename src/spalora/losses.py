"""The completion loss, shared by training and evaluation (neither imports the other)."""

from __future__ import annotations

import inspect

import torch
from torch.nn.parallel import DistributedDataParallel


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over labelled tokens, with the LM head run only where a label exists.

    Equal to the model's own loss, but the vocabulary projection is skipped on prompt positions
    via `logits_to_keep`, where most of a short-completion step's head cost would go.
    """
    labels = batch["labels"]
    shifted = labels[:, 1:]
    keep = (shifted != -100).any(0).nonzero().squeeze(1)
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return model(**batch).loss  # a model without logits_to_keep: its own loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits
    target = shifted[:, keep]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100
    )
