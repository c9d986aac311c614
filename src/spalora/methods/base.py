"""The contract every adapter method meets, in the spirit of PEFT's `BaseTuner` overrides.

A method says what it trains (a low-rank part, a sparse part, or both), checks the settings it
reads, may re-size the adapter it starts from, lists its phases as an agenda (RoSA's schedule as
a table), and may bring a controller that acts after each optimizer step of one phase. The model,
the layer and the training loop know nothing else about a method: adding one is one module (or
one class in a user's file) and `register_method`.

Invariants a method keeps:
- Its adapter ends at or under the budget (`trains_over_budget` methods must say so and cut back
  by the end of their controller's phase).
- A controller changes the trained tensors only through the layer's API (`resize`, `set_sparse`)
  and reports it with the event RESIZED, after swapping the optimizer's parameters itself.
- Everything a controller needs to continue exactly is in its `state_dict()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

# Events a schedule step returns to the loop.
MASKS_SET = "masks_set"  # the sparse support was chosen: new trained values from now on
RESTARTED = "restarted"  # adapters back at their initial values: restart the LR schedule
RESIZED = "resized"  # layers got new parameter tensors (the optimizer already holds them)

# What ends a phase of an agenda.
AFTER_STEPS = "steps"  # `length` optimizer steps from the start of the run
AFTER_MASK = "mask"  # the mask statistics are gathered and the masks set
AFTER_CONTROLLER = "controller"  # the method's controller says it is finished
NEVER = "never"  # the last phase: it runs to the end


@dataclass(frozen=True)
class Phase:
    """One row of an agenda: a phase's name and what ends it."""

    name: str
    ends: str = NEVER
    length: int = 0  # for AFTER_STEPS: the optimizer step at which the phase ends

    def __post_init__(self) -> None:
        if self.ends not in (AFTER_STEPS, AFTER_MASK, AFTER_CONTROLLER, NEVER):
            raise ValueError(f"phase {self.name!r}: unknown end {self.ends!r}")


class Controller(Protocol):
    """Acts after each optimizer step of its phase (our method: penalties, allocation, cut)."""

    log: list[dict]  # one summary per decision, kept in the run's metrics
    finished: bool  # True once its phase is over

    def step(self, step: int, optimizer: Any) -> tuple[str, ...]:
        """Called after optimizer step number `step`; returns the events it raised."""

    def lr_scale(self, step: int) -> float:
        """Factor on every learning rate for the next step (1.0: none)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Method:
    """A method: subclass, set the class attributes, override what differs, `register_method`."""

    name: ClassVar[str]
    trains_lora: ClassVar[bool] = True
    trains_sparse: ClassVar[bool] = True
    # It trains more than the budget until its controller cuts back (the budget is checked then).
    trains_over_budget: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def validate(self, config: Any) -> None:
        """Raise ValueError on settings this method cannot honour (the generic ones are checked
        by the config)."""

    def rank_fraction(self, config: Any) -> float:
        """Share of a budget spent on rank when the budget is split evenly across layers."""
        if not self.trains_sparse:
            return 1.0
        if not self.trains_lora:
            return 0.0
        return 0.5 if config.rank_fraction is None else float(config.rank_fraction)

    def initial_allocation(self, uniform: list, model: Any, config: Any, shapes: list) -> list:
        """The per-layer sizes training starts from, given the budget's even split `uniform`."""
        return uniform

    def agenda(self, config: Any) -> tuple[Phase, ...]:
        """The phases of one run in order; the last one runs to the end. RoSA's by default:
        low-rank warm-up, mask statistics, joint training."""
        phases = []
        if self.trains_lora and self.trains_sparse and config.warmup_steps > 0:
            phases.append(Phase("warmup", AFTER_STEPS, int(config.warmup_steps)))
        if self.trains_sparse:
            phases.append(Phase("collect", AFTER_MASK))
        return (*phases, Phase("joint"))

    def controller(
        self,
        model: Any,
        total_steps: int | None,
        start_step: int,
        input_rms: dict | None,
        progress: bool,
    ) -> Controller:
        """The controller of this method's AFTER_CONTROLLER phase (only methods with one)."""
        raise NotImplementedError(f"method {self.name!r} has no controller phase")


def swap_parameters(
    optimizer: torch.optim.Optimizer, swaps: dict, keep: dict | None = None
) -> None:
    """Replace parameters in the optimizer's groups; None removes one. A replaced parameter's
    state is dropped, unless `keep` maps it to the old positions the new one's entries continue
    (a 1-d index, -1 for a new entry): its per-entry state is then carried over at those
    positions. New entries start at zero, except Adam's second moments, which start at the mean
    of the kept entries': Adam counts steps per tensor, not per entry, so a zero second moment
    under an old step count would inflate a new entry's updates several-fold for hundreds of
    steps (its bias correction is long done). A controller that resizes layers calls this
    before it returns RESIZED."""
    keep = keep or {}
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if p in swaps:
                state = optimizer.state.pop(p, None)
                new = swaps[p]
                if new is not None:
                    params.append(new)
                    if state and p in keep:
                        optimizer.state[new] = {
                            k: _carry(v, keep[p], k in SECOND_MOMENTS) if _per_entry(v, p) else v
                            for k, v in state.items()
                        }
            else:
                params.append(p)
        group["params"] = params


SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")  # torch's Adam / AdamW state names


def _carry(value: torch.Tensor, index: torch.Tensor, mean_for_new: bool) -> torch.Tensor:
    """value[index]; where index is -1, zero, or the kept entries' mean (`mean_for_new`)."""
    out = value[index.clamp_min(0)].clone()
    new = index < 0
    if new.any():
        kept = out[~new]
        out[new] = kept.mean() if mean_for_new and kept.numel() else 0
    return out


def _per_entry(value: Any, param: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == param.shape and value.dim() > 0
