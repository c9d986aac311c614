"""Standard errors of paired gaps that count seed noise, and the seeds a target effect needs.

A gap between methods A and B is measured on the same test examples at the same seeds (same
batches, same initialisation stream), so its data is a matrix D[s, i] = loss_A - loss_B of seed
s on example i. Its grand mean estimates the gap; treating seeds and examples as two crossed
random factors (no replication), the variance of that mean is

    sigma_seed^2 / S + sigma_example^2 / n + sigma_resid^2 / (n S)

estimated from the two-way ANOVA mean squares as (MS_seed + MS_example - MS_resid) / (n S).
Fixing the test set and averaging over seeds only (the protocol-1 report) drops sigma_seed^2.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PairedGap:
    gap: float  # grand mean of D
    se: float  # with seed noise and test sampling
    se_test_only: float  # test sampling alone (what protocol 1 printed)
    var_seed: float  # sigma_seed^2 (between-seed variance of the per-seed gap, net of examples)
    var_example: float
    var_resid: float
    per_seed: tuple[float, ...]  # each seed's gap (mean over examples)
    n_test: int
    n_seeds: int

    def seeds_for(self, target_se: float) -> int | None:
        """Seeds at which the SE reaches `target_se` on this test set (None: never, because the
        example term alone is above it)."""
        floor = self.var_example / self.n_test
        if target_se**2 <= floor:
            return None
        per_seed = self.var_seed + self.var_resid / self.n_test
        return max(2, math.ceil(per_seed / (target_se**2 - floor)))


def paired_gap(d: torch.Tensor) -> PairedGap:
    """`d`: seeds x examples matrix of per-example differences (float64 inside)."""
    d = d.to(torch.float64)
    s, n = d.shape
    if s < 2 or n < 2:
        raise ValueError(f"need at least 2 seeds and 2 examples, got {s} x {n}")
    grand = d.mean()
    seed_means, example_means = d.mean(1), d.mean(0)
    ms_seed = n * float(((seed_means - grand) ** 2).sum()) / (s - 1)
    ms_example = s * float(((example_means - grand) ** 2).sum()) / (n - 1)
    resid = d - seed_means[:, None] - example_means[None, :] + grand
    ms_resid = float((resid**2).sum()) / ((s - 1) * (n - 1))
    var = max(ms_seed + ms_example - ms_resid, 0.0) / (n * s)
    return PairedGap(
        gap=float(grand),
        se=math.sqrt(var),
        se_test_only=math.sqrt(ms_example / (n * s)),
        var_seed=max((ms_seed - ms_resid) / n, 0.0),
        var_example=max((ms_example - ms_resid) / s, 0.0),
        var_resid=ms_resid,
        per_seed=tuple(float(x) for x in seed_means),
        n_test=n,
        n_seeds=s,
    )


def matrix(runs_a: dict[int, list[float]], runs_b: dict[int, list[float]]) -> torch.Tensor:
    """Per-example differences A - B at the seeds both have, as seeds x examples."""
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        raise ValueError("the two methods share no seed")
    rows = []
    for s in seeds:
        a, b = runs_a[s], runs_b[s]
        if len(a) != len(b):
            raise ValueError(f"seed {s}: {len(a)} vs {len(b)} examples; not the same test set")
        rows.append(torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64))
    return torch.stack(rows)


def nested_gap(per_seed: dict[int, torch.Tensor]) -> PairedGap:
    """A cross-fitted gap: seed s tested on its own fold, so examples are nested in seeds. The
    gap is the mean of the per-seed gaps; its SE, from their spread, carries seed noise and
    example sampling together (S - 1 degrees of freedom)."""
    if len(per_seed) < 2:
        raise ValueError(f"need at least 2 seeds, got {len(per_seed)}")
    seeds = sorted(per_seed)
    rows = [per_seed[s].to(torch.float64) for s in seeds]
    means = torch.stack([r.mean() for r in rows])
    s = len(rows)
    within = [float(r.var()) / r.numel() for r in rows]  # each fold's test-sampling variance
    var_example = statistics.fmean(float(r.var()) for r in rows)
    return PairedGap(
        gap=float(means.mean()),
        se=float(means.std()) / math.sqrt(s),
        se_test_only=math.sqrt(sum(within)) / s,
        var_seed=max(float(means.var()) - statistics.fmean(within), 0.0),
        var_example=var_example,
        var_resid=0.0,
        per_seed=tuple(float(m) for m in means),
        n_test=sum(r.numel() for r in rows),
        n_seeds=s,
    )
