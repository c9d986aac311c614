"""The configuration dataclasses: the one source of every default and its help text.

`SpaloraConfig` (what to adapt and how, in PEFT's style, saved as JSON), `TrainConfig` (the
training loop), and for the `spalora train` job `RunConfig` (model, task, output) and
`DataConfig` (the `file` task's options). The CLI's flags and the YAML recipe keys are built
from these fields (`spalora.cli`), so a flag's default and help are the field's.

Field metadata: "help" (one line), "choices" (the allowed values), "recipe": False (not a recipe
key: filled by the solver or derived by the job), "recipe_default" (where a `spalora train` job
starts from another value than a Python call; the help says why).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .budget import NNZ_ALLOCATIONS
from .methods.registry import get_method, method_names

METHODS = method_names()  # the built-ins (the CLI's choices); Python users may register more
MASK_STRATEGIES = ("fisher", "grad", "residual", "magnitude", "wanda", "random")
ALLOCATIONS = ("global", "uniform")
START_RANKS = ("budget", "split")
REACH_BUDGET = ("cut", "cubic", "exchange")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with its help text (and CLI metadata) beside its default."""
    meta = {"help": help, **metadata}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise ValueError naming `name` unless `value` is a whole number >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def check_real(name: str, value: Any, minimum: float | None = None, strict: bool = False) -> None:
    """Raise ValueError naming `name` unless `value` is a finite number (>= `minimum`, or >
    `minimum` when `strict`); nan and inf never pass."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def recipe_default(f: dataclasses.Field) -> Any:
    """The value a `spalora train` recipe starts from for field `f`."""
    if "recipe_default" in f.metadata:
        return f.metadata["recipe_default"]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def recipe_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config class that a recipe (YAML key or flag) may set."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("recipe", True)]


@dataclass
class SpaloraConfig:
    """Configuration of a spalora adapter.

    Sizes come either from `r` + `density` directly, or from a `budget` (absolute count, "0.5%" of
    the model, or "r16" for as many parameters as LoRA r=16 on the targeted layers) split by
    `rank_fraction` between rank and nonzeros. The solver writes the result per layer into
    `rank_pattern` / `nnz_pattern`, so a saved adapter reloads with exactly its shapes.
    """

    method: str = option(
        "rosa",
        "lora, sparse, rosa, or spalora (ours: IRLS penalties split the budget across layers, "
        "then truncate)",
        choices=METHODS,
    )
    target_modules: list[str] | str = option(
        "all-linear", "'all-linear', module names (joined by commas on the CLI), or a regex"
    )
    exclude_modules: list[str] | str | None = option(
        None, "module names or a regex never adapted, even when targeted"
    )
    r: int = option(8, "LoRA rank (when no budget is given)")
    lora_alpha: float = option(16.0, "LoRA scale numerator: the update is alpha / r * B A")
    lora_dropout: float = option(
        0.0,
        "dropout on the LoRA input; off: short runs are not regularized by it and it costs a "
        "sizeable share of a CPU step",
    )
    density: float | None = option(None, "sparse density (when no budget is given)")
    budget: int | str | None = option(
        None,
        "'r8' (as LoRA r=8), '0.5%' of the model, or a count; a Python config without one "
        "sizes from r and density, a `spalora train` job by the LoRA r=8 budget",
        recipe_default="r8",
    )
    rank_fraction: float | None = option(
        None, "share of the budget spent on rank (unset: half, where a method has both parts)"
    )
    nnz_allocation: str = option(
        "density",
        "how a budget's nonzeros spread over layers: the same density everywhere (density, "
        "RoSA's) or in proportion to m + n, what one LoRA rank costs there (lora, PEFT ShiRA's)",
        choices=NNZ_ALLOCATIONS,
    )
    # Mask schedule (RoSA): LoRA-only warm-up, gradient collection, then joint training.
    mask_strategy: str = option(
        "fisher", "how the sparse support is chosen (or a callable)", choices=MASK_STRATEGIES
    )
    warmup_steps: int = option(40, "LoRA-only steps before the mask")
    mask_batches: int = option(8, "micro-batches of mask statistics")
    restart_after_mask: bool = option(
        False, "after the mask, reset adapters and train from step 0 (paper recipe)"
    )
    # The sparse values join training mid-run, where Adam's first steps move every one of them by
    # about the full learning rate at once (a sign step): their rate ramps up instead, as every
    # parameter's does at step 0.
    sparse_warmup_steps: int = option(
        10, "steps over which the sparse values' learning rate ramps up after the mask"
    )
    seed: int = option(
        0,
        "LoRA initialisation and random masks",
        recipe=False,  # a job has one seed (train.seed) for split, data order and adapter
    )
    # A key matches a module whose name equals it or ends with "." + key, or fully matches it as
    # a regex: {"mlp.down_proj": 0.02, r".*\.0\..*": 0.05}.
    density_pattern: dict[str, float] = option(
        {}, "per-layer densities overriding `density`, by module name or regex"
    )
    # Our method (method="spalora"): train over-provisioned under IRLS rank and sparsity
    # penalties, split the budget across layers at one global threshold, then truncate to exactly
    # the budget. See spalora.methods.spalora.
    overprovision: float = option(
        1.5, "spalora: train with this many times the rank and nonzeros the budget allows"
    )
    # "budget": the allocation can reach pure LoRA and beyond in the layers that need it. The
    # candidate nonzeros are always overprovision x the split's.
    start_rank: str = option(
        "budget",
        "spalora: over-provision the rank all of the budget buys (budget) or the split's (split)",
        choices=START_RANKS,
    )
    rank_reg: float = option(10.0, "spalora: IRLS rank penalty weight")
    sparse_reg: float = option(10.0, "spalora: IRLS sparsity penalty weight")
    irls_every: int = option(10, "spalora: steps between IRLS refreshes")
    allocation: str = option(
        "global",
        "spalora: one global threshold across layers, or RoSA's even split (uniform)",
        choices=ALLOCATIONS,
    )
    truncate_at: float = option(
        0.5, "spalora: truncate to the budget at this fraction of the run, or this step (>= 1)"
    )
    rewarm_steps: int = option(
        5, "spalora: steps over which the learning rate re-warms after the truncation"
    )
    # "cubic": prune to the budget on a schedule from prune_from to truncate_at, keeping the
    # optimizer state of what stays (spalora.methods.spalora.gradual).
    reach_budget: str = option(
        "cut",
        "spalora: cut to the budget at truncate_at (cut), prune to it gradually (cubic), or "
        "train at it from the start and exchange units (exchange)",
        choices=REACH_BUDGET,
    )
    prune_from: float = option(
        0.1, "spalora, cubic/exchange: fraction of the run where pruning (exchange) starts"
    )
    # "exchange": at the budget from step 0; the weakest units are swapped for random entries
    # on RigL's cosine-decayed fraction between prune_from and truncate_at.
    exchange_fraction: float = option(
        0.3, "spalora, exchange: fraction of the budget exchanged at the first exchange"
    )
    # Filled by the solver / at save time; reloading uses them verbatim.
    rank_pattern: dict[str, int] = option({}, "per-layer rank (the solver's)", recipe=False)
    nnz_pattern: dict[str, int] = option({}, "per-layer nonzeros (the solver's)", recipe=False)
    alpha_pattern: dict[str, float] = option({}, "per-layer lora_alpha")
    base_model_name_or_path: str | None = option(
        None, "the base model the adapter was trained on (set by the job)", recipe=False
    )
    peft_type: str = option("SPALORA", "PEFT's adapter type tag", recipe=False)
    spalora_version: str = option("0.1.0", "the format version", recipe=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a clear message on settings that cannot work."""
        method = get_method(self.method)  # one error listing the methods there are
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            # a method may be registered beyond the built-in choices; a mask may be a callable
            if choices and f.name != "method" and not callable(value) and value not in choices:
                extra = " or a callable" if f.name == "mask_strategy" else ""
                raise ValueError(f"{f.name} must be one of {choices}{extra}, got {value!r}")
        if self.density is not None and not (0.0 < float(self.density) < 1.0):
            raise ValueError(f"density must lie in (0, 1), got {self.density}")
        for key, value in self.density_pattern.items():
            if not (0.0 < float(value) < 1.0):
                raise ValueError(f"density_pattern[{key!r}] must lie in (0, 1), got {value}")
        if self.rank_fraction is not None and not (0.0 <= float(self.rank_fraction) <= 1.0):
            raise ValueError(f"rank_fraction must lie in [0, 1], got {self.rank_fraction}")
        check_int("r", self.r, 0)
        if self.uses_lora and self.budget is None and int(self.r) < 1:
            raise ValueError(f"r must be >= 1 for method {self.method!r}, got {self.r}")
        check_real("lora_alpha", self.lora_alpha)
        for key, value in self.alpha_pattern.items():
            check_real(f"alpha_pattern[{key!r}]", value)
        if not (0.0 <= float(self.lora_dropout) < 1.0):
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("mask_batches", self.mask_batches, 1)
        check_int("sparse_warmup_steps", self.sparse_warmup_steps, 0)
        for name in ("overprovision", "rank_reg", "sparse_reg", "truncate_at"):
            check_real(name, getattr(self, name))  # finite: nan slips past the range checks
        method.validate(self)

    @property
    def uses_lora(self) -> bool:
        return get_method(self.method).trains_lora

    @property
    def uses_sparse(self) -> bool:
        return get_method(self.method).trains_sparse

    @property
    def effective_rank_fraction(self) -> float:
        return get_method(self.method).rank_fraction(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if callable(self.mask_strategy):
            d["mask_strategy"] = getattr(self.mask_strategy, "__name__", "callable")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpaloraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SpaloraConfig keys: {unknown}")
        data = dict(data)
        if data.get("mask_strategy") not in MASK_STRATEGIES:
            data["mask_strategy"] = "fisher"  # a saved user callable: the mask itself is saved
        return cls(**data)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> SpaloraConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        return cls.from_dict(json.loads(path.read_text()))


@dataclass
class TrainConfig:
    """The training loop's settings (`spalora.train.train`)."""

    steps: int = option(150, "optimizer steps")
    batch_size: int = option(8, "examples per micro-batch (per process when distributed)")
    lora_lr: float = option(1e-3, "learning rate of the LoRA factors")
    sparse_lr: float = option(3e-4, "learning rate of the sparse values (RoSA's ratio to LoRA's)")
    lora_b_lr_ratio: float = option(
        1.0, "LoRA+: the B factors' learning rate as a multiple of lora_lr (1: plain LoRA)"
    )
    lr_warmup_steps: int = option(10, "linear learning-rate warm-up steps, then linear decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm (inf: none)")
    max_length: int = option(256, "tokens per training example")
    seed: int = option(0, "one seed for the task split, data order, LoRA init and random masks")
    progress: bool = option(True, "progress bar", recipe=False)  # the CLI's --no-progress
    checkpoint_dir: str | None = option(
        None,
        "where checkpoint-<step> folders go",
        recipe=False,  # a job: OUTPUT_DIR/checkpoints
    )
    checkpoint_every: int = option(
        0, "write a resumable checkpoint every N steps (atomic; 0: none)"
    )
    keep_last: int = option(2, "checkpoints kept")
    resume: bool = option(False, "continue from the newest checkpoint in the checkpoint folder")
    grad_accum: int = option(
        1, "micro-batches per optimizer step (effective batch = batch_size * this)"
    )
    log_path: str | None = option(
        None,
        "JSONL of per-step loss, phase and LR factor (+ eval rows)",
        recipe=False,  # a job: OUTPUT_DIR/history.jsonl
    )
    eval_every: int = option(
        0,
        "evaluate on the validation split every N steps (0: never); a Python call needs an "
        "evaluate_fn for it, a `spalora train` job evaluates by default",
        recipe_default=50,
    )
    bf16: bool = option(False, "bfloat16 autocast for forward/backward (adapters stay fp32)")
    tensorboard_dir: str | None = option(
        None, "also log to TensorBoard here (a job: OUTPUT_DIR/tensorboard when installed)"
    )
    overlong: str = option(
        "truncate",
        "examples over max_length: cut the prompt from its start (truncate) or drop them",
        choices=("truncate", "drop"),
    )
    # batch_size is per process: global batch = batch_size * grad_accum * world size.
    distributed: str = option(
        "auto",
        "under torchrun / accelerate launch: DDP, or FSDP2 sharding the frozen base (auto: FSDP "
        "when accelerate's FSDP is on, else DDP); ignored in one process",
        choices=("auto", "ddp", "fsdp"),
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot work (before any model loads)."""
        check_int("steps", self.steps, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("grad_accum", self.grad_accum, 1)
        check_int("max_length", self.max_length, 1)
        check_int("lr_warmup_steps", self.lr_warmup_steps, 0)
        check_int("checkpoint_every", self.checkpoint_every, 0)
        check_int("keep_last", self.keep_last, 1)
        check_int("eval_every", self.eval_every, 0)
        check_real("lora_lr", self.lora_lr, 0.0)
        check_real("sparse_lr", self.sparse_lr, 0.0)
        check_real("lora_b_lr_ratio", self.lora_b_lr_ratio, 0.0, strict=True)
        if self.max_grad_norm != math.inf:  # inf: no clipping
            check_real("max_grad_norm", self.max_grad_norm, 0.0, strict=True)
        for name in ("overlong", "distributed"):
            choices = {f.name: f for f in dataclasses.fields(self)}[name].metadata["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")


@dataclass
class RunConfig:
    """A `spalora train` job's top-level recipe keys: which model, task and output folder."""

    model: str = option("smollm2-135m", "'smollm2-135m' (embedded), a local folder or a hub id")
    task: str = option(
        "bbc-topic",
        "bbc-topic, arithmetic, gsm-symbolic, or file (your data: --data PATH with "
        "prompt/completion or chat messages, as JSONL, JSON, CSV or a datasets folder)",
    )
    output_dir: str = option("runs/default", "where the adapter and metrics.json go")
    eval_limit: int | None = option(None, "evaluate on the first N test examples only")
    val_limit: int | None = option(None, "first N validation examples only")
    eval_batch_size: int = option(32, "prompts per generation batch in evaluation")
    quantize: str | None = option(
        None,
        "store the frozen base's linear layers weight-only quantized (adapters stay fp32; "
        "nf4/fp4 need pip install 'spalora[quant]'); see docs/quantization.md",
        choices=("int8", "nf4", "fp4"),
    )
    device: str = option(
        "auto",
        "where to train and evaluate: auto (the GPU when torch sees one, under torchrun this "
        "rank's), cpu, or cuda (an error without a GPU)",
        choices=("auto", "cpu", "cuda"),
    )
    overwrite: bool = option(
        False, "train into an output folder that holds a finished run, replacing its results"
    )


@dataclass
class DataConfig:
    """The `file` task's options (a recipe's `data` section); unset: the file loader's default."""

    path: str | None = option(
        None, "file task: .jsonl/.json/.csv or a datasets save_to_disk folder"
    )
    eval_path: str | None = option(None, "file task: a separate test file (else 10% is held out)")
    metric: str | None = option(
        None,
        "file task: exact match, accuracy over the label set, final-number match, or "
        "loss/perplexity only (default exact)",
        choices=("exact", "label", "number", "loss"),
    )
    prompt_field: str | None = option(None, "file task: prompt column (default prompt)")
    completion_field: str | None = option(None, "file task: completion column (default completion)")
    strict: bool | None = option(
        None, "file task: fail on the first bad row (default: skip bad rows and report them)"
    )


# A recipe's sections and the config each one fills; RunConfig's fields are top-level keys.
RECIPE_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "adapter": SpaloraConfig,
    "train": TrainConfig,
}


def recipe_defaults() -> dict[str, Any]:
    """The recipe a `spalora train` job starts from, built from the dataclass fields alone."""
    recipe: dict[str, Any] = {f.name: recipe_default(f) for f in recipe_fields(RunConfig)}
    for section, cls in RECIPE_SECTIONS.items():
        recipe[section] = {f.name: recipe_default(f) for f in recipe_fields(cls)}
    return recipe
