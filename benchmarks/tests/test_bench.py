"""The accuracy harness end to end on a tiny random model: every registered method trains at the
same budget, runs are cached by configuration, tables are rebuilt from the cache."""

import csv
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import accuracy
from benchmarks.methods import METHODS, budget_params, build_method, supra_sparsity
from spalora import SpaloraConfig
from spalora.tasks import Task
from tests.conftest import WORD_EXAMPLES, tiny_llama, word_tokenizer


def toy_task(name: str) -> Task:
    return Task(
        "toy",
        WORD_EXAMPLES[:48],
        WORD_EXAMPLES[48:56],
        WORD_EXAMPLES[56:],
        None,
        max_new_tokens=2,
        score=lambda p, t: p.split()[:1] == t.split()[:1],
    )


def tiny(name: str):
    return tiny_llama(), word_tokenizer()


def token_batches():
    """A stand-in for a run's training micro-batches (sparse-credit probes them)."""
    gen = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, 96, (2, 10), generator=gen)
        yield {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("r_eq", [2, 8])
def test_every_method_stays_within_the_budget(method, r_eq):
    pytest.importorskip("peft")
    model = tiny_llama()
    budget = budget_params(model, r_eq)
    assert budget == r_eq * 2 * (4 * (32 + 32) - 2 * 16 + 3 * (32 + 48))  # k,v project to 16
    from benchmarks.methods import trainable_params

    fractions = [v.get("rank_fraction") for v in METHODS[method].variants(r_eq)]
    for fraction in fractions:
        options = {"rank_fraction": fraction, "seed": 0, "probe_batches": token_batches}
        built = build_method(method, tiny_llama(), r_eq, options)
        n = trainable_params(built)
        exact = (
            "lora",
            "sparse",
            "rosa",
            "peft-lora",
            "peft-lora-eva",
            "peft-lora-ga",
            "peft-loraplus",
            "peft-shira",
        )
        if method in exact or method.startswith(("sparse", "split-random")):
            assert n == budget, fraction  # these land exactly on P
        elif method == "peft-supra":  # rank plus one global sparsity, floored per layer
            assert budget - 14 <= n <= budget, fraction
    if method == "fft":
        assert n == sum(p.numel() for p in tiny_llama().parameters())


def test_supra_sparsity_spends_the_rest_of_the_budget():
    model = tiny_llama()
    s = supra_sparsity(model, 8, 4)
    layers = [m for m in model.modules() if m.__class__.__name__ == "Linear"][:-1]
    kept = sum(int(m.in_features * m.out_features * (1 - s)) for m in layers)
    assert kept <= budget_params(model, 8) - 4 * sum(m.in_features + m.out_features for m in layers)


def test_quick_benchmark_runs_caches_and_reports(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    cache = tmp_path / "cache"
    kwargs = dict(load_model=tiny, load_task=toy_task, progress=False)
    records, grid = accuracy.run_benchmark(
        "quick", ["toy"], [2], list(METHODS), cache, model="tiny", save_dir=tmp_path / "s", **kwargs
    )
    assert len(records) == len(METHODS) == len(grid)  # quick: one setting, one seed each
    assert len(list(cache.glob("*.json"))) == len(METHODS)
    for path in cache.glob("*.json"):  # each record states the method revision it trained at
        record = json.loads(path.read_text())
        assert record["revision"] == METHODS[record["spec"]["method"]].revision
    for rec in records:
        r = rec["result"]
        assert r["finite"] and 0.0 <= r["test"] <= 1.0 and r["n_test"] == 8
        if rec["spec"]["method"] != "fft":
            assert r["trainable_params"] <= r["budget_params"]
        method = rec["spec"]["method"]
        if method == "spalora-exchange":  # at the budget throughout, its support exchanged
            assert r["peak_trainable_params"] == r["budget_params"] == r["trainable_params"]
        elif method.startswith("spalora"):  # over-provisioned, then truncated
            assert r["peak_trainable_params"] > r["budget_params"] >= r["trainable_params"]
        if method.startswith("spalora"):
            # the final split is recorded, layer by layer, and adds up to the trained count
            spent = sum(rk * (o + i) + k for o, i, rk, k in r["allocation"].values())
            assert spent == r["trainable_params"]
            # and its adapter is saved, with that split, for `spalora plot`
            saved = SpaloraConfig.load(r["saved_model"])
            assert {n: v[2] for n, v in r["allocation"].items()} == saved.rank_pattern
            # the controller's log: refreshes (splits of the whole budget), then the cut, or
            # for the gradual candidate the step where the budget was reached
            *refreshes, cut = [e for e in r["budget_log"] if "exchanged_at_step" not in e]
            assert refreshes and all(0.0 <= e["rank_share"] <= 1.0 for e in refreshes)
            if saved.reach_budget in ("cubic", "exchange"):  # reached without a cut
                assert cut["at_budget_after_step"] >= 1
                assert cut["start_params"] == r["peak_trainable_params"]
            else:
                assert 0.0 <= cut["truncated_fraction"] <= 1.0
        else:
            assert r["allocation"] is None and r["budget_log"] is None

    def must_not_train(*args, **kw):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(accuracy, "run_one", must_not_train)
    again, _ = accuracy.run_benchmark(
        "quick", ["toy"], [2], list(METHODS), cache, model="tiny", **kwargs
    )
    assert again == records
    rows = accuracy.summarize(records)
    paths = accuracy.write_report(rows, grid, tmp_path / "out", "quick", "pytest", records)
    with open(tmp_path / "out" / "accuracy.csv") as fh:
        table = list(csv.reader(fh))
    assert tuple(table[0]) == accuracy.CSV_COLUMNS
    assert {row[0] for row in table[1:]} == set(METHODS)
    md = paths[0].read_text()
    assert "| peft-supra |" in md and "## Selection" in md
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    # our method's split: one row for the one (task, r_eq), and its plot
    (split,) = accuracy.split_summary(records)
    assert (split["task"], split["r_eq"], split["seeds"]) == ("toy", 2, 1)
    assert 0.0 < split["rank_share"] <= 1.0
    assert "## Our method's split" in md and "| toy | 2 | 1 |" in md
    assert "## Our method's ablations" in md and "| 2 | toy | spalora-no-reg |" in md
    # every run kept which test examples it got right, so gaps can be paired by example
    for rec in records:
        bits = rec["result"]["test_correct"]
        assert len(bits) == rec["result"]["n_test"] and set(bits) <= {"0", "1"}
        assert bits.count("1") == round(rec["result"]["test"] * len(bits))
    assert "## Paired test gaps" in md and "| 2 | toy | spalora - rosa | 1 |" in md
    assert "| 2 | toy | spalora-no-reg - spalora | 1 |" in md
    assert paths[3].name == "allocation.png" and paths[3].read_bytes()[:4] == b"\x89PNG"


def test_report_only_leaves_out_unfinished_grids(tmp_path):
    records, grid = accuracy.run_benchmark(
        "full", ["toy"], [2], ["lora"], tmp_path, model="tiny", run_missing=False
    )
    assert records == [] and grid == []


def test_rosa_grid_has_distinct_whole_ranks():
    from benchmarks.methods import rosa_splits

    assert rosa_splits(8) == (
        {"rank_fraction": 0.25},
        {"rank_fraction": 0.5},
        {"rank_fraction": 0.75},
    )
    assert rosa_splits(2) == ({"rank_fraction": 0.5},)


def test_speed_benchmark_on_a_saved_tiny_model(tmp_path):
    """Every row builds and steps, memory comes from fresh processes, files have the columns."""
    pytest.importorskip("peft")
    from benchmarks import speed

    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    paths = speed.run_speed(tmp_path / "out", repeats=2, model_name=str(folder), progress=False)
    with open(paths[1]) as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == speed.CSV_COLUMNS
    assert [r["row"] for r in rows] == list(speed.ROWS)
    floor = next(r for r in rows if r["row"] == "floor")
    assert floor["ratio_to_floor"] == "1.000" and float(floor["peak_rss_mb"]) > 50
    assert all(float(r["step_s_median"]) > 0 for r in rows)
    md_rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in paths[0].read_text().splitlines()
        if line.startswith("| ") and not line.startswith(("| row", "| ---"))
    ][: len(speed.ROWS)]  # the first table; the per-round ratios follow
    base_mb = {cells[0]: float(cells[-1]) for cells in md_rows}  # last column of speed.md
    assert 0 < base_mb["rosa-int8"] < 0.35 * base_mb["rosa"] == 0.35 * base_mb["floor"]
    assert "Mask generation" in paths[0].read_text()
    per_round = [line for line in paths[0].read_text().splitlines() if " | rosa | " in line]
    assert [line.split(" | ")[0] for line in per_round] == ["| spalora", "| spalora-final"]
    per_round = [line for line in paths[0].read_text().splitlines() if " | peft-lora | " in line]
    assert [line.split(" | ")[0] for line in per_round] == [
        "| lora", "| rosa", "| spalora-gradual", "| spalora-exchange",
    ]  # fmt: skip
    assert "One exchange of spalora-exchange" in paths[0].read_text()


def test_profile_script_runs_and_lists_the_extra_operators(tmp_path, monkeypatch):
    """benchmarks/profile_step.py on a tiny saved model: one table per row and, for each row
    after the first, the operators behind its extra time (the sparse gradient's for RoSA)."""
    import runpy
    import sys

    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    script = Path(__file__).resolve().parents[1] / "profile_step.py"
    argv = ["profile_step.py", "--rows", "lora,rosa", "--model", str(folder)]
    monkeypatch.setattr(sys, "argv", argv + ["--out", str(tmp_path / "out"), "--top", "40"])
    runpy.run_path(str(script), run_name="__main__")
    md = (tmp_path / "out" / "profile_step.md").read_text()
    assert "## lora" in md and "## rosa" in md
    extra = md.split("### rosa over lora")[1].split("## rosa")[0]
    assert "`aten::sparse_sampled_addmm`" in extra


def test_paired_ratio_cancels_a_slow_spell_that_hits_both_rows():
    from benchmarks import speed

    # the machine slows 3x in the last two rounds; the row is 1.5x the reference throughout
    times = {"row": [1.5, 1.5, 4.5, 4.5, 4.5], "ref": [1.0, 1.0, 3.0, 3.0, 3.0]}
    assert speed.paired_ratio(times, "row", "ref") == pytest.approx((1.5, 1.5, 1.5))
    times = {"row": [2.0, 4.0, 6.0, 8.0], "ref": [1.0, 2.0, 2.0, 4.0]}  # ratios 2, 2, 3, 2
    assert speed.paired_ratio(times, "row", "ref") == pytest.approx((2.0, 2.0, 2.25))
    with pytest.raises(ValueError):
        speed.paired_ratio({"row": [1.0], "ref": [1.0, 2.0]}, "row", "ref")


def test_selection_uses_validation_and_reuses_the_chosen_setting(tmp_path, monkeypatch):
    """The best validation score picks the setting (not the best test score); seeds 1-2 rerun
    exactly that setting; a diverged run is cached and never chosen."""
    calls = []

    def fake_run(spec, load_model, load_task, progress, save_dir=None):
        calls.append(spec)
        lr_rank = accuracy.METHODS["lora"].lr_grid.index(spec.lr)
        if lr_rank == 2:
            return {
                "diverged": "loss is nan",
                "validation": float("-inf"),
                "test": float("nan"),
                "metric": "accuracy",
                "trainable_params": 10,
                "budget_params": 10,
            }
        # lr 1 (inside the grid) is best on validation, lr 0 is best on test
        return {
            "validation": [0.5, 0.9][lr_rank] + spec.seed / 100,
            "test": [0.8, 0.6][lr_rank],
            "metric": "accuracy",
            "trainable_params": 10,
            "budget_params": 10,
            "adapter_bytes": 40,
        }

    monkeypatch.setattr(accuracy, "run_one", fake_run)
    records, grid = accuracy.run_benchmark("full", ["toy"], [8], ["lora"], tmp_path, model="tiny")
    assert [r["spec"]["lr"] for r in records] == [accuracy.METHODS["lora"].lr_grid[1]] * 3
    assert [r["spec"]["seed"] for r in records] == [0, 1, 2]
    assert len(calls) == 3 + 2  # the grid at seed 0, then seeds 1 and 2 of the chosen lr
    assert [g["diverged"] for g in grid] == [False, False, True]
    rows = accuracy.summarize(records)
    assert rows[0]["mean"] == 0.6 and rows[0]["n_seeds"] == 3
    md = accuracy.write_report(rows, grid, tmp_path / "out", "full", "pytest")[0].read_text()
    assert "| diverged |" in md


def test_report_states_the_test_sets_binomial_standard_error():
    rows = [
        {"task": "toy", "mean": m, "n_test": 400}
        for m in (0.1, 0.2, 0.3)  # median 0.2
    ] + [{"task": "other", "mean": 0.5}]  # no test size recorded: left out
    (line, blank) = accuracy.precision_note(rows, ["other", "toy"])
    assert blank == ""
    assert "toy: 400 test examples, ±2.0 points at 20% (a difference of two scores: ±2.8)" in line
    assert "other" not in line
    assert accuracy.precision_note(rows[3:], ["other"]) == []
    diverged = [{"task": "toy", "mean": float("nan"), "n_test": 400}]
    assert accuracy.precision_note(diverged, ["toy"]) == []  # not a crash on an empty median
    assert accuracy.precision_note(rows + diverged, ["toy"])[0] == line  # NaN row ignored


def test_full_fine_tuning_runs_are_shared_across_budgets(tmp_path, monkeypatch):
    calls = []

    def fake_run(spec, *args, **kwargs):
        calls.append(spec)
        return {
            "validation": 0.9 if spec.lr == 3e-5 else 0.5,  # inside the grid: no extension
            "test": 0.5,
            "metric": "accuracy",
            "trainable_params": 1,
            "budget_params": 0,
            "adapter_bytes": 4,
        }

    monkeypatch.setattr(accuracy, "run_one", fake_run)
    records, _ = accuracy.run_benchmark("full", ["toy"], [2, 8], ["fft"], tmp_path, model="tiny")
    from benchmarks.methods import FFT_LRS

    assert len(calls) == len(FFT_LRS) + 2  # not twice
    assert sorted({r["budget"] for r in records}) == [2, 8]
    assert {row["r_eq"] for row in accuracy.summarize(records)} == {2, 8}


def test_a_choice_on_the_grid_edge_extends_the_grid(tmp_path, monkeypatch):
    """Validation rising with the rate: the grid grows past its top edge, at most twice."""
    calls = []

    def fake_run(spec, *args, **kwargs):
        calls.append(spec.lr)
        return {
            "validation": spec.lr,
            "test": 0.5,
            "metric": "accuracy",
            "trainable_params": 1,
            "budget_params": 1,
            "adapter_bytes": 4,
        }

    monkeypatch.setattr(accuracy, "run_one", fake_run)
    records, grid = accuracy.run_benchmark("full", ["toy"], [8], ["lora"], tmp_path, model="tiny")
    grid_lrs = list(accuracy.METHODS["lora"].lr_grid)
    assert calls[:3] == grid_lrs and calls[3:5] == [3e-2, 1e-1]  # two points past the edge
    assert {r["spec"]["lr"] for r in records} == {1e-1} and len(calls) == 5 + 2
    assert len(grid) == 5  # the selection table lists the extensions too
    assert accuracy.next_lr(1e-3, up=False) == 3e-4 and accuracy.next_lr(3e-5, up=True) == 1e-4


def test_committed_cache_files_are_still_found_under_their_keys():
    """A change to TrainConfig, RunSpec or the key must not silently orphan the committed runs
    (hours of CPU): every cached file's spec must hash to its own file name."""
    from benchmarks.accuracy import Profile, RunSpec

    root = Path(__file__).resolve().parents[1] / "cache" / "accuracy-full"
    files = sorted(root.glob("*.json"))
    if not files:
        pytest.skip("no committed accuracy cache")
    for path in files:
        sp = json.loads(path.read_text())["spec"]
        profile = {k: tuple(v) if isinstance(v, list) else v for k, v in sp["profile"].items()}
        spec = RunSpec(
            sp["method"],
            tuple(tuple(x) for x in sp["variant"]),
            sp["lr"],
            sp["seed"],
            sp["task"],
            sp["r_eq"],
            Profile(**profile),
            sp["model"],
        )
        assert spec.key() == path.stem, f"{path.name} is no longer found under its key"


def test_a_method_revision_retrains_only_that_method(monkeypatch):
    """Bumping Method.revision gives its runs new keys (retrained); other methods keep theirs."""
    from dataclasses import replace as dc_replace

    from benchmarks import methods
    from benchmarks.accuracy import PROFILES, RunSpec

    def key(method):
        return RunSpec(method, (), 1e-3, 0, "bbc-topic", 8, PROFILES["full"], "m").key()

    rosa, lora = key("rosa"), key("lora")
    revised = dc_replace(methods.METHODS["rosa"], revision=methods.METHODS["rosa"].revision + 1)
    monkeypatch.setitem(methods.METHODS, "rosa", revised)
    assert key("rosa") != rosa
    assert key("lora") == lora


def test_ablation_summary_pairs_by_seed_and_reads_the_controller_log():
    def rec(method, seed, test, losses, cut=None, alloc=None):
        log = None if cut is None else [{"rank_share": 0.8}, {"truncated_fraction": cut}]
        result = {"test": test, "losses": losses, "budget_log": log, "allocation": alloc}
        spec = {"method": method, "seed": seed, "task": "toy", "r_eq": 8}
        return {"spec": spec, "result": result}

    alloc = {"a": [4, 6, 2, 5]}  # rank 2 costs 2 * (4 + 6) = 20, plus 5 nonzeros: 80% rank
    records = [
        rec("spalora", 0, 0.50, [9.0] * 8 + [1.0, 1.0], alloc=alloc),
        rec("spalora", 1, 0.60, [9.0] * 8 + [2.0, 2.0], alloc=alloc),
        rec("spalora", 3, 0.70, None, alloc=alloc),  # no curve recorded
        rec("spalora-no-reg", 0, 0.40, [0.0] * 8 + [1.5, 1.5], cut=0.1),
        rec("spalora-no-reg", 2, 0.90, [0.0] * 8 + [5.0, 5.0], cut=0.3),  # no partner seed
        rec("spalora-no-reg", 3, 0.80, [0.0] * 10, cut=0.2),  # partner has no curve
        rec("spalora-no-reg", 1, float("nan"), [float("nan")], cut=None),  # diverged
        rec("lora", 0, 0.99, [0.0] * 10),  # not ours: left out
    ]
    ref, abl = accuracy.ablation_summary(records)
    assert (ref["method"], ref["seeds"], ref["d_test"], ref["cut"]) == ("spalora", 3, None, None)
    assert ref["tail_loss"] == 1.5 and ref["rank_share"] == pytest.approx(
        0.8
    )  # last 20% = last 2 of 10 steps
    assert (abl["method"], abl["seeds"], abl["diverged"]) == ("spalora-no-reg", 3, 1)
    assert abl["pairs"] == 2 and abl["loss_pairs"] == 1  # seed 1 diverged: not a pair
    assert abl["test"] == pytest.approx(0.7) and abl["d_test"] == pytest.approx(0.0)
    assert abl["d_loss"] == pytest.approx(0.5) and abl["tail_loss"] == pytest.approx(6.5 / 3)
    assert abl["cut"] == pytest.approx(0.2) and abl["rank_share"] is None
    lines = accuracy.ablation_lines([ref, abl])
    assert "| 8 | toy | spalora-no-reg | neither penalty" in lines[-1]
    assert "| 3 + 1 diverged | 2 | 70.0 | +0.0 | 2.167 | +0.500 (1) | - | 20.0% |" in lines[-1]
    assert "| 3 | - | 60.0 | - | 1.500 | - | 80% | - |" in lines[-2]
    assert accuracy.ablation_lines([ref]) == []  # no ablation yet: no section


def test_paired_gap_takes_each_example_as_one_sample():
    def run(bits):
        return {"test_correct": bits}

    a = {0: run("1100"), 1: run("1110"), 2: run("0000")}
    b = {0: run("1000"), 1: run("1000"), 5: run("1111")}  # seed 5: no partner
    gap = accuracy.paired_gap(a, b)
    # per example, A's share of seeds 0 and 1 right minus B's: 0, 1, 1/2, 0
    diffs = [0.0, 1.0, 0.5, 0.0]
    mean = sum(diffs) / 4
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3 / 4)
    assert (gap["seeds"], gap["n"]) == (2, 4)
    assert gap["gap"] == pytest.approx(0.375) and gap["se"] == pytest.approx(se)
    # seed 0: 1100 - 1000 = +1/4; seed 1: 1110 - 1000 = +2/4; their mean is the gap
    assert gap["per_seed"] == pytest.approx([0.25, 0.5])
    line = accuracy.paired_gap_lines([{"r_eq": 2, "task": "toy", "a": "x", "b": "y", **gap}])[-1]
    assert line == "| 2 | toy | x - y | 2 | 4 | +37.5 | 23.9 | +1.6 | +25.0 / +50.0 |"
    # identical runs differ nowhere: a zero gap with zero error, unlike two unpaired scores
    same = accuracy.paired_gap(a, a)
    assert same["gap"] == 0.0 and same["se"] == 0.0
    # runs from before per-example results were kept, or on different test sets: no pair
    assert accuracy.paired_gap({0: {"test": 0.5}}, b) is None
    assert accuracy.paired_gap({0: run("10")}, b) is None
    assert accuracy.correct_bits([{"correct": True}, {"correct": False}]) == "10"
    assert accuracy.correct_bits([{"correct": 0.5}]) is None  # not right-or-wrong
    assert accuracy.correct_bits([]) is None


def test_our_method_keeps_loras_alpha_at_the_budget():
    """Revision 3: the rank-ceil(1.5 r_eq) start trains at LoRA's alpha 2 r_eq (scale 4/3 here), so
    a learning rate moves it as much as it moves LoRA at the budget."""
    for r_eq in (2, 8):
        model = build_method("spalora", tiny_llama(), r_eq, {"seed": 0})
        layers = model.adapter_layers().values()
        assert {layer.r for layer in layers} == {math.ceil(1.5 * r_eq)}
        expected = 2 * r_eq / math.ceil(1.5 * r_eq)
        assert all(layer.scale == pytest.approx(expected) for layer in layers)
    assert METHODS["spalora"].revision == METHODS["spalora-no-reg"].revision == 3


def test_loss_curves_script_windows_cached_runs_by_revision(tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    cache = tmp_path / "cache"
    (cache / "superseded").mkdir(parents=True)

    def write(path, method, revision, seed, losses):
        spec = {"method": method, "variant": [], "lr": 0.003, "seed": seed, "task": "toy"}
        record = {"spec": spec | {"r_eq": 8}, "revision": revision, "result": {"losses": losses}}
        path.write_text(json.dumps(record))

    write(cache / "a.json", "spalora", 3, 0, [2.0] * 6 + [1.0] * 4)
    write(cache / "b.json", "spalora", 3, 1, [4.0] * 6 + [3.0] * 4)
    write(cache / "superseded" / "c.json", "spalora", 2, 0, [5.0] * 10)
    write(cache / "d.json", "lora", 0, 0, [9.0] * 10)  # another method: filtered out
    script = Path(__file__).resolve().parents[1] / "loss_curves.py"
    argv = ["loss_curves.py", "--task", "toy", "--methods", "spalora", "--cache", str(cache)]
    argv += ["--window", "5", "--plot", str(tmp_path / "curves.png")]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| spalora")]
    # seeds averaged per revision: windows of 5 steps, then the last 20% (2 steps)
    assert rows == [
        "| spalora | 2 | - | 0.003 | 8 | 0 | 5.000 | 5.000 | 5.000 |",
        "| spalora | 3 | - | 0.003 | 8 | 0,1 | 3.000 | 2.200 | 2.000 |",
    ]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # --chosen keeps settings trained with several seeds, then --seeds picks among them
    monkeypatch.setattr(sys, "argv", argv[:5] + ["--cache", str(cache), "--chosen", "--seeds", "0"])
    runpy.run_path(str(script), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| spalora")]
    assert [row.split(" | ")[1:6] for row in rows] == [["3", "-", "0.003", "8", "0"]]
    monkeypatch.setattr(sys, "argv", argv[:3] + ["--methods", "rosa", "--cache", str(cache)])
    with pytest.raises(SystemExit, match="no cached runs"):
        runpy.run_path(str(script), run_name="__main__")
    write(cache / "e.json", "spalora", 3, 2, [1.0] * 4)  # a run of another length
    monkeypatch.setattr(sys, "argv", argv[:5] + ["--cache", str(cache)])
    with pytest.raises(SystemExit, match=r"different lengths \(\[4, 10\] steps\)"):
        runpy.run_path(str(script), run_name="__main__")


def test_a_cell_says_when_its_seeds_are_not_all_done():
    row = {"mean": 0.225, "std": 0.042, "n_seeds": 2}
    assert accuracy.cell(row, seeds=3) == "22.5 ± 4.2 (2 seeds)"
    assert accuracy.cell(row | {"n_seeds": 3}, seeds=3) == "22.5 ± 4.2"
    assert accuracy.cell(row | {"n_seeds": 1}, seeds=3) == "22.5 (seed 0 only)"


def test_backfill_adds_per_example_results_only_when_the_score_is_reproduced(
    tmp_path, monkeypatch, capsys
):
    import runpy
    import sys
    from dataclasses import asdict, replace

    import torch

    from spalora import SpaloraConfig, get_spalora_model
    from spalora.evaluate import evaluate_task

    model = get_spalora_model(tiny_llama(), SpaloraConfig(method="lora", r=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # an adapter that changes the predictions
    saved = tmp_path / "adapter"
    model.save_pretrained(saved)

    def even_word(prediction, target):  # right or wrong per example, whatever the training
        words = prediction.split()
        return bool(words) and int(words[0][1:]) % 2 == 0

    task = Task(
        "toy",
        WORD_EXAMPLES[:48],
        WORD_EXAMPLES[48:56],
        WORD_EXAMPLES[56:],
        None,
        2,
        score=even_word,
    )
    truth = evaluate_task(model, word_tokenizer(), task, task.test, progress=False)
    bits = "".join("1" if p["correct"] else "0" for p in truth["predictions"])
    assert 0 < bits.count("1") < len(bits)  # a test that could tell the examples apart

    cache = tmp_path / "cache"
    cache.mkdir()
    quick = accuracy.PROFILES["quick"]
    lora = accuracy.RunSpec("lora", (), 0.003, 0, "toy", 2, quick, "tiny")
    trained = accuracy.run_one(lora, tiny, lambda name: task, progress=False)

    def write(name, spec, result):
        result = {k: v for k, v in result.items() if k != "test_correct"}
        (cache / f"{name}.json").write_text(json.dumps({"spec": asdict(spec), "result": result}))

    ours = replace(lora, method="spalora")
    write("ours", ours, {"test": truth["value"], "saved_model": str(saved)})
    # its saved model was overwritten by a later run: the score is not reproduced
    write(
        "stale", replace(ours, seed=1), {"test": truth["value"] + 0.125, "saved_model": str(saved)}
    )
    write(lora.key(), lora, trained)  # no saved model: only --retrain can fill it in
    write("renamed", replace(lora, seed=1), trained)  # its key is not its configuration's
    monkeypatch.setattr("spalora.hub.load_model_and_tokenizer", tiny)
    monkeypatch.setattr("spalora.tasks.get_task", lambda name, seed: task)
    script = Path(__file__).resolve().parents[1] / "backfill_test_correct.py"

    def backfill(*flags):
        argv = ["backfill_test_correct.py", "--cache", str(cache), *flags]
        monkeypatch.setattr(sys, "argv", argv)
        runpy.run_path(str(script), run_name="__main__")
        return capsys.readouterr().out

    def kept(name):
        return json.loads((cache / f"{name}.json").read_text())["result"].get("test_correct")

    out = backfill("--methods", "spalora,lora")
    assert "reproduced" in out and "not this run's" in out and "--retrain trains it" in out
    assert kept("ours") == bits and kept("stale") is None and kept(lora.key()) is None
    out = backfill("--methods", "lora", "--retrain")
    assert "no longer gives its key" in out and kept("renamed") is None
    assert kept(lora.key()) == trained["test_correct"]  # the retrain reproduced the run


def test_a_control_is_paired_with_the_methods_it_names():
    """`sparse-random` is ShiRA's support in our code: the report pairs it with PEFT ShiRA and
    with our Fisher-mask sparse-only, besides our method - it as for every other method."""
    bits = {"spalora": "1100", "peft-shira": "1110", "sparse": "1000", "sparse-random": "1111"}
    records = [
        {"spec": {"r_eq": 2, "task": "toy", "method": m, "seed": 0}, "result": {"test_correct": b}}
        for m, b in bits.items()
    ]
    rows = {(r["a"], r["b"]): r["gap"] for r in accuracy.paired_gap_summary(records)}
    assert rows[("sparse-random", "peft-shira")] == pytest.approx(0.25)
    assert rows[("sparse-random", "sparse")] == pytest.approx(0.75)
    assert rows[("spalora", "sparse-random")] == pytest.approx(-0.5)
    assert len(rows) == 5  # ours against the three others, and the control's two pairs
    assert METHODS["sparse-random"].compare_with == ("peft-shira", "sparse")


def test_ablations_share_our_rate_and_revision_except_where_they_name_it():
    ours = METHODS["spalora"]
    ablations = [m for m in METHODS.values() if m.lr_from == "spalora"]
    assert len(ablations) == 7 and all(m.revision == ours.revision for m in ablations)
    changed = {m.name for m in ablations if m.sparse_lr_ratio != ours.sparse_lr_ratio}
    assert changed == {"spalora-random-fullrate"}
    assert METHODS["spalora-random-fullrate"].sparse_lr_ratio == 1.0
    for name, ratio in (("spalora-random-fullrate", 1.0), ("spalora-random", 2 / 7)):
        spec = accuracy.RunSpec(name, (), 1e-2, 0, "toy", 2, accuracy.PROFILES["full"], "tiny")
        assert spec.train_config().sparse_lr == pytest.approx(1e-2 * ratio)


def test_peft_lora_eva_starts_from_the_data_unchanged_and_refuses_without_it():
    pytest.importorskip("peft")
    base = tiny_llama()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = build_method("peft-lora-eva", base, 2, {"seed": 0, "probe_batches": token_batches})
    a = [p for n, p in model.named_parameters() if "lora_A" in n]
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(a) == len(b) == 14
    for p in a:  # EVA's A: orthonormal rows (singular vectors), never Kaiming's random draw
        assert torch.allclose(p @ p.T, torch.eye(2), atol=1e-5)
    assert all(not p.any() for p in b)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-6)  # starts unchanged
    with pytest.raises(ValueError, match="needs the run's training batches"):
        build_method("peft-lora-eva", tiny_llama(), 2, {"seed": 0})


def test_peft_lora_ga_starts_unchanged_along_the_mean_gradient_and_refuses_without_data():
    pytest.importorskip("peft")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    reference = tiny_llama()
    with torch.no_grad():
        want = reference(input_ids=ids).logits
    for batch in itertools.islice(token_batches(), 8):  # the mean gradient LoRA-GA starts from
        reference(**batch).loss.backward()
    grad = reference.model.layers[0].self_attn.q_proj.weight.grad.double() / 8
    model = build_method(
        "peft-lora-ga", tiny_llama(), 2, {"seed": 0, "probe_batches": token_batches}
    )
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)  # starts unchanged
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a = layer.lora_A["default"].weight.double()
    assert torch.allclose(a @ a.T, torch.eye(2, dtype=a.dtype), atol=1e-5)
    # ArB2r: A's rows span the gradient's top-2 right singular directions (cosines of the
    # principal angles all 1), where a random start would span an unrelated plane
    top = torch.linalg.svd(grad).Vh[:2]
    assert torch.allclose(torch.linalg.svdvals(a @ top.T), torch.ones(2, dtype=a.dtype), atol=1e-3)
    assert layer.lora_B["default"].weight.abs().sum() > 0  # and B is not zero
    with pytest.raises(ValueError, match="needs the run's training batches"):
        build_method("peft-lora-ga", tiny_llama(), 2, {"seed": 0})


def test_loraplus_trains_b_at_sixteen_times_the_grid_rate_and_no_other_method_does():
    spec = accuracy.RunSpec("peft-loraplus", (), 1e-3, 0, "toy", 2, accuracy.PROFILES["v2"], "m")
    assert spec.train_config().lora_b_lr_ratio == 16.0 and spec.train_config().lora_lr == 1e-3
    others = [m for m in METHODS.values() if m.name != "peft-loraplus"]
    assert all(m.lora_b_lr_ratio == 1.0 for m in others)
