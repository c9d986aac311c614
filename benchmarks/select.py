"""Protocol 2's choice of a method's setting (learning rate, and split where it has one): on
validation NLL at selection seeds that are never reported.

1. Every grid setting trains at the first selection seed; a setting that diverged is excluded.
2. A best rate on the grid's edge extends the grid past it (accuracy.next_lr), as protocol 1.
3. When the best and the runner-up are closer than MARGIN_SE paired standard errors (by
   example, on validation), both train at the second selection seed and the choice is made on
   the mean over the two; a setting whose two seeds disagree by more than SWING_FRACTION of its
   NLL (or that diverged at either) is excluded as unstable, not chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from .accuracy import MAX_EXTENSIONS, Profile, RunSpec, grid, next_lr

MARGIN_SE = 2.0
SWING_FRACTION = 0.05


@dataclass
class Choice:
    spec: RunSpec | None  # the chosen setting at the first selection seed (None: not yet known)
    tried: list[tuple[RunSpec, dict]]  # every selection run, for the report
    excluded: list[tuple[RunSpec, str]]
    pending: bool = False  # report-only: a needed run is not in the cache


def val_nll(result: dict) -> float:
    """Mean validation NLL; +inf for a run that diverged or has a non-finite loss."""
    if "diverged" in result or not all(map(math.isfinite, result["validation_nll"])):
        return math.inf
    return result["validation_nll_mean"]


def paired_se(a: dict, b: dict) -> float:
    d = [x - y for x, y in zip(a["validation_nll"], b["validation_nll"], strict=True)]
    mean = sum(d) / len(d)
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def choose(
    method: str,
    task: str,
    r_eq: int,
    profile: Profile,
    ensure: Callable[[RunSpec], dict | None],
    model: str = "smollm2-135m",
    extend: bool = True,
) -> Choice:
    first, second = profile.selection_seeds[0], profile.selection_seeds[-1]
    run_r = 0 if method == "fft" else r_eq
    specs = [
        RunSpec(method, tuple(sorted(v.items())), lr, first, task, run_r, profile, model)
        for v, lr in grid(method, profile, r_eq)
    ]
    results: dict[RunSpec, dict] = {}
    for spec in specs:
        if (found := ensure(spec)) is None:
            return Choice(None, list(results.items()), [], pending=True)
        results[spec] = found
    excluded = [(s, "diverged") for s in specs if val_nll(results[s]) == math.inf]
    added = {True: 0, False: 0}
    while extend:
        ranked = sorted((s for s in results if val_nll(results[s]) < math.inf), key=_by(results))
        if not ranked:
            return Choice(None, list(results.items()), excluded)
        lrs = sorted({s.lr for s in results if s.variant == ranked[0].variant})
        lr, up = ranked[0].lr, ranked[0].lr == lrs[-1]
        if len(lrs) < 2 or not (up or lr == lrs[0]) or added[up] >= MAX_EXTENSIONS:
            break
        added[up] += 1
        spec = replace(ranked[0], lr=next_lr(lr, up))
        if (found := ensure(spec)) is None:
            return Choice(None, list(results.items()), excluded, pending=True)
        results[spec] = found
        if val_nll(found) == math.inf:
            excluded.append((spec, "diverged"))
    return _second_seed(results, excluded, second, ensure)


def _by(results: dict[RunSpec, dict]):
    return lambda s: (val_nll(results[s]), s.lr)


def _second_seed(results, excluded, second: int, ensure) -> Choice:
    """Step 3: a close call is decided on the mean over both selection seeds."""
    while True:
        ranked = sorted(
            (s for s in results if s.seed != second and val_nll(results[s]) < math.inf),
            key=_by(results),
        )
        ranked = [s for s in ranked if s not in {e for e, _ in excluded}]
        if len(ranked) < 2:
            return Choice(ranked[0] if ranked else None, list(results.items()), excluded)
        best, runner = ranked[0], ranked[1]
        margin = val_nll(results[runner]) - val_nll(results[best])
        if margin >= MARGIN_SE * paired_se(results[best], results[runner]):
            return Choice(best, list(results.items()), excluded)
        means = {}
        for spec in (best, runner):
            again = replace(spec, seed=second)
            if (found := ensure(again)) is None:
                return Choice(None, list(results.items()), excluded, pending=True)
            results[again] = found
            a, b = val_nll(results[spec]), val_nll(found)
            if b == math.inf or abs(a - b) > SWING_FRACTION * a:
                excluded.append((spec, f"unstable across selection seeds ({a:.4f} vs {b:.4f})"))
            else:
                means[spec] = (a + b) / 2
        if len(means) == 2 or (means and len(ranked) == 2):
            chosen = min(means, key=lambda s: (means[s], s.lr))
            return Choice(chosen, list(results.items()), excluded)
        # one or both were unstable: choose again among the settings that remain
