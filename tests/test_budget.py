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
