"""Our method between the mask and the truncation: over-provisioned adapters compressed to a budget.

After the Fisher mask is set, every layer trains with rank R0 = c r and c k candidate nonzeros.
Every `irls_every` steps the controller refreshes, per layer, the SVD of B A (from QR of the small
factors) and the magnitudes of S, finds one global threshold that splits the budget into per-layer
targets (r_l, k_l) (allocation.py), and moves the IRLS smoothing eps <- min(eps, sigma_{r_l+1}) and
delta <- min(delta, (k_l+1)-th largest |s|): both only decrease. After each optimizer step it takes
one decoupled step on the rank and sparsity penalties (penalties.py) scaled by each group's current
learning rate, as AdamW does with weight decay. At `truncate_at`, each layer is cut to its best
rank-r_l part and its top k_l entries, the optimizer forgets those tensors, the learning rate
re-warms over `rewarm_steps`, and training goes on at exactly the budget.
"""

from __future__ import annotations

import math
import sys

import torch
from tqdm.auto import tqdm

from ...layer import SpaloraLinear
from ...lowrank import factored_svd
from ..base import RESIZED, swap_parameters
from .allocation import Allocation, LayerCandidates, allocate_budget
from .penalties import kth_largest, rank_penalty, rank_weights, sparse_weights

FLOOR = 1e-8  # eps and delta never go below this (weights stay finite)


def truncate_layer(layer: SpaloraLinear, r: int, k: int, entry_score: torch.Tensor | None = None):
    """Cut a layer to rank r (B A -> its best rank-r part) and its top-k entries of S.

    The LoRA scale is kept (lora_alpha becomes scale * r), so scale * B A is unchanged up to the
    dropped singular values. `entry_score` ranks the entries (default |s|). Returns the old
    parameters -> new ones (None when a part is dropped), for the optimizer.
    """
    old = {"lora_A": layer.lora_A, "lora_B": layer.lora_B, "sparse_values": layer.sparse_values}
    scale = layer.scale if layer.r > 0 else 1.0
    new_B = new_A = None
    if layer.r > 0 and r > 0:
        spec = factored_svd(layer.lora_B, layer.lora_A, scale)
        root = (spec.sigma[:r] / scale).sqrt()
        new_B = spec.U[:, :r] * root
        new_A = (spec.V[:, :r] * root).t()
    r = min(r, layer.r)
    flat = vals = None
    if layer.nnz > 0 and k > 0 and layer.mask_ready:
        k = min(k, layer.nnz)
        score = layer.sparse_values.detach().abs() if entry_score is None else entry_score
        keep = torch.topk(score, k, sorted=False).indices
        flat = layer.mask_flat_indices()[keep]
        vals = layer.sparse_values.detach()[keep]
    else:
        k = 0
    layer.resize(r, k, scale * r if r > 0 else layer.lora_alpha)
    with torch.no_grad():
        if r > 0:
            layer.lora_B.copy_(new_B.to(layer.lora_B))
            layer.lora_A.copy_(new_A.to(layer.lora_A))
    if k > 0:
        layer.set_sparse(flat, vals)
    new = {"lora_A": layer.lora_A, "lora_B": layer.lora_B, "sparse_values": layer.sparse_values}
    return {old[key]: new[key] for key in old if old[key] is not None}


class BudgetController:
    """IRLS refreshes, decoupled penalty steps, global allocation and truncation (see module)."""

    def __init__(
        self,
        model,
        total_steps: int | None,
        start_step: int,
        input_rms: dict[str, torch.Tensor] | None = None,
        progress: bool = True,
    ) -> None:
        cfg = model.spalora_config
        self.model = model
        self.cfg = cfg
        self.progress = progress
        self.layers: dict[str, SpaloraLinear] = model.adapter_layers()
        self.budget = model.budget_params
        self.uniform = {a.name: (a.r, a.nnz) for a in model.uniform_allocations}
        self.input_rms = input_rms or {}
        at = float(cfg.truncate_at)
        if at < 1.0:
            if not total_steps:
                raise ValueError(
                    "truncate_at is a fraction of the run, but the number of training steps is "
                    "unknown: give the schedule total_steps or set truncate_at to a step number"
                )
            self.truncate_step = max(start_step + 1, round(at * total_steps))
        else:
            self.truncate_step = max(start_step + 1, int(at))
        self.start_step = start_step
        self.eps = {n: math.inf for n in self.layers}
        self.delta = {n: math.inf for n in self.layers}
        self.targets = dict(self.uniform)
        self.allocation: Allocation | None = None
        self.truncated = False
        self.truncated_at: int | None = None  # the optimizer step after which the cut was made
        self._weights: dict[str, dict] = {}
        self.log: list[dict] = []  # one summary per refresh: how the budget is being split

    # ------------------------------------------------------------- refresh
    def _col_weight(self, name: str) -> torch.Tensor | None:
        return self.input_rms.get(name) if self.cfg.allocation == "global" else None

    def _entry_score(self, name: str, layer: SpaloraLinear) -> torch.Tensor:
        score = layer.sparse_values.detach().abs().double()
        w = self._col_weight(name)
        if w is not None:
            score = score * w.to(score)[layer.sparse_col.long()]
        return score

    def _candidates(self) -> list[LayerCandidates]:
        out = []
        for name, layer in self.layers.items():
            if layer.r > 0:
                w = self._col_weight(name)
                sigma = factored_svd(layer.lora_B, layer.lora_A, layer.scale, w).sigma
            else:
                sigma = torch.zeros(0, dtype=torch.float64)
            if layer.nnz > 0 and layer.mask_ready:
                entries = self._entry_score(name, layer)
            else:
                entries = torch.zeros(0, dtype=torch.float64)
            out.append(
                LayerCandidates(name, layer.in_features + layer.out_features, sigma, entries)
            )
        return out

    @torch.no_grad()
    def refresh(self) -> None:
        """New targets (global threshold or uniform), then new IRLS weights for every layer."""
        if self.cfg.allocation == "global":
            self.allocation = allocate_budget(self._candidates(), self.budget)
            self.targets = self.allocation.targets
        for name, layer in self.layers.items():
            r_l, k_l = self.targets[name]
            weights = {}
            if layer.r > 0:
                spec = factored_svd(layer.lora_B, layer.lora_A, layer.scale)
                sigma_next = float(spec.sigma[r_l]) if r_l < spec.sigma.numel() else 0.0
                self.eps[name] = max(FLOOR, min(self.eps[name], sigma_next))
                weights["U"] = spec.U.to(layer.lora_B)
                weights["V"] = spec.V.to(layer.lora_B)
                weights["d"] = rank_weights(spec.sigma, self.eps[name]).to(layer.lora_B)
            if layer.nnz > 0 and layer.mask_ready:
                mags = layer.sparse_values.detach().abs()
                self.delta[name] = max(FLOOR, min(self.delta[name], kth_largest(mags, k_l + 1)))
                weights["w"] = sparse_weights(layer.sparse_values, self.delta[name])
            self._weights[name] = weights
        ranks = sum(r for r, _ in self.targets.values())
        nnz = sum(k for _, k in self.targets.values())
        self.log.append(
            {
                "ranks": ranks,
                "nonzeros": nnz,
                "rank_share": 1.0 - nnz / max(1, self.budget),
                "threshold": None if self.allocation is None else self.allocation.threshold,
            }
        )

    # ------------------------------------------------------------ penalties
    @torch.no_grad()
    def apply_penalties(self, optimizer: torch.optim.Optimizer) -> None:
        """One decoupled step on both penalties at each parameter's current learning rate."""
        lr = {p: g["lr"] for g in optimizer.param_groups for p in g["params"]}
        lam_r, lam_s = float(self.cfg.rank_reg), float(self.cfg.sparse_reg)
        for name, layer in self.layers.items():
            wts = self._weights.get(name, {})
            if lam_r > 0 and "U" in wts and layer.lora_B in lr:
                _, g_b, g_a = rank_penalty(
                    layer.lora_B, layer.lora_A, layer.scale, wts["U"], wts["V"], wts["d"]
                )
                layer.lora_B.sub_(g_b, alpha=lr[layer.lora_B] * lam_r)
                layer.lora_A.sub_(g_a, alpha=lr[layer.lora_A] * lam_r)
            if lam_s > 0 and "w" in wts and layer.sparse_values in lr:
                shrink = 1.0 - 2.0 * lr[layer.sparse_values] * lam_s * wts["w"]
                layer.sparse_values.mul_(shrink.clamp_min(0.0))

    # ------------------------------------------------------------- truncate
    @torch.no_grad()
    def truncate(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Cut every layer to its target; the model's patterns then describe the final adapter."""
        self.refresh()
        swaps = {}
        kept = dropped = 0.0  # squared norms of the low-rank and sparse parts, kept and cut
        for name, layer in self.layers.items():
            r_l, k_l = self.targets[name]
            if layer.r > 0:
                sq = factored_svd(layer.lora_B, layer.lora_A, layer.scale).sigma ** 2
                kept, dropped = kept + float(sq[:r_l].sum()), dropped + float(sq[r_l:].sum())
            if layer.nnz > 0 and layer.mask_ready:
                sq = torch.sort(layer.sparse_values.detach().double() ** 2, descending=True).values
                kept, dropped = kept + float(sq[:k_l].sum()), dropped + float(sq[k_l:].sum())
            score = self._entry_score(name, layer) if layer.nnz > 0 and layer.mask_ready else None
            swaps.update(truncate_layer(layer, r_l, k_l, score))
        if optimizer is not None:
            swap_parameters(optimizer, swaps)
        self.model.sync_allocations()
        self.truncated = True
        self._weights.clear()
        # how much the cut removed (a sparse entry kept by its scaled value may not be among
        # the largest |s|, so for the sparse part this is a close bound, not exact)
        self.log.append({"truncated_fraction": dropped / max(kept + dropped, 1e-30)})
        if self.progress:
            ranks = [lay.r for lay in self.layers.values()]
            nnz = sum(lay.nnz for lay in self.layers.values())
            used = sum(lay.num_adapter_parameters() for lay in self.layers.values())
            tqdm.write(
                f"[spalora] truncated to the budget: {used:,} of {self.budget:,} parameters, "
                f"ranks {min(ranks)}-{max(ranks)} (total {sum(ranks)}), {nnz:,} nonzeros; "
                f"the cut removed {self.log[-1]['truncated_fraction']:.1%} of the adapters' "
                "squared norm",
                file=sys.stderr,
            )

    @property
    def finished(self) -> bool:
        return self.truncated

    def step(self, step: int, optimizer: torch.optim.Optimizer | None) -> tuple[str, ...]:
        """Called after optimizer step number `step`; (RESIZED,) when the layers were cut now."""
        if self.truncated:
            return ()
        if step >= self.truncate_step:
            self.truncate(optimizer)
            self.truncated_at = step
            return (RESIZED,)
        if (step - self.start_step) % self.cfg.irls_every == 0 or not self._weights:
            self.refresh()
        if optimizer is not None:
            self.apply_penalties(optimizer)
        return ()

    def lr_scale(self, step: int) -> float:
        """A linear re-warm of every learning rate over `rewarm_steps` after the cut."""
        if self.truncated_at is None or not self.cfg.rewarm_steps:
            return 1.0
        return min(1.0, (step - self.truncated_at + 1) / self.cfg.rewarm_steps)

    def state_dict(self) -> dict:
        """Everything the next steps read: the IRLS weights of the last refresh (tensors), the
        smoothing, the targets, the step counters and the log; resuming from it is exact."""
        return {
            "eps": self.eps,
            "delta": self.delta,
            "targets": {n: list(t) for n, t in self.targets.items()},
            "truncated": self.truncated,
            "truncate_step": self.truncate_step,
            "truncated_at": self.truncated_at,
            "start_step": self.start_step,
            "input_rms": {n: v.tolist() for n, v in self.input_rms.items()},
            "weights": {n: dict(w) for n, w in self._weights.items()},
            "log": list(self.log),
        }

    def load_state_dict(self, state: dict) -> None:
        self.eps = {n: float(v) for n, v in state["eps"].items()}
        self.delta = {n: float(v) for n, v in state["delta"].items()}
        self.targets = {n: (int(t[0]), int(t[1])) for n, t in state["targets"].items()}
        self.truncated = bool(state["truncated"])
        self.truncate_step = int(state["truncate_step"])
        self.truncated_at = state.get("truncated_at")
        self.start_step = int(state["start_step"])
        self.input_rms = {n: torch.tensor(v) for n, v in state["input_rms"].items()}
        # an older checkpoint without weights: recomputed at the next step (close, not exact)
        self._weights = {}
        for name, weights in state.get("weights", {}).items():
            layer = self.layers[name]
            self._weights[name] = {
                k: v.to(layer.sparse_values if k == "w" else layer.lora_B)
                for k, v in weights.items()
            }
        self.log = list(state.get("log", []))
