"""Budget solver: exact counts on SmolLM2's layer shapes, never above the budget."""

import pytest

from spalora.budget import LayerShape, allocate_nnz, parse_budget, solve_budget

# SmolLM2-135M: 30 blocks, hidden 576, 9 heads x 64, 3 KV heads (192), MLP 1536.
BLOCK = [
    ("q_proj", 576, 576),
    ("k_proj", 192, 576),
    ("v_proj", 192, 576),
    ("o_proj", 576, 576),
    ("gate_proj", 1536, 576),
    ("up_proj", 1536, 576),
    ("down_proj", 576, 1536),
]
SHAPES = [LayerShape(f"model.layers.{i}.{n}", o, k) for i in range(30) for n, o, k in BLOCK]
UNIT = sum(s.rank_unit for s in SHAPES)
MODEL_PARAMS = 134_515_008


def test_rank_unit_of_smollm2():
    assert UNIT == 30 * (1152 + 768 + 768 + 1152 + 2112 + 2112 + 2112) == 305_280


@pytest.mark.parametrize("budget", ["r2", "r8", "r16", "0.5%", 1_000_003, 3_333_333])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.8, 0.0])
def test_hybrid_budget_is_hit_exactly(budget, fraction):
    p = parse_budget(budget, SHAPES, MODEL_PARAMS)
    if 0 < fraction * p < UNIT:
        with pytest.raises(ValueError, match="smaller than one rank unit"):
            solve_budget(SHAPES, p, fraction)
        return
    allocs = solve_budget(SHAPES, p, fraction)
    total = sum(a.params for a in allocs)
    assert total == p
    r = allocs[0].r
    assert all(a.r == r for a in allocs)
    assert r == int(fraction * p // UNIT)
    # the same density in every layer, to within one entry
    d = (p - r * UNIT) / sum(s.numel for s in SHAPES)
    assert all(abs(a.nnz - d * a.out_features * a.in_features) < 1 for a in allocs)


@pytest.mark.parametrize("budget", ["r8", 1_000_003, "0.5%"])
def test_lora_only_never_above_budget(budget):
    p = parse_budget(budget, SHAPES, MODEL_PARAMS)
    allocs = solve_budget(SHAPES, p, 1.0, use_sparse=False)
    total = sum(a.params for a in allocs)
    assert total <= p and p - total < UNIT
    assert all(a.nnz == 0 for a in allocs)


def test_parse_budget_forms():
    assert parse_budget("r8", SHAPES, MODEL_PARAMS) == 8 * UNIT
    assert parse_budget("lora-r16", SHAPES, MODEL_PARAMS) == 16 * UNIT
    assert parse_budget("0.5%", SHAPES, MODEL_PARAMS) == 672_575
    assert parse_budget(0.01, SHAPES, MODEL_PARAMS) == 1_345_150
    assert parse_budget("2,000,000", SHAPES, MODEL_PARAMS) == 2_000_000


@pytest.mark.parametrize("bad", ["lots", "0%", "-5", 0, -3, 1.5, "150%"])
def test_bad_budgets(bad):
    with pytest.raises(ValueError):
        parse_budget(bad, SHAPES, MODEL_PARAMS)


def test_budget_below_one_rank_unit():
    with pytest.raises(ValueError, match="smaller than one rank unit"):
        solve_budget(SHAPES, UNIT - 1, 1.0)
    with pytest.raises(ValueError, match="at least 610,560"):
        solve_budget(SHAPES, 600_000, 0.5)


def test_allocate_nnz_sums_exactly():
    counts = allocate_nnz(SHAPES, 12_345)
    assert sum(counts) == 12_345
    with pytest.raises(ValueError):
        allocate_nnz(SHAPES[:1], 576 * 576 + 1)


def test_lora_shaped_nonzeros_match_peft_shira_layer_for_layer():
    """nnz_allocation="lora" at budget r2, all-sparse: each layer gets r (m + n) entries,
    exactly what PEFT's ShiraConfig(r=2) trains there; "density" gives every layer one density."""
    p = parse_budget("r2", SHAPES, MODEL_PARAMS)
    shaped = solve_budget(SHAPES, p, 0.0, nnz_allocation="lora")
    assert [a.nnz for a in shaped] == [2 * s.rank_unit for s in SHAPES]
    even = solve_budget(SHAPES, p, 0.0)
    assert sum(a.nnz for a in even) == sum(a.nnz for a in shaped) == p
    densities = [a.density for a in even]
    assert max(densities) - min(densities) < 2 / (192 * 576)
    # the shapes differ where it matters: k_proj gets 2.4x RoSA's even share under ShiRA's
    k = [i for i, s in enumerate(SHAPES) if s.name.endswith("k_proj")]
    assert shaped[k[0]].nnz / even[k[0]].nnz == pytest.approx(2.4, rel=0.01)


def test_lora_shaped_nonzeros_fill_small_layers_and_give_the_rest_to_the_others():
    shapes = [LayerShape("tiny", 4, 4), LayerShape("big", 100, 100)]
    # m + n weights give "tiny" 8/208 of 1,000 = 38 entries; it holds 16
    counts = allocate_nnz(shapes, 1_000, by="lora")
    assert counts == [16, 984]
    assert allocate_nnz(shapes, 10_016, by="lora") == [16, 10_000]
    with pytest.raises(ValueError, match="nnz_allocation must be one of"):
        allocate_nnz(shapes, 10, by="shira")


def test_config_refuses_an_unknown_nnz_allocation():
    from spalora import SpaloraConfig

    with pytest.raises(ValueError, match=r"nnz_allocation must be one of \('density', 'lora'\)"):
        SpaloraConfig(method="sparse", budget="r2", nnz_allocation="rows")


def test_lora_shaped_model_trains_what_peft_shira_trains_in_every_layer(tmp_path):
    """On a real (tiny) model: our sparse adapter with nnz_allocation="lora" has PEFT ShiRA's
    count in every layer, and the saved adapter reloads with exactly those counts."""
    from peft import ShiraConfig, get_peft_model

    from spalora import SpaloraConfig, SpaloraModel, get_spalora_model

    from .conftest import tiny_llama

    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=names))
    want = {
        n.removeprefix("base_model.model.").removesuffix(".shira_weight.default"): p.numel()
        for n, p in peft.named_parameters()
        if "shira_weight" in n
    }
    cfg = SpaloraConfig(
        method="sparse", target_modules=names, budget="r2", nnz_allocation="lora",
        mask_strategy="random",
    )  # fmt: skip
    ours = get_spalora_model(tiny_llama(), cfg)
    assert ours.spalora_config.nnz_pattern == want
    ours.save_pretrained(tmp_path)
    again = SpaloraModel.from_pretrained(tiny_llama(), tmp_path)
    assert again.spalora_config.nnz_pattern == want
