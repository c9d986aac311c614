"""Our method reaching its budget gradually: no cut, no lost optimizer state.

Both parts train from the first step: LoRA at an over-provisioned rank and S on a random support
as large as all of the budget would buy (times `overprovision`). The budget the adapters may hold
falls on AdaLoRA's cubic schedule from the starting size B0 to P between `prune_from` and
`truncate_at` (fractions of the run):

    B(t) = P + (B0 - P) (1 - (t - t_i) / (t_f - t_i))^3   for t_i <= t <= t_f.

Every `irls_every` steps the global allocation (allocation.py) splits B(t) across layers and
between rank and nonzeros; units outside it are removed, and the IRLS penalties (penalties.py)
drain the units outside the next refresh's allocation B(t + irls_every) meanwhile, so what is
removed is already small. A removed sparse entry takes only its own Adam moments with it: every
kept entry keeps its moments. A layer whose rank falls is re-factored from its SVD and restarts
its LoRA moments (its basis rotates); a layer whose rank stays keeps its factors as they are.
At t_f the adapters hold exactly P and training goes on at the budget.
"""

from __future__ import annotations

import math
import sys

import torch
from tqdm.auto import tqdm

from ...layer import SpaloraLinear
from ...lowrank import factored_svd
from ..base import RESIZED, swap_parameters
from .allocation import allocate_budget
from .controller import FLOOR, BudgetController
from .penalties import kth_largest, sparse_weights


def random_free_positions(
    taken: torch.Tensor, n: int, size: int, generator: torch.Generator
) -> torch.Tensor:
    """n distinct flat positions in [0, size), uniformly among those not in `taken` (sorted).

    Sparse supports (most positions free): uniform draws with the taken ones rejected, then a
    uniform n-subset of the distinct survivors (uniform by symmetry); cost O(n), not O(size).
    Dense ones: the exact rank-to-position map over a permutation of the free positions."""
    free = size - taken.numel()
    if n > free:
        raise ValueError(f"cannot grow {n} entries: only {free} positions are free")
    if free < 4 * n:
        ranks = torch.randperm(free, generator=generator)[:n]
        # the j-th free position is j plus the number of taken positions t_i with t_i - i <= j
        shifted = taken - torch.arange(taken.numel(), dtype=taken.dtype)
        return ranks + torch.searchsorted(shifted, ranks, right=True)
    got = torch.zeros(0, dtype=torch.int64)
    while got.numel() < n:
        draw = torch.randint(size, (2 * (n - got.numel()) + 16,), generator=generator)
        got = torch.cat([got, draw]).unique()
        got = got[~torch.isin(got, taken)]
    return got[torch.randperm(got.numel(), generator=generator)[:n]]


def prune_layer(
    layer: SpaloraLinear,
    r: int,
    k: int,
    entry_score: torch.Tensor | None = None,
    grow: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[dict, dict]:
    """Shrink a layer to at most rank r and k entries, keeping what stays as it is, then add
    `grow` entries at zero at random positions outside the old support.

    Returns (swaps, keep): old parameter -> new one (None when a part goes), and old sparse
    values -> for each new entry, the old position it continues (-1: a grown entry, fresh
    optimizer state), so that their optimizer state can follow.
    """
    r, k = min(r, layer.r), (min(k, layer.nnz) if layer.mask_ready else 0)
    if r == layer.r and k == layer.nnz and grow == 0:
        return {}, {}
    old_A, old_B, old_S = layer.lora_A, layer.lora_B, layer.sparse_values
    scale = layer.scale if layer.r > 0 else 1.0
    new_B = new_A = None
    if 0 < r < layer.r:
        spec = factored_svd(old_B, old_A, scale)
        root = (spec.sigma[:r] / scale).sqrt()
        new_B, new_A = spec.U[:, :r] * root, (spec.V[:, :r] * root).t()
    keep = flat = None
    if k > 0:
        score = old_S.detach().abs() if entry_score is None else entry_score
        # sorted positions keep the CSR (flat-index) order, so values and moments stay aligned
        keep = torch.sort(torch.topk(score, k, sorted=False).indices).values
        flat = layer.mask_flat_indices()[keep]
    values = old_S.detach()[keep] if keep is not None else None
    if grow > 0:
        if old_S is None or keep is None:
            raise ValueError("entries grow only beside kept ones: the layer keeps no sparse part")
        old_flat = layer.mask_flat_indices()
        size = layer.out_features * layer.in_features
        grown = random_free_positions(old_flat.cpu(), grow, size, generator).to(old_flat.device)
        src = torch.cat([keep, torch.full_like(grown, -1)])
        order = torch.argsort(torch.cat([flat, grown]))
        flat, keep = torch.cat([flat, grown])[order], src[order]  # CSR order; -1: grown
        values = old_S.detach().new_zeros(flat.numel())
        values[keep >= 0] = old_S.detach()[keep[keep >= 0]]
        k += grow
    alpha = scale * r if r > 0 else layer.lora_alpha
    layer.resize(r, k, alpha)
    adapter = layer.adapter()
    with torch.no_grad():
        if r > 0 and r == len(old_A):  # rank kept: the very same factors (and their moments)
            adapter.lora_A, adapter.lora_B = old_A, old_B
        elif r > 0:
            layer.lora_B.copy_(new_B.to(layer.lora_B))
            layer.lora_A.copy_(new_A.to(layer.lora_A))
    if k > 0:
        layer.set_sparse(flat, values)
    swaps, kept = {}, {}
    if old_A is not None and layer.lora_A is not old_A:
        swaps.update({old_A: layer.lora_A, old_B: layer.lora_B})
    if old_S is not None:
        swaps[old_S] = layer.sparse_values
        if keep is not None:
            kept[old_S] = keep
    return swaps, kept


def proportional_split(total: int, weights: dict[str, int], room: dict[str, int]) -> dict[str, int]:
    """`total` split in proportion to `weights` (largest remainders, so the parts add up to it
    exactly), no part above its `room`; what a full part cannot take goes to the others."""
    out = dict.fromkeys(weights, 0)
    left, open_ = total, {n for n, w in weights.items() if w > 0 and room[n] > 0}
    while left > 0 and open_:
        mass = sum(weights[n] for n in open_)
        share = {n: left * weights[n] / mass for n in open_}
        part = {n: min(math.floor(v), room[n] - out[n]) for n, v in share.items()}
        short = left - sum(part.values())
        for n in sorted(open_, key=lambda n: (part[n] - share[n], n)):
            if short == 0:
                break
            if part[n] < room[n] - out[n]:
                part[n] += 1
                short -= 1
        for n, v in part.items():
            out[n] += v
        left -= sum(part.values())
        open_ = {n for n in open_ if out[n] < room[n]}
    return {n: v for n, v in out.items() if v > 0}


class GradualController(BudgetController):
    """The cubic budget schedule over BudgetController's refreshes and penalties (see module)."""

    def __init__(self, model, total_steps, start_step, input_rms=None, progress=True) -> None:
        super().__init__(model, total_steps, start_step, input_rms, progress)
        frac = float(self.cfg.prune_from)
        self.prune_step = start_step + round(frac * total_steps) if total_steps else start_step
        self.prune_step = min(self.prune_step, self.truncate_step)
        self.start_params = self.params()
        self.grown = {}

    def params(self) -> int:
        return sum(layer.num_adapter_parameters() for layer in self.layers.values())

    generator = None  # the exchange's random regrowth; pruning alone grows nothing
    grown: dict  # layer -> which of its entries the last prune grew (bool), for the exchange

    def regrowth(self, allocation) -> dict[str, int]:
        """Entries to grow per layer after pruning to `allocation`: none when only pruning."""
        return {}

    def budget_at(self, step: int) -> int:
        """B(t): the start size until prune_step, P from truncate_step on, cubic between."""
        if step >= self.truncate_step:
            return self.budget
        if step <= self.prune_step:
            return max(self.budget, self.start_params)
        left = 1.0 - (step - self.prune_step) / (self.truncate_step - self.prune_step)
        return self.budget + round((self.start_params - self.budget) * left**3)

    def refresh(self) -> None:
        """IRLS weights toward the allocation of the next refresh's budget."""
        budget, self.budget = self.budget, self.budget_at(self._step + self.cfg.irls_every)
        try:
            super().refresh()
        finally:
            self.budget = budget

    _step = 0  # the step of the prune and refresh being made

    @torch.no_grad()
    def prune(self, budget: int, optimizer: torch.optim.Optimizer | None) -> bool:
        """Remove the units outside the allocation of `budget`; True if any layer changed."""
        self.grown = {}  # a prune that changes nothing grows nothing
        if budget >= self.params():
            return False
        allocation = allocate_budget(self._candidates(), budget)
        grow = self.regrowth(allocation)
        swaps, keep = {}, {}
        for name, layer in self.layers.items():
            r_l, k_l = allocation.targets[name]
            score = self._entry_score(name, layer) if layer.nnz and layer.mask_ready else None
            s, k = prune_layer(layer, r_l, k_l, score, grow.get(name, 0), self.generator)
            swaps.update(s)
            keep.update(k)
            if grow.get(name):  # which of the layer's entries are new
                self.grown[name] = next(iter(k.values())) < 0
        if not swaps:
            return False
        if optimizer is not None:
            swap_parameters(optimizer, swaps, keep)
        self.model.sync_allocations()
        return True

    def step(self, step: int, optimizer: torch.optim.Optimizer | None) -> tuple[str, ...]:
        """Called after optimizer step `step`: prune and refresh when due, then penalties."""
        if self.truncated:
            return ()
        events: tuple[str, ...] = ()
        due = (step - self.start_step) % self.cfg.irls_every == 0 or step >= self.truncate_step
        if due or not self._weights:
            self._step = step
            if self.prune(self.budget_at(step), optimizer):
                events = (RESIZED,)
            if step >= self.truncate_step:
                self.finish(step)
                return events
            self.refresh()
        if optimizer is not None:
            self.apply_penalties(optimizer)
        return events

    def finish(self, step: int) -> None:
        self.truncated, self.truncated_at = True, step
        self._weights.clear()
        self.log.append({"at_budget_after_step": step, "start_params": self.start_params})
        if self.progress:
            ranks = [lay.r for lay in self.layers.values()]
            nnz = sum(lay.nnz for lay in self.layers.values())
            tqdm.write(
                f"[spalora] at the budget after step {step}: {self.params():,} of "
                f"{self.budget:,} parameters (from {self.start_params:,}), ranks "
                f"{min(ranks)}-{max(ranks)} (total {sum(ranks)}), {nnz:,} nonzeros",
                file=sys.stderr,
            )

    def lr_scale(self, step: int) -> float:
        return 1.0  # nothing was cut: nothing to re-warm

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "prune_step": self.prune_step,
            "start_params": self.start_params,
            "refresh_step": self._step,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.prune_step = int(state["prune_step"])
        self.start_params = int(state["start_params"])
        self._step = int(state["refresh_step"])


class ExchangeController(GradualController):
    """Our method at exactly the budget from step 0, its support learned by exchange.

    Every `irls_every` steps between `prune_from` and `truncate_at`, the weakest units (rank
    units or entries, by the global allocation's common value) worth a fraction zeta(t) of the
    budget P are removed, as the cubic schedule removes them, and as many entries are grown at
    random positions outside each layer's support, at zero with fresh optimizer state, in
    proportion to the entries each layer kept (so the budget moves toward the layers whose entries
    hold their value). zeta falls as RigL's does:

        zeta(t) = zeta_0 (1 + cos(pi (t - t_i) / (t_f - t_i))) / 2,   t_i <= t < t_f.

    Meanwhile the IRLS sparsity penalty drains the entries outside the next exchange's
    allocation, so what is removed is already small; the entries just grown are exempt until the
    exchange after. Trainable parameters never exceed P: a training step costs what a step at the
    budget costs.
    """

    def __init__(self, model, total_steps, start_step, input_rms=None, progress=True) -> None:
        super().__init__(model, total_steps, start_step, input_rms, progress)
        if self.start_params != self.budget:
            raise ValueError(
                f"reach_budget='exchange' trains at the budget from the start, but the adapters "
                f"hold {self.start_params:,} parameters for a budget of {self.budget:,}: set "
                "overprovision=1 and start_rank='split'"
            )
        self.generator = torch.Generator().manual_seed(int(self.cfg.seed) + 1)

    def fraction(self, step: int) -> float:
        if not self.prune_step <= step < self.truncate_step:
            return 0.0
        t = (step - self.prune_step) / (self.truncate_step - self.prune_step)
        return float(self.cfg.exchange_fraction) * 0.5 * (1.0 + math.cos(math.pi * t))

    def budget_at(self, step: int) -> int:
        """P less the units the exchange at `step` removes (and grows back as entries)."""
        return self.budget - round(self.fraction(step) * self.budget)

    def regrowth(self, allocation) -> dict[str, int]:
        """What pruning freed, grown back as entries in proportion to the entries kept."""
        free = self.budget - allocation.params
        kept = {n: k for n, (_, k) in allocation.targets.items() if k > 0}
        # a layer grows only outside its old support: at most its size less its old entries
        room = {
            n: self.layers[n].out_features * self.layers[n].in_features - self.layers[n].nnz
            for n in kept
        }
        return proportional_split(free, kept, room)

    def _entry_score(self, name, layer) -> torch.Tensor:
        score = super()._entry_score(name, layer)
        grown = self.grown.get(name) if self._protect else None
        if grown is not None and grown.numel() == score.numel():
            score = score.masked_fill(grown.to(score.device), math.inf)
        return score

    _protect = False  # during a refresh: the entries just grown are kept by the allocation

    def refresh(self) -> None:
        """The drain of the next exchange, among the entries that have trained: those just grown
        (still zero) are kept by the allocation and not drained, and the smoothing delta is the
        boundary among the others (it restarts at every refresh: the boundary moves)."""
        self.delta = {n: math.inf for n in self.layers}
        self._protect = True
        try:
            super().refresh()
        finally:
            self._protect = False
        for name, grown in self.grown.items():
            weights, layer = self._weights.get(name, {}), self.layers[name]
            if "w" not in weights or grown.numel() != layer.nnz:
                continue
            older = layer.sparse_values.detach().abs()[~grown]
            keep = self.targets[name][1] - int(grown.sum())
            self.delta[name] = max(FLOOR, kth_largest(older, keep + 1))
            w = sparse_weights(layer.sparse_values, self.delta[name])
            weights["w"] = w.masked_fill(grown.to(w.device), 0.0)

    def prune(self, budget: int, optimizer: torch.optim.Optimizer | None) -> bool:
        changed = super().prune(budget, optimizer)
        if changed:
            self.log.append({"exchanged_at_step": self._step, "units": self.budget - budget})
        return changed

    def state_dict(self) -> dict:
        # `grown` is read only by the refresh right after the prune that set it: not state
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
