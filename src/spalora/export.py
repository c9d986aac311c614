"""Export: a merged plain transformers checkpoint, and PEFT's LoRA format for LoRA-only adapters."""

from __future__ import annotations

from pathlib import Path

import torch

from .hub import hub_id
from .model import SpaloraModel


def save_merged(model: SpaloraModel, out_dir: str | Path, tokenizer=None) -> Path:
    """Fold the adapter into the base weights and save a plain safetensors checkpoint.

    The result loads with `AutoModelForCausalLM.from_pretrained(out_dir)`, no spalora needed.
    `model` is consumed: afterwards it is the merged base model's wrapper no longer.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def save_peft_lora(model: SpaloraModel, out_dir: str | Path) -> Path:
    """Write a LoRA-only spalora adapter in PEFT's format (loads with PeftModel.from_pretrained).

    Per-layer ranks go to LoraConfig.rank_pattern / alpha_pattern so the scale alpha/r of every
    layer is kept. A sparse part has no PEFT LoRA equivalent: export refuses it.
    """
    from peft import LoraConfig
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    model.check_finite_adapter(model.active_adapter, "cannot export the adapter")
    layers = model.adapter_layers()
    with_sparse = [n for n, lay in layers.items() if lay.nnz > 0]
    if with_sparse:
        raise ValueError(
            f"{len(with_sparse)} layers have a sparse part (e.g. {with_sparse[0]}); PEFT's LoRA "
            "format cannot hold it. Use `spalora merge` for a merged checkpoint instead."
        )
    ranked = {n: lay for n, lay in layers.items() if lay.r > 0}
    if not ranked:
        raise ValueError("the adapter has no LoRA part to export")
    first = next(iter(ranked.values()))
    cfg = LoraConfig(
        r=first.r,
        lora_alpha=first.lora_alpha,
        lora_dropout=first.lora_dropout,
        target_modules=sorted(ranked),
        rank_pattern={n: lay.r for n, lay in ranked.items()},
        alpha_pattern={n: lay.lora_alpha for n, lay in ranked.items()},
        fan_in_fan_out=any(lay.conv1d for lay in ranked.values()),
        base_model_name_or_path=hub_id(model.spalora_config.base_model_name_or_path),
        task_type="CAUSAL_LM",
    )
    state = {}
    for name, lay in ranked.items():
        state[f"base_model.model.{name}.lora_A.weight"] = lay.lora_A.detach().contiguous().cpu()
        state[f"base_model.model.{name}.lora_B.weight"] = lay.lora_B.detach().contiguous().cpu()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    save_file(state, str(out / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    return out


@torch.no_grad()
def max_logit_difference(a: torch.nn.Module, b: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Largest absolute difference of two models' logits on the same input (for checks)."""
    return (a(input_ids=input_ids).logits - b(input_ids=input_ids).logits).abs().max().item()
