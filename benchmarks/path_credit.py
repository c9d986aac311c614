"""`python -m benchmarks.path_credit`: where a random sparse support's entries realize their loss
reduction, by module type (issue 25, direction 3: is a value-based score non-uniform across
layers where magnitude, under Adam, is not?).

Trains one protocol-2 run's configuration for `--steps` steps and accumulates, per entry, the
first-order loss reduction each optimizer step realized, -g . delta-theta (Synaptic
Intelligence's path integral), through global optimizer hooks, so the loop is the library's own.
Prints, per module type and per sixth of the depth, its share of the budget, of the realized
reduction, and the ratio (credit per parameter, relative to the mean), beside the same table for
|value|. `--probe N` instead measures, before any training, the mean |gradient| per entry of
each layer over the first N training batches: under Adam an entry's first steps realize about
lr |g|, so this is the credit rate at step 0, at the cost of N backward passes.
"""

from __future__ import annotations

import argparse
import collections
from dataclasses import replace

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .accuracy import PROFILES, RunSpec, method_options, task_loader
from .methods import build_method


def credit_run(
    method: str, lr: float, seed: int, steps: int, r_eq: int = 2, early: int = 0
) -> dict:
    """{layer: (entries, realized credit, sum |value|)}; with early=K > 0 also, per layer, each
    entry's mean |g| over the first K steps and the credit it realized after them (tensors)."""
    from spalora.hub import load_model_and_tokenizer
    from spalora.train import train

    if early and steps <= early:
        raise ValueError(f"--early {early} needs more than {early} steps, got --steps {steps}")

    profile = PROFILES["v2"]
    spec = RunSpec(method, (), lr, seed, "arithmetic", r_eq, profile, "smollm2-135m")
    model, tokenizer = load_model_and_tokenizer(spec.model)
    model = build_method(method, model, r_eq, method_options(spec))
    if model.spalora_config.method == "spalora":  # resizes its layers: the hooks would go stale
        raise ValueError(f"{method}: path credit follows fixed supports only (a sparse method)")
    values: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():  # each tensor once, under its layer's name
        p = getattr(module, "sparse_values", None)
        if p is not None and all(p is not q for q in values.values()):
            values[name.removesuffix(".default")] = p
    credit = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in values.items()}
    late = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in values.items()}
    grad0 = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in values.items()}
    before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    step = [0]

    def pre(opt, args, kwargs):
        for n, p in values.items():
            if p.grad is not None:
                before[n] = (p.detach().clone(), p.grad.detach().clone())

    def post(opt, args, kwargs):
        if not before:  # a step that moved no entry (a warm-up, a mask collection) counts not
            return
        for n, p in values.items():
            if n in before and before[n][0].shape == p.shape:
                old, g = before[n]
                gain = -(g * (p.detach() - old)).double()
                credit[n] += gain
                if step[0] < early:
                    grad0[n] += g.double().abs() / early
                else:
                    late[n] += gain
        before.clear()
        step[0] += 1

    h1 = register_optimizer_step_pre_hook(pre)
    h2 = register_optimizer_step_post_hook(post)
    try:
        task = task_loader(profile)("arithmetic")
        cfg = replace(spec.train_config(), steps=steps, progress=True)
        train(model, tokenizer, task.train, cfg)
    finally:
        h1.remove()
        h2.remove()
    sums = {
        n: (credit[n].numel(), float(credit[n].sum()), float(values[n].detach().abs().sum()))
        for n in values
    }
    if early and any(not bool(g.any()) for g in grad0.values()):
        raise ValueError("an entry tensor took no gradient in the early steps: nothing to rank")
    return sums | ({"early": {n: (grad0[n], late[n]) for n in values}} if early else {})


def decile_table(early: dict, bins: int = 10) -> str:
    """Entries ranked by their early mean |g| within their own layer (so the layer's level does
    not count), pooled into `bins` bins: each bin's share of the credit realized after the early
    steps, per entry relative to the mean. Flat: an entry's early gradient does not say what it
    will earn; rising: supports sampled by early |g| earn more per entry (first order)."""
    got = torch.zeros(bins, dtype=torch.float64)
    count = torch.zeros(bins, dtype=torch.float64)
    for g, c in early.values():
        rank = g.flatten().argsort().argsort().double() / g.numel()
        b = (rank * bins).long().clamp(max=bins - 1)
        c = c.flatten().double()
        got.index_add_(0, b, c)
        count.index_add_(0, b, torch.ones_like(c))
    rate = (got / got.sum()) / (count / count.sum())
    lines = ["| early |g| bin (within layer) | share of later credit | per entry (x mean) |"]
    lines.append("| --- | ---: | ---: |")
    for k in range(bins):
        lines.append(f"| {k + 1} of {bins} | {float(got[k] / got.sum()):.3f} | {rate[k]:.2f} |")
    return "\n".join(lines) + "\n"


def probe_run(batches: int, seed: int = 0) -> dict:
    """{layer: (gradient mass, entries)} at the base model over the run's first micro-batches
    (benchmarks.spread.layer_gradient_mass, as sparse-credit measures it)."""
    from spalora.hub import load_model_and_tokenizer

    from .accuracy import training_stream
    from .methods import adapted_linears
    from .spread import layer_gradient_mass

    profile = PROFILES["v2"]
    spec = RunSpec("sparse-random", (), 1e-2, seed, "arithmetic", 2, profile, "smollm2-135m")
    model, tokenizer = load_model_and_tokenizer(spec.model)
    for p in model.parameters():
        p.requires_grad_(False)
    task = task_loader(profile)("arithmetic")
    layers = {n: m for n, m in model.named_modules() if m in set(adapted_linears(model))}
    stream = training_stream(tokenizer, task.train, spec.train_config())()
    mass = layer_gradient_mass(model, layers, stream, batches)
    return {n: (m.weight.numel(), mass[n]) for n, m in layers.items()}


def share_table(result: dict, key, label: str, scores: tuple[str, ...]) -> str:
    """Per group of layers (key(layer name)): its share of the entries, and for each score its
    share and its share per entry relative to the mean. `result`: {layer: (entries, *sums)}."""
    rows = collections.defaultdict(lambda: [0.0] * (1 + len(scores)))
    for name, values in result.items():
        row = rows[key(name)]
        for i, v in enumerate(values):
            row[i] += v
    totals = [sum(r[i] for r in rows.values()) for i in range(1 + len(scores))]
    head = "".join(f" share of {s} | per entry (x mean) |" for s in scores)
    lines = [
        f"| {label} | share of entries |{head}",
        "| --- | ---: |" + " ---: | ---: |" * len(scores),
    ]
    for t, row in rows.items():
        share = [v / tot for v, tot in zip(row, totals, strict=True)]
        cells = "".join(f" {x:.3f} | {x / share[0]:.2f} |" for x in share[1:])
        lines.append(f"| {t} | {share[0]:.3f} |{cells}")
    return "\n".join(lines) + "\n"


def sixth(name: str, depth: int = 30) -> str:
    """Which sixth of a `depth`-block model the layer is in, as "blocks a-b"."""
    block = int(name.split(".layers.")[1].split(".")[0])
    k = block * 6 // depth
    return f"blocks {k * depth // 6}-{(k + 1) * depth // 6 - 1}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="sparse-random")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--probe", type=int, default=0, help="mean |g| over N batches instead")
    ap.add_argument(
        "--early", type=int, default=0, help="also: later credit by the first K steps' |g|"
    )
    a = ap.parse_args(argv)
    if a.probe:
        result, scores = probe_run(a.probe, a.seed), ("mean |g| mass",)
        print(f"gradient mass at the base model, first {a.probe} micro-batches (seed {a.seed})\n")
    else:
        result = credit_run(a.method, a.lr, a.seed, a.steps, early=a.early)
        early, scores = result.pop("early", None), ("-g.dtheta", "|s|")
        print(f"{a.method} lr={a.lr:g} seed={a.seed}, {a.steps} steps (arithmetic, r_eq 2)\n")
        if early:
            print(f"credit after step {a.early} by the first {a.early} steps' mean |g|\n")
            print(decile_table(early))
    print(share_table(result, lambda n: n.rsplit(".", 1)[-1], "module", scores))
    print(share_table(result, sixth, "depth", scores))


if __name__ == "__main__":
    main()
