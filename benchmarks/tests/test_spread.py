"""sparse-credit's probe and spread (benchmarks/spread.py)."""

import pytest
import torch

from benchmarks.spread import (
    credit_spread,
    entry_gradient_mean,
    layer_gradient_mass,
    sampled_support,
)
from spalora.budget import LayerShape, allocate_nnz, allocate_nnz_by_weight
from tests.conftest import tiny_llama


def batch_stream(seed=0):
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, 96, (2, 12), generator=gen)
        yield {"input_ids": ids, "labels": ids}


def test_gradient_mass_matches_a_float64_reference_and_changes_nothing():
    model = tiny_llama()
    names = ("q_proj", "v_proj", "down_proj")
    layers = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names}
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen base, as under an adapter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mass = layer_gradient_mass(model, layers, batch_stream(), 3)
    # reference: the same batches through a float64 copy, every weight trainable
    ref = tiny_llama().double()
    ref.load_state_dict({k: v.double() for k, v in before.items()})
    want = dict.fromkeys(layers, 0.0)
    stream = batch_stream()
    for _ in range(3):
        ref.zero_grad()
        ref(**next(stream)).loss.backward()
        for n in layers:
            want[n] += ref.get_submodule(n).weight.grad.abs().sum().item() / 3
    assert mass == pytest.approx(want, rel=1e-4)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    assert model.training is False  # tiny_llama() is in eval mode and stays there
    assert not any(p.requires_grad for p in model.parameters())  # still frozen


def test_spread_follows_the_gradient_mass_exactly_and_fits_every_layer():
    shapes = [LayerShape("a", 10, 10), LayerShape("b", 10, 10), LayerShape("c", 20, 10)]
    assert credit_spread(shapes, 60, {"a": 1.0, "b": 2.0, "c": 3.0}) == [10, 20, 30]
    # "c" would take 3/4 of 300 = 225 entries but holds 200: the rest goes to a and b by weight
    assert credit_spread(shapes, 300, {"a": 1.0, "b": 3.0, "c": 12.0}) == [25, 75, 200]
    assert sum(credit_spread(shapes, 257, {"a": 0.3, "b": 0.1, "c": 0.7})) == 257
    with pytest.raises(ValueError, match="non-negative number per layer"):
        allocate_nnz_by_weight(shapes, 10, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="not all zero"):
        allocate_nnz_by_weight(shapes, 10, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        allocate_nnz_by_weight(shapes, 10, [1.0, float("inf"), 1.0])
    for total in (401, -1):
        with pytest.raises(ValueError, match="do not fit"):
            allocate_nnz_by_weight(shapes, total, [1.0, 1.0, 1.0])


def test_sparse_credit_builds_the_budget_exactly_and_refuses_without_data():
    from benchmarks.methods import METHODS, adapted_linears, budget_params, trainable_params

    build = METHODS["sparse-credit"].build
    model = build(tiny_llama(), 2, {"seed": 0, "mask_batches": 2, "probe_batches": batch_stream})
    assert trainable_params(model) == budget_params(tiny_llama(), 2)
    # the counts are the spread of the mass measured on the same two batches, which neither
    # shape rule gives
    base = tiny_llama()
    layers = {n: m for n, m in base.named_modules() if m in set(adapted_linears(base))}
    mass = layer_gradient_mass(base, layers, batch_stream(), 2)
    shapes = [LayerShape(n, m.out_features, m.in_features) for n, m in layers.items()]
    want = credit_spread(shapes, budget_params(base, 2), mass)
    assert list(model.spalora_config.nnz_pattern.values()) == want
    for rule in ("density", "lora"):
        assert want != allocate_nnz(shapes, budget_params(base, 2), rule)
    with pytest.raises(ValueError, match="needs the run's training batches"):
        build(tiny_llama(), 2, {"seed": 0})


def test_sampled_support_draws_in_proportion_to_the_weights():
    gen = torch.Generator().manual_seed(0)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0], dtype=torch.float64)
    counts = torch.zeros(5)
    for _ in range(4000):
        counts[sampled_support(w, 1, gen).argmax()] += 1
    assert counts[4] == 0  # weight 0: never drawn
    assert torch.allclose(counts[:4] / 4000, w[:4].float() / 10, atol=0.025)
    # k of n without replacement: every positive entry before any zero one
    top = torch.topk(sampled_support(w, 4, gen), 4).indices
    assert sorted(top.tolist()) == [0, 1, 2, 3]


def _masked(model):
    """Set the masks as training's first step does (the strategy needs no data)."""
    from spalora import apply_masks

    layers = {n: lay for n, lay in model.adapter_layers().items() if lay.nnz > 0}
    apply_masks(layers, model.spalora_config.mask_strategy, seed=0, progress=False)
    return layers


def test_sparse_sampled_spreads_as_shira_and_draws_high_gradient_entries():
    from benchmarks.methods import METHODS, adapted_linears, budget_params, trainable_params
    from spalora.budget import allocate_nnz

    build = METHODS["sparse-sampled"].build
    opts = {"seed": 0, "mask_batches": 2, "probe_batches": batch_stream}
    model = build(tiny_llama(), 2, opts)
    assert trainable_params(model) == budget_params(tiny_llama(), 2)
    got = _masked(model)
    base = tiny_llama()
    layers = {n: m for n, m in base.named_modules() if m in set(adapted_linears(base))}
    shapes = [LayerShape(n, m.out_features, m.in_features) for n, m in layers.items()]
    want = allocate_nnz(shapes, budget_params(base, 2), "lora")
    assert [lay.nnz for lay in got.values()] == want  # ShiRA's r (m + n) per layer
    # the drawn entries carry more gradient than the layer's average entry, everywhere
    g = entry_gradient_mean(base, layers, batch_stream(), 2)
    for name, lay in got.items():
        (probe,) = [w for n, w in g.items() if name.endswith(n)]
        flat = lay.sparse_rows * lay.in_features + lay.sparse_col
        drawn = probe.reshape(-1)[flat]
        assert drawn.mean() > 1.2 * probe.mean(), name
    again = _masked(build(tiny_llama(), 2, opts))  # the same seed draws the same support
    for a, b in zip(got.values(), again.values(), strict=True):
        assert torch.equal(a.sparse_col, b.sparse_col) and torch.equal(a.sparse_crow, b.sparse_crow)
    with pytest.raises(ValueError, match="needs the run's training batches"):
        build(tiny_llama(), 2, {"seed": 0})


def test_share_table_reports_shares_and_per_entry_ratios():
    from benchmarks.path_credit import share_table, sixth

    result = {"model.layers.0.q": (10, 1.0, 5.0), "model.layers.29.q": (30, 3.0, 5.0)}
    text = share_table(result, sixth, "depth", ("credit", "|s|"))
    assert "| blocks 0-4 | 0.250 | 0.250 | 1.00 | 0.500 | 2.00 |" in text
    assert "| blocks 25-29 | 0.750 | 0.750 | 1.00 | 0.500 | 0.67 |" in text


def test_decile_table_ranks_within_each_layer():
    from benchmarks.path_credit import decile_table

    # layer a: credit grows with the early |g|; layer b: 100x larger gradients, flat credit.
    # Ranked within each layer, b's scale cannot put its entries in the top bins.
    g = torch.arange(1, 101, dtype=torch.float64)
    early = {"a": (g, g.clone()), "b": (100 * g.flip(0), torch.full((100,), 50.5))}
    table = [
        [c.strip() for c in r.strip("|").split("|")] for r in decile_table(early, 2).split("\n")
    ]
    per_entry = {row[0]: float(row[2]) for row in table if row[0].endswith("of 2")}
    # a's lower half earns 25.5 each, its upper half 75.5; b's 50.5 in both: (76, 126) / 101
    assert per_entry == {"1 of 2": 0.75, "2 of 2": 1.25}


def test_early_credit_needs_steps_after_the_early_ones():
    from benchmarks.path_credit import credit_run

    with pytest.raises(ValueError, match="needs more than 8 steps"):
        credit_run("sparse-random", 1e-2, 0, steps=8, early=8)
