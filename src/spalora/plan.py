"""An adapter's plan: the layers a configuration takes and each one's rank, nonzeros and alpha.

Sizes come from saved per-layer patterns (a reloaded adapter), a budget (solved by
spalora.budget), or r + density. The plan's config has the patterns filled in, so saving it
describes the adapter exactly; the caller's config is never mutated.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from .budget import LayerAllocation, LayerShape, parse_budget, solve_budget
from .config import SpaloraConfig
from .layer import ADAPTER_KEYS, is_quantized, layer_shape
from .methods.registry import get_method
from .targeting import find_target_modules, unwrapped


@dataclasses.dataclass
class AdapterPlan:
    """An adapter's resolved configuration (per-layer patterns filled in) and sizes."""

    config: SpaloraConfig
    allocations: list[LayerAllocation]
    # a method that trains over the budget (ours): what it truncates to ("uniform_allocations",
    # "budget_params"), readable on the model while this adapter is active
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


def layer_sizes(config: SpaloraConfig, name: str) -> tuple[int, int, float]:
    """(r, nnz, lora_alpha) of one layer under a resolved config; r = nnz = 0 off its targets."""
    return (
        int(config.rank_pattern.get(name, 0)),
        int(config.nnz_pattern.get(name, 0)),
        float(config.alpha_pattern.get(name, config.lora_alpha)),
    )


def layer_density(name: str, config: SpaloraConfig) -> float | None:
    """The density of one layer: the first density_pattern key that matches it, else density."""
    for key, value in config.density_pattern.items():
        if name == key or name.endswith("." + key) or re.fullmatch(key, name):
            return float(value)
    return config.density


def is_adapter_param(param_name: str) -> bool:
    return param_name.rpartition(".")[2] in ADAPTER_KEYS


def base_numel(model: nn.Module) -> int:
    """Base parameters (adapters excluded), a quantized layer's weight at its logical size."""
    n = sum(p.numel() for name, p in model.named_parameters() if not is_adapter_param(name))
    return n + sum(m.in_features * m.out_features for m in model.modules() if is_quantized(m))


def uniform_allocation(
    model: nn.Module, config: SpaloraConfig, shapes: list[LayerShape]
) -> list[LayerAllocation]:
    """RoSA's split of the budget: one rank everywhere, the rest as the same density."""
    # base parameters only: a second adapter's "0.5%" must not count the first one's
    budget = parse_budget(config.budget, shapes, base_numel(model))
    return solve_budget(
        shapes,
        budget,
        config.effective_rank_fraction,
        config.uses_sparse,
        config.nnz_allocation,
    )


def resolve_allocation(
    model: nn.Module, config: SpaloraConfig, names: list[str]
) -> list[LayerAllocation]:
    """Per-layer r and nnz from saved patterns, a budget, or r + density."""
    modules = dict(model.named_modules())
    shapes = [LayerShape(n, *layer_shape(unwrapped(modules[n]))) for n in names]
    if config.rank_pattern or config.nnz_pattern:
        return [
            LayerAllocation(s.name, s.out_features, s.in_features, *layer_sizes(config, s.name)[:2])
            for s in shapes
        ]
    if config.budget is not None:
        uniform = uniform_allocation(model, config, shapes)
        budget = parse_budget(config.budget, shapes, base_numel(model))
        return get_method(config.method).initial_allocation(uniform, shapes, budget, config)
    r = int(config.r) if config.uses_lora else 0
    # An explicit r must fit every layer (a budget's rank is the solver's and stays as it is):
    # above a layer's smaller side it trains more than a full-rank update needs.
    for s in shapes:
        if r > min(s.out_features, s.in_features):
            raise ValueError(
                f"r={r} exceeds the smaller dimension of layer {s.name} "
                f"({s.out_features}x{s.in_features}); use r <= "
                f"{min(min(t.out_features, t.in_features) for t in shapes)} or a budget"
            )
    if config.uses_sparse:
        if config.density is None and not config.density_pattern:
            raise ValueError(f"method {config.method!r} needs a density or a budget")
        nnz = []
        for s in shapes:
            density = layer_density(s.name, config)
            nnz.append(max(1, int(density * s.numel)) if density else 0)
    else:
        nnz = [0] * len(shapes)
    return [
        LayerAllocation(s.name, s.out_features, s.in_features, r, k)
        for s, k in zip(shapes, nnz, strict=True)
    ]


def plan_adapter(model: nn.Module, config: SpaloraConfig, wrapped: bool = False) -> AdapterPlan:
    """Which layers an adapter takes and their sizes; `config` is copied, never mutated.

    `wrapped`: the model holds adapters already (its wrapped layers may be targeted again).
    """
    config = dataclasses.replace(config)  # the caller's config stays reusable
    names = find_target_modules(model, config, include_wrapped=wrapped)
    if config.rank_pattern or config.nnz_pattern:  # a saved adapter: exactly its layers
        saved = set(config.rank_pattern) | set(config.nnz_pattern)
        names = [n for n, _ in model.named_modules() if n in saved]
    allocs = resolve_allocation(model, config, names)
    extras: dict[str, Any] = {}
    if get_method(config.method).trains_over_budget and config.budget is not None:
        # what the method truncates to: recomputed from the budget, so a reloaded
        # (over-provisioned or already truncated) adapter knows it too
        shapes = [LayerShape(a.name, a.out_features, a.in_features) for a in allocs]
        uniform = uniform_allocation(model, config, shapes)
        extras = {"uniform_allocations": uniform, "budget_params": sum(a.params for a in uniform)}
    config.rank_pattern = {a.name: a.r for a in allocs}
    config.nnz_pattern = {a.name: a.nnz for a in allocs}
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(
            getattr(model, "config", None), "_name_or_path", None
        )
    return AdapterPlan(config, allocs, extras)
