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


def credit_run(method: str, lr: float, seed: int, steps: int, r_eq: int = 2) -> dict:
    from spalora.hub import load_model_and_tokenizer
    from spalora.train import train

    profile = PROFILES["v2"]
    spec = RunSpec(method, (), lr, seed, "arithmetic", r_eq, profile, "smollm2-135m")
    model, tokenizer = load_model_and_tokenizer(spec.model)
    model = build_method(method, model, r_eq, method_options(spec))
    values: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():  # each tensor once, under its layer's name
        p = getattr(module, "sparse_values", None)
        if p is not None and all(p is not q for q in values.values()):
            values[name.removesuffix(".default")] = p
    credit = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in values.items()}
    before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def pre(opt, args, kwargs):
        for n, p in values.items():
            if p.grad is not None:
                before[n] = (p.detach().clone(), p.grad.detach().clone())

    def post(opt, args, kwargs):
        for n, p in values.items():
            if n in before and before[n][0].shape == p.shape:
                old, g = before[n]
                credit[n] -= (g * (p.detach() - old)).double()
        before.clear()

    h1 = register_optimizer_step_pre_hook(pre)
    h2 = register_optimizer_step_post_hook(post)
    try:
        task = task_loader(profile)("arithmetic")
        cfg = replace(spec.train_config(), steps=steps, progress=True)
        train(model, tokenizer, task.train, cfg)
    finally:
        h1.remove()
        h2.remove()
    return {n: (credit[n], values[n].detach().abs().double()) for n in values}


def probe_run(batches: int, seed: int = 0, r_eq: int = 2) -> dict:
    """{layer: (sum over entries of mean |g| per micro-batch, entries)} at the base model."""
    from spalora.data import batches as stream
    from spalora.data import encode_examples
    from spalora.hub import load_model_and_tokenizer

    from .methods import adapted_linears

    profile = PROFILES["v2"]
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    task = task_loader(profile)("arithmetic")
    rows, _ = encode_examples(tokenizer, task.train, profile.max_length)
    layers = {n: m for n, m in model.named_modules() if m in set(adapted_linears(model))}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers.values():
        m.weight.requires_grad_(True)
    total = {n: torch.zeros((), dtype=torch.float64) for n in layers}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i, batch in enumerate(stream(rows, profile.batch_size, pad, seed)):
        if i == batches:
            break
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for n, m in layers.items():
            total[n] += m.weight.grad.abs().double().sum() / batches
    return {n: (float(total[n]), m.weight.numel()) for n, m in layers.items()}


def share_table(result: dict, key, label: str) -> str:
    """Rows of (entries, credit, |s|) summed by key(layer name)."""
    rows = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for name, (credit, mag) in result.items():
        row = rows[key(name)]
        row[0] += credit.numel()
        row[1] += float(credit.sum())
        row[2] += float(mag.sum())
    n, c, m = (sum(r[i] for r in rows.values()) for i in range(3))
    lines = [
        f"| {label} | share of entries | share of -g.dtheta | per entry (x mean) | share of |s| "
        "| per entry (x mean) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t, (k, cr, mg) in rows.items():
        lines.append(
            f"| {t} | {k / n:.3f} | {cr / c:.3f} | {(cr / c) / (k / n):.2f} | {mg / m:.3f} "
            f"| {(mg / m) / (k / n):.2f} |"
        )
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
    a = ap.parse_args(argv)
    if a.probe:
        probe = probe_run(a.probe, a.seed)
        # the same tables, the probe's mean |g| standing in for credit (and for |s|)
        fake = {
            n: (torch.full((k,), g / k), torch.full((k,), g / k)) for n, (g, k) in probe.items()
        }
        print(f"mean |g| per entry at the base model, first {a.probe} batches (seed {a.seed})\n")
    else:
        fake = credit_run(a.method, a.lr, a.seed, a.steps)
        print(f"{a.method} lr={a.lr:g} seed={a.seed}, {a.steps} steps (arithmetic, r_eq 2)\n")
    print(share_table(fake, lambda n: n.rsplit(".", 1)[-1], "module"))
    print(share_table(fake, sixth, "depth"))


if __name__ == "__main__":
    main()
