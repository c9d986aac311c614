"""The RoSA schedule inside one run: LoRA-only warm-up, mask statistics, then joint training.

Drive it from any loop by calling `schedule.step(optimizer)` after each optimizer step, or under
HF `Trainer` with `SpaloraCallback`. Phases:

  warmup  -> `warmup_steps` optimizer steps of LoRA alone (skipped for sparse-only);
  collect -> hooks gather statistics over the next `mask_batches` micro-batches (gradient and
             activation strategies only; training goes on meanwhile; with several processes,
             micro-batches of all ranks, whose statistics are summed before the top-k);
  joint   -> masks are set, values start at zero and train with LoRA; their learning rate
             ramps up over `sparse_warmup_steps` (`group_lr_scale`).

Our method (method="spalora") puts one phase between collect and joint:

  compress -> over-provisioned adapters train under IRLS rank and sparsity penalties while one
              global threshold splits the budget across layers (spalora.adaptive); at
              `truncate_at` every layer is cut to its share, and joint training goes on at
              exactly the budget (`lr_scale()` re-warms the learning rate for `rewarm_steps`).

With `restart_after_mask=True` (the paper's two-run recipe in one run) the adapters return to
their initial state when the masks are set and the optimizer state is cleared; `restarted` tells
the loop to restart its learning-rate schedule.
"""

from __future__ import annotations

import sys
import warnings

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .adaptive import BudgetController
from .distributed import world_size
from .masks import MaskCollector, apply_masks, needs_data
from .model import SpaloraModel


class MaskSchedule:
    def __init__(
        self, model: SpaloraModel, progress: bool = True, total_steps: int | None = None
    ) -> None:
        self.model = model
        self.config = model.spalora_config
        self.progress = progress
        self.total_steps = total_steps
        self.steps = 0
        self.restarted = False
        self.resized = False  # set when layers got new parameter tensors (the loop resets it)
        self.collector: MaskCollector | None = None
        self.controller: BudgetController | None = None
        self.mask_step: int | None = None
        self.truncate_step: int | None = None
        layers = model.adapter_layers()
        self._has_sparse = any(lay.nnz > 0 for lay in layers.values())
        self._initial_lora = (
            {n: lay.lora_A.detach().clone() for n, lay in layers.items() if lay.r > 0}
            if self.config.restart_after_mask
            else {}
        )
        if not self._has_sparse or all(lay.mask_ready for lay in layers.values() if lay.nnz > 0):
            self.phase = "joint"
        elif self.config.uses_lora and self.config.warmup_steps > 0:
            self.phase = "warmup"
        else:
            self._begin_masking(None)

    # ----------------------------------------------------------------- phases
    def _begin_masking(self, optimizer) -> None:
        strategy = self.config.mask_strategy
        if needs_data(strategy):
            self.phase = "collect"
            layers = {n: lay for n, lay in self.model.adapter_layers().items() if lay.nnz > 0}
            self.collector = MaskCollector(layers, strategy).attach()
        else:
            self._finish_masking(optimizer)

    def _finish_masking(self, optimizer) -> None:
        layers = {n: lay for n, lay in self.model.adapter_layers().items() if lay.nnz > 0}
        if self.collector is not None:  # several processes: every rank ranks the same sums
            self.collector.all_reduce()
        # no bar here: it would tear the training bar, and top-k over all layers takes ~1 s
        apply_masks(
            layers, self.config.mask_strategy, self.collector, self.config.seed, progress=False
        )
        input_rms = self.collector.input_rms() if self.collector is not None else None
        self._detach_collector()
        self.mask_step = self.steps
        if self.progress:
            nnz = sum(lay.nnz for lay in layers.values())
            tqdm.write(
                f"[spalora] masks set at step {self.steps}: {nnz:,} nonzeros "
                f"({self.config.mask_strategy})",
                file=sys.stderr,
            )
        if self.config.restart_after_mask and self.steps > 0:  # at step 0 nothing was trained
            self.restart(optimizer)
        self.phase = "joint"
        if self.config.method == "spalora":
            self.controller = BudgetController(
                self.model, self.total_steps, self.steps, input_rms, self.progress
            )
            self.phase = "compress"

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

    def step(self, optimizer=None) -> str:
        """Advance by one optimizer step; returns the phase for the next step."""
        self.steps += 1
        if self.phase == "warmup" and self.steps >= self.config.warmup_steps:
            self._begin_masking(optimizer)
        elif (
            self.phase == "collect"
            # mask_batches counts micro-batches over all ranks (each rank sees its share)
            and self.collector.batches * world_size() >= self.config.mask_batches
        ):
            self._finish_masking(optimizer)
        elif self.phase == "compress" and self.controller.step(self.steps, optimizer):
            self.phase = "joint"
            self.truncate_step = self.steps
            self.resized = True
        return self.phase

    def lr_scale(self) -> float:
        """Factor on the learning rate for the next step: a linear re-warm after truncation."""
        if self.truncate_step is None or not self.config.rewarm_steps:
            return 1.0
        return min(1.0, (self.steps - self.truncate_step + 1) / self.config.rewarm_steps)

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
        if self.phase != "joint":
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
        self._detach_collector()  # a sparse-only schedule starts collecting at construction
        self.steps = state["steps"]
        self.phase = state["phase"]
        self.mask_step = state["mask_step"]
        self.restarted = state["restarted"]
        self.truncate_step = state.get("truncate_step")
        if state.get("controller") is not None:
            self.controller = BudgetController(self.model, self.total_steps, self.steps)
            self.controller.load_state_dict(state["controller"])

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "phase": self.phase,
            "mask_step": self.mask_step,
            "restarted": self.restarted,
            "truncate_step": self.truncate_step,
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
        if self.schedule.config.method == "spalora" and world_size() > 1:
            # Trainer's DDP wrapper would keep the tensors truncation replaces: ranks would drift
            raise ValueError(
                "method='spalora' under Trainer with several processes is not supported: "
                "train with spalora.train.train() or `spalora train` under torchrun instead"
            )
        self.schedule.total_steps = state.max_steps  # for method="spalora"'s truncation step
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
