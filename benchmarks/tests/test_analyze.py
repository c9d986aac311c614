"""`spalora analyze`: errors of rank, sparse and rank + sparse approximations of an update."""

import copy

import pytest
import torch

from benchmarks import analyze
from tests.conftest import tiny_llama


def test_rank_and_sparse_errors_match_explicit_approximations():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(12, 20, generator=g, dtype=torch.float64)
    norm = torch.linalg.norm(d)
    for r in (1, 3, 7):
        explicit = torch.linalg.norm(d - analyze.best_rank(d, r)) / norm
        assert abs(analyze.rank_errors(d, [r])[r] - float(explicit)) < 1e-10
    for k in (1, 17, 100):
        explicit = torch.linalg.norm(d - analyze.top_k(d, k)) / norm
        assert abs(analyze.sparse_errors(d, [k])[k] - float(explicit)) < 1e-10
    assert analyze.sparse_errors(d, [240])[240] == 0.0


def test_hybrid_recovers_low_rank_plus_sparse_exactly():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(30, 2, generator=g) @ torch.randn(2, 40, generator=g)
    spikes = torch.zeros(30 * 40)
    spikes[torch.randperm(1200, generator=g)[:20]] = 10.0
    d = low + spikes.view(30, 40)
    unit = 30 + 40
    # 2 rank units + 20 entries = 160 parameters; rank-only and sparse-only get the same count
    hybrid = analyze.hybrid_error(d, 2, 20, iters=30)
    assert hybrid < 1e-3
    params = 2 * unit + 20
    assert analyze.sparse_errors(d, [params])[params] > 0.1
    assert analyze.rank_errors(d, [3])[3] > 0.1  # rank 3 (210 params) still misses the spikes


def test_analysis_of_a_tuned_tiny_model_writes_tables(tmp_path):
    base = tiny_llama()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(0.01 * torch.randn_like(p))
    paths = analyze.run_analysis(base, tuned, tmp_path, "pytest", progress=False, budgets=(1, 4))
    md = paths[0].read_text()
    assert "| 1 |" in md and "| 4 |" in md and "/ 14 |" in md  # 14 adapted layers
    lines = paths[1].read_text().splitlines()
    assert lines[0] == ",".join(analyze.COLUMNS) and len(lines) == 1 + 14 * 2
    rows = [dict(zip(analyze.COLUMNS, x.split(","), strict=True)) for x in lines[1:]]
    for r in rows:  # the best of the three is never worse than either alone
        assert float(r["hybrid_error"]) <= min(float(r["rank_error"]), float(r["sparse_error"]))
    with pytest.raises(ValueError, match="no model.layers.0.self_attn.q_proj.weight"):
        other = tiny_llama()
        other.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 8, bias=False)
        analyze.layer_updates(base, other)


def test_randomized_svd_path_matches_the_exact_one():
    g = torch.Generator().manual_seed(2)
    d = torch.randn(80, 120, generator=g, dtype=torch.float64)
    d += (
        5
        * torch.randn(80, 3, generator=g, dtype=torch.float64)
        @ torch.randn(3, 120, generator=g, dtype=torch.float64)
    )
    approx = analyze.best_rank(d, 3)  # 3 + 10 < 40: the randomized path
    err = float(torch.linalg.norm(d - approx) / torch.linalg.norm(d))
    assert abs(err - analyze.rank_errors(d, [3])[3]) < 1e-3
