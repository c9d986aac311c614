"""Adapter folders: adapter_config.json + adapter_model.safetensors (safetensors only, no pickle).

Tensor keys are `<layer name>.<lora_A|lora_B|sparse_values|sparse_crow|sparse_col>`; masks are
saved as CSR (crow, col). A folder holding several adapters keeps "default" at its root and every
other adapter in the subfolder named after it, as PEFT lays them out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .budget import LayerAllocation
from .config import CONFIG_NAME, WEIGHTS_NAME, SpaloraConfig
from .csr import check_csr
from .layer import DEFAULT_ADAPTER, SpaloraLinear, is_adaptable, layer_shape
from .plan import layer_sizes

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def check_adapter_name(adapter_name: str) -> None:
    """Adapter names become folder names: refuse anything that is not a plain one."""
    if not isinstance(adapter_name, str) or not _NAME_RE.fullmatch(adapter_name):
        raise ValueError(
            f"adapter name {adapter_name!r} must be a non-empty string of letters, digits, "
            "'_', '-' and '.' (it names a subfolder when saved)"
        )


def write_adapter(
    out: Path, config: SpaloraConfig, allocations: list[LayerAllocation], state: dict
) -> None:
    """adapter_config.json + adapter_model.safetensors of one adapter."""
    out.mkdir(parents=True, exist_ok=True)
    config.save(out)
    save_file(
        state,
        str(out / WEIGHTS_NAME),
        metadata={
            "format": "pt",
            "spalora_config": json.dumps(config.to_dict()),
            # [out, in] per adapted layer: lets plots show densities without the base model
            "shapes": json.dumps({a.name: [a.out_features, a.in_features] for a in allocations}),
        },
    )


def adapter_folder(adapter_dir: str | Path, adapter_name: str) -> Path:
    """Where an adapter named `adapter_name` lies under `adapter_dir`: its own subfolder, as
    save_pretrained writes non-default adapters, when there is one; else the folder itself."""
    adapter_dir = Path(adapter_dir)
    sub = adapter_dir / adapter_name
    if adapter_name != DEFAULT_ADAPTER and (sub / CONFIG_NAME).exists():
        return sub
    return adapter_dir


def read_config(folder: str | Path) -> SpaloraConfig:
    """An adapter folder's configuration; a damaged or invalid file is a ValueError naming it
    (the parser's own message names no file)."""
    try:
        return SpaloraConfig.load(folder)
    except (ValueError, TypeError, AttributeError) as exc:  # bad JSON, keys or values
        raise ValueError(f"{Path(folder) / CONFIG_NAME}: {exc}") from exc


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or corrupt file is a ValueError naming it."""
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc


def check_tensor_file(path: str | Path) -> None:
    """Read a safetensors file's header only: raises as `read_tensors` would on a truncated or
    corrupt file, without loading a tensor."""
    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc


def check_finite(state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Refuse NaN or inf in an adapter's values: merged or loaded, they spread to every output.

    `where` (the file, or what is being done) starts the message."""
    for key, value in state.items():
        if value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ValueError(
                    f"{where}: tensor {key!r} holds {bad} of {value.numel()} values that are "
                    "NaN or inf"
                )


def read_adapter(
    adapter_dir: str | Path, adapter_name: str
) -> tuple[SpaloraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a saved adapter (its subfolder for a named one, if any); a
    damaged file or a NaN / inf value is a ValueError naming the file (and the tensor)."""
    folder = adapter_folder(adapter_dir, adapter_name)
    config = read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
    state = read_tensors(weights)
    check_finite(state, weights)
    return config, state


def expected_shapes(name: str, out_f: int, in_f: int, r: int, nnz: int) -> dict[str, tuple]:
    """The tensors one layer of an adapter has in a saved file, with their shapes."""
    shapes: dict[str, tuple] = {}
    if r > 0:
        shapes[f"{name}.lora_A"] = (r, in_f)
        shapes[f"{name}.lora_B"] = (out_f, r)
    if nnz > 0:
        shapes[f"{name}.sparse_values"] = (nnz,)
        shapes[f"{name}.sparse_crow"] = (out_f + 1,)
        shapes[f"{name}.sparse_col"] = (nnz,)
    return shapes


def validate_adapter_state(
    model: nn.Module, config: SpaloraConfig, state: dict[str, torch.Tensor], wrapped: bool = False
) -> None:
    """Check that a saved adapter fits `model`: names, sizes, shapes, CSR indices and finite
    values.

    Raises a ValueError naming the first tensor that does not fit; reads nothing but `state`.
    """
    modules = dict(model.named_modules())
    expected: set[str] = set()
    for name in sorted(set(config.rank_pattern) | set(config.nnz_pattern)):
        module = modules.get(name)
        if module is None:
            raise ValueError(f"adapter layer {name!r} does not exist in this model")
        if wrapped and isinstance(module, SpaloraLinear):
            module = module.base_layer
        if not is_adaptable(module):
            raise ValueError(f"adapter layer {name!r} is a {type(module).__name__}, not a Linear")
        out_f, in_f = layer_shape(module)
        r, k, _ = layer_sizes(config, name)
        if r < 0 or k < 0 or k > out_f * in_f:
            raise ValueError(f"adapter layer {name!r}: r={r}, nnz={k} do not fit {out_f}x{in_f}")
        for key, shape in expected_shapes(name, out_f, in_f, r, k).items():
            expected.add(key)
            if key not in state:
                raise ValueError(f"adapter file lacks tensor {key!r}")
            if tuple(state[key].shape) != shape:
                raise ValueError(
                    f"tensor {key!r} has shape {tuple(state[key].shape)}, but the model's layer "
                    f"({out_f}x{in_f}, r={r}, nnz={k}) needs {shape}"
                )
        if k > 0:
            check_csr(name, state[f"{name}.sparse_crow"], state[f"{name}.sparse_col"], in_f)
    extra = sorted(set(state) - expected)
    if extra:
        raise ValueError(
            f"adapter file has tensors this configuration does not expect: {extra[:5]}"
        )
    check_finite(state, "adapter state")


def split_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`<layer>.<tensor>` keys grouped by layer: {layer: {tensor: value}}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, attr = key.rpartition(".")
        grouped.setdefault(name, {})[attr] = value
    return grouped
