"""Paired-gap standard errors with seed noise: the estimator against known variance components."""

import math

import pytest
import torch

from benchmarks.power import matrix, paired_gap


def simulate(s, n, sd_seed, sd_example, sd_resid, gap, gen):
    seed = torch.randn(s, 1, generator=gen, dtype=torch.float64) * sd_seed
    example = torch.randn(1, n, generator=gen, dtype=torch.float64) * sd_example
    resid = torch.randn(s, n, generator=gen, dtype=torch.float64) * sd_resid
    return gap + seed + example + resid


def test_the_se_covers_seed_noise_that_test_sampling_alone_misses():
    """Over many simulated pilots the gap's spread matches the SE with seed noise; the test-only
    SE understates it when seeds vary."""
    gen = torch.Generator().manual_seed(0)
    gaps, ses, test_only = [], [], []
    for _ in range(400):
        g = paired_gap(simulate(5, 400, 0.02, 0.1, 0.2, 0.03, gen))
        gaps.append(g.gap)
        ses.append(g.se)
        test_only.append(g.se_test_only)
    spread = torch.tensor(gaps).std().item()
    assert sum(ses) / len(ses) == pytest.approx(spread, rel=0.15)
    assert sum(test_only) / len(test_only) < 0.8 * spread
    assert sum(gaps) / len(gaps) == pytest.approx(0.03, abs=0.003)


def test_components_and_seed_count():
    gen = torch.Generator().manual_seed(1)
    g = paired_gap(simulate(40, 2000, 0.03, 0.1, 0.2, 0.0, gen))
    assert math.sqrt(g.var_seed) == pytest.approx(0.03, rel=0.3)
    assert math.sqrt(g.var_example) == pytest.approx(0.1, rel=0.1)
    assert math.sqrt(g.var_resid) == pytest.approx(0.2, rel=0.05)
    assert g.seeds_for(math.sqrt(g.var_example / g.n_test) * 0.99) is None  # below the floor
    k = g.seeds_for(0.02)
    floor = g.var_example / g.n_test
    assert (g.var_seed + g.var_resid / g.n_test) / k + floor <= 0.02**2
    assert len(g.per_seed) == 40 and g.n_test == 2000


def test_matrix_pairs_by_seed_and_refuses_mismatched_test_sets():
    d = matrix({1: [1.0, 2.0], 2: [3.0, 4.0], 5: [0.0, 0.0]}, {1: [0.5, 1.0], 2: [3.0, 3.0]})
    assert d.tolist() == [[0.5, 1.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="same test set"):
        matrix({1: [1.0]}, {1: [1.0, 2.0]})
    with pytest.raises(ValueError, match="share no seed"):
        matrix({1: [1.0]}, {2: [1.0]})
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_gap(torch.zeros(1, 5))


def fake_record(method, r_eq, seed, nll, correct, steps=150, lr=1e-3):
    return {
        "spec": {
            "method": method, "variant": [], "lr": lr, "seed": seed, "task": "arithmetic",
            "r_eq": r_eq, "profile": {"steps": steps}, "model": "m",
        },
        "result": {
            "test_nll": nll, "test_nll_mean": sum(nll) / len(nll),
            "test": sum(correct) / len(correct),
            "test_correct": "".join(str(c) for c in correct), "train_seconds": 1.0,
            "eval_seconds": 1.0,
        },
    }  # fmt: skip


def test_pilot_report_pairs_arms_and_puts_fft_first(tmp_path):
    import json

    from benchmarks.pilot import write_pilot_report

    gen = torch.Generator().manual_seed(0)
    cache = tmp_path / "cache"
    cache.mkdir()
    for seed in (1, 2, 3):
        base = (torch.rand(50, generator=gen) + 1).tolist()
        for method, r_eq, shift in (("fft", 0, -0.2), ("lora", 2, 0.0), ("peft-shira", 2, -0.05)):
            nll = [x + shift for x in base]
            correct = [int(x + shift < 1.4) for x in base]
            rec = fake_record(method, r_eq, seed, nll, correct)
            (cache / f"{method}-{seed}.json").write_text(json.dumps(rec))
    # the selection seed's runs (a lucky fft) must not move a reported mean or gap
    rec = fake_record("fft", 0, 0, [0.0] * 50, [1] * 50)
    (cache / "fft-0.json").write_text(json.dumps(rec))
    (path,) = write_pilot_report([cache], tmp_path / "out", "cmd")
    text = path.read_text()
    assert "| arithmetic 150 steps r_eq 2 | fft lr=0.001 | lora lr=0.001 | 3 | -0.2000" in text
    assert "| arithmetic | 150 | 0 | fft lr=0.001 | 1,2,3 |" in text
    assert (
        "| peft-shira lr=0.001 | lora lr=0.001 |" in text or "| lora lr=0.001 | peft-shira" in text
    )
    assert "nats of mean test NLL" in text
    assert "Selection seed 0" not in text  # no seed-0 runs: no selection table


def test_pilot_report_pairs_each_budget_with_twice_it(tmp_path):
    import json

    from benchmarks.pilot import write_pilot_report

    gen = torch.Generator().manual_seed(1)
    cache = tmp_path / "cache"
    cache.mkdir()
    arms = (
        ("peft-shira", 1, 0.30), ("peft-shira", 2, 0.10), ("lora", 2, 0.05),
        ("peft-shira", 4, 0.0), ("spalora", 4, -0.5), ("fft", 0, -0.6),
    )  # fmt: skip
    for seed in (1, 2):
        base = (torch.rand(40, generator=gen) + 1).tolist()
        for method, r_eq, shift in arms:
            nll = [x + shift for x in base]
            rec = fake_record(method, r_eq, seed, nll, [int(x < 1.5) for x in nll])
            (cache / f"{method}-{r_eq}-{seed}.json").write_text(json.dumps(rec))
    text = (write_pilot_report([cache], tmp_path / "out", "cmd")[0]).read_text()
    table = text.split("## Twice the budget")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| arithmetic")]
    # 1 vs 2: shira against shira and lora; 2 vs 4: both against shira; never ours, never fft,
    # never 1 vs 4
    assert len(rows) == 4 and "spalora" not in table and "fft" not in table
    best = (
        "| arithmetic 150 steps r_eq 1 vs 2 (best vs best) | peft-shira lr=0.001 | lora lr=0.001 |"
    )
    assert best + " 2 | +0.2500 ± 0.0000 |" in text
    assert "r_eq 2 vs 4 (best vs best) | lora lr=0.001 | peft-shira lr=0.001 | 2 | +0.0500" in text
    assert "r_eq 2 vs 4 | peft-shira lr=0.001 | peft-shira lr=0.001 | 2 | +0.1000" in text


def test_pilot_report_ranks_selection_seed_runs_on_validation(tmp_path):
    import json

    from benchmarks.pilot import write_pilot_report

    cache = tmp_path / "cache"
    cache.mkdir()
    gen = torch.Generator().manual_seed(1)
    val = (torch.rand(400, generator=gen) + 1).tolist()
    for method, shift in (("lora", 0.0), ("peft-shira", -0.1), ("sparse-random", -0.098)):
        rec = fake_record(method, 2, 0, [x + shift for x in val[:50]], [1] * 50)
        noise = (0.05 * torch.randn(400, generator=gen)).tolist()
        rec["result"]["validation_nll"] = [x + shift + e for x, e in zip(val, noise, strict=True)]
        if method == "sparse-random":  # a selection run scored on validation only
            for key in ("test", "test_nll", "test_nll_mean", "test_correct"):
                del rec["result"][key]
        (cache / f"{method}-0.json").write_text(json.dumps(rec))
    # the second selection seed gets its own table, ranked on its own runs
    for method, shift in (("lora", -0.3), ("peft-shira", 0.0)):
        rec = fake_record(method, 2, 100, [1.0] * 50, [1] * 50)
        rec["result"]["validation_nll"] = [x + shift for x in val]
        (cache / f"{method}-100.json").write_text(json.dumps(rec))
    (path,) = write_pilot_report([cache], tmp_path / "out", "cmd")
    text = path.read_text()
    seed0, seed100 = text.split("## Selection seed 0")[1].split("## Selection seed 100")
    rows = seed0.splitlines()
    table = [r for r in rows if r.startswith("| arithmetic")]
    assert [r.split(" | ")[1] for r in table] == [
        "peft-shira lr=0.001", "sparse-random lr=0.001", "lora lr=0.001",
    ]  # fmt: skip
    assert table[0].split(" | ")[4] == "best"
    assert table[1].endswith("| - |")  # its test accuracy was never scored
    # 0.1 nats behind is clear at one seed; 0.002 is not (no seed-noise pairs: allowance 0)
    assert table[2].split(" | ")[4] == "yes" and table[1].split(" | ")[4] == "no"
    table = [r for r in seed100.splitlines() if r.startswith("| arithmetic")]
    assert [r.split(" | ")[1] for r in table] == ["lora lr=0.001", "peft-shira lr=0.001"]
    assert table[1].split(" | ")[3] == "+0.3000 ± 0.0000"
    assert "seeds | NLL gap" in text and "| 100 |" not in text.split("## Selection")[0]


def test_nested_gap_counts_fold_to_fold_spread():
    from benchmarks.power import nested_gap

    gen = torch.Generator().manual_seed(3)
    gaps, ses = [], []
    for _ in range(300):
        per_seed = {
            s: 0.05 + 0.04 * torch.randn(1, generator=gen) + 0.3 * torch.randn(400, generator=gen)
            for s in range(5)
        }
        g = nested_gap(per_seed)
        gaps.append(g.gap)
        ses.append(g.se)
    spread = torch.tensor(gaps).std().item()
    assert sum(ses) / len(ses) == pytest.approx(spread, rel=0.2)
    assert g.n_test == 2000 and g.n_seeds == 5
    with pytest.raises(ValueError, match="at least 2 seeds"):
        nested_gap({1: torch.zeros(3)})
