"""`python -m benchmarks accuracy`: every method at the same budget, recipe and learning-rate grid.

Protocol (docs/results/accuracy.md says it again next to the numbers): for each task and
budget, each method trains once per (learning rate, variant) at seed 0 and is scored on the
validation split carved from the training data; the best setting is then trained with seeds 1
and 2, and the table reports the test metric's mean and standard deviation over the 3 seeds.
Every run is cached as one JSON file named by the hash of its full configuration, so a killed
benchmark continues where it stopped and the tables are rebuilt from the cache alone.

This module runs and caches; the statistics over the records are in `accuracy_stats`, the report
(accuracy.md, .csv, the plots) in `accuracy_report`, and both are re-exported from here.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from spalora.methods import get_method

from . import heldout
from .accuracy_report import (  # noqa: F401  (re-exported: the harness imports them from here)
    CSV_COLUMNS,
    ablation_lines,
    cell,
    method_color,
    paired_gap_lines,
    plot_accuracy,
    plot_splits,
    precision_note,
    write_report,
)
from .accuracy_stats import (  # noqa: F401  (re-exported, as above)
    LOSS_TAIL,
    ablation_summary,
    correct_bits,
    paired_gap,
    paired_gap_summary,
    rank_share,
    results_by_seed,
    split_summary,
    summarize,
)
from .methods import METHODS, budget_params, build_method, trainable_params

# Bump when a change alters results (recipe defaults, builders, tasks, evaluation): the key
# then changes for every run. The training settings and package versions are in the key too.
CACHE_VERSION = 2


@dataclass(frozen=True)
class Profile:
    steps: int
    batch_size: int
    seeds: tuple[int, ...]
    max_length: int = 256
    val_limit: int | None = None
    test_limit: int | None = None
    lr_index: int | None = None  # quick: only this entry of each method's grid
    first_variant_only: bool = False
    warmup_steps: int = 40  # RoSA's LoRA-only steps before the mask
    mask_batches: int = 8
    # Protocol 2 (docs/benchmarks.md, "Version 2"): held-out NLL per example, a selection seed
    # never reported, task sizes set here. These fields enter a run's key only when set away
    # from their defaults, so every protocol-1 key stays what it was.
    protocol: int = 1
    n_validation: int | None = None  # the task's validation size (None: the task's default)
    n_test: int | None = None
    accuracy_limit: int | None = None  # generation-scored test examples (the first n)
    selection_seeds: tuple[int, ...] = ()


PROFILES = {
    "full": Profile(steps=150, batch_size=8, seeds=(0, 1, 2)),
    "quick": Profile(
        steps=24,
        batch_size=8,
        seeds=(0,),
        val_limit=48,
        test_limit=96,
        lr_index=1,
        first_variant_only=True,
        warmup_steps=8,
        mask_batches=2,
    ),
    # Protocol 2 on arithmetic: choose on seed 0 (seed 100 too when the margin is under 2 SE),
    # report seeds 1-8; 1,000 validation and 4,000 test questions, accuracy on 2,000 of them.
    "v2": Profile(
        steps=150,
        batch_size=8,
        seeds=tuple(range(1, 9)),
        protocol=2,
        n_validation=1000,
        n_test=4000,
        accuracy_limit=2000,
        selection_seeds=(0, 100),
    ),
}
PROFILES["v2-600"] = replace(PROFILES["v2"], steps=600)
NEW_PROFILE_FIELDS = ("protocol", "n_validation", "n_test", "accuracy_limit", "selection_seeds")
# Which seeds a profile reports or selects on does not change any one run: not in its key.
UNKEYED_PROFILE_FIELDS = ("seeds", "selection_seeds")


def profile_key(profile: Profile) -> dict:
    """The profile's part of a run's key: protocol-1 profiles exactly as they always were."""
    d = asdict(profile)
    defaults = asdict(Profile(steps=0, batch_size=0, seeds=()))
    for name in NEW_PROFILE_FIELDS:
        if d[name] == defaults[name]:
            del d[name]
    if profile.protocol >= 2:
        for name in UNKEYED_PROFILE_FIELDS:
            d.pop(name, None)
    return d


@dataclass(frozen=True)
class RunSpec:
    method: str
    variant: tuple[tuple[str, float], ...]
    lr: float
    seed: int
    task: str
    r_eq: int
    profile: Profile
    model: str

    def key(self) -> str:
        spec = asdict(self) | {"profile": profile_key(self.profile)}
        parts = [CACHE_VERSION, spec, train_key(self.train_config()), package_versions()]
        revision = METHODS[self.method].revision
        if revision:  # absent at 0, so the keys of methods never revised stay as they were
            parts.append({"method_revision": revision})
        blob = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def train_config(self):
        from spalora.train import TrainConfig

        p = self.profile
        return TrainConfig(
            steps=p.steps,
            batch_size=p.batch_size,
            lora_lr=self.lr,
            sparse_lr=self.lr * METHODS[self.method].sparse_lr_ratio,
            lora_b_lr_ratio=METHODS[self.method].lora_b_lr_ratio,
            max_length=p.max_length,
            seed=self.seed,
            progress=False,
        )

    def label(self) -> str:
        variant = ",".join(f"{k}={v}" for k, v in self.variant)
        name = f"{self.method}[{variant}]" if variant else self.method
        return f"{self.task} r_eq={self.r_eq} {name} lr={self.lr:g} seed={self.seed}"


def spec_from_dict(d: dict) -> RunSpec:
    """The RunSpec that a cache record's `spec` (its asdict) was written from."""
    profile = {k: tuple(v) if isinstance(v, list) else v for k, v in d["profile"].items()}
    variant = tuple((str(k), v) for k, v in d["variant"])
    return RunSpec(
        d["method"],
        variant,
        d["lr"],
        d["seed"],
        d["task"],
        d["r_eq"],
        Profile(**profile),
        d["model"],
    )


# TrainConfig's fields when the cache began: always in the key. A field added since enters the
# key only when set away from its default, so adding an option (e.g. `distributed`) leaves the
# cached runs valid while a run that uses it gets a key of its own.
KEYED_TRAIN_FIELDS = (
    "steps", "batch_size", "lora_lr", "sparse_lr", "lr_warmup_steps", "max_grad_norm",
    "max_length", "seed", "progress", "checkpoint_dir", "checkpoint_every", "keep_last",
    "resume", "grad_accum", "log_path", "eval_every", "bf16", "tensorboard_dir", "overlong",
)  # fmt: skip


def train_key(cfg) -> dict:
    """The part of a TrainConfig that names a run in the cache (see KEYED_TRAIN_FIELDS)."""
    from dataclasses import fields

    defaults = type(cfg)()
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in KEYED_TRAIN_FIELDS or value != getattr(defaults, f.name):
            out[f.name] = value
    return out


def package_versions() -> dict[str, str]:
    """Versions that can change a result; part of every cache key."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("spalora", "torch", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


MAX_EXTENSIONS = 2  # grid points added past each edge at most


def next_lr(lr: float, up: bool) -> float:
    """The next point of the 1-3-10 ladder above or below `lr` (1e-3 -> 3e-3 -> 1e-2)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10**exponent)
    ladder = [1, 3]
    i = ladder.index(mantissa) if mantissa in ladder else 0
    step = i + (1 if up else -1)
    exponent += step // 2
    return float(f"{ladder[step % 2]}e{exponent}")


def grid(
    method: str, profile: Profile, r_eq: int, lr: float | None = None
) -> list[tuple[dict, float]]:
    """(variant, lr) settings tried at seed 0; `lr` fixes the rate (ablations, see lr_from)."""
    m = METHODS[method]
    lrs = m.lr_grid if profile.lr_index is None else (m.lr_grid[profile.lr_index],)
    if lr is not None:
        lrs = (lr,)
    variants = m.variants(r_eq)
    if profile.first_variant_only:  # quick: the middle setting
        variants = variants[len(variants) // 2 : len(variants) // 2 + 1]
    return [(v, lr) for v in variants for lr in lrs]


class Cache:
    """One JSON file per finished run under `root`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def get(self, spec: RunSpec) -> dict | None:
        path = self.root / f"{spec.key()}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, spec: RunSpec, result: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{spec.key()}.tmp"
        # the method's revision is in the key; the record states it too, so runs of different
        # revisions can be told apart once superseded (benchmarks/loss_curves.py)
        record = {"spec": asdict(spec), "revision": METHODS[spec.method].revision, "result": result}
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.root / f"{spec.key()}.json")


def run_one(
    spec: RunSpec,
    load_model: Callable,
    load_task: Callable,
    progress: bool,
    save_dir: str | Path | None = None,
    device: str = "cpu",
) -> dict:
    """Train one configuration and score it on validation and test (full fine-tuning runs are
    also saved under `save_dir`, for `python -m benchmarks analyze`; our method's adapters too,
    for `spalora plot`)."""
    from spalora.train import train

    model, tokenizer = load_model(spec.model)
    p = spec.profile
    task = load_task(spec.task)  # the split is fixed (seed 0): only training varies by seed
    budget = budget_params(model, spec.r_eq)
    cfg = replace(spec.train_config(), progress=progress)
    options = method_options(spec) | {"probe_batches": training_stream(tokenizer, task.train, cfg)}
    built = time.perf_counter()  # a method that probes data first (sparse-credit) pays here
    model = build_method(spec.method, model, spec.r_eq, options).to(device)
    build_seconds = time.perf_counter() - built
    n_trainable = trainable_params(model)
    # Our method trains over-provisioned and truncates to the budget: its count is checked
    # after training, and the training-time count is reported next to it.
    truncates = trains_over_budget(model)
    check_budget(spec, n_trainable, budget, before_truncation=truncates)
    peak_trainable = n_trainable
    started = time.perf_counter()
    try:
        trained = train(model, tokenizer, task.train, cfg)
        history = trained["history"]
    except FloatingPointError as exc:  # diverged: cached as such, never selected
        return diverged_result(exc, task.metric, n_trainable, budget)
    train_seconds = time.perf_counter() - started
    n_trainable = trainable_params(model)
    check_budget(spec, n_trainable, budget)
    if p.protocol >= 2:
        selecting = spec.seed in p.selection_seeds  # read for its validation NLL only
        scores = heldout.score(model, tokenizer, task, p, progress, test=not selecting)
    else:
        scores = score_v1(model, tokenizer, task, p, progress)
    losses = [h["loss"] for h in history if "loss" in h]
    allocation = final_allocation(model) if truncates else None
    saved = save_trained(spec, model, tokenizer, save_dir, truncates)
    return (
        scores
        | {
            "trainable_params": n_trainable,
            "peak_trainable_params": peak_trainable,
            "budget_params": budget,
            "adapter_bytes": adapter_bytes(model, spec.method),
            "train_seconds": train_seconds,
            "build_seconds": build_seconds,
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "finite": all(x == x for x in losses),
            "losses": [round(x, 4) for x in losses],  # the training curve, for diagnosis
            "saved_model": saved,
            "allocation": allocation,
            "budget_log": trained["budget_log"],  # our method: refreshes and the cut, for diagnosis
            "versions": package_versions(),
        }
        | ({} if str(device) == "cpu" else {"device": str(device)})
    )


def training_stream(tokenizer, examples, cfg) -> Callable:
    """() -> the run's own training micro-batches from its start, for a method that looks at
    data before it trains (sparse-credit's probe); the run's training is unaffected."""

    def stream():
        from spalora.data import batches, encode_examples

        encoded, _ = encode_examples(tokenizer, examples, cfg.max_length, cfg.overlong)
        pad = tokenizer.pad_token_id
        return batches(
            encoded, cfg.batch_size, tokenizer.eos_token_id if pad is None else pad, cfg.seed
        )

    return stream


def method_options(spec: RunSpec) -> dict:
    """The builder's options: the spec's variant plus the seed and the profile's mask settings."""
    p = spec.profile
    return dict(spec.variant) | {
        "seed": spec.seed,
        "warmup_steps": p.warmup_steps,
        "mask_batches": p.mask_batches,
    }


def trains_over_budget(model) -> bool:
    """Whether the wrapped model's method trains over the budget until it truncates to it."""
    return getattr(model, "spalora_config", None) is not None and (
        get_method(model.spalora_config.method).trains_over_budget
    )


def check_budget(spec: RunSpec, n_trainable: int, budget: int, before_truncation=False) -> None:
    """Raise when a run trains more than its budget (full fine-tuning has none; a method that
    truncates to the budget is checked once it has)."""
    if spec.method != "fft" and n_trainable > budget and not before_truncation:
        raise RuntimeError(f"{spec.label()}: {n_trainable:,} trainable > budget {budget:,}")


def diverged_result(exc: FloatingPointError, metric: str, n_trainable: int, budget: int) -> dict:
    """A diverged run's record: validation -inf so that it is never selected, test NaN."""
    return {
        "diverged": str(exc),
        "validation": float("-inf"),
        "test": float("nan"),
        "metric": metric,
        "trainable_params": n_trainable,
        "budget_params": budget,
        "versions": package_versions(),
    }


def final_allocation(model) -> dict[str, list[int]]:
    """Our method's final split: {layer: [out, in, r, nnz]}."""
    return {a.name: [a.out_features, a.in_features, a.r, a.nnz] for a in model.allocations}


def save_trained(spec: RunSpec, model, tokenizer, save_dir, truncates: bool) -> str | None:
    """Where the trained model went under `save_dir`, if it is one that is kept: full
    fine-tuning at protocol 1 (what `python -m benchmarks analyze --tuned` reads) and the
    adapters of a method that truncates (for `spalora plot ADAPTER`)."""
    if save_dir is None:
        return None
    if spec.method == "fft" and spec.profile.protocol < 2:
        saved = str(Path(save_dir) / f"fft-{spec.task}-lr{spec.lr:g}-seed{spec.seed}")
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        return saved
    if truncates:
        name = f"{spec.method}-{spec.task}-r{spec.r_eq}-lr{spec.lr:g}-seed{spec.seed}"
        saved = str(Path(save_dir) / name)
        model.save_pretrained(saved)
        return saved
    return None


def task_loader(profile: Profile) -> Callable:
    """name -> Task at the profile's protocol (its split always from seed 0)."""
    from spalora.tasks import get_task

    if profile.protocol >= 2:
        return lambda name: heldout.load_task(name, profile)
    return lambda name: get_task(name, seed=0)


def score_v1(model, tokenizer, task, p: Profile, progress: bool) -> dict:
    """Protocol 1: the task's metric on validation and test, with per-example test bits."""
    from spalora.evaluate import evaluate_task

    val = task.validation[: p.val_limit] if p.val_limit else task.validation
    test = task.test[: p.test_limit] if p.test_limit else task.test
    v = evaluate_task(model, tokenizer, task, val, progress=progress, desc="validation")
    t = evaluate_task(model, tokenizer, task, test, progress=progress, desc="test")
    return {
        "validation": v["value"],
        "test": t["value"],
        "test_correct": correct_bits(t["predictions"]),  # per example, for paired gaps
        "metric": t["metric"],
        "n_validation": v["n"],
        "n_test": t["n"],
    }


def adapter_bytes(model, method: str) -> int:
    """Bytes of the saved adapter file; for full fine-tuning, the fp32 weights it must store."""
    if method == "fft":
        return 4 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))


def run_benchmark(
    profile_name: str,
    tasks: list[str],
    budgets: list[int],
    methods: list[str],
    cache_dir: str | Path,
    model: str = "smollm2-135m",
    load_model: Callable | None = None,
    load_task: Callable | None = None,
    progress: bool = True,
    run_missing: bool = True,
    save_dir: str | Path | None = None,
) -> tuple[list[dict], list[dict]]:
    """Run (or read from the cache) every needed configuration.

    Returns the chosen setting's records (one per seed) and the seed-0 grid with its
    validation scores (what the choice was made on). With `run_missing=False` nothing is
    trained: the tables show what the cache holds (a method whose grid is unfinished is left out).
    """
    from spalora.hub import load_model_and_tokenizer

    load_model = load_model or load_model_and_tokenizer
    profile = PROFILES[profile_name]
    load_task = load_task or task_loader(profile)
    cache = Cache(cache_dir)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; available: {sorted(METHODS)}")
    bench = BenchmarkRuns(
        profile, model, cache, load_model, load_task, progress, run_missing, save_dir
    )
    for task in tasks:
        for r_eq in budgets:
            for method in methods:
                bench.select(task, r_eq, method)
    return bench.records, bench.grid_rows


def best_index(results: list[dict]) -> int:
    """The best validation score; on a tie, the setting tried first."""
    return max(range(len(results)), key=lambda i: (results[i]["validation"], -i))


class BenchmarkRuns:
    """One benchmark's runs, setting by setting: the seed-0 grid of each method, the choice on
    validation, then the reported seeds at the chosen setting. Holds the rates chosen so far
    (an ablation trains at its reference method's) and what the report is made from."""

    def __init__(
        self,
        profile: Profile,
        model: str,
        cache: Cache,
        load_model: Callable,
        load_task: Callable,
        progress: bool,
        run_missing: bool,
        save_dir: str | Path | None,
    ) -> None:
        self.profile = profile
        self.model = model
        self.cache = cache
        self.load_model = load_model
        self.load_task = load_task
        self.progress = progress
        self.run_missing = run_missing
        self.save_dir = save_dir
        self.chosen_lr: dict[tuple[str, int, str], float] = {}
        self.records: list[dict] = []
        self.grid_rows: list[dict] = []

    def ensure(self, spec: RunSpec) -> dict | None:
        """The run's result: from the cache, else trained and cached (None in report-only)."""
        found = self.cache.get(spec)
        if found is not None:
            return found["result"]
        if not self.run_missing:
            return None
        print(f"[bench] {spec.label()}", file=sys.stderr, flush=True)
        # looked up in this module at call time, so that tests can replace `run_one`
        result = run_one(spec, self.load_model, self.load_task, self.progress, self.save_dir)
        self.cache.put(spec, result)
        if "diverged" in result:
            line = f"[bench]   diverged: {result['diverged']}"
        else:
            line = (
                f"[bench]   validation {result['validation']:.4f} "
                f"test {result.get('test', float('nan')):.4f} "
                f"({result.get('train_seconds', 0):.0f} s)"
            )
        print(line, file=sys.stderr, flush=True)
        return result

    def fetch(self, spec: RunSpec, record: bool) -> dict | None:
        # a reference looked up for an ablation is only read, never trained, from here
        return self.ensure(spec) if record else (self.cache.get(spec) or {}).get("result")

    def seed0_specs(self, task: str, r_eq: int, method: str) -> list[RunSpec] | None:
        """The method's seed-0 grid (None while an ablation's reference has no chosen rate)."""
        fixed_lr = None
        ref = METHODS[method].lr_from
        if ref is not None:  # an ablation: the rate chosen for its reference method
            if (task, r_eq, ref) not in self.chosen_lr:
                self.select(task, r_eq, ref, record=False)
            fixed_lr = self.chosen_lr.get((task, r_eq, ref))
            if fixed_lr is None:
                return None
        run_r = 0 if method == "fft" else r_eq  # no budget: one set of runs for all
        settings = grid(method, self.profile, r_eq, fixed_lr)
        seed0 = self.profile.seeds[0]
        return [
            RunSpec(
                method, tuple(sorted(v.items())), lr, seed0, task, run_r, self.profile, self.model
            )
            for v, lr in settings
        ]

    def select(self, task: str, r_eq: int, method: str, record: bool = True) -> None:
        """Choose the method's setting on seed 0; with `record`, keep its grid and run the
        reported seeds at the choice (without, only the chosen rate is kept, for ablations)."""
        specs = self.seed0_specs(task, r_eq, method)
        if specs is None:
            return
        results = [self.fetch(s, record) for s in specs]
        if any(r is None for r in results):  # report-only: an unfinished grid
            return
        best = best_index(results)
        if self.profile.lr_index is None and METHODS[method].lr_from is None:
            best = self.extend_past_edge(specs, results, best, record)
            if best is None:  # report-only: the extension is not run yet
                return
        self.chosen_lr[(task, r_eq, method)] = specs[best].lr
        if not record:
            return
        for spec, r in zip(specs, results, strict=True):
            self.grid_rows.append(
                {
                    "spec": asdict(spec),
                    "budget": r_eq,
                    "validation": r["validation"],
                    "diverged": "diverged" in r,
                }
            )
        for seed in self.profile.seeds:
            spec = replace(specs[best], seed=seed)
            result = self.ensure(spec)
            if result is not None:
                self.records.append({"spec": asdict(spec), "budget": r_eq, "result": result})

    def extend_past_edge(
        self, specs: list[RunSpec], results: list[dict], best: int, record: bool
    ) -> int | None:
        """A choice on the grid's edge: try the next rate past it (for the chosen variant),
        until the best rate is inside the grid or MAX_EXTENSIONS were added on that side.
        Appends to `specs` and `results`; returns the best index (None: an extension is not
        in the cache and `record` is off or nothing may be trained)."""
        added = {True: 0, False: 0}
        while True:
            lrs = sorted({s.lr for s in specs})
            lr = specs[best].lr
            up = lr == lrs[-1]
            if len(lrs) < 2 or not (up or lr == lrs[0]) or added[up] >= MAX_EXTENSIONS:
                return best
            added[up] += 1
            spec = replace(specs[best], lr=next_lr(lr, up))
            result = self.fetch(spec, record)
            if result is None:
                return None
            specs.append(spec)
            results.append(result)
            best = best_index(results)


def read_cached(profile, tasks, budgets, methods, cache_dir, model: str = "smollm2-135m"):
    """The records `run_benchmark` would return, from the cache only."""
    return run_benchmark(
        profile, tasks, budgets, methods, cache_dir, model, progress=False, run_missing=False
    )
