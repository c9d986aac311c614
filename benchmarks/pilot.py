"""`python -m benchmarks pilot`: what protocol 2's pilots measured, from the cache alone.

Seed noise: for every two methods run at the same condition and seeds, the paired gap in held-out
NLL and in accuracy, with an SE that counts seed noise (benchmarks/power.py) and the seeds that
would resolve the target effect. Admission: full fine-tuning against LoRA at each condition; a
condition is admitted when full fine-tuning is ahead by at least ADMIT_FACTOR target effects, or
(docs/benchmarks.md) when the best peer at twice the budget is ahead of the best peer by as much.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from itertools import combinations
from pathlib import Path

from .accuracy import PROFILES
from .decision import is_peer
from .power import matrix, paired_gap

TARGET_POINTS = 1.0  # the effect to detect: one accuracy point, or its NLL equivalent
ADMIT_FACTOR = 3.0


def load_records(cache_dirs: list[Path]) -> list[dict]:
    """Protocol-2 records (per-example NLL present; a selection run has no test set), each with
    its spec."""
    out = []
    for root in cache_dirs:
        for path in sorted(Path(root).glob("*.json")):
            rec = json.loads(path.read_text())
            if {"test_nll", "validation_nll"} & set(rec["result"]):  # protocol 2
                out.append(rec)
    return out


def condition(spec: dict) -> tuple:
    """(task, steps, r_eq): runs of one condition are compared; fft is filed under r_eq 0."""
    return spec["task"], spec["profile"]["steps"], spec["r_eq"]


def arm(spec: dict) -> str:
    variant = ",".join(f"{k}={v:g}" for k, v in spec["variant"])
    name = spec["method"] + (f"[{variant}]" if variant else "")
    return f"{name} lr={spec['lr']:g}"


def is_selection(spec: dict) -> bool:
    """A run at one of its profile's selection seeds (a record without them: protocol 2's)."""
    default = PROFILES["v2"].selection_seeds
    return spec["seed"] in spec["profile"].get("selection_seeds", default)


def by_arm(records: list[dict], selection: bool = False) -> dict[tuple, dict[int, dict]]:
    """{(condition, arm): {seed: result}} over the reported seeds, or (selection=True) over the
    selection seeds: a seed that chose a setting never enters a reported mean or gap."""
    out: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for rec in records:
        if is_selection(rec["spec"]) == selection:
            out[(condition(rec["spec"]), arm(rec["spec"]))][rec["spec"]["seed"]] = rec["result"]
    return out


def nats_per_point(records: list[dict]) -> float | None:
    """Least-squares slope of mean test NLL on test accuracy (points) across runs: how many
    nats one accuracy point is worth here (None with fewer than 4 runs)."""
    scored = [r["result"] for r in records if not is_selection(r["spec"])]
    xs = [100 * r["test"] for r in scored]
    ys = [r["test_nll_mean"] for r in scored]
    if len(xs) < 4 or statistics.pvariance(xs) == 0:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return -cov / sum((x - mx) ** 2 for x in xs)


def bits(result: dict) -> list[float]:
    return [float(c == "1") for c in result["test_correct"]]


def gap_rows(arms: dict[tuple, dict[int, dict]], target_nats: float | None) -> list[dict]:
    """Every pair of arms of one condition (or an fft arm against each budgeted arm of the
    same task and steps) with at least 2 shared seeds."""
    rows = []
    keys = sorted(arms)
    for a, b in combinations(keys, 2):
        (ca, _), (cb, _) = a, b
        same = ca == cb or (ca[:2] == cb[:2] and 0 in (ca[2], cb[2]))
        shared = sorted(set(arms[a]) & set(arms[b]))
        if not same or len(shared) < 2:
            continue
        if cb[2] == 0:  # fft first: the gap reads "fft minus adapter"
            a, b = b, a
        nll, acc = paired_test_gaps(arms[a], arms[b], shared)
        rows.append({"a": a, "b": b, "nll": nll, "acc": acc, "target_nats": target_nats})
    return rows


def paired_test_gaps(ra: dict[int, dict], rb: dict[int, dict], shared: list[int]) -> tuple:
    """(NLL gap, accuracy gap) of arm a minus arm b, paired by test example over `shared`."""
    nll = paired_gap(matrix(*({s: r[s]["test_nll"] for s in shared} for r in (ra, rb))))
    acc = paired_gap(matrix(*({s: bits(r[s]) for s in shared} for r in (ra, rb))))
    return nll, acc


def per_seed(gap) -> str:
    return " / ".join(f"{g:+.3f}" for g in gap.per_seed)


def write_pilot_report(cache_dirs: list[Path], out: Path, command: str) -> list[Path]:
    records = load_records(cache_dirs)
    if not records:
        raise ValueError(f"no protocol-2 runs under {', '.join(map(str, cache_dirs))}")
    arms = by_arm(records)
    slope = nats_per_point(records)
    target = None if slope is None else slope * TARGET_POINTS
    lines = [
        "# Protocol 2 pilots",
        "",
        f"Produced by `{command}` from the cached runs. Do not edit: rerun the command.",
        "",
        "Gap = first arm minus second, paired by test example and seed; NLL in nats (lower is "
        "better), accuracy in points. SE counts seed noise and test sampling (two crossed "
        "random factors); 'test-only SE' is what a fixed test set with seeds averaged out "
        "would claim. sd(seed) is the between-seed SD of the gap net of the examples.",
        "",
    ]
    if slope is not None:
        n_scored = sum(not is_selection(r["spec"]) for r in records)
        lines.append(
            f"One accuracy point is worth {slope:.4f} nats of mean test NLL here (least-squares "
            f"slope over {n_scored} runs); the target effect of {TARGET_POINTS:g} point is "
            f"{target:.4f} nats."
        )
        lines.append("")
    lines += runs_table(arms)
    rows = gap_rows(arms, target)
    lines += gaps_table(rows, target)
    lines += doubling_table(arms, target)
    sd_seed = max((r["nll"].var_seed ** 0.5 for r in rows), default=0.0)
    lines += selection_table(by_arm(records, selection=True), sd_seed)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pilot.md"
    path.write_text("\n".join(lines) + "\n")
    return [path]


def runs_table(arms: dict[tuple, dict[int, dict]]) -> list[str]:
    lines = [
        "## Runs",
        "",
        "Reported seeds only: the selection seeds' runs are in the last table.",
        "",
        "| task | steps | r_eq | arm | seeds | test NLL (mean ± sd over seeds) | test acc | "
        "train s | eval s |",
        "| --- | ---: | ---: | --- | --- | --- | --- | ---: | ---: |",
    ]
    for (cond, name), runs in sorted(arms.items()):
        nll = [r["test_nll_mean"] for r in runs.values()]
        acc = [100 * r["test"] for r in runs.values()]
        nll_sd = f" ± {statistics.stdev(nll):.3f}" if len(nll) > 1 else ""
        acc_sd = f" ± {statistics.stdev(acc):.1f}" if len(acc) > 1 else ""
        lines.append(
            f"| {cond[0]} | {cond[1]} | {cond[2]} | {name} | {','.join(map(str, sorted(runs)))} "
            f"| {statistics.fmean(nll):.4f}{nll_sd} | {statistics.fmean(acc):.1f}{acc_sd} "
            f"| {statistics.fmean(r['train_seconds'] for r in runs.values()):.0f} "
            f"| {statistics.fmean(r['eval_seconds'] for r in runs.values()):.0f} |"
        )
    return lines + [""]


def gaps_table(rows: list[dict], target: float | None) -> list[str]:
    lines = [
        "## Paired gaps",
        "",
        "| condition | first | second | seeds | NLL gap ± SE (test-only SE) | sd(seed) | "
        "per-seed NLL gaps | acc gap ± SE | seeds for SE = target/2 | gap / target |",
        "| --- | --- | --- | ---: | --- | ---: | --- | --- | ---: | ---: |",
    ]
    for row in rows:
        nll, acc = row["nll"], row["acc"]
        need = "-" if target is None else (nll.seeds_for(target / 2) or "never")
        ratio = "-" if target is None else f"{abs(nll.gap) / target:.1f}"
        cond = row["a"][0]
        lines.append(
            f"| {cond[0]} {cond[1]} steps r_eq {max(cond[2], row['b'][0][2])} | {row['a'][1]} "
            f"| {row['b'][1]} | {nll.n_seeds} | {nll.gap:+.4f} ± {nll.se:.4f} "
            f"({nll.se_test_only:.4f}) | {nll.var_seed**0.5:.4f} "
            f"| {per_seed(nll)} | {100 * acc.gap:+.1f} ± {100 * acc.se:.1f} | {need} | {ratio} |"
        )
    return lines + [""]


def doubling_table(arms: dict[tuple, dict[int, dict]], target: float | None) -> list[str]:
    """Admission's second reference: every peer at r_eq against every peer at 2 r_eq (same task
    and steps, at least 2 shared reported seeds), gap = (r_eq) - (2 r_eq), so positive says the
    budget binds. 'best' marks each budget's lowest mean test NLL over its reported seeds."""
    peers = {k: runs for k, runs in arms.items() if k[0][2] > 0 and is_peer(k[1].split()[0])}
    best = {}
    for (cond, name), runs in peers.items():
        mean = statistics.fmean(r["test_nll_mean"] for r in runs.values())
        if len(runs) >= 2 and (cond not in best or mean < best[cond][1]):
            best[cond] = (name, mean)
    rows = []
    for (ca, a), ra in sorted(peers.items()):
        for (cb, b), rb in sorted(peers.items()):
            shared = sorted(set(ra) & set(rb))
            if ca[:2] != cb[:2] or cb[2] != 2 * ca[2] or len(shared) < 2:
                continue
            nll, acc = paired_test_gaps(ra, rb, shared)
            mark = " (best vs best)" if best[ca][0] == a and best[cb][0] == b else ""
            targets = "-" if target is None else f"{nll.gap / target:.1f}"
            rows.append(
                f"| {ca[0]} {ca[1]} steps r_eq {ca[2]} vs {cb[2]}{mark} | {a} | {b} "
                f"| {nll.n_seeds} | {nll.gap:+.4f} ± {nll.se:.4f} "
                f"| {per_seed(nll)} | {100 * acc.gap:+.1f} ± {100 * acc.se:.1f} | {targets} |"
            )
    if not rows:
        return []
    return [
        "## Twice the budget (admission's second reference)",
        "",
        "Gap = the peer at r_eq minus the peer at twice r_eq, paired by test example over shared "
        "reported seeds: positive says more budget helps. A condition is admitted when the best "
        f"peer's gap is at least {ADMIT_FACTOR:g} targets (docs/benchmarks.md). 'best': each "
        "budget's lowest mean test NLL among the peers with 2 or more reported seeds.",
        "",
        "| budgets | at r_eq | at 2 r_eq | seeds | NLL gap ± SE | per-seed NLL gaps | acc gap ± SE "
        "| gap / target |",
        "| --- | --- | --- | ---: | --- | --- | --- | ---: |",
        *rows,
        "",
    ]


def selection_table(arms: dict[tuple, dict[int, dict]], sd_seed: float) -> list[str]:
    """Every selection seed's table, never reported (see seed_table)."""
    seeds = sorted({seed for runs in arms.values() for seed in runs})
    return [line for seed in seeds for line in seed_table(arms, sd_seed, seed)]


def seed_table(arms: dict[tuple, dict[int, dict]], sd_seed: float, seed: int) -> list[str]:
    """One selection seed: every arm's validation NLL against the condition's best arm at that
    seed, paired by validation example. One seed cannot measure the gap's seed noise, so a gap
    is called clear only beyond 2 sqrt(SE^2 + sd_seed^2), sd_seed being the largest
    between-seed SD of a gap the multi-seed pairs measured."""
    best: dict[tuple, tuple[str, list[float]]] = {}
    for (cond, name), runs in sorted(arms.items()):
        if seed in runs and cond[2] > 0:
            val = runs[seed]["validation_nll"]
            if cond not in best or statistics.fmean(val) < statistics.fmean(best[cond][1]):
                best[cond] = (name, val)
    if not best:
        return []
    lines = [
        f"## Selection seed {seed} (choices only, never reported)",
        "",
        f"Validation NLL (1,000 questions) at seed {seed}, paired by example with the "
        "condition's best arm at that seed. SE: examples only; 'clear' when |gap| > 2 sqrt(SE^2 "
        f"+ {sd_seed:.4f}^2), the allowance being the largest sd(seed) of a gap measured above.",
        "",
        "| condition | arm | validation NLL | gap to best ± SE | clear? | test acc |",
        "| --- | --- | ---: | --- | --- | ---: |",
    ]
    order = sorted(arms.items(), key=lambda kv: (kv[0][0], _val(kv[1], seed)))
    for (cond, name), runs in order:
        if cond not in best or seed not in runs:
            continue
        diff = [a - b for a, b in zip(runs[seed]["validation_nll"], best[cond][1], strict=True)]
        gap, se = statistics.fmean(diff), statistics.stdev(diff) / len(diff) ** 0.5
        clear = (
            "best"
            if name == best[cond][0]
            else ("yes" if abs(gap) > 2 * (se**2 + sd_seed**2) ** 0.5 else "no")
        )
        lines.append(
            f"| {cond[0]} {cond[1]} steps r_eq {cond[2]} | {name} "
            f"| {statistics.fmean(runs[seed]['validation_nll']):.4f} | {gap:+.4f} ± {se:.4f} "
            f"| {clear} | {_test_acc(runs[seed])} |"
        )
    return lines + [""]


def _test_acc(result: dict) -> str:
    """A selection run's test accuracy, where it was scored (runs before selection seeds went
    validation-only were)."""
    return f"{100 * result['test']:.1f}" if "test" in result else "-"


def _val(runs: dict[int, dict], seed: int) -> float:
    return statistics.fmean(runs[seed]["validation_nll"]) if seed in runs else float("inf")
