"""NaN or inf in an adapter is refused on load (naming the file and the tensor) and on merge or
export (naming the tensor), and the model is left as it was."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from spalora import SpaloraLinear, SpaloraModel
from spalora.export import save_peft_lora

from .conftest import tiny_llama
from .test_model import state_of, trained_adapter

LAYER = "model.layers.0.self_attn.q_proj"
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def poisoned_folder(tmp_path, tensor: str, value: float, method: str = "rosa"):
    """A saved adapter whose `tensor` of LAYER has one entry set to `value`."""
    trained_adapter(tiny_llama(), method=method).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(str(weights))
    state[f"{LAYER}.{tensor}"].view(-1)[1] = value
    save_file(state, str(weights))
    return weights


@pytest.mark.parametrize(
    ("tensor", "bad"), [("lora_A", "nan"), ("lora_B", "inf"), ("sparse_values", "-inf")]
)
def test_from_pretrained_refuses_a_non_finite_tensor_naming_file_and_tensor(tmp_path, tensor, bad):
    weights = poisoned_folder(tmp_path, tensor, BAD[bad])
    model = tiny_llama()
    before = state_of(model)
    with pytest.raises(ValueError) as info:
        SpaloraModel.from_pretrained(model, tmp_path)
    n = load_file(str(weights))[f"{LAYER}.{tensor}"].numel()
    assert str(info.value) == (
        f"{weights}: tensor '{LAYER}.{tensor}' holds 1 of {n} values that are NaN or inf"
    )
    assert not any(isinstance(m, SpaloraLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_adapter_refuses_a_non_finite_tensor_and_adds_nothing(tmp_path):
    weights = poisoned_folder(tmp_path / "bad", "lora_B", float("nan"))
    wrapped = trained_adapter(tiny_llama())
    with pytest.raises(ValueError, match=re.escape(f"{weights}: tensor '{LAYER}.lora_B' holds 1")):
        wrapped.load_adapter(tmp_path / "bad", "other")
    assert wrapped.adapters == ["default"]


def test_load_adapter_state_refuses_a_non_finite_tensor(tmp_path):
    wrapped = trained_adapter(tiny_llama())
    state = wrapped.adapter_state_dict()
    state[f"{LAYER}.sparse_values"][0] = float("inf")
    n = state[f"{LAYER}.sparse_values"].numel()
    with pytest.raises(ValueError) as info:
        wrapped.load_adapter_state(state)
    assert str(info.value) == (
        f"adapter state: tensor '{LAYER}.sparse_values' holds 1 of {n} values that are NaN or inf"
    )


@pytest.mark.parametrize("tensor", ["lora_B", "sparse_values"])
def test_merge_refuses_a_non_finite_adapter_and_changes_no_weight(tensor):
    wrapped = trained_adapter(tiny_llama())
    layer = wrapped.adapter_layers()[LAYER]
    with torch.no_grad():
        getattr(layer, tensor).view(-1)[0] = float("nan")
    n = getattr(layer, tensor).numel()
    before = {k: v.clone() for k, v in wrapped.base_model.state_dict().items() if "base" in k}
    with pytest.raises(ValueError) as info:
        wrapped.merge_and_unload()
    assert str(info.value) == (
        f"cannot merge adapter 'default': tensor '{LAYER}.{tensor}' holds 1 of {n} values "
        "that are NaN or inf"
    )
    assert wrapped.merged_adapters == [] and wrapped.wrapped_layers()
    after = wrapped.base_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_peft_export_refuses_a_non_finite_adapter(tmp_path):
    wrapped = trained_adapter(tiny_llama(), method="lora")
    with torch.no_grad():
        wrapped.adapter_layers()[LAYER].lora_A[0, 0] = float("inf")
    with pytest.raises(ValueError, match=rf"cannot export the adapter: tensor '{LAYER}\.lora_A'"):
        save_peft_lora(wrapped, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
