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


def _mean_abs_gradient(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterator[dict],
    n: int,
    per_entry: bool,
) -> dict[str, torch.Tensor]:
    """{layer: |dL/dW| averaged over n micro-batches (float64), per entry or summed over the
    layer}, at the model as it is, on its device (no parameter changes; only the probed weights
    take gradients, and every flag, the mode and the gradients are as before afterwards)."""
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    shape = {name: m.weight.shape if per_entry else () for name, m in layers.items()}
    mean = {name: torch.zeros(shape[name], dtype=torch.float64) for name in layers}
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
                g = m.weight.grad.detach().abs().double()
                mean[name] += (g if per_entry else g.sum()).cpu() / n
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in zip(params, was, strict=True):
            p.requires_grad_(flag)
        model.train(training)
    return mean


def entry_gradient_mean(
    model: nn.Module, layers: dict[str, nn.Linear], batches: Iterator[dict], n: int
) -> dict[str, torch.Tensor]:
    """{layer: |dL/dW| per entry, averaged over n micro-batches (float64)}."""
    return _mean_abs_gradient(model, layers, batches, n, per_entry=True)


def layer_gradient_mass(
    model: nn.Module, layers: dict[str, nn.Linear], batches: Iterator[dict], n: int
) -> dict[str, float]:
    """{layer: sum over its weight's entries of |dL/dW|, averaged over n micro-batches}."""
    mass = _mean_abs_gradient(model, layers, batches, n, per_entry=False)
    return {k: float(v) for k, v in mass.items()}


def credit_spread(shapes: list[LayerShape], total: int, mass: dict[str, float]) -> list[int]:
    """Nonzeros per layer in proportion to its gradient mass (size x mean |g|), summing to
    `total`, none above its layer's size."""
    return allocate_nnz_by_weight(shapes, total, [mass[s.name] for s in shapes])


def sampled_support(weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Scores whose top k are k entries drawn without replacement with probability in proportion
    to `weights` (Gumbel top-k: log w + Gumbel noise). An entry of weight 0 is never drawn
    while a positive one is left."""
    u = torch.rand(weights.shape, generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
    return (weights.log() + gumbel).float()


def probe_count(variant: dict) -> int:
    """How many of the run's micro-batches a builder probes (`mask_batches`, default 8)."""
    return int(variant.get("mask_batches", 8))


def probe_stream(variant: dict, method: str) -> Iterator[dict]:
    """The run's training micro-batches from its start (the harness's `probe_batches`), for a
    builder that looks at data before training; refused in one line where there are none."""
    if "probe_batches" not in variant:
        raise ValueError(f"{method} needs the run's training batches (probe_batches)")
    return variant["probe_batches"]()


def _probe_inputs(model: nn.Module, variant: dict, method: str):
    """What a probing builder measures: the adapted layers by name, the run's training stream
    and how many micro-batches (`mask_batches`, default 8)."""
    from .methods import adapted_linears

    stream = probe_stream(variant, method)
    linear = set(adapted_linears(model))
    layers = {n: m for n, m in model.named_modules() if m in linear}
    return layers, stream, probe_count(variant)


def build_sparse_sampled(names: tuple[str, ...]) -> Callable:
    """The `sparse-sampled` builder: ShiRA's r (m + n) entries per layer, drawn at random with
    probability in proportion to each entry's mean |g| over the run's first `mask_batches`
    micro-batches (between `sparse-random-lora`'s uniform draw and the Fisher top-k)."""

    def build(model: nn.Module, r_eq: int, variant: dict) -> nn.Module:
        from spalora import SpaloraConfig, get_spalora_model

        layers, batches, n = _probe_inputs(model, variant, "sparse-sampled")
        weights = entry_gradient_mean(model, layers, batches, n)
        generator = torch.Generator().manual_seed(int(variant.get("seed", 0)))

        def draw(name: str, weight: torch.Tensor, k: int) -> torch.Tensor:
            # each layer's probe is used once: popped, so the closure (kept in the config for
            # the whole run) does not hold a float64 copy of every weight
            (layer,) = [n for n in weights if name == n or name.endswith("." + n)]
            probe = weights.pop(layer)
            if probe.shape != weight.shape:
                raise ValueError(f"{name}: probe {tuple(probe.shape)} != {tuple(weight.shape)}")
            return sampled_support(probe, k, generator)

        cfg = SpaloraConfig(
            method="sparse",
            target_modules=list(names),
            budget=f"r{r_eq}",
            nnz_allocation="lora",
            mask_strategy=draw,
            seed=variant.get("seed", 0),
        )
        return get_spalora_model(model, cfg)

    return build


def build_sparse_credit(names: tuple[str, ...]) -> Callable:
    """The `sparse-credit` builder: probe, spread, then our sparse adapter on those counts."""

    def build(model: nn.Module, r_eq: int, variant: dict) -> nn.Module:
        from spalora import SpaloraConfig, get_spalora_model

        from .methods import budget_params

        layers, batches, n = _probe_inputs(model, variant, "sparse-credit")
        mass = layer_gradient_mass(model, layers, batches, n)
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
