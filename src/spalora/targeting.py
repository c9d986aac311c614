"""Which modules of a model an adapter (or quantization) takes, and replacing them in place.

Shared by spalora.model and spalora.quant: it imports neither, so they do not import each other.
"""

from __future__ import annotations

import re

from torch import nn

from .config import SpaloraConfig
from .layer import SpaloraLinear, is_adaptable


def matches(name: str, patterns: list[str] | str | None) -> bool:
    """A list matches exact names or name suffixes ("q_proj" matches "model.layers.0.q_proj");
    a plain string is a regex matched against the full name; None matches nothing."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule `name` ("a.b.c") of `root` by `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def unwrapped(module: nn.Module) -> nn.Module:
    """The base layer of a SpaloraLinear; any other module as it is."""
    return module.base_layer if isinstance(module, SpaloraLinear) else module


def find_target_modules(
    model: nn.Module, config: SpaloraConfig, include_wrapped: bool = False
) -> list[str]:
    """Names of the Linear/Conv1D modules selected by target_modules minus exclude_modules.

    "all-linear" takes every Linear/Conv1D except the output head (as PEFT does). A list matches
    exact names or name suffixes; a plain string is a regex matched against the full name.
    `include_wrapped` also selects layers already wrapped (adding a second adapter to a model).
    """
    output_head = None
    if hasattr(model, "get_output_embeddings"):
        output_head = model.get_output_embeddings()
    names = []
    for name, module in _candidates(model):
        if isinstance(module, SpaloraLinear) and not include_wrapped:
            continue
        if config.target_modules == "all-linear":
            hit = module is not output_head
        else:
            hit = matches(name, config.target_modules)
        if hit and not matches(name, config.exclude_modules):
            names.append(name)
    if not names:
        available = sorted({n.split(".")[-1] for n, _ in _candidates(model)})
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no Linear/Conv1D module. "
            f"Module names in this model include: {available}"
        )
    return names


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Adaptable modules and wrapped layers, not the base layers inside the wrappers."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if (is_adaptable(m) or isinstance(m, SpaloraLinear)) and "base_layer" not in n.split(".")
    ]
