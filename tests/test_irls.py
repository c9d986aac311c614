"""Our method (method="spalora"): IRLS penalties against dense float64 references, the global
allocation's exact budget, truncation to the best rank-r part, and an end-to-end tiny run."""

import json
import math
import shutil

import pytest
import torch

from spalora import SpaloraConfig, get_spalora_model
from spalora.layer import SpaloraLinear
from spalora.lowrank import factored_svd
from spalora.masks import MaskCollector, apply_masks
from spalora.methods import swap_parameters
from spalora.methods.spalora.allocation import LayerCandidates, allocate_budget
from spalora.methods.spalora.controller import BudgetController, truncate_layer
from spalora.methods.spalora.penalties import (
    dense_rank_penalty,
    rank_penalty,
    rank_weights,
    sparse_weights,
)
from spalora.train import TrainConfig, train

from .conftest import WORD_EXAMPLES, assert_saves_reloads_and_merges, tiny_llama, word_tokenizer

SMOLLM2_SHAPES = {  # (out, in) of SmolLM2-135M's seven adapted linears, 30 blocks
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}


def _factors(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    return B, A


@pytest.mark.parametrize("m,n,r,seed", [(9, 6, 3, 0), (5, 11, 4, 1), (7, 7, 7, 2), (12, 8, 1, 3)])
def test_rank_penalty_and_gradients_match_dense_reference(m, n, r, seed):
    B, A = _factors(m, n, r, seed)
    scale = 1.7
    spec = factored_svd(B, A, scale)
    eps = float(spec.sigma[min(1, r - 1)]) * 0.9
    d = rank_weights(spec.sigma, eps)
    Bg, Ag = B.clone().requires_grad_(True), A.clone().requires_grad_(True)
    ref = dense_rank_penalty(scale * Bg @ Ag, spec.U, spec.V, d)
    ref.backward()
    value, g_b, g_a = rank_penalty(B, A, scale, spec.U, spec.V, d)
    torch.testing.assert_close(value, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_b, Bg.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_a, Ag.grad, rtol=1e-9, atol=1e-9)
    # a frozen P from an earlier iterate: the penalty is still the dense one at the new X
    B2, A2 = _factors(m, n, r, seed + 10)
    value2, _, _ = rank_penalty(B2, A2, scale, spec.U, spec.V, d)
    torch.testing.assert_close(
        value2, dense_rank_penalty(scale * B2 @ A2, spec.U, spec.V, d), rtol=1e-10, atol=1e-10
    )


def test_rank_penalty_depends_only_on_the_product():
    B, A = _factors(10, 7, 4, 5)
    spec = factored_svd(B, A, 2.0)
    d = rank_weights(spec.sigma, float(spec.sigma[2]))
    M = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    M = M + 4 * torch.eye(4, dtype=torch.float64)  # well conditioned
    v1, _, _ = rank_penalty(B, A, 2.0, spec.U, spec.V, d)
    v2, _, _ = rank_penalty(B @ M, torch.linalg.solve(M, A), 2.0, spec.U, spec.V, d)
    torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-10)
    # and the weights: directions below eps get weight 1, those above eps / sigma
    assert torch.all(d[spec.sigma <= float(spec.sigma[2])] == 1.0)
    torch.testing.assert_close(d[:2], float(spec.sigma[2]) / spec.sigma[:2])


def test_factored_svd_matches_dense_svd_with_and_without_column_weights():
    B, A = _factors(13, 9, 5, 4)
    w = torch.rand(9, dtype=torch.float64) + 0.1
    for col, X in ((None, 3.0 * B @ A), (w, 3.0 * B @ A * w)):
        spec = factored_svd(B, A, 3.0, col)
        torch.testing.assert_close(spec.sigma, torch.linalg.svdvals(X)[:5])
        torch.testing.assert_close(spec.U @ torch.diag(spec.sigma) @ spec.V.t(), X)


def test_sparse_weights():
    s = torch.tensor([0.0, 0.05, -0.1, 0.4, -2.0])
    w = sparse_weights(s, 0.1)
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 1.0, 0.0625, 0.0025]))


def smollm2_candidates(r0: int, k0: dict, seed: int = 0) -> list[LayerCandidates]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for block in range(30):
        for kind, (m, n) in SMOLLM2_SHAPES.items():
            sigma = torch.sort(
                torch.rand(r0, generator=g, dtype=torch.float64) * 3, descending=True
            )
            entries = torch.rand(k0[kind], generator=g, dtype=torch.float64) * 0.1
            out.append(LayerCandidates(f"{block}.{kind}", m + n, sigma.values, entries))
    return out


@pytest.mark.parametrize("r_eq", [2, 8])
def test_global_threshold_spends_exactly_the_budget_on_smollm2_shapes(r_eq):
    unit = 30 * sum(m + n for m, n in SMOLLM2_SHAPES.values())
    budget = r_eq * unit
    r = r_eq // 2
    density = (budget - r * unit) / (30 * sum(m * n for m, n in SMOLLM2_SHAPES.values()))
    k0 = {kind: round(1.5 * density * m * n) for kind, (m, n) in SMOLLM2_SHAPES.items()}
    cands = smollm2_candidates(round(1.5 * r + 0.5), k0)
    alloc = allocate_budget(cands, budget)
    assert alloc.params == budget
    assert (
        sum(r * c.rank_unit + k for c, (r, k) in zip(cands, alloc.targets.values(), strict=True))
        == budget
    )
    ranks = [r for r, _ in alloc.targets.values()]
    assert len(set(ranks)) > 1  # heterogeneous
    # threshold property: every rank unit taken is worth at least tau, and so is every nonzero
    # (except the few below tau that fill the last lump)
    for c in cands:
        r_l, k_l = alloc.targets[c.name]
        assert torch.all(c.sigma[:r_l] / c.rank_unit**0.5 >= alloc.threshold)
        assert torch.all(c.sigma[r_l:] / c.rank_unit**0.5 <= alloc.threshold + 1e-12)


def test_allocation_prefers_what_carries_the_most_per_parameter():
    cands = [
        LayerCandidates("lowrank", 100, torch.tensor([50.0, 40.0, 0.1]), torch.full((50,), 0.01)),
        LayerCandidates("scattered", 100, torch.tensor([0.2, 0.1]), torch.full((300,), 1.0)),
    ]
    alloc = allocate_budget(cands, 2 * 100 + 250)
    assert alloc.targets == {"lowrank": (2, 0), "scattered": (0, 250)}
    assert alloc.params == 450


def _trained_layer(r=4, nnz=20, seed=0):
    torch.manual_seed(seed)
    layer = SpaloraLinear(torch.nn.Linear(9, 12), r=r, lora_alpha=8.0, nnz=nnz)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_A.normal_()
    flat = torch.randperm(9 * 12)[:nnz]
    layer.set_sparse(flat, torch.randn(nnz))
    return layer


def test_truncation_keeps_the_best_rank_r_part_and_the_top_k_entries():
    layer = _trained_layer()
    old_B = layer.lora_B
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B, layer.sparse_values], lr=1e-2)
    layer(torch.randn(3, 9)).sum().backward()
    opt.step()
    delta_lr = layer.scale * (layer.lora_B @ layer.lora_A).detach().double()
    values, flat = layer.sparse_values.detach().clone(), layer.mask_flat_indices().clone()
    scale = layer.scale
    swaps = truncate_layer(layer, 2, 7)
    swap_parameters(opt, swaps)
    U, S, Vh = torch.linalg.svd(delta_lr)
    best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
    assert layer.r == 2 and layer.nnz == 7 and layer.scale == pytest.approx(scale)
    got = layer.scale * (layer.lora_B @ layer.lora_A).double()
    torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-5)  # fp32 factors
    keep = torch.topk(values.abs(), 7).indices
    expected = torch.zeros(12 * 9)
    expected[flat[keep]] = values[keep]
    torch.testing.assert_close(layer.sparse_dense().reshape(-1), expected)
    # the optimizer now holds the new tensors, without state
    held = [p for g in opt.param_groups for p in g["params"]]
    assert all(any(p is q for q in held) for p in swaps.values())
    assert not any(p is old_B for p in held) and all(p not in opt.state for p in held)
    opt.zero_grad()
    layer(torch.randn(3, 9)).sum().backward()
    opt.step()  # trains on with the new shapes


def test_residual_mask_ignores_gradient_inside_the_lora_subspace():
    # rank 3 on a 4x3 layer spans every input direction: nothing is left outside the subspace
    layer = SpaloraLinear(torch.nn.Linear(3, 4), r=3, nnz=5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 3)
    scores = {}
    for strategy in ("fisher", "residual"):
        collector = MaskCollector({"l": layer}, strategy).attach()
        layer(x).pow(2).sum().backward()
        collector.detach()
        scores[strategy] = collector.scores("l", layer)
    assert float(scores["fisher"].sum()) > 1e-3
    assert float(scores["residual"].abs().max()) < 1e-8
    apply_masks({"l": layer}, "residual", collector, progress=False)  # still picks k entries
    assert layer.mask_ready


def config(**kw):
    base = dict(
        method="spalora",
        budget="r4",
        lora_alpha=12.0,
        lora_dropout=0.0,
        warmup_steps=4,
        mask_batches=2,
        irls_every=3,
    )
    return SpaloraConfig(**(base | kw))


def test_config_errors():
    with pytest.raises(ValueError, match="needs a budget"):
        SpaloraConfig(method="spalora")
    with pytest.raises(ValueError, match="overprovision"):
        config(overprovision=0.5)
    with pytest.raises(ValueError, match="allocation"):
        config(allocation="greedy")
    with pytest.raises(ValueError, match="start_rank"):
        config(start_rank="max")
    with pytest.raises(ValueError, match="restart_after_mask"):
        config(restart_after_mask=True)


@pytest.mark.parametrize("r_eq", [2, 8])
def test_over_provisioned_start_on_smollm2_shapes(r_eq):
    """start_rank="budget": rank ceil(1.5 r_eq) (1.5x what all of P buys, so the allocation can
    reach LoRA's rank); "split": 1.5x the even split's rank. Nonzeros: 1.5x the even split's."""
    from spalora.budget import LayerShape, parse_budget, solve_budget
    from spalora.methods.spalora import overprovisioned

    shapes = [
        LayerShape(f"{b}.{m}", o, i)
        for b in range(30)
        for m, (o, i) in {
            "q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
            "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536),
        }.items()
    ]  # fmt: skip
    budget = parse_budget(f"r{r_eq}", shapes, 134_515_008)
    even = solve_budget(shapes, budget, 0.5)
    full_rank = solve_budget(shapes, budget, 1.0, use_sparse=False)[0].r
    assert full_rank == r_eq
    start = overprovisioned(even, 1.5, full_rank)
    assert {a.r for a in start} == {math.ceil(1.5 * r_eq)}
    assert [a.nnz for a in start] == [round(1.5 * a.nnz) for a in even]
    split = overprovisioned(even, 1.5)
    assert {a.r for a in split} == {math.ceil(1.5 * max(1, r_eq // 2))}


def test_start_rank_reaches_the_model():
    budget_start = get_spalora_model(tiny_llama(), config())
    split_start = get_spalora_model(tiny_llama(), config(start_rank="split"))
    assert {lay.r for lay in budget_start.adapter_layers().values()} == {6}  # ceil(1.5 * 4)
    assert {lay.r for lay in split_start.adapter_layers().values()} == {3}  # ceil(1.5 * 2)


def test_truncate_at_a_fraction_needs_the_run_length():
    model = get_spalora_model(tiny_llama(), config())
    with pytest.raises(ValueError, match="total_steps"):
        BudgetController(model, None, 0)


def test_tiny_run_end_to_end_has_heterogeneous_layers_on_the_exact_budget(tmp_path, monkeypatch):
    model = get_spalora_model(tiny_llama(), config())
    budget = model.budget_params
    assert model.get_nb_trainable_parameters()[0] > budget  # over-provisioned while training
    seen = []
    real_refresh = BudgetController.refresh

    def spy(self):
        real_refresh(self)
        seen.append((dict(self.eps), dict(self.delta)))

    monkeypatch.setattr(BudgetController, "refresh", spy)
    cfg = TrainConfig(steps=24, batch_size=8, lora_lr=3e-3, sparse_lr=3e-3, progress=False)
    out = train(model, word_tokenizer(), WORD_EXAMPLES, cfg)
    phases = [h["phase"] for h in out["history"] if "phase" in h]
    assert "compress" in phases and phases[-1] == "joint"
    assert len(seen) >= 3
    for (eps0, delta0), (eps1, delta1) in zip(
        seen[:-1], seen[1:], strict=True
    ):  # eps and delta never increase
        assert all(eps1[n] <= eps0[n] for n in eps0)
        assert all(delta1[n] <= delta0[n] for n in delta0)
    layers = model.adapter_layers()
    assert model.get_nb_trainable_parameters()[0] == budget
    assert sum(lay.num_adapter_parameters() for lay in layers.values()) == budget
    densities = {
        round(lay.nnz / (lay.in_features * lay.out_features), 4) for lay in layers.values()
    }
    assert len({lay.r for lay in layers.values()}) > 1 and len(densities) > 1
    # saved, reloaded, merged: the same function
    assert_saves_reloads_and_merges(model, tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert sum(saved["rank_pattern"].values()) == sum(lay.r for lay in layers.values())


def test_uniform_allocation_truncates_to_rosas_split():
    model = get_spalora_model(tiny_llama(), config(allocation="uniform"))
    uniform = {a.name: (a.r, a.nnz) for a in model.uniform_allocations}
    cfg = TrainConfig(steps=16, batch_size=8, lora_lr=3e-3, sparse_lr=3e-3, progress=False)
    train(model, word_tokenizer(), WORD_EXAMPLES, cfg)
    assert {n: (lay.r, lay.nnz) for n, lay in model.adapter_layers().items()} == uniform


def test_resume_after_truncation_continues_the_run(tmp_path):
    def run(resume, steps):
        model = get_spalora_model(tiny_llama(), config())
        cfg = TrainConfig(
            steps=steps,
            batch_size=8,
            lora_lr=3e-3,
            sparse_lr=3e-3,
            progress=False,
            checkpoint_dir=str(tmp_path / "ck"),
            checkpoint_every=4,
            resume=resume,
            seed=1,
        )
        train(model, word_tokenizer(), WORD_EXAMPLES, cfg)
        return model

    full = get_spalora_model(tiny_llama(), config())
    cfg = TrainConfig(steps=20, batch_size=8, lora_lr=3e-3, sparse_lr=3e-3, progress=False, seed=1)
    train(full, word_tokenizer(), WORD_EXAMPLES, cfg)
    first = run(False, 20)  # writes checkpoints up to step 20 (truncation at step 10)
    for ck in sorted((tmp_path / "ck").glob("checkpoint-*")):
        if ck.name != "checkpoint-16":
            shutil.rmtree(ck)
    resumed = run(True, 20)  # from step 16: a truncated model rebuilt from its checkpoint
    a, b, c = full.adapter_state_dict(), first.adapter_state_dict(), resumed.adapter_state_dict()
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
        torch.testing.assert_close(c[key], a[key], rtol=0, atol=0)
