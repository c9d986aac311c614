"""The training recipe: one readable loop (AdamW with LoRA/sparse groups, warm-up + linear decay,
gradient clipping) that drives the mask schedule. Explicit config, torchtune style."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from .checkpoint import list_checkpoints, load_checkpoint, read_state, rng_state, save_checkpoint
from .config import SpaloraConfig, TrainConfig
from .data import batches, encode_examples
from .distributed import (
    DistributedTraining,
    agree,
    check_in_sync,
    dist_backend,
    gather_objects,
    init_distributed,
    local_device,
    mean_over_ranks,
    rank,
    resolve_mode,
    world_size,
)
from .losses import completion_loss  # the name the loop calls (tests patch it here)
from .model import SpaloraModel
from .schedule import MaskSchedule


class NoSchedule:
    """Stands in for MaskSchedule on models without spalora layers (PEFT peers, full
    fine-tuning), so one loop trains every method the benchmark compares."""

    phase = "joint"
    restarted = False
    resized = False
    mask_step = None
    controller = None

    def step(self, optimizer) -> str:
        return self.phase

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


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def tensorboard_writer(log_dir: str | None):
    """A SummaryWriter when a folder is asked for and TensorBoard is installed, else None."""
    if not log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the `tensorboard` package
        tqdm.write(
            "[spalora] TensorBoard is not installed (pip install tensorboard): "
            "logging to history.jsonl only",
            file=sys.stderr,
        )
        return None
    return SummaryWriter(log_dir)


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
    alone writes checkpoints and logs. On GPUs the model moves to this rank's device.
    """
    if cfg.grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {cfg.grad_accum}")
    if cfg.eval_every and evaluate_fn is None:
        raise ValueError("eval_every is set but no evaluate_fn was given")
    resolve_mode(cfg.distributed)  # a bad value fails in one process too
    init_distributed()
    world, this_rank = world_size(), rank()
    main = this_rank == 0  # the one process that writes files and shows progress
    if world > 1 and local_device().type == "cuda":
        model.to(local_device())
    torch.manual_seed(cfg.seed + this_rank)  # ranks draw different dropout masks
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded, length_report = encode_examples(tokenizer, examples, cfg.max_length, cfg.overlong)
    if length_report and main:
        tqdm.write(f"[spalora] training data: {length_report}", file=sys.stderr)
    # Every check on earlier checkpoints comes before anything (hooks, adapter values) changes.
    signature = {
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "seed": cfg.seed,
        "n_examples": len(encoded),
    }
    if world > 1:  # the global batch depends on it (one-process signatures stay as they were)
        signature["world_size"] = world
    existing = list_checkpoints(cfg.checkpoint_dir) if cfg.checkpoint_dir else []
    if world > 1 and cfg.checkpoint_dir:  # every rank must resume from the same checkpoint
        agree(
            [p.name for p in existing],
            f"the checkpoints in {cfg.checkpoint_dir} (every node must see that folder)",
        )
    if existing and not cfg.resume and cfg.checkpoint_every:
        raise ValueError(
            f"{cfg.checkpoint_dir} holds checkpoints of an earlier run: resume it, "
            "or remove them or choose another output folder"
        )
    latest = existing[-1] if cfg.resume and existing else None
    if latest is not None and read_state(latest).get("signature") != signature:
        raise ValueError(
            f"{latest} was written by a run with {read_state(latest).get('signature')}, "
            f"not {signature}: it cannot be resumed with these settings"
        )
    is_spalora = isinstance(model, SpaloraModel)
    if (cfg.checkpoint_every or cfg.resume) and not is_spalora:
        raise ValueError("checkpoints and resume are for spalora models only")
    if is_spalora:
        if latest is not None:  # a run of our method may have been truncated: match its sizes
            saved = SpaloraConfig.load(latest / "adapter")
            current = model.spalora_config
            if (saved.rank_pattern, saved.nnz_pattern) != (
                current.rank_pattern,
                current.nnz_pattern,
            ):
                model.resize_layers(saved)
        groups = model.parameter_groups(cfg.lora_lr, cfg.sparse_lr)
        schedule = MaskSchedule(model, progress=cfg.progress and main, total_steps=cfg.steps)
    else:  # a PEFT model or full fine-tuning: every trainable parameter at lora_lr
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": trainable, "lr": cfg.lora_lr, "name": "all"}]
        schedule = NoSchedule()
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    device = next(model.parameters()).device
    history: list[dict] = []
    model.train()
    total, lr_step, step, consumed = cfg.steps, 0, 0, 0
    resumed_from = None
    if latest is not None:
        saved = load_checkpoint(latest, model, optimizer, rank=this_rank)
        step, lr_step, consumed = saved["step"], saved["lr_step"], saved["consumed"]
        resumed_from = step
        history = saved["history"]
        schedule.load_state_dict(saved["schedule"])
        if main:
            tqdm.write(
                f"[spalora] resumed from {latest} (step {step}, phase {schedule.phase})",
                file=sys.stderr,
            )
    # After any load: rank 0's adapters copied to all, then DDP wraps or FSDP shards the base.
    parallel = DistributedTraining(model, cfg.distributed)
    if world > 1 and main:
        tqdm.write(
            f"[spalora] {world} processes ({dist_backend()}, {parallel.mode.upper()}): global "
            f"batch {cfg.batch_size} x {cfg.grad_accum} x {world} = "
            f"{cfg.batch_size * cfg.grad_accum * world}",
            file=sys.stderr,
        )
    # `consumed` counts micro-batches of the one stream, over all ranks
    stream = batches(encoded, cfg.batch_size, pad, cfg.seed, consumed, this_rank, world)
    log = None
    if cfg.log_path and main:  # the loss log is written as the run goes (rewritten on resume)
        log = open(cfg.log_path, "w")  # noqa: SIM115  (closed in the finally below)
        for row in history:
            log.write(json.dumps(row) + "\n")
    writer = tensorboard_writer(cfg.tensorboard_dir) if main else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    def record(row: dict) -> None:  # every rank keeps the history; rank 0 writes it
        history.append(row)
        if log is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()
        if writer is not None:
            for key, value in row.items():
                if isinstance(value, dict):  # {"validation": {"accuracy": ...}}
                    for name, v in value.items():
                        writer.add_scalar(f"{key}/{name}", v, row["step"])
                elif key in ("loss", "lr"):
                    writer.add_scalar(f"train/{key}", value, row["step"])

    bar = tqdm(total=total, initial=lr_step, desc="training", disable=not (cfg.progress and main))
    start = time.perf_counter()
    try:
        while lr_step < total:
            factor = lr_factor(lr_step, cfg.lr_warmup_steps, total) * schedule.lr_scale()
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * factor * schedule.group_lr_scale(g.get("name"))
            total_loss = 0.0
            for i in range(cfg.grad_accum):  # micro-batches of one optimizer step
                batch = {k: v.to(device) for k, v in next(stream).items()}
                consumed += world
                with parallel.no_sync(last_micro_batch=i == cfg.grad_accum - 1):
                    with autocast:
                        loss = completion_loss(parallel.engine, batch) / cfg.grad_accum
                    if world == 1 and not math.isfinite(loss.item()):
                        raise FloatingPointError(
                            f"loss is {loss.item()} at step {step}: stopping before the update "
                            "(the last checkpoint, if any, is the last good state)"
                        )
                    loss.backward()
                total_loss += loss.item()
            if world > 1:
                parallel.average_gradients(params)
                total_loss = mean_over_ranks(total_loss)  # the global batch's loss, on all ranks
                if not math.isfinite(total_loss):  # every rank stops (one alone would hang)
                    raise FloatingPointError(
                        f"loss is {total_loss} at step {step}: stopping before the update "
                        "(the last checkpoint, if any, is the last good state)"
                    )
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            phase_before = schedule.phase
            schedule.step(optimizer)
            resized = schedule.resized
            if resized:  # our method truncated its layers: new parameter tensors
                schedule.resized = False
                params = [p for g in optimizer.param_groups for p in g["params"]]
            if world > 1 and (resized or schedule.phase != phase_before):
                parallel.trained_tensors_changed()  # masks set or layers truncated: new DDP
                check_in_sync(model, f"after step {step} ({phase_before} -> {schedule.phase})")
            record({"step": step, "loss": total_loss, "phase": phase_before, "lr": factor})
            step += 1
            lr_step += 1
            if schedule.restarted:  # the paper's recipe: train both parts again from step 0
                schedule.restarted = False
                lr_step = 0
                bar.reset(total=total)
            else:
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss:.3f}", phase=schedule.phase)
            evaluate_now = cfg.eval_every and step % cfg.eval_every == 0 and lr_step < total
            if evaluate_now and schedule.phase != "collect":  # keep statistics training-only
                record({"step": step, "validation": evaluate_fn(model)})
            # No checkpoint while mask statistics accumulate: they are not part of one.
            if (
                cfg.checkpoint_every
                and step % cfg.checkpoint_every == 0
                and (schedule.phase != "collect")
            ):
                state = {
                    "step": step,
                    "lr_step": lr_step,
                    "consumed": consumed,
                    "signature": signature,
                    "schedule": schedule.state_dict(),
                    "history": history,
                }
                rank_rng = gather_objects(rng_state()) if world > 1 else None  # all ranks
                if main:
                    save_checkpoint(
                        cfg.checkpoint_dir, model, optimizer, state, cfg.keep_last, rank_rng
                    )
        check_in_sync(model, "at the end of training")
    finally:
        schedule.close()
        bar.close()
        if log is not None:
            log.close()
        if writer is not None:
            writer.close()
    return {
        "history": history,
        "train_seconds": time.perf_counter() - start,
        "steps_run": step,
        "mask_step": schedule.mask_step,
        "final_phase": schedule.phase,
        # our method: how the budget was split at each refresh, and what the truncation cut
        "budget_log": None if schedule.controller is None else list(schedule.controller.log),
        "resumed_from": resumed_from,
        "length_report": length_report,
        "world_size": world,
        "distributed": parallel.mode,  # "single", "ddp" or "fsdp"
    }
