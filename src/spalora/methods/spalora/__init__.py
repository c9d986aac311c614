"""Our method: over-provisioned adapters compressed to a budget by IRLS rank and sparsity
penalties, with one global threshold splitting the budget across layers, then cut to it.

Its parts, one module each: `penalties` (the IRLS rank and sparsity penalties), `allocation` (the
global split), `controller` (refreshes, penalty steps and the truncation). Its agenda is RoSA's
with one phase, `compress`, between the mask and joint training."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ...budget import LayerAllocation, LayerShape, solve_budget
from ..base import AFTER_CONTROLLER, AFTER_MASK, AFTER_STEPS, Method, Phase
from .controller import BudgetController
from .gradual import ExchangeController, GradualController


def overprovisioned(
    allocs: list[LayerAllocation], c: float, rank: int | None = None
) -> list[LayerAllocation]:
    """c times each layer's rank (or c times `rank` when given; rounded up, at most the layer's
    smaller side) and nonzeros (capped at the layer's size): what our method trains with until
    it truncates to the budget."""
    return [
        dataclasses.replace(
            a,
            r=min(math.ceil(c * (a.r if rank is None else rank)), a.out_features, a.in_features),
            nnz=min(a.out_features * a.in_features, round(c * a.nnz)),
        )
        for a in allocs
    ]


class Spalora(Method):
    name = "spalora"
    trains_over_budget = True
    description = "ours: IRLS penalties split the budget across layers, then truncate"

    def validate(self, config: Any) -> None:
        if config.overprovision < 1.0:
            raise ValueError(f"overprovision must be >= 1, got {config.overprovision}")
        if config.rank_reg < 0 or config.sparse_reg < 0:
            raise ValueError("rank_reg and sparse_reg must be >= 0")
        if config.irls_every < 1 or config.rewarm_steps < 0:
            raise ValueError("irls_every must be >= 1 and rewarm_steps >= 0")
        if float(config.truncate_at) <= 0:
            raise ValueError(f"truncate_at must be > 0, got {config.truncate_at}")
        scheduled = config.reach_budget in ("cubic", "exchange")
        if scheduled and not 0 <= float(config.prune_from) < 1:
            raise ValueError(f"prune_from must be in [0, 1), got {config.prune_from}")
        if scheduled and float(config.truncate_at) <= config.prune_from:
            raise ValueError(
                f"truncate_at ({config.truncate_at}) must come after prune_from "
                f"({config.prune_from}): the budget falls (or units are exchanged) between them"
            )
        if config.reach_budget == "exchange":
            if config.overprovision != 1 or config.start_rank != "split":
                raise ValueError(
                    "reach_budget='exchange' trains at the budget from the start: set "
                    "overprovision=1 and start_rank='split'"
                )
            if not 0 < float(config.exchange_fraction) < 1:
                raise ValueError(
                    f"exchange_fraction must be in (0, 1), got {config.exchange_fraction}"
                )
        if config.restart_after_mask:
            raise ValueError("restart_after_mask is RoSA's recipe; method='spalora' has its own")
        if config.budget is None and not (config.rank_pattern or config.nnz_pattern):
            raise ValueError("method='spalora' needs a budget (it splits one across layers)")

    def initial_allocation(
        self, uniform: list, shapes: list[LayerShape], budget: int, config: Any
    ) -> list:
        """`overprovision` times the even split; with start_rank="budget" the rank is that of
        the whole budget spent on rank (LoRA's), so the allocation can reach pure LoRA."""
        rank = None
        if config.start_rank == "budget":
            rank = solve_budget(shapes, budget, 1.0, use_sparse=False)[0].r
        return overprovisioned(uniform, config.overprovision, rank)

    def agenda(self, config: Any) -> tuple[Phase, ...]:
        warmup = int(config.warmup_steps)
        return (
            *((Phase("warmup", AFTER_STEPS, warmup),) if warmup > 0 else ()),
            Phase("collect", AFTER_MASK),
            Phase("compress", AFTER_CONTROLLER),
            Phase("joint"),
        )

    def controller(self, model, total_steps, start_step, input_rms, progress) -> BudgetController:
        reach = model.spalora_config.reach_budget
        if reach == "exchange":
            return ExchangeController(model, total_steps, start_step, input_rms, progress)
        if reach == "cubic":
            return GradualController(model, total_steps, start_step, input_rms, progress)
        return BudgetController(model, total_steps, start_step, input_rms, progress)
