"""One budget split across layers and between rank and nonzeros, at one global threshold.

Every candidate unit of adapter capacity gets a value in a common scale: a rank unit i of a layer
(cost m + n parameters) is worth sigma_i / sqrt(m + n), a nonzero (cost 1) is worth |s|, both
measured after weighting the delta's columns by the running RMS of the layer's inputs (so a unit
of change means the same output change in every layer). Units are taken in order of value; the
threshold tau is where the budget runs out. Because rank units are lumps of m + n parameters, the
last few hundred parameters go to the next nonzeros below tau, so the total is exactly the budget
(whenever enough candidate nonzeros exist).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCandidates:
    name: str
    rank_unit: int  # m + n: the cost of one rank
    sigma: torch.Tensor  # scaled singular values of the low-rank part, descending
    entries: torch.Tensor  # scaled |s| of the candidate nonzeros (any order)


@dataclass
class Allocation:
    targets: dict[str, tuple[int, int]]  # name -> (rank, nonzeros)
    threshold: float  # tau: the value of the last unit taken before the budget ran out
    params: int  # exactly the budget unless the candidates ran out

    @property
    def ranks(self) -> int:
        return sum(r for r, _ in self.targets.values())

    @property
    def nonzeros(self) -> int:
        return sum(k for _, k in self.targets.values())


def allocate_budget(candidates: list[LayerCandidates], budget: int) -> Allocation:
    """Per-layer (rank, nonzeros) taking the highest-valued units until `budget` is spent."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    values, costs, owner, is_rank = [], [], [], []
    for i, c in enumerate(candidates):
        sig = c.sigma.detach().double().reshape(-1)
        ent = c.entries.detach().double().reshape(-1)
        values += [sig / c.rank_unit**0.5, ent]
        costs += [torch.full_like(sig, c.rank_unit), torch.ones_like(ent)]
        owner += [torch.full(sig.shape, i, dtype=torch.int64)]
        owner += [torch.full(ent.shape, i, dtype=torch.int64)]
        is_rank += [
            torch.ones(sig.shape, dtype=torch.bool),
            torch.zeros(ent.shape, dtype=torch.bool),
        ]
    value, cost = torch.cat(values), torch.cat(costs)
    owner, is_rank = torch.cat(owner), torch.cat(is_rank)
    # descending by value; stable, so a layer's rank units keep their order on ties
    order = torch.sort(value, descending=True, stable=True).indices
    spent = torch.cumsum(cost[order], 0)
    n_prefix = int(
        torch.searchsorted(spent, torch.tensor(float(budget), dtype=spent.dtype), right=True)
    )
    taken = torch.zeros(value.numel(), dtype=torch.bool)
    taken[order[:n_prefix]] = True
    left = budget - (int(spent[n_prefix - 1]) if n_prefix else 0)
    threshold = float(value[order[n_prefix - 1]]) if n_prefix else float("inf")
    rest = order[n_prefix:]
    # what is left is smaller than the rank unit that did not fit: spend it on the next
    # nonzeros in order of value; rank units are only tried if those run out
    rest_entries = rest[~is_rank[rest]]
    fill = rest_entries[:left]
    taken[fill] = True
    left -= int(fill.numel())
    if left > 0:
        for idx in rest[is_rank[rest]].tolist():
            if cost[idx] <= left:
                taken[idx] = True
                left -= int(cost[idx])
    ranks = torch.bincount(owner[taken & is_rank], minlength=len(candidates))
    nnz = torch.bincount(owner[taken & ~is_rank], minlength=len(candidates))
    targets = {c.name: (int(ranks[i]), int(nnz[i])) for i, c in enumerate(candidates)}
    params = sum(
        r * c.rank_unit + k for c, (r, k) in zip(candidates, targets.values(), strict=True)
    )
    return Allocation(targets, threshold, params)
