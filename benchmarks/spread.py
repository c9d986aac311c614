"""Issue 25's spread pilot: where a random sparse support's entries go across layers, set by
the credit rate each layer offers at step 0.

Under Adam an entry's first steps move it by about the learning rate whatever its gradient's
scale, so the loss reduction it realizes per step is about lr |g|: a layer whose entries have a
larger mean |gradient| gives more per entry. `python -m benchmarks.path_credit` measured that
this step-0 rate per module type predicts the credit (-g . delta-theta) realized over 60 steps of
`sparse-random` within ~15% (docs/results/README.md). `sparse-credit` spreads a budget's nonzeros
in proportion to size x mean |g| (the total |g| of each layer), measured over the run's first
`mask_batches` training micro-batches at its seed, at random positions within each layer.

This is a pilot in the harness, not yet the library's: it runs the probe in the method's
builder (`probe_batches`, given by the harness), before training starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from spalora.budget import LayerShape, allocate_nnz_by_weight


def layer_gradient_mass(
    model: nn.Module, layers: dict[str, nn.Linear], batches: Iterator[dict], n: int
) -> dict[str, float]:
    """{layer: sum over its weight's entries of |dL/dW|, averaged over n micro-batches}, at the
    model as it is, on its device (no parameter changes; only the probed weights take
    gradients, and every flag, the mode and the gradients are as before afterwards)."""
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    mass = {name: torch.zeros((), dtype=torch.float64) for name in layers}
    training = model.training
    device = params[0].device
    model.train()
    try:
        for p in params:
            p.requires_grad_(False)
        for m in layers.values():
            m.weight.requires_grad_(True)
        for _ in range(n):
            model.zero_grad(set_to_none=True)
            batch = {k: v.to(device) for k, v in next(batches).items()}
            model(**batch).loss.backward()
            for name, m in layers.items():
                mass[name] += m.weight.grad.detach().abs().double().sum() / n
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in zip(params, was, strict=True):
            p.requires_grad_(flag)
        model.train(training)
    return {name: float(v) for name, v in mass.items()}


def credit_spread(shapes: list[LayerShape], total: int, mass: dict[str, float]) -> list[int]:
    """Nonzeros per layer in proportion to its gradient mass (size x mean |g|), summing to
    `total`, none above its layer's size."""
    return allocate_nnz_by_weight(shapes, total, [mass[s.name] for s in shapes])


def build_sparse_credit(names: tuple[str, ...]) -> Callable:
    """The `sparse-credit` builder: probe, spread, then our sparse adapter on those counts."""

    def build(model: nn.Module, r_eq: int, variant: dict) -> nn.Module:
        from spalora import SpaloraConfig, get_spalora_model

        from .methods import adapted_linears, budget_params

        if "probe_batches" not in variant:
            raise ValueError("sparse-credit needs the run's training batches (probe_batches)")
        linear = set(adapted_linears(model))
        layers = {n: m for n, m in model.named_modules() if m in linear}
        n = int(variant.get("mask_batches", 8))
        mass = layer_gradient_mass(model, layers, variant["probe_batches"](), n)
        shapes = [LayerShape(name, m.out_features, m.in_features) for name, m in layers.items()]
        counts = credit_spread(shapes, budget_params(model, r_eq), mass)
        cfg = SpaloraConfig(
            method="sparse",
            target_modules=list(names),
            nnz_pattern=dict(zip(layers, counts, strict=True)),
            mask_strategy="random",
            seed=variant.get("seed", 0),
        )
        return get_spalora_model(model, cfg)

    return build
