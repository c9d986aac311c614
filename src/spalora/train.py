"""The training loop: AdamW with LoRA/sparse groups, warm-up + linear decay and gradient clipping,
driving the mask schedule. `train()` runs it on a model; `Trainer` is the same loop as named steps
(data, optimizer, schedule, resume, the loop, checkpoints, cleanup) that a job composes
(`spalora.recipes.finetune`). Explicit config, torchtune style."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import training_recipe
from .config import SpaloraConfig, TrainConfig
from .data import batches, encode_examples
from .distributed import (
    DistributedTraining,
    check_in_sync,
    dist_backend,
    init_distributed,
    local_device,
    mean_over_ranks,
    rank,
    resolve_mode,
    world_size,
)
from .losses import completion_loss  # the name the loop calls (tests patch it here)
from .methods import RESIZED, RESTARTED
from .model import SpaloraModel
from .resume import ResumableMixin
from .runlog import RunLog
from .schedule import MaskSchedule


class NoSchedule:
    """Stands in for MaskSchedule on models without spalora layers (PEFT peers, full
    fine-tuning), so one loop trains every method the benchmark compares."""

    phase = "joint"
    restarted = False
    mask_step = None
    controller = None

    def step(self, optimizer) -> tuple[str, ...]:
        return ()

    def lr_scale(self) -> float:
        return 1.0

    def group_lr_scale(self, group: str | None) -> float:
        return 1.0

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def loraplus_groups(model: torch.nn.Module, groups: list[dict], ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al., 2024): each group's B factors (ours `lora_B`, PEFT's `lora_B.*`)
    move to a group of their own at `ratio` times the group's rate, named `<name>_B`; B starts
    at zero and A does not, so a faster B speeds up the product's first steps. Ratio 1: the
    groups unchanged."""
    if ratio == 1.0:
        return groups
    is_b = {id(p) for n, p in model.named_parameters() if ".lora_B" in f".{n}"}
    out = []
    for g in groups:
        b = [p for p in g["params"] if id(p) in is_b]
        rest = [p for p in g["params"] if id(p) not in is_b]
        if rest:
            out.append(g | {"params": rest})
        if b:
            out.append(g | {"params": b, "lr": g["lr"] * ratio, "name": f"{g['name']}_B"})
    return out


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class Trainer(ResumableMixin):
    """One model's training as named steps; `setup()` runs them in order, `train()` is the loop.

    Invariants: every check on earlier checkpoints comes before anything (hooks, adapter values)
    changes; the RNG is seeded before the optimizer and schedule are built and restored from a
    checkpoint before the first batch, so a resumed run continues bit for bit.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        cfg: TrainConfig,
        evaluate_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        recipe_extra: dict[str, Any] | None = None,
    ) -> None:
        if cfg.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {cfg.grad_accum}")
        if cfg.eval_every and evaluate_fn is None:
            raise ValueError("eval_every is set but no evaluate_fn was given")
        resolve_mode(cfg.distributed)  # a bad value fails in one process too
        init_distributed()
        self.world, self.rank = world_size(), rank()
        self.main = self.rank == 0  # the one process that writes files and shows progress
        if self.world > 1 and local_device().type == "cuda":
            model.to(local_device())
        self.model, self.tokenizer, self.cfg, self.evaluate_fn = model, tokenizer, cfg, evaluate_fn
        self.is_spalora = isinstance(model, SpaloraModel)
        adapter = model.spalora_config if self.is_spalora else None
        self.recipe = training_recipe(adapter, cfg, recipe_extra)
        self.schedule: MaskSchedule | NoSchedule = NoSchedule()
        self.history: list[dict] = []
        self.step = self.lr_step = self.consumed = 0  # consumed: micro-batches over all ranks
        self.latest: Path | None = None
        self.resumed_from: int | None = None
        self.parallel: DistributedTraining | None = None
        self.runlog: RunLog | None = None
        self.bar = None
        self.closed = False
        self.started = time.perf_counter()
        torch.manual_seed(cfg.seed + self.rank)  # ranks draw different dropout masks

    def setup(self, examples) -> None:
        """The named steps in order; each refusal comes before anything changes."""
        self.setup_data(examples)
        self.find_checkpoint()
        self.setup_optimizer()
        self.setup_schedule()
        self.resume()
        self.setup_parallel()
        self.setup_logging()

    def setup_data(self, examples) -> None:
        """Tokenize the examples; the signature ties a checkpoint to this data and batching."""
        cfg, tok = self.cfg, self.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.encoded, self.length_report = encode_examples(
            tok, examples, cfg.max_length, cfg.overlong
        )
        if self.length_report and self.main:
            tqdm.write(f"[spalora] training data: {self.length_report}", file=sys.stderr)
        self.signature = {
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "seed": cfg.seed,
            "n_examples": len(self.encoded),
        }
        if self.world > 1:  # the global batch depends on it (one-process signatures unchanged)
            self.signature["world_size"] = self.world

    def setup_optimizer(self) -> None:
        """AdamW over the LoRA and sparse groups (a model without spalora layers: one group),
        B factors in groups of their own under LoRA+ (`lora_b_lr_ratio`)."""
        model, cfg = self.model, self.cfg
        if self.is_spalora:
            if self.latest is not None:  # our method may have truncated: match the saved sizes
                saved = SpaloraConfig.load(self.latest / "adapter")
                now = model.spalora_config
                if (saved.rank_pattern, saved.nnz_pattern) != (now.rank_pattern, now.nnz_pattern):
                    model.resize_layers(saved)
            groups = model.parameter_groups(cfg.lora_lr, cfg.sparse_lr)
        else:  # a PEFT model or full fine-tuning: every trainable parameter at lora_lr
            trainable = [p for p in model.parameters() if p.requires_grad]
            groups = [{"params": trainable, "lr": cfg.lora_lr, "name": "all"}]
        groups = loraplus_groups(model, groups, cfg.lora_b_lr_ratio)
        for g in groups:
            g["initial_lr"] = g["lr"]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.params = [p for g in groups for p in g["params"]]

    def setup_schedule(self) -> None:
        """The mask schedule (or our method's controller) the loop steps after each update."""
        if self.is_spalora:
            progress = self.cfg.progress and self.main
            self.schedule = MaskSchedule(self.model, progress=progress, total_steps=self.cfg.steps)

    def setup_parallel(self) -> None:
        """After any load: rank 0's adapters copied to all, then DDP wraps or FSDP shards."""
        cfg = self.cfg
        self.parallel = DistributedTraining(self.model, cfg.distributed)
        if self.world > 1 and self.main:
            global_batch = cfg.batch_size * cfg.grad_accum * self.world
            tqdm.write(
                f"[spalora] {self.world} processes ({dist_backend()}, "
                f"{self.parallel.mode.upper()}): global batch {cfg.batch_size} x "
                f"{cfg.grad_accum} x {self.world} = {global_batch}",
                file=sys.stderr,
            )
        self.stream = batches(
            self.encoded, cfg.batch_size, self.pad, cfg.seed, self.consumed, self.rank, self.world
        )
        self.device = next(self.model.parameters()).device
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
        )

    def setup_logging(self) -> None:
        """history.jsonl (rewritten on resume, then appended as the run goes) and TensorBoard."""
        if self.main:
            self.runlog = RunLog(self.cfg.log_path, self.cfg.tensorboard_dir, self.history)

    def train(self) -> None:
        """The loop: set the rates, one optimizer step, one schedule step, log, evaluate and
        checkpoint when due, until `steps` steps after the last (re)start."""
        cfg = self.cfg
        show = cfg.progress and self.main
        self.bar = tqdm(total=cfg.steps, initial=self.lr_step, desc="training", disable=not show)
        self.started = time.perf_counter()
        while self.lr_step < cfg.steps:
            factor = self.set_learning_rates()
            loss = self.train_step()
            phase = self.schedule.phase
            events = self.step_schedule()
            self.record({"step": self.step, "loss": loss, "phase": phase, "lr": factor})
            self.step += 1
            self.lr_step += 1
            self.on_schedule_events(events, phase, loss)
            if self.evaluation_due():
                self.record({"step": self.step, "validation": self.evaluate_fn(self.model)})
            if self.checkpoint_due():
                self.save_checkpoint()
        check_in_sync(self.model, "at the end of training")

    def set_learning_rates(self) -> float:
        """Each group's rate for this step; returns the shared warm-up/decay factor."""
        factor = lr_factor(self.lr_step, self.cfg.lr_warmup_steps, self.cfg.steps)
        factor *= self.schedule.lr_scale()
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor * self.schedule.group_lr_scale(g.get("name"))
        return factor

    def train_step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches per rank; returns the global
        batch's loss. A non-finite loss stops the run before the update."""
        cfg, parallel = self.cfg, self.parallel
        total_loss = 0.0
        for i in range(cfg.grad_accum):
            batch = {k: v.to(self.device) for k, v in next(self.stream).items()}
            self.consumed += self.world
            with parallel.no_sync(last_micro_batch=i == cfg.grad_accum - 1):
                with self.autocast:
                    loss = completion_loss(parallel.engine, batch) / cfg.grad_accum
                if self.world == 1:
                    self.stop_unless_finite(loss.item())
                loss.backward()
            total_loss += loss.item()
        if self.world > 1:
            parallel.average_gradients(self.params)
            total_loss = mean_over_ranks(total_loss)  # the global batch's loss, on all ranks
            self.stop_unless_finite(total_loss)  # every rank stops (one alone would hang)
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss

    def stop_unless_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at step {self.step}: stopping before the update "
                "(the last checkpoint, if any, is the last good state)"
            )

    def step_schedule(self) -> tuple[str, ...]:
        """One schedule step; returns the events it raised (spalora.methods: MASKS_SET,
        RESTARTED, RESIZED)."""
        return self.schedule.step(self.optimizer)

    def on_schedule_events(self, events: tuple[str, ...], phase_before: str, loss: float) -> None:
        """The loop's one reaction to the schedule: new tensors, a re-wrap, a restart."""
        if RESIZED in events:  # a controller cut its layers: new parameter tensors
            self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        phase = self.schedule.phase
        if self.world > 1 and (RESIZED in events or phase != phase_before):
            self.parallel.trained_tensors_changed()  # masks set or layers truncated: new DDP
            check_in_sync(self.model, f"after step {self.step - 1} ({phase_before} -> {phase})")
        if RESTARTED in events:  # the paper's recipe: train both parts again from step 0
            self.lr_step = 0
            self.bar.reset(total=self.cfg.steps)
        else:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", phase=phase)

    def evaluation_due(self) -> bool:
        """Every `eval_every` steps, not at the end, never while mask statistics accumulate
        (they stay training-only)."""
        every = self.cfg.eval_every
        due = every and self.step % every == 0 and self.lr_step < self.cfg.steps
        return bool(due) and self.schedule.phase != "collect"

    def record(self, row: dict) -> None:
        """Every rank keeps the history; rank 0 writes it to the log and TensorBoard."""
        self.history.append(row)
        if self.runlog is not None:
            self.runlog.write(row)

    def cleanup(self) -> None:
        """Detach the schedule's hooks and close the bar and logs; safe to call twice."""
        if not self.closed:  # the schedule's end-of-run warning is said once
            self.schedule.close()
            self.closed = True
        for handle in (self.bar, self.runlog):
            if handle is not None:
                handle.close()
        self.bar = self.runlog = None

    def result(self) -> dict:
        controller = self.schedule.controller
        return {
            "history": self.history,
            "train_seconds": time.perf_counter() - self.started,
            "steps_run": self.step,
            "mask_step": self.schedule.mask_step,
            "final_phase": self.schedule.phase,
            # our method: how the budget was split at each refresh, and what the truncation cut
            "budget_log": None if controller is None else list(controller.log),
            "resumed_from": self.resumed_from,
            "length_report": self.length_report,
            "world_size": self.world,
            "distributed": self.parallel.mode,  # "single", "ddp" or "fsdp"
        }


def train(
    model: torch.nn.Module,
    tokenizer,
    examples,
    cfg: TrainConfig,
    evaluate_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
) -> dict:
    """Train `model` on prompt/target `examples`; returns the loss history and timings.

    `model` is a SpaloraModel, or any causal LM with its trainable parameters already chosen (a
    PEFT model, or full fine-tuning): those train as one group at `lora_lr`, without a schedule.

    The mask schedule runs inside: warm-up and mask collection count toward `steps`, except with
    restart_after_mask, where the joint phase gets `steps` fresh steps after the restart.
    `evaluate_fn(model)` (e.g. the validation metric) runs every `eval_every` steps; its numbers
    go into the history as {"step": s, "validation": {...}}.

    Launched by torchrun or accelerate with WORLD_SIZE > 1, the same call trains on every rank
    (spalora.distributed: DDP or FSDP, each rank its share of the micro-batches, mask statistics
    summed over ranks); every rank runs `evaluate_fn` and returns the same history, and rank 0
    alone writes checkpoints and logs. On GPUs the model moves to this rank's device; in one
    process it trains where it is.
    """
    trainer = Trainer(model, tokenizer, cfg, evaluate_fn)
    try:
        trainer.setup(examples)
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer.result()
