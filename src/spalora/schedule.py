"""A method's agenda run inside one training run: each step advances through its phases and
returns the events the loop must react to.

Drive it from any loop by calling `events = schedule.step(optimizer)` after each optimizer step,
or under HF `Trainer` with `SpaloraCallback`. The agenda is the method's (`spalora.methods`):
RoSA's is

  warmup  -> `warmup_steps` optimizer steps of the low-rank part alone;
  collect -> hooks gather statistics over the next `mask_batches` micro-batches (gradient and
             activation strategies; training goes on meanwhile; with several processes,
             micro-batches of all ranks, whose statistics are summed before the top-k); a
             strategy that needs no data sets the masks on entering this phase;
  joint   -> masks are set, values start at zero and train with the low-rank part; their
             learning rate ramps up over `sparse_warmup_steps` (`group_lr_scale`).

A phase that ends by its controller (ours: `compress`) hands each step to the method's controller
until it says it is finished. With `restart_after_mask=True` (the paper's two-run recipe in one
run) the adapters return to their initial state when the masks are set, the optimizer state is
cleared, and the step returns RESTARTED so the loop restarts its learning-rate schedule.
"""

from __future__ import annotations

import sys
import warnings

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .distributed import world_size
from .masks import MaskCollector, apply_masks, needs_data
from .methods import (
    AFTER_CONTROLLER,
    AFTER_MASK,
    AFTER_STEPS,
    MASKS_SET,
    RESTARTED,
    Controller,
    Phase,
    get_method,
)
from .model import SpaloraModel


class MaskSchedule:
    """Runs one method's agenda: `phase` is the current row, `step()` returns events."""

    def __init__(
        self, model: SpaloraModel, progress: bool = True, total_steps: int | None = None
    ) -> None:
        self.model = model
        self.config = model.spalora_config
        self.method = get_method(self.config.method)
        self.progress = progress
        self.total_steps = total_steps
        self.steps = 0
        self.restarted = False  # the run restarted once (the paper's recipe); kept for the record
        self.collector: MaskCollector | None = None
        self.controller: Controller | None = None
        self.mask_step: int | None = None
        layers = model.adapter_layers()
        self.agenda: tuple[Phase, ...] = self.method.agenda(self.config)
        self._initial_lora = (
            {n: lay.lora_A.detach().clone() for n, lay in layers.items() if lay.r > 0}
            if self.config.restart_after_mask
            else {}
        )
        sparse = [lay for lay in layers.values() if lay.nnz > 0]
        masking = any(row.ends == AFTER_MASK for row in self.agenda)
        if masking and all(lay.mask_ready for lay in sparse):  # also when there is no S
            self.index = len(self.agenda) - 1  # nothing to mask: the last phase only
        else:
            self.index = 0
            self._enter(None, [])

    @property
    def phase(self) -> str:
        return self.agenda[self.index].name

    # ----------------------------------------------------------------- phases
    def _enter(self, optimizer, events: list[str]) -> None:
        """Begin the current row; a row already over on entry (no warm-up left, a mask needing
        no data) passes straight on to the next."""
        row = self.agenda[self.index]
        if row.ends == AFTER_STEPS and self.steps >= row.length:
            self._advance(optimizer, events)
        elif row.ends == AFTER_MASK:
            if needs_data(self.config.mask_strategy):
                layers = {n: lay for n, lay in self.model.adapter_layers().items() if lay.nnz > 0}
                self.collector = MaskCollector(layers, self.config.mask_strategy).attach()
            else:
                self._finish_masking(optimizer, events)
        elif row.ends == AFTER_CONTROLLER:
            self.controller = self.method.controller(
                self.model, self.total_steps, self.steps, self._input_rms, self.progress
            )

    def _advance(self, optimizer, events: list[str]) -> None:
        self.index += 1
        self._enter(optimizer, events)

    def _finish_masking(self, optimizer, events: list[str]) -> None:
        layers = {n: lay for n, lay in self.model.adapter_layers().items() if lay.nnz > 0}
        if self.collector is not None:  # several processes: every rank ranks the same sums
            self.collector.all_reduce()
        # no bar here: it would tear the training bar, and top-k over all layers takes ~1 s
        apply_masks(
            layers, self.config.mask_strategy, self.collector, self.config.seed, progress=False
        )
        self._input_rms = self.collector.input_rms() if self.collector is not None else None
        self._detach_collector()
        self.mask_step = self.steps
        events.append(MASKS_SET)
        if self.progress:
            nnz = sum(lay.nnz for lay in layers.values())
            tqdm.write(
                f"[spalora] masks set at step {self.steps}: {nnz:,} nonzeros "
                f"({self.config.mask_strategy})",
                file=sys.stderr,
            )
        if self.config.restart_after_mask and self.steps > 0:  # at step 0 nothing was trained
            self.restart(optimizer)
            events.append(RESTARTED)
        self._advance(optimizer, events)

    _input_rms = None  # set when the masks are: the column weights our controller uses

    def restart(self, optimizer=None) -> None:
        """Reset adapters to their initial values (masks kept) and clear optimizer state."""
        if any(layer.merged for layer in self.model.adapter_layers().values()):
            raise RuntimeError("cannot restart a merged adapter: unmerge_adapter() first")
        with torch.no_grad():
            for name, layer in self.model.adapter_layers().items():
                if layer.r > 0:
                    layer.lora_A.copy_(self._initial_lora[name])
                    layer.lora_B.zero_()
                if layer.nnz > 0:
                    layer.sparse_values.zero_()
        if optimizer is not None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    optimizer.state.pop(p, None)
        self.restarted = True

    def step(self, optimizer=None) -> tuple[str, ...]:
        """Advance by one optimizer step; returns the events raised (MASKS_SET, RESTARTED,
        RESIZED), in order. `phase` then names the phase of the next step."""
        self.steps += 1
        events: list[str] = []
        row = self.agenda[self.index]
        if row.ends == AFTER_STEPS and self.steps >= row.length:
            self._advance(optimizer, events)
        elif (
            row.ends == AFTER_MASK
            # mask_batches counts micro-batches over all ranks (each rank sees its share)
            and self.collector.batches * world_size() >= self.config.mask_batches
        ):
            self._finish_masking(optimizer, events)
        elif row.ends == AFTER_CONTROLLER:
            events += self.controller.step(self.steps, optimizer)
            if self.controller.finished:
                self._advance(optimizer, events)
        return tuple(events)

    def lr_scale(self) -> float:
        """Factor on the learning rate for the next step (ours: a re-warm after truncation)."""
        return 1.0 if self.controller is None else self.controller.lr_scale(self.steps)

    def group_lr_scale(self, group: str | None) -> float:
        """Extra factor on one optimizer group's learning rate for the next step: the sparse
        values, which start training when the masks are set, warm up linearly from there (with
        `restart_after_mask` the whole schedule restarts, warm-up included: no extra factor)."""
        warm = self.config.sparse_warmup_steps
        # before the masks are set the values do not train: nothing to scale
        if (
            group != "sparse"
            or not warm
            or self.config.restart_after_mask
            or self.mask_step is None
        ):
            return 1.0
        return min(1.0, (self.steps - self.mask_step + 1) / warm)

    def _detach_collector(self) -> None:
        if self.collector is not None:
            self.collector.detach()
            self.collector = None

    def close(self) -> None:
        """Detach the statistics hooks; warn when the run ended before the masks were set."""
        self._detach_collector()
        if self.mask_step is None and self.index < len(self.agenda) - 1:
            warnings.warn(
                f"training ended in the {self.phase!r} phase after {self.steps} steps: the sparse "
                f"masks were never set (warmup_steps={self.config.warmup_steps}, "
                f"mask_batches={self.config.mask_batches}); only LoRA was trained",
                stacklevel=2,
            )

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved schedule (checkpoints are never taken while statistics accumulate)."""
        if state["phase"] == "collect":
            raise ValueError("cannot resume a schedule in the middle of mask collection")
        names = [row.name for row in self.agenda]
        if state["phase"] not in names:
            raise ValueError(
                f"the checkpoint's phase {state['phase']!r} is not in method "
                f"{self.method.name!r}'s agenda {names}"
            )
        self._detach_collector()  # a sparse-only schedule starts collecting at construction
        self.steps = state["steps"]
        self.index = names.index(state["phase"])
        self.mask_step = state["mask_step"]
        self.restarted = state["restarted"]
        self.controller = None
        if state.get("controller") is not None:
            self.controller = self.method.controller(
                self.model, self.total_steps, self.steps, None, self.progress
            )
            self.controller.load_state_dict(state["controller"])
            if getattr(self.controller, "truncated_at", 0) is None and "truncate_step" in state:
                self.controller.truncated_at = state["truncate_step"]  # an older checkpoint

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "phase": self.phase,
            "mask_step": self.mask_step,
            "restarted": self.restarted,
            "controller": None if self.controller is None else self.controller.state_dict(),
        }


class SpaloraCallback(TrainerCallback):
    """Runs the MaskSchedule under HF Trainer (on_step_end = after each optimizer step).

    Build the Trainer's optimizer with `model.parameter_groups(...)` to keep RoSA's two learning
    rates. With restart_after_mask the optimizer state is cleared, but Trainer's LR schedule
    keeps running (it cannot be rewound from a callback).
    """

    def __init__(self, model: SpaloraModel, progress: bool = True) -> None:
        self.schedule = MaskSchedule(model, progress=progress)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.schedule.method.trains_over_budget and world_size() > 1:
            # Trainer's DDP wrapper would keep the tensors truncation replaces: ranks would drift
            raise ValueError(
                f"method={self.schedule.method.name!r} under Trainer with several processes is "
                "not supported: "
                "train with spalora.train.train() or `spalora train` under torchrun instead"
            )
        self.schedule.total_steps = state.max_steps  # for a controller's step count (ours)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        optimizer = kwargs.get("optimizer")
        self.schedule.step(optimizer)
        if optimizer is not None:  # Trainer's scheduler set the next rate already: scale it
            for group in optimizer.param_groups:
                group["lr"] *= self.schedule.group_lr_scale(group.get("name"))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.schedule.close()
        return control
