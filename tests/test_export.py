"""Merged checkpoints load with plain transformers; LoRA-only adapters load with PEFT."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from spalora import SpaloraConfig, get_spalora_model
from spalora.export import max_logit_difference, save_merged, save_peft_lora
from spalora.masks import apply_masks

from .conftest import tiny_llama


def randomized(model, **cfg):
    wrapped = get_spalora_model(model, SpaloraConfig(**cfg))
    if any(lay.nnz for lay in wrapped.adapter_layers().values()):
        apply_masks(wrapped.adapter_layers(), "random", seed=1, progress=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return wrapped.eval()


def test_merged_checkpoint_loads_with_transformers(tmp_path):
    ids = torch.randint(0, 96, (2, 9))
    wrapped = randomized(tiny_llama(), method="rosa", r=2, density=0.05)
    with torch.no_grad():
        want = wrapped(input_ids=ids).logits
    save_merged(wrapped, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert not any("lora" in k or "sparse" in k for k in plain.state_dict())


def test_lora_only_exports_to_peft(tmp_path):
    from peft import PeftModel

    ids = torch.randint(0, 96, (2, 9))
    names = [n for n, m in tiny_llama().named_modules() if n.endswith("proj")]
    ranks = {n: 1 + i % 4 for i, n in enumerate(names)}  # per-layer ranks: rank_pattern matters
    wrapped = randomized(tiny_llama(), method="lora", rank_pattern=ranks)
    assert {lay.r for lay in wrapped.adapter_layers().values()} == {1, 2, 3, 4}
    save_peft_lora(wrapped, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert max_logit_difference(peft_model, wrapped, ids) < 1e-5
    n_peft = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert n_peft == wrapped.get_nb_trainable_parameters()[0]


def test_peft_export_refuses_sparse(tmp_path):
    wrapped = randomized(tiny_llama(), method="rosa", r=2, density=0.05)
    with pytest.raises(ValueError, match="sparse part"):
        save_peft_lora(wrapped, tmp_path)
