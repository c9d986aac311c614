"""`spalora train` as a recipe: fine-tune a base model with a spalora adapter on a task.

    recipe = FinetuneRecipe(FinetuneConfig.from_recipe(resolved))
    recipe.run()   # setup -> train -> evaluate -> save, cleanup always

`setup()` runs the named steps in order: `setup_data` (the task and its splits), `check_output`
(refusals that need no model: a folder that is a file or not writable, a finished run without
--overwrite, a resume that changes the recipe), `setup_model` (base model on its device,
quantized, scored zero-shot, wrapped with the adapter), `setup_optimizer` and `setup_schedule`
(the loop of `spalora.train.Trainer`, resumed from a checkpoint if asked). Under torchrun every
rank runs the recipe; rank 0 alone prints and writes files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import check_resumable, list_checkpoints, training_recipe
from ..config import RECIPE_SECTIONS, RunConfig, SpaloraConfig, TrainConfig
from ..distributed import (
    DEVICES,
    close_distributed,
    dist_backend,
    init_distributed,
    is_main,
    resolve_device,
    world_size,
)
from ..hub import check_model_path
from ..train import Trainer
from .output import JobError, check_output_folder, remove_checkpoints, write_or_fall_back
from .zero_shot import base_score


@dataclass
class FinetuneConfig:
    """A `spalora train` job: the resolved recipe as typed configs."""

    run: RunConfig
    adapter: SpaloraConfig
    train: TrainConfig
    data: dict[str, Any] = field(default_factory=dict)  # the file task's options (None: unset)
    evaluate: bool = True  # zero-shot, validation and final test evaluation
    recipe: dict[str, Any] = field(default_factory=dict)  # as resolved, kept in metrics.json

    @classmethod
    def from_recipe(
        cls, recipe: dict[str, Any], progress: bool = True, evaluate: bool = True
    ) -> FinetuneConfig:
        """Build and check the configs of a resolved recipe (top-level keys, then sections);
        raises JobError naming the bad field."""
        try:
            run = RunConfig(**{k: v for k, v in recipe.items() if k not in RECIPE_SECTIONS})
            adapter = SpaloraConfig(**recipe["adapter"])
            out = Path(run.output_dir)
            train = {
                **recipe["train"],
                "progress": progress,
                "checkpoint_dir": str(out / "checkpoints"),
                "log_path": str(out / "history.jsonl"),
            }
            if train["tensorboard_dir"] is None and importlib.util.find_spec("tensorboard"):
                train["tensorboard_dir"] = str(out / "tensorboard")  # TensorBoard when installed
            train_cfg = TrainConfig(**train)
        except (TypeError, ValueError) as exc:
            raise JobError(str(exc)) from exc
        if run.device not in DEVICES:
            raise JobError(f"device must be one of {DEVICES}, got {run.device!r}")
        if train_cfg.resume and run.overwrite:
            raise JobError("give --resume (continue the run) or --overwrite (replace it), not both")
        adapter.base_model_name_or_path = run.model  # what `spalora eval/merge` reload
        return cls(run, adapter, train_cfg, dict(recipe.get("data") or {}), evaluate, recipe)

    def job_keys(self) -> dict[str, Any]:
        """The job's own keys that decide the trained adapter: model, task, data, quantization."""
        keys = {"model": self.run.model, "task": self.run.task, "quantize": self.run.quantize}
        keys.update({f"data.{k}": v for k, v in self.data.items()})
        return keys

    def recorded_recipe(self) -> dict[str, Any]:
        """What decides the trained adapter (checked on resume): the loop's and the adapter's
        settings and the job's keys, as the loop writes them into each checkpoint."""
        return training_recipe(self.adapter, self.train, self.job_keys())


def _silent(*_args, **_kwargs) -> None:
    """print() on ranks other than 0."""


class FinetuneRecipe:
    """Fine-tuning as named steps; see the module docstring for the order and what each does."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.metrics: dict[str, Any] = {"recipe": cfg.recipe}
        self.trainer: Trainer | None = None
        self.started = time.perf_counter()
        self.main = True
        self.say = print

    def run(self) -> int:
        """The whole job; returns the exit status. Closes a process group it opened."""
        import torch.distributed as dist

        opened_before = dist.is_available() and dist.is_initialized()  # then not ours to close
        try:
            self.setup()
            self.train()
            self.evaluate()
            return self.save()
        finally:
            self.cleanup()
            if not opened_before:
                close_distributed()

    def setup(self) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        init_distributed()  # several ranks: every one runs this job; rank 0 prints and writes
        self.main = is_main()
        self.say = print if self.main else _silent
        try:  # a missing model folder is said before any data loads
            check_model_path(self.cfg.run.model)
        except FileNotFoundError as exc:
            raise JobError(str(exc)) from exc
        self.setup_data()
        self.check_output()
        self.setup_model()
        self.setup_optimizer()
        self.setup_schedule()

    def check_output(self) -> None:
        """Every refusal that needs no model, before anything loads or is written: the output
        folder (a file, a finished run, not writable) and a resume that changes the recipe."""
        cfg = self.cfg
        check_output_folder(self.out, cfg.train.resume, cfg.run.overwrite)
        checkpoints = list_checkpoints(cfg.train.checkpoint_dir)
        if cfg.run.overwrite and checkpoints:
            self.say(
                f"[spalora] --overwrite: removing the earlier run's {len(checkpoints)} "
                f"checkpoint(s) in {cfg.train.checkpoint_dir}",
                file=sys.stderr,
            )
            if self.main:
                remove_checkpoints(checkpoints)
            if world_size() > 1:  # every rank sees them gone before the loop looks for them
                torch.distributed.barrier()
        elif cfg.train.resume and checkpoints:
            try:
                check_resumable(checkpoints[-1], cfg.recorded_recipe())
            except ValueError as exc:
                raise JobError(str(exc)) from exc

    def setup_data(self) -> None:
        """The task with its fixed splits; the test and validation examples this job scores."""
        from ..tasks import get_task

        run, seed = self.cfg.run, self.cfg.train.seed
        try:
            self.task = get_task(run.task, seed=seed, **self.cfg.data)
        except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
            raise JobError(str(exc)) from exc
        task = self.task
        self.test = task.test[: run.eval_limit] if run.eval_limit else task.test
        self.validation = task.validation[: run.val_limit] if run.val_limit else task.validation
        self.say(f"[spalora] task {task.summary()}; testing on {len(self.test)}", file=sys.stderr)
        for note in task.notes:
            self.say(f"[spalora] data: {note}", file=sys.stderr)
        self.metrics.update({"metric": task.metric, "data_notes": task.notes})

    def setup_model(self) -> None:
        """The base model on its device (quantized if asked), its zero-shot score, then the
        adapter around it."""
        from ..hub import load_model_and_tokenizer
        from ..model import get_spalora_model
        from ..plan import plan_adapter

        run = self.cfg.run
        self.device = self.resolve_device()
        self.say(f"[spalora] loading {run.model} on {self.device}", file=sys.stderr, flush=True)
        model, self.tokenizer = load_model_and_tokenizer(run.model)
        model.to(self.device)
        if run.quantize:  # before the zero-shot evaluation, which then measures this base
            from ..quant import base_memory, quantize_base

            try:
                quantize_base(model, run.quantize)
            except (ImportError, ValueError) as exc:
                raise JobError(str(exc)) from exc
            self.say(f"[spalora] base quantized to {run.quantize}: {base_memory(model)}")
        try:  # an adapter that cannot fit this model is refused before the zero-shot score
            plan_adapter(model, self.cfg.adapter)
        except ValueError as exc:
            raise JobError(str(exc)) from exc
        if self.cfg.evaluate:
            self.score_zero_shot(model)
        self.model = get_spalora_model(model, self.cfg.adapter)
        if self.main:
            small = len(self.model.allocations) <= 16
            print(self.model.allocation_table() if small else short_table(self.model))
            self.model.print_trainable_parameters()

    def resolve_device(self) -> torch.device:
        """--device: under a CPU process group (gloo) "auto" stays on the CPU."""
        name = self.cfg.run.device
        if name == "auto" and world_size() > 1 and dist_backend() != "nccl":
            return torch.device("cpu")
        try:
            return resolve_device(name)
        except ValueError as exc:
            raise JobError(str(exc)) from exc

    def score_zero_shot(self, model) -> None:
        """The base model's test score: a resumed run's own, else the cached one for this model
        and these examples, else evaluated (and cached)."""
        from ..evaluate import format_value

        run, metric, in_run = self.cfg.run, self.task.metric, self.out / "zero_shot.json"
        settings = {"quantize": run.quantize, "batch_size": run.eval_batch_size}
        settings["device"] = self.device.type
        row, source = base_score(
            model,
            self.tokenizer,
            self.task,
            self.test,
            run.model,
            settings,
            self.progress,
            resumed=in_run if self.cfg.train.resume else None,
            write=self.main,
        )
        on = "" if row.get("n") is None else f" on {row['n']} held-out examples"
        self.say(
            f"[spalora] zero-shot {metric}: {format_value(metric, row['value'])}{on} ({source})"
        )
        if self.main:
            in_run.write_text(json.dumps(row))
        self.metrics["zero_shot"] = row.get("value", row.get("accuracy"))  # older: "accuracy"

    @property
    def progress(self) -> bool:
        return self.cfg.train.progress and self.main

    def validation_scores(self, model) -> dict[str, float]:
        """The task metric (unless loss-only) and the completion loss on the validation split."""
        from ..evaluate import validation_scores

        run, max_length = self.cfg.run, self.cfg.train.max_length
        return validation_scores(
            model, self.tokenizer, self.task, self.validation, max_length, run.eval_batch_size
        )

    def setup_optimizer(self) -> None:
        """The loop around the adapter: its data, the checkpoint it resumes from (checked),
        AdamW over the LoRA and sparse groups."""
        train_cfg = self.cfg.train
        if not self.validation:
            train_cfg.eval_every = 0
        try:
            self.trainer = Trainer(
                self.model,
                self.tokenizer,
                train_cfg,
                self.validation_scores,  # during training, every eval_every steps
                recipe_extra=self.cfg.job_keys(),
            )
            self.trainer.setup_data(self.task.train)
            self.trainer.find_checkpoint()
            self.trainer.setup_optimizer()
        except ValueError as exc:  # e.g. checkpoints of another run in the output folder
            raise JobError(str(exc)) from exc

    def setup_schedule(self) -> None:
        """The mask schedule (our method: its controller), then the resumed state, if any."""
        trainer = self.trainer
        trainer.setup_schedule()
        try:
            trainer.resume()
        except ValueError as exc:
            raise JobError(str(exc)) from exc
        trainer.setup_parallel()
        trainer.setup_logging()

    def train(self) -> None:
        """The loop (`Trainer.train`); its bar and logs close as soon as it ends."""
        try:
            self.trainer.train()
        finally:
            self.trainer.cleanup()
        result = self.trainer.result()
        self.metrics.update({k: v for k, v in result.items() if k != "history"})

    def evaluate(self) -> None:
        """Validation scores and the test score after training, beside the zero-shot one."""
        from ..evaluate import evaluate_task, format_value

        if not self.cfg.evaluate:
            return
        if self.validation:
            self.metrics["validation"] = self.validation_scores(self.model)
        started = time.perf_counter()
        ev = evaluate_task(
            self.model,
            self.tokenizer,
            self.task,
            self.test,
            self.cfg.run.eval_batch_size,
            self.progress,
            "final eval",
        )
        self.metrics.update({"test": ev["value"], "n_test": ev["n"]})
        metric = self.task.metric
        line = f"[spalora] test {metric} after training: {format_value(metric, ev['value'])}"
        if "zero_shot" in self.metrics:
            line += f" (zero-shot {format_value(metric, self.metrics['zero_shot'])})"
        line += f" on {ev['n']} held-out examples ({time.perf_counter() - started:.0f} s)"
        self.say(line)

    def save(self) -> int:
        """The adapter and metrics.json (rank 0). If the run folder cannot take them after
        all, they go to a fresh temporary folder, named in the error, so no training is lost."""
        if not self.main:  # the same adapter is on every rank; rank 0 writes it
            return 0
        written, error = write_or_fall_back(self.out, self.write_results)
        if error is not None:
            print(
                f"error: could not write the results to {self.out} ({error}); the trained "
                f"adapter and metrics.json are in {written} instead",
                file=sys.stderr,
            )
            return 1
        print(
            f"[spalora] saved adapter to {self.out / 'adapter'} "
            f"({self.metrics['adapter_bytes'] / 1e6:.2f} MB); "
            f"total wall time {self.metrics['wall_seconds']:.0f} s"
        )
        return 0

    def write_results(self, folder: Path) -> None:
        """adapter/ and metrics.json into `folder`."""
        adapter_dir = folder / "adapter"
        self.model.save_pretrained(adapter_dir)
        trainable, _ = self.model.get_nb_trainable_parameters()
        self.metrics.update(
            {
                "trainable_params": trainable,
                "adapter_bytes": (adapter_dir / "adapter_model.safetensors").stat().st_size,
                "wall_seconds": time.perf_counter() - self.started,
            }
        )
        (folder / "metrics.json").write_text(json.dumps(self.metrics, indent=2))

    def cleanup(self) -> None:
        if self.trainer is not None:
            self.trainer.cleanup()


def short_table(model) -> str:
    """Per module type (q_proj, ...): layers, r, nnz and density, summed over the layers."""
    rows: dict[str, list] = {}
    for a in model.allocations:
        kind = a.name.rsplit(".", 1)[-1]
        row = rows.setdefault(kind, [0, a.r, 0, 0, 0, f"{a.out_features}x{a.in_features}"])
        row[0] += 1
        row[2] += a.nnz
        row[3] += a.out_features * a.in_features
        row[4] += a.params
    lines = [
        f"{'module':<12} {'layers':>6} {'shape':>10} {'r':>4} {'nnz':>10} {'density':>8} "
        f"{'params':>11}"
    ]
    for kind, (n, r, nnz, numel, params, shape) in rows.items():
        lines.append(
            f"{kind:<12} {n:>6} {shape:>10} {r:>4} {nnz:>10,} {nnz / numel:>8.3%} {params:>11,}"
        )
    lines.append(f"total trainable: {sum(a.params for a in model.allocations):,}")
    return "\n".join(lines)
