"""Command line: `spalora train` (the default: RoSA on SmolLM2 + BBC headlines), `spalora eval`,
`spalora merge`, `spalora plot`. A refused input prints one `error:` line naming the file or field
(SPALORA_DEBUG=1 adds its traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import traceback
import typing
from pathlib import Path

import yaml

from .config import (
    RECIPE_SECTIONS,
    RunConfig,
    recipe_default,
    recipe_defaults,
)
from .methods import get_method, method_names

# flag -> (section, key): section None is a top-level (RunConfig) key. Each of these flags sets
# one config field and takes its type, choices, help and default from that field.
DATA_FLAGS = {
    "data": ("data", "path"),
    "eval_data": ("data", "eval_path"),
    "metric": ("data", "metric"),
    "prompt_field": ("data", "prompt_field"),
    "completion_field": ("data", "completion_field"),
    "strict": ("data", "strict"),
}
FLAGS = {
    "model": (None, "model"),
    "task": (None, "task"),
    **DATA_FLAGS,
    "output_dir": (None, "output_dir"),
    "method": ("adapter", "method"),
    "budget": ("adapter", "budget"),
    "rank_fraction": ("adapter", "rank_fraction"),
    "r": ("adapter", "r"),
    "density": ("adapter", "density"),
    "target_modules": ("adapter", "target_modules"),
    "mask_strategy": ("adapter", "mask_strategy"),
    "nnz_allocation": ("adapter", "nnz_allocation"),
    "warmup_steps": ("adapter", "warmup_steps"),
    "mask_batches": ("adapter", "mask_batches"),
    "sparse_warmup_steps": ("adapter", "sparse_warmup_steps"),
    "restart": ("adapter", "restart_after_mask"),
    "overprovision": ("adapter", "overprovision"),
    "start_rank": ("adapter", "start_rank"),
    "rank_reg": ("adapter", "rank_reg"),
    "sparse_reg": ("adapter", "sparse_reg"),
    "irls_every": ("adapter", "irls_every"),
    "allocation": ("adapter", "allocation"),
    "truncate_at": ("adapter", "truncate_at"),
    "steps": ("train", "steps"),
    "batch_size": ("train", "batch_size"),
    "grad_accum": ("train", "grad_accum"),
    "lora_lr": ("train", "lora_lr"),
    "sparse_lr": ("train", "sparse_lr"),
    "lora_b_lr_ratio": ("train", "lora_b_lr_ratio"),
    "seed": ("train", "seed"),
    "max_length": ("train", "max_length"),
    "overlong": ("train", "overlong"),
    "bf16": ("train", "bf16"),
    "quantize": (None, "quantize"),
    "distributed": ("train", "distributed"),
    "eval_every": ("train", "eval_every"),
    "eval_limit": (None, "eval_limit"),
    "val_limit": (None, "val_limit"),
    "checkpoint_every": ("train", "checkpoint_every"),
    "resume": ("train", "resume"),
    "overwrite": (None, "overwrite"),
    "device": (None, "device"),
}
# What only the command line needs: other spellings of a flag, and notes on spelling it.
ALIASES = {"r": ("--lora-r",)}
NOTES = {
    "r": "write --lora-r under torchrun, which reads --r as an abbreviation of its own --rdzv-* "
    "options",
}
SIZE_KEYS = ("r", "density")  # explicit sizes, the alternative to a budget
BUDGET_KEYS = ("budget", "rank_fraction")


def config_class(section: str | None) -> type:
    """The dataclass whose fields a recipe section holds (None: the top level)."""
    return RECIPE_SECTIONS[section] if section else RunConfig


def field_of(section: str | None, key: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(config_class(section))}[key]


def _flag_type(section: str | None, key: str) -> type:
    """The field's type without None; str where a field takes several (a budget: 'r8' or 1000)."""
    hint = typing.get_type_hints(config_class(section))[key]
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (bool, int, float, str) else str


def add_field_flag(parser: argparse.ArgumentParser, flag: str) -> None:
    """`--flag` for the config field FLAGS names; its default stays None (not given), so a YAML
    value or the field's default stands, and the help shows the field's default."""
    section, key = FLAGS[flag]
    f = field_of(section, key)
    help_text = f.metadata["help"] + (f"; {NOTES[flag]}" if flag in NOTES else "")
    kwargs: dict = {"dest": flag, "default": None}
    kind = _flag_type(section, key)
    if kind is bool:
        kwargs.update(action="store_const", const=True)
    else:
        kwargs.update(type=kind, choices=f.metadata.get("choices"))
        default = recipe_default(f)
        if default is not None:
            help_text += f" (default: {default})"
    kwargs["help"] = help_text.replace("%", "%%")
    parser.add_argument("--" + flag.replace("_", "-"), *ALIASES.get(flag, ()), **kwargs)


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the `file` task, shared by train and eval."""
    for flag in DATA_FLAGS:
        add_field_flag(p, flag)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spalora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", help="fine-tune with a spalora adapter (defaults: RoSA, SmolLM2, BBC)"
    )
    t.add_argument("--config", help="YAML recipe (see configs/); flags override it")
    for flag in FLAGS:
        add_field_flag(t, flag)
    t.add_argument("--no-eval", action="store_true", help="skip zero-shot and final evaluation")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="evaluate a saved adapter (or the base model) on a task")
    e.add_argument("--adapter", help="adapter folder; omit for the base model alone (zero-shot)")
    e.add_argument("--task", default=RunConfig.task, help=field_of(None, "task").metadata["help"])
    add_data_flags(e)
    e.add_argument("--split", choices=["test", "validation"], default="test")
    e.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    e.add_argument("--limit", type=int, help="first N test examples only")
    e.add_argument("--batch-size", type=int, default=RunConfig.eval_batch_size)
    e.add_argument("--output-dir", help="where predictions.jsonl and metrics.json go")
    e.add_argument("--seed", type=int, help="the task's split seed (default: the adapter's)")
    add_field_flag(e, "device")
    e.add_argument("--no-progress", action="store_true")

    m = sub.add_parser("merge", help="fold an adapter into its base model and save the result")
    m.add_argument("--adapter", required=True, help="adapter folder")
    m.add_argument("--out", required=True, help="output folder (a plain transformers checkpoint)")
    m.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    m.add_argument(
        "--peft",
        action="store_true",
        help="write PEFT's LoRA format instead of merging (LoRA-only adapters)",
    )

    p = sub.add_parser("plot", help="write PNGs of a run: loss curve, per-layer rank/density")
    p.add_argument(
        "run_dir",
        help="a `spalora train --output-dir` folder, or an adapter folder (allocation only)",
    )
    return parser


def load_yaml_recipe(recipe: dict, path: str) -> dict:
    """Override `recipe` in place with the YAML file at `path`; returns what the file set.

    Every key must be a recipe field (RunConfig's at the top, the section's config below)."""
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise SystemExit(f"error: {path} must hold a mapping of recipe keys")
    unknown = [key for key in loaded if key not in recipe]
    for section in RECIPE_SECTIONS:
        value = loaded.get(section) or {}
        if not isinstance(value, dict):
            raise SystemExit(f"error: {path}: `{section}` must hold a mapping of keys")
        unknown += [f"{section}.{key}" for key in value if key not in recipe[section]]
    if unknown:
        raise SystemExit(f"error: unknown keys in {path}: {sorted(unknown)}")
    for key, value in loaded.items():
        if key in RECIPE_SECTIONS:
            recipe[key].update(value or {})
        else:
            recipe[key] = value
    return loaded


def resolve_recipe(args: argparse.Namespace) -> dict:
    """The config fields' defaults, then the YAML file, then flags."""
    recipe = recipe_defaults()
    loaded = load_yaml_recipe(recipe, args.config) if args.config else {}
    for flag, (section, key) in FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if flag == "target_modules" and value != "all-linear" and re.fullmatch(r"[\w.,\s]+", value):
            value = [v.strip() for v in value.split(",") if v.strip()]  # names; else a regex
        (recipe[section] if section else recipe)[key] = value
    adapter = recipe["adapter"]
    sized_by_flags = any(getattr(args, k) is not None for k in SIZE_KEYS)
    budget_by_flags = any(getattr(args, k) is not None for k in BUDGET_KEYS)
    if sized_by_flags and budget_by_flags:
        raise SystemExit("error: give either --budget/--rank-fraction or --r/--density, not both")
    in_yaml = loaded.get("adapter") or {}
    sized_by_yaml = any(k in in_yaml for k in SIZE_KEYS) and not any(
        k in in_yaml for k in BUDGET_KEYS
    )
    if sized_by_flags or (sized_by_yaml and not budget_by_flags):
        for key in BUDGET_KEYS:  # explicit sizes replace the default (or the YAML's) budget
            adapter.pop(key, None)
    adapter["seed"] = recipe["train"]["seed"]  # one seed: split, data order, init, masks
    method = adapter.get("method")
    if method in method_names() and not get_method(method).trains_sparse:
        adapter.pop("density", None)  # a recipe's density means nothing to a low-rank method
    return recipe


def cmd_train(args: argparse.Namespace) -> int:
    """`spalora train`: the resolved recipe, run by FinetuneRecipe (under torchrun / accelerate
    launch every rank runs it; rank 0 prints and writes)."""
    from .recipes import FinetuneConfig, FinetuneRecipe

    recipe = resolve_recipe(args)
    cfg = FinetuneConfig.from_recipe(
        recipe, progress=not args.no_progress, evaluate=not args.no_eval
    )
    return FinetuneRecipe(cfg).run()


def _base_model_for(adapter: str | None, model: str | None) -> str:
    """The base model to load: --model, else the adapter's recorded one. The adapter's files
    are read (and refused: damaged, NaN / inf) first, before a model takes time to load."""
    from .hub import DEFAULT_MODEL
    from .layer import DEFAULT_ADAPTER
    from .serialization import read_adapter

    config = read_adapter(adapter, DEFAULT_ADAPTER)[0] if adapter else None
    return model or (config and config.base_model_name_or_path) or DEFAULT_MODEL


def cmd_eval(args: argparse.Namespace) -> int:
    from .distributed import resolve_device
    from .evaluate import evaluate_task, format_value
    from .hub import load_model_and_tokenizer
    from .model import SpaloraModel
    from .serialization import read_config
    from .tasks import get_task

    seed = args.seed
    if seed is None:  # the split the adapter was trained on, so no test example was seen
        seed = read_config(args.adapter).seed if args.adapter else 0
    data = {key: getattr(args, flag) for flag, (section, key) in FLAGS.items() if section == "data"}
    task = get_task(args.task, seed=seed, **(data if args.task == "file" else {}))
    for note in task.notes:
        print(f"[spalora] data: {note}", file=sys.stderr)
    model_name = _base_model_for(args.adapter, args.model)
    device = resolve_device(args.device or RunConfig.device)
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(model_name)
    if args.adapter:
        model = SpaloraModel.from_pretrained(model, args.adapter)
    model.to(device)
    examples = task.test if args.split == "test" else task.validation
    examples = examples[: args.limit] if args.limit else examples
    result = evaluate_task(model, tokenizer, task, examples, args.batch_size, not args.no_progress)
    default_out = Path(args.adapter).parent if args.adapter else Path("runs")
    out = Path(args.output_dir) if args.output_dir else default_out / f"eval-{task.name}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as fh:
        for row in result["predictions"]:
            fh.write(json.dumps(row) + "\n")
    seconds = time.perf_counter() - started
    metrics = {
        "task": task.name,
        "split": args.split,
        "adapter": args.adapter,
        "model": model_name,
        "metric": result["metric"],
        "value": result["value"],
        "n": result["n"],
        "seconds": seconds,
    }
    if "loss" in result:
        metrics["loss"] = result["loss"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    n_correct = sum(row["correct"] for row in result["predictions"])
    correct = f"{n_correct}/{result['n']}" if result["predictions"] else "-"
    print(
        f"| task | split | adapter | n | correct | {result['metric']} |\n"
        "| --- | --- | --- | ---: | ---: | ---: |\n"
        f"| {task.name} | {args.split} | {args.adapter or '(base model)'} | {result['n']} | "
        f"{correct} | {format_value(result['metric'], result['value'])} |"
    )
    where = out / "predictions.jsonl" if result["predictions"] else out / "metrics.json"
    print(f"[spalora] wrote {where} ({seconds:.0f} s)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .export import save_merged, save_peft_lora
    from .hub import load_model_and_tokenizer
    from .model import SpaloraModel

    model_name = _base_model_for(args.adapter, args.model)
    model, tokenizer = load_model_and_tokenizer(model_name)
    wrapped = SpaloraModel.from_pretrained(model, args.adapter)
    if args.peft:
        out = save_peft_lora(wrapped, args.out)
        print(
            f"[spalora] wrote a PEFT LoRA adapter to {out} "
            "(load with peft.PeftModel.from_pretrained)"
        )
    else:
        out = save_merged(wrapped, args.out, tokenizer)
        print(
            f"[spalora] wrote a merged checkpoint to {out} "
            "(load with AutoModelForCausalLM.from_pretrained)"
        )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    paths = plot_run(args.run_dir)
    for path in paths:
        print(f"[spalora] wrote {path}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "plot": cmd_plot}
DEBUG_ENV = "SPALORA_DEBUG"  # set to 1: a traceback with every error, expected or not


def expected_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises (our checks name the file, field or tensor), and a diverged run
    (a non-finite loss, which names the step): one `error:` line, no traceback. Anything else
    is a bug, and its traceback is what a report needs."""
    from .hub import MissingPackageError
    from .recipes.output import JobError

    return (JobError, ValueError, OSError, ImportError, MissingPackageError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    """Parse, dispatch, and turn an expected failure of any command into `error: <message>`
    (exit status 1)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:
        if not isinstance(exc, expected_errors()):
            raise
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    sys.exit(main())
