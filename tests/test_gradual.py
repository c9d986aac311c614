"""Our method reaching its budget gradually (reach_budget="cubic"): the cubic schedule, pruning
that keeps the optimizer state of what stays, and an end-to-end run that ends on the exact budget
and saves, reloads and merges like every other adapter."""

import pytest
import torch

from spalora import SpaloraConfig, get_spalora_model
from spalora.layer import SpaloraLinear
from spalora.methods import swap_parameters
from spalora.methods.spalora.controller import FLOOR
from spalora.methods.spalora.gradual import (
    ExchangeController,
    GradualController,
    proportional_split,
    prune_layer,
    random_free_positions,
)
from spalora.train import TrainConfig, train

from .conftest import WORD_EXAMPLES, assert_saves_reloads_and_merges, tiny_llama, word_tokenizer


def config(**kw) -> SpaloraConfig:
    base = dict(
        method="spalora",
        budget="r2",
        warmup_steps=0,
        mask_strategy="random",
        rank_fraction=0.0,
        reach_budget="cubic",
        prune_from=0.1,
        truncate_at=0.6,
        irls_every=2,
        lora_dropout=0.0,
    )
    return SpaloraConfig(**{**base, **kw})


def _adam_layer(r=3, nnz=30, steps=3, seed=0):
    torch.manual_seed(seed)
    layer = SpaloraLinear(torch.nn.Linear(9, 12), r=r, lora_alpha=4.0, nnz=nnz)
    layer.reset_lora()
    layer.set_mask(torch.randperm(9 * 12)[:nnz])
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B, layer.sparse_values], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        layer(torch.randn(4, 9)).pow(2).sum().backward()
        opt.step()
    return layer, opt


def test_pruning_sparse_entries_keeps_the_moments_of_those_that_stay():
    layer, opt = _adam_layer()
    old_A, old_S = layer.lora_A, layer.sparse_values
    values, flat = old_S.detach().clone(), layer.mask_flat_indices().clone()
    moments = {k: v.clone() for k, v in opt.state[old_S].items()}
    swaps, keep = prune_layer(layer, 3, 12)
    swap_parameters(opt, swaps, keep)
    top = torch.sort(torch.topk(values.abs(), 12).indices).values
    assert layer.nnz == 12 and torch.equal(layer.mask_flat_indices(), flat[top])
    assert torch.equal(layer.sparse_values.detach(), values[top])
    new = opt.state[layer.sparse_values]
    assert torch.equal(new["exp_avg"], moments["exp_avg"][top])
    assert torch.equal(new["exp_avg_sq"], moments["exp_avg_sq"][top])
    assert torch.equal(new["step"], moments["step"])
    # the rank did not change: the same factor tensors, their state untouched
    assert layer.lora_A is old_A and old_A in opt.state
    held = [p for g in opt.param_groups for p in g["params"]]
    assert not any(p is old_S for p in held) and any(p is layer.sparse_values for p in held)
    opt.zero_grad()
    layer(torch.randn(4, 9)).pow(2).sum().backward()
    opt.step()  # trains on with the new shapes


def test_pruning_a_rank_keeps_the_best_part_and_restarts_only_the_factors():
    layer, opt = _adam_layer()
    delta = (layer.scale * layer.lora_B @ layer.lora_A).detach().double()
    old_S = layer.sparse_values
    moments = opt.state[old_S]["exp_avg_sq"].clone()
    swaps, keep = prune_layer(layer, 1, 30)
    swap_parameters(opt, swaps, keep)
    U, S, Vh = torch.linalg.svd(delta)
    best = S[0] * torch.outer(U[:, 0], Vh[0])
    got = (layer.scale * layer.lora_B @ layer.lora_A).detach().double()
    torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-5)
    assert layer.lora_A not in opt.state and layer.lora_B not in opt.state  # basis rotated
    # every entry stays: the moments follow to the new tensor
    assert torch.equal(opt.state[layer.sparse_values]["exp_avg_sq"], moments)
    assert old_S not in opt.state and layer.nnz == 30


def test_nothing_to_prune_changes_nothing():
    layer, _ = _adam_layer()
    A, S = layer.lora_A, layer.sparse_values
    assert prune_layer(layer, 5, 40) == ({}, {})
    assert layer.lora_A is A and layer.sparse_values is S


def test_cubic_schedule_falls_from_the_start_size_to_the_budget():
    model = get_spalora_model(tiny_llama(), config())
    start = model.get_nb_trainable_parameters()[0]
    ctl = GradualController(model, total_steps=100, start_step=0, progress=False)
    P = model.budget_params
    # all of the budget as nonzeros, and LoRA at the rank all of it buys, each 1.5x
    assert start == ctl.start_params and start > 2.5 * P
    assert ctl.prune_step == 10 and ctl.truncate_step == 60
    assert ctl.budget_at(0) == ctl.budget_at(10) == start
    assert ctl.budget_at(60) == ctl.budget_at(99) == P
    mid = (start - P) * (1 - 25 / 50) ** 3 + P
    assert ctl.budget_at(35) == round(mid)
    seq = [ctl.budget_at(t) for t in range(101)]
    assert all(b >= a for a, b in zip(seq[1:], seq[:-1], strict=True))  # never grows


def test_tiny_run_prunes_in_steps_and_ends_on_the_exact_budget(tmp_path, monkeypatch):
    model = get_spalora_model(tiny_llama(), config())
    budget, start = model.budget_params, model.get_nb_trainable_parameters()[0]
    sizes = []
    real_step = GradualController.step

    def spy(self, step, optimizer):
        events = real_step(self, step, optimizer)
        sizes.append(self.params())
        held = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        assert held == self.params()  # the optimizer trains exactly what the layers hold
        return events

    monkeypatch.setattr(GradualController, "step", spy)
    cfg = TrainConfig(steps=30, batch_size=8, lora_lr=3e-3, sparse_lr=3e-2, progress=False)
    out = train(model, word_tokenizer(), WORD_EXAMPLES, cfg)
    assert sizes[0] == start and sizes[-1] == budget
    assert all(b <= a for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    assert len(set(sizes)) >= 4  # several prunes, not one cut
    assert out["final_phase"] == "joint" and len(out["budget_log"]) >= 3
    layers = model.adapter_layers()
    assert model.get_nb_trainable_parameters()[0] == budget
    assert sum(lay.num_adapter_parameters() for lay in layers.values()) == budget
    assert_saves_reloads_and_merges(model, tmp_path / "ad")


def test_free_positions_are_distinct_outside_the_support_and_uniform():
    g = torch.Generator().manual_seed(0)
    taken = torch.tensor([0, 1, 2, 5, 9])
    assert sorted(random_free_positions(taken, 5, 10, g).tolist()) == [3, 4, 6, 7, 8]
    counts = torch.zeros(10)
    for _ in range(2000):
        got = random_free_positions(taken, 2, 10, g)
        assert got.unique().numel() == 2 and not torch.isin(got, taken).any()
        counts[got] += 1
    free = counts[[3, 4, 6, 7, 8]]
    assert counts[taken].sum() == 0 and (free - 800).abs().max() < 100  # 4000 draws over 5
    with pytest.raises(ValueError, match="only 5 positions are free"):
        random_free_positions(taken, 6, 10, g)
    # a sparse support: rejection sampling, still distinct, outside, and uniform
    taken = torch.sort(torch.randperm(200, generator=g)[:20]).values
    counts = torch.zeros(200)
    for _ in range(4000):
        got = random_free_positions(taken, 5, 200, g)
        assert got.unique().numel() == 5 and not torch.isin(got, taken).any()
        counts[got] += 1
    free = counts[~torch.isin(torch.arange(200), taken)]
    assert counts[taken].sum() == 0 and (free - 20000 / 180).abs().max() < 50  # sd ~10.5


def test_growth_is_split_in_proportion_exactly_and_within_each_layers_room():
    assert proportional_split(10, {"a": 1, "b": 1, "c": 2}, {"a": 99, "b": 99, "c": 99}) in (
        {"a": 3, "b": 2, "c": 5},
        {"a": 2, "b": 3, "c": 5},
    )
    split = proportional_split(1001, {"a": 3, "b": 5, "c": 0}, {"a": 999, "b": 999, "c": 9})
    assert sum(split.values()) == 1001 and "c" not in split and abs(split["a"] - 375) <= 1
    # a full layer passes its share on
    split = proportional_split(100, {"a": 1, "b": 1}, {"a": 10, "b": 1000})
    assert split == {"a": 10, "b": 90}
    assert proportional_split(50, {"a": 1}, {"a": 20}) == {"a": 20}  # no room left anywhere


def test_exchange_keeps_the_strongest_entries_and_grows_fresh_ones_outside_the_support():
    layer, opt = _adam_layer(r=2, nnz=30)
    values, flat = layer.sparse_values.detach().clone(), layer.mask_flat_indices().clone()
    moments = opt.state[layer.sparse_values]["exp_avg_sq"].clone()
    step_before = opt.state[layer.sparse_values]["step"].clone()
    g = torch.Generator().manual_seed(0)
    swaps, keep = prune_layer(layer, 2, 20, grow=10, generator=g)
    swap_parameters(opt, swaps, keep)
    index = next(iter(keep.values()))
    new_flat = layer.mask_flat_indices()
    assert layer.nnz == 30 and torch.equal(new_flat, torch.sort(new_flat).values)
    top = torch.sort(torch.topk(values.abs(), 20).indices).values
    kept, grown = index >= 0, index < 0
    assert int(grown.sum()) == 10 and torch.equal(index[kept], top)
    assert torch.equal(new_flat[kept], flat[top]) and not torch.isin(new_flat[grown], flat).any()
    assert torch.equal(layer.sparse_values.detach()[kept], values[top])
    assert (layer.sparse_values.detach()[grown] == 0).all()
    state = opt.state[layer.sparse_values]
    assert torch.equal(state["exp_avg_sq"][kept], moments[top])
    assert (state["exp_avg"][grown] == 0).all()  # no momentum of its own yet
    # Adam's step count is the tensor's: a zero second moment would inflate the new entries'
    # steps; they start at the kept entries' mean instead
    torch.testing.assert_close(state["exp_avg_sq"][grown], moments[top].mean().expand(10))
    assert torch.equal(state["step"], step_before)
    opt.zero_grad()
    layer(torch.randn(4, 9)).pow(2).sum().backward()
    opt.step()  # trains on; the grown entries get gradients
    assert (layer.sparse_values.detach()[grown] != 0).all()


def exchange_config(**kw) -> SpaloraConfig:
    base = dict(overprovision=1.0, start_rank="split", reach_budget="exchange")
    return config(**{**base, **kw})


def test_exchange_fraction_falls_on_a_cosine_and_only_between_its_bounds():
    model = get_spalora_model(tiny_llama(), exchange_config(exchange_fraction=0.4))
    ctl = ExchangeController(model, total_steps=100, start_step=0, progress=False)
    P = model.budget_params
    assert ctl.start_params == P == model.get_nb_trainable_parameters()[0]
    assert ctl.fraction(9) == 0 and ctl.fraction(60) == 0 and ctl.fraction(10) == 0.4
    assert ctl.fraction(35) == pytest.approx(0.2) and ctl.budget_at(35) == P - round(0.2 * P)
    seq = [ctl.fraction(t) for t in range(10, 60)]
    assert all(b <= a for a, b in zip(seq[:-1], seq[1:], strict=True))


def test_tiny_exchange_run_never_exceeds_the_budget_and_moves_the_support(tmp_path, monkeypatch):
    model = get_spalora_model(tiny_llama(), exchange_config(exchange_fraction=0.5))
    budget = model.budget_params
    supports = {n: lay.mask_flat_indices().clone() for n, lay in model.adapter_layers().items()}
    sizes = []
    real_step = ExchangeController.step

    def spy(self, step, optimizer):
        events = real_step(self, step, optimizer)
        sizes.append(self.params())
        held = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        assert held == self.params()
        for name, grown in self.grown.items():
            if not grown.any() or self.fraction(step + self.cfg.irls_every) == 0:
                continue
            w = self._weights[name]["w"]
            exempt.append(bool((w[grown] == 0).all()))  # fresh entries: not drained yet
            # the weakest of the others are drained toward the next exchange
            if self.targets[name][1] < self.layers[name].nnz:  # the layer has entries to lose
                drained.append(self.delta[name] > FLOOR and bool((w[~grown] > 0.5).any()))
        return events

    drained = []

    exempt = []
    monkeypatch.setattr(ExchangeController, "step", spy)
    cfg = TrainConfig(steps=30, batch_size=8, lora_lr=3e-3, sparse_lr=3e-2, progress=False)
    out = train(model, word_tokenizer(), WORD_EXAMPLES, cfg)
    assert sizes and all(s == budget for s in sizes)  # at the budget at every step
    assert exempt and all(exempt) and drained and all(drained)
    exchanges = [e for e in out["budget_log"] if "exchanged_at_step" in e]
    units = [e["units"] for e in exchanges]
    assert len(units) >= 3 and 0.45 * budget < units[0] <= 0.5 * budget
    assert all(b < a for a, b in zip(units[:-1], units[1:], strict=True))  # the cosine falls
    assert out["final_phase"] == "joint"
    moved = [
        not torch.equal(lay.mask_flat_indices(), supports[n])
        for n, lay in model.adapter_layers().items()
    ]
    assert all(moved)
    assert_saves_reloads_and_merges(model, tmp_path / "ad")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(prune_from=1.0), "prune_from must be in"),
        (dict(prune_from=0.5, truncate_at=0.4), "must come after prune_from"),
        (dict(reach_budget="linear"), "reach_budget must be one of"),
        (dict(reach_budget="exchange"), "set overprovision=1 and start_rank='split'"),
        (
            dict(
                reach_budget="exchange",
                overprovision=1.0,
                start_rank="split",
                exchange_fraction=0.0,
            ),
            "exchange_fraction must be in",
        ),  # fmt: skip
    ],
)
def test_schedule_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        get_spalora_model(tiny_llama(), config(**kw))
