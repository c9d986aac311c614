"""Statistics over the accuracy benchmark's cached records: per-setting means over seeds, our
method's split of the budget, paired gaps on the same test examples, and the ablation summary.
Pure functions of the records (`benchmarks.accuracy` runs and caches them)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from .methods import METHODS


def summarize(records: list[dict]) -> list[dict]:
    """One row per (method, r_eq, task): mean/std of the test metric over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        s = rec["spec"]
        groups.setdefault((s["method"], rec.get("budget", s["r_eq"]), s["task"]), []).append(rec)
    rows = []
    for (method, r_eq, task), recs in groups.items():
        tests = [r["result"]["test"] for r in recs]  # a diverged seed counts as NaN, visibly
        spec = recs[0]["spec"]
        rows.append(
            {
                "method": method,
                "r_eq": r_eq,
                "task": task,
                "mean": statistics.fmean(tests),
                "std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                "n_seeds": len(tests),
                "trainable_params": recs[0]["result"]["trainable_params"],
                "peak_trainable_params": recs[0]["result"].get(
                    "peak_trainable_params", recs[0]["result"]["trainable_params"]
                ),
                "adapter_bytes": recs[0]["result"].get("adapter_bytes", 0),
                "lr": spec["lr"],
                "variant": dict(spec["variant"]),
                "metric": recs[0]["result"]["metric"],
                "validation": recs[0]["result"]["validation"],
                "n_test": recs[0]["result"].get("n_test", 0),
            }
        )
    return rows


def rank_share(allocation: dict) -> float:
    """The share of a final split's parameters spent on rank ({layer: [out, in, r, nnz]})."""
    rank = sum(r * (o + i) for o, i, r, _ in allocation.values())
    return rank / max(1, sum(r * (o + i) + k for o, i, r, k in allocation.values()))


def split_summary(records: list[dict], method: str = "spalora") -> list[dict]:
    """How our method split the budget, per (task, r_eq), averaged over the chosen setting's
    seeds: the share of the budget spent on rank, and mean rank / density per module type."""
    from spalora.plot import block_and_kind

    groups: dict[tuple[str, int], list[dict]] = {}
    for rec in records:
        alloc = rec["result"].get("allocation")
        if rec["spec"]["method"] == method and alloc:
            groups.setdefault((rec["spec"]["task"], rec["budget"]), []).append(alloc)
    out = []
    for (task, r_eq), allocs in sorted(groups.items()):
        kinds: dict[str, list[float]] = {}
        blocks: dict[str, list[float]] = {}
        for alloc in allocs:
            for name, (o, i, r, k) in alloc.items():
                block, kind = block_and_kind(name)
                kinds.setdefault(kind, []).append((r, k / (o * i)))
                blocks.setdefault(block, []).append((r, k / (o * i)))

        def means(cells: dict) -> dict[str, tuple[float, float]]:
            return {
                key: (
                    statistics.fmean(r for r, _ in v),
                    statistics.fmean(d for _, d in v),
                )
                for key, v in cells.items()
            }

        out.append(
            {
                "task": task,
                "r_eq": r_eq,
                "seeds": len(allocs),
                "rank_share": statistics.fmean(rank_share(a) for a in allocs),
                "by_kind": means(kinds),
                "by_block": means(blocks),
            }
        )
    return out


def correct_bits(predictions: list[dict]) -> str | None:
    """Which test examples a run got right, as a string of 0s and 1s in test-set order (None
    when the metric is not right-or-wrong per example)."""
    marks = [p["correct"] for p in predictions]
    if not marks or any(m not in (0, 1) for m in marks):
        return None
    return "".join("1" if m else "0" for m in marks)


def paired_gap(a: dict[int, dict], b: dict[int, dict]) -> dict | None:
    """Test score of A minus B on the same test examples, over the seeds both ran, with its
    standard error over the examples. Each example's difference (A's share of seeds that got
    it right minus B's) is one sample, so examples that both get right or both miss add no
    noise: far tighter than the unpaired error of two scores when methods mostly agree.
    `per_seed` is the gap of each seed's pair (in seed order): whether it holds across seeds.
    None when either side lacks per-example results (runs recorded before they were kept)."""
    seeds = sorted(
        s
        for s in set(a) & set(b)
        if a[s].get("test_correct")
        and b[s].get("test_correct")
        and len(a[s]["test_correct"]) == len(b[s]["test_correct"])
    )
    if not seeds:
        return None
    n = len(a[seeds[0]]["test_correct"])
    if any(len(a[s]["test_correct"]) != n for s in seeds):
        return None
    by_seed = [  # one row per seed: each example's difference, A right minus B right
        [int(x) - int(y) for x, y in zip(a[s]["test_correct"], b[s]["test_correct"], strict=True)]
        for s in seeds
    ]
    diff = [statistics.fmean(col) for col in zip(*by_seed, strict=True)]  # per example
    per_seed = [statistics.fmean(row) for row in by_seed]
    gap = statistics.fmean(diff)
    se = statistics.stdev(diff) / math.sqrt(n) if n > 1 else math.inf
    return {"gap": gap, "se": se, "n": n, "seeds": len(seeds), "per_seed": per_seed}


def results_by_seed(records: Iterable[dict]) -> dict[tuple[int, str, str], dict[int, dict]]:
    """{(r_eq, task, method): {seed: result}}: the runs of one setting, for pairing by seed."""
    by: dict[tuple[int, str, str], dict[int, dict]] = {}
    for rec in records:
        s = rec["spec"]
        key = (rec.get("budget", s["r_eq"]), s["task"], s["method"])
        by.setdefault(key, {})[s["seed"]] = rec["result"]
    return by


def paired_gap_summary(records: list[dict], reference: str = "spalora") -> list[dict]:
    """`reference` against every other method, each of its ablations against it, and each
    control against the methods it names (`Method.compare_with`), per (r_eq, task), where both
    kept per-example test results (see paired_gap)."""
    ablations = {n for n, m in METHODS.items() if m.lr_from == reference}
    by = results_by_seed(records)
    order = list(METHODS)
    rows = []
    for (r_eq, task, other), runs in sorted(
        by.items(), key=lambda kv: (kv[0][0], kv[0][1], order.index(kv[0][2]))
    ):
        ref = by.get((r_eq, task, reference))
        if other == reference or ref is None:
            continue
        pair = ((other, runs), (reference, ref))  # an ablation minus ours, else ours minus it
        (a, a_runs), (b, b_runs) = pair if other in ablations else pair[::-1]
        gap = paired_gap(a_runs, b_runs)
        if gap is not None:
            rows.append({"r_eq": r_eq, "task": task, "a": a, "b": b, **gap})
    for (r_eq, task, control), runs in sorted(by.items(), key=lambda kv: kv[0]):
        for other in METHODS[control].compare_with:
            gap = paired_gap(runs, by.get((r_eq, task, other), {}))
            if gap is not None:
                rows.append({"r_eq": r_eq, "task": task, "a": control, "b": other, **gap})
    return rows


LOSS_TAIL = 0.2  # the training loss is compared over this last fraction of the steps


def ablation_summary(records: list[dict], reference: str = "spalora") -> list[dict]:
    """Our method and each of its ablations, per (r_eq, task): test score and training loss
    over the last LOSS_TAIL of the run, both also as differences to `reference` paired by seed
    (a seed fixes the batches, so a paired difference drops the data order's noise), with the
    rank share of the final split and the share of the adapters' squared norm the cut removed.
    The test score is noisy (see the precision note); the paired training loss is far less so,
    and tells whether a part of the method changes what training reaches at all. Diverged runs
    (no finite test score) are counted apart and left out of every mean and pair."""
    ours = {reference} | {n for n, m in METHODS.items() if m.lr_from == reference}
    by = results_by_seed(r for r in records if r["spec"]["method"] in ours)

    def finite(result: dict) -> bool:
        return math.isfinite(result["test"])

    def tail_loss(result: dict) -> float | None:
        losses = result.get("losses")
        if not losses:
            return None
        return statistics.fmean(losses[-max(1, round(LOSS_TAIL * len(losses))) :])

    def cut(result: dict) -> float | None:
        log = result.get("budget_log") or []
        return next((e["truncated_fraction"] for e in log if "truncated_fraction" in e), None)

    def mean_of(values) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    def paired(runs: dict, ref: dict, value) -> tuple[float | None, int]:
        pairs = [(value(runs[s]), value(ref[s])) for s in runs if s in ref]
        diffs = [a - b for a, b in pairs if a is not None and b is not None]
        return mean_of(diffs), len(diffs)

    rows = []
    order = list(METHODS)
    for (r_eq, task, method), seeds in sorted(
        by.items(), key=lambda kv: (kv[0][0], kv[0][1], order.index(kv[0][2]))
    ):
        runs = {s: r for s, r in seeds.items() if finite(r)}
        ref = {s: r for s, r in by.get((r_eq, task, reference), {}).items() if finite(r)}
        d_test, n_pairs = paired(runs, ref, lambda r: r["test"])
        d_loss, n_loss_pairs = paired(runs, ref, tail_loss)
        is_ref = method == reference
        rows.append(
            {
                "r_eq": r_eq,
                "task": task,
                "method": method,
                "seeds": len(runs),
                "diverged": len(seeds) - len(runs),
                "test": mean_of(r["test"] for r in runs.values()),
                "tail_loss": mean_of(tail_loss(r) for r in runs.values()),
                "d_test": None if is_ref else d_test,
                "d_loss": None if is_ref else d_loss,
                "pairs": None if is_ref else n_pairs,
                "loss_pairs": None if is_ref else n_loss_pairs,
                "rank_share": mean_of(
                    rank_share(r["allocation"]) if r.get("allocation") else None
                    for r in runs.values()
                ),
                "cut": mean_of(cut(r) for r in runs.values()),
            }
        )
    return rows
