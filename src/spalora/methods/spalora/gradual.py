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

import sys

import torch
from tqdm.auto import tqdm

from ...layer import SpaloraLinear
from ...lowrank import factored_svd
from ..base import RESIZED, swap_parameters
from .allocation import allocate_budget
from .controller import BudgetController


def prune_layer(
    layer: SpaloraLinear, r: int, k: int, entry_score: torch.Tensor | None = None
) -> tuple[dict, dict]:
    """Shrink a layer to at most rank r and k entries, keeping what stays as it is.

    Returns (swaps, keep): old parameter -> new one (None when a part goes), and old sparse
    values -> the sorted positions the new ones keep, so their optimizer state can follow.
    """
    r, k = min(r, layer.r), (min(k, layer.nnz) if layer.mask_ready else 0)
    if r == layer.r and k == layer.nnz:
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


class GradualController(BudgetController):
    """The cubic budget schedule over BudgetController's refreshes and penalties (see module)."""

    def __init__(self, model, total_steps, start_step, input_rms=None, progress=True) -> None:
        super().__init__(model, total_steps, start_step, input_rms, progress)
        frac = float(self.cfg.prune_from)
        self.prune_step = start_step + round(frac * total_steps) if total_steps else start_step
        self.prune_step = min(self.prune_step, self.truncate_step)
        self.start_params = self.params()

    def params(self) -> int:
        return sum(layer.num_adapter_parameters() for layer in self.layers.values())

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

    _step = 0  # the step of the refresh being made

    @torch.no_grad()
    def prune(self, budget: int, optimizer: torch.optim.Optimizer | None) -> bool:
        """Remove the units outside the allocation of `budget`; True if any layer changed."""
        if budget >= self.params():
            return False
        targets = allocate_budget(self._candidates(), budget).targets
        swaps, keep = {}, {}
        for name, layer in self.layers.items():
            r_l, k_l = targets[name]
            score = self._entry_score(name, layer) if layer.nnz and layer.mask_ready else None
            s, k = prune_layer(layer, r_l, k_l, score)
            swaps.update(s)
            keep.update(k)
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
            if self.prune(self.budget_at(step), optimizer):
                events = (RESIZED,)
            if step >= self.truncate_step:
                self.finish(step)
                return events
            self._step = step
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
