"""`python -m benchmarks accuracy`: every method at the same budget, recipe and learning-rate grid.

Protocol (docs/results/accuracy.md says it again next to the numbers): for each task and
budget, each method trains once per (learning rate, variant) at seed 0 and is scored on the
validation split carved from the training data; the best setting is then trained with seeds 1
and 2, and the table reports the test metric's mean and standard deviation over the 3 seeds.
Every run is cached as one JSON file named by the hash of its full configuration, so a killed
benchmark continues where it stopped and the tables are rebuilt from the cache alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import heldout
from .methods import METHODS, budget_params, build_method, trainable_params

# Bump when a change alters results (recipe defaults, builders, tasks, evaluation): the key
# then changes for every run. The training settings and package versions are in the key too.
CACHE_VERSION = 2
CSV_COLUMNS = ("method", "r_eq", "task", "mean", "std", "n_seeds", "trainable_params")


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
    variant = dict(spec.variant) | {
        "seed": spec.seed,
        "warmup_steps": p.warmup_steps,
        "mask_batches": p.mask_batches,
    }
    budget = budget_params(model, spec.r_eq)
    model = build_method(spec.method, model, spec.r_eq, variant).to(device)
    n_trainable = trainable_params(model)
    # Our method trains over-provisioned and truncates to the budget: its count is checked
    # after training, and the training-time count is reported next to it.
    over_budget_until_truncation = getattr(model, "spalora_config", None) is not None and (
        model.spalora_config.method == "spalora"
    )
    if spec.method != "fft" and n_trainable > budget and not over_budget_until_truncation:
        raise RuntimeError(f"{spec.label()}: {n_trainable:,} trainable > budget {budget:,}")
    peak_trainable = n_trainable
    cfg = replace(spec.train_config(), progress=progress)
    started = time.perf_counter()
    try:
        trained = train(model, tokenizer, task.train, cfg)
        history = trained["history"]
    except FloatingPointError as exc:  # diverged: cached as such, never selected
        return {
            "diverged": str(exc),
            "validation": float("-inf"),
            "test": float("nan"),
            "metric": task.metric,
            "trainable_params": n_trainable,
            "budget_params": budget,
            "versions": package_versions(),
        }
    train_seconds = time.perf_counter() - started
    n_trainable = trainable_params(model)
    if spec.method != "fft" and n_trainable > budget:
        raise RuntimeError(f"{spec.label()}: {n_trainable:,} trainable > budget {budget:,}")
    if p.protocol >= 2:
        scores = heldout.score(model, tokenizer, task, p, progress)
    else:
        scores = score_v1(model, tokenizer, task, p, progress)
    losses = [h["loss"] for h in history if "loss" in h]
    saved = None
    allocation = None
    if over_budget_until_truncation:  # our method's final split: {layer: [out, in, r, nnz]}
        allocation = {
            a.name: [a.out_features, a.in_features, a.r, a.nnz] for a in model.allocations
        }
    # what `python -m benchmarks analyze --tuned` reads
    if spec.method == "fft" and save_dir is not None and p.protocol < 2:
        saved = str(Path(save_dir) / f"fft-{spec.task}-lr{spec.lr:g}-seed{spec.seed}")
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
    elif over_budget_until_truncation and save_dir is not None:  # for `spalora plot ADAPTER`
        saved = str(
            Path(save_dir) / f"{spec.method}-{spec.task}-r{spec.r_eq}-lr{spec.lr:g}-seed{spec.seed}"
        )
        model.save_pretrained(saved)
    return (
        scores
        | {
            "trainable_params": n_trainable,
            "peak_trainable_params": peak_trainable,
            "budget_params": budget,
            "adapter_bytes": adapter_bytes(model, spec.method),
            "train_seconds": train_seconds,
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


def cell(row: dict, seeds: int = 1) -> str:
    """Mean ± std in percent; a setting with fewer than `seeds` seeds done says how many."""
    if row["n_seeds"] < 2:
        return f"{100 * row['mean']:.1f} (seed 0 only)"
    text = f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"
    return text + (f" ({row['n_seeds']} seeds)" if row["n_seeds"] < seeds else "")


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

    def ensure(spec: RunSpec) -> dict | None:
        found = cache.get(spec)
        if found is not None:
            return found["result"]
        if not run_missing:
            return None
        print(f"[bench] {spec.label()}", file=sys.stderr, flush=True)
        result = run_one(spec, load_model, load_task, progress, save_dir)
        cache.put(spec, result)
        if "diverged" in result:
            line = f"[bench]   diverged: {result['diverged']}"
        else:
            line = (
                f"[bench]   validation {result['validation']:.4f} test {result['test']:.4f} "
                f"({result.get('train_seconds', 0):.0f} s)"
            )
        print(line, file=sys.stderr, flush=True)
        return result

    records, grid_rows = [], []
    mdl = model
    chosen_lr: dict[tuple[str, int, str], float] = {}

    def seed0_specs(task: str, r_eq: int, method: str) -> list[RunSpec] | None:
        fixed_lr = None
        ref = METHODS[method].lr_from
        if ref is not None:  # an ablation: the rate chosen for its reference method
            if (task, r_eq, ref) not in chosen_lr:
                select(task, r_eq, ref, record=False)
            fixed_lr = chosen_lr.get((task, r_eq, ref))
            if fixed_lr is None:
                return None
        run_r = 0 if method == "fft" else r_eq  # no budget: one set of runs for all
        settings = grid(method, profile, r_eq, fixed_lr)
        seed0 = profile.seeds[0]
        return [
            RunSpec(method, tuple(sorted(v.items())), lr, seed0, task, run_r, profile, mdl)
            for v, lr in settings
        ]

    def select(task: str, r_eq: int, method: str, record: bool = True) -> None:
        specs = seed0_specs(task, r_eq, method)
        if specs is None:
            return

        def fetch(spec: RunSpec) -> dict | None:
            # a reference looked up for an ablation is only read, never trained, from here
            return ensure(spec) if record else (cache.get(spec) or {}).get("result")

        results = [fetch(s) for s in specs]
        if any(r is None for r in results):  # report-only: an unfinished grid
            return
        best = max(range(len(specs)), key=lambda i: (results[i]["validation"], -i))
        # A choice on the grid's edge: try the next rate past it (for the chosen variant),
        # until the best rate is inside the grid or MAX_EXTENSIONS were added on that side.
        extend = profile.lr_index is None and METHODS[method].lr_from is None
        added = {True: 0, False: 0}
        while extend:
            lrs = sorted({s.lr for s in specs})
            lr = specs[best].lr
            up = lr == lrs[-1]
            if len(lrs) < 2 or not (up or lr == lrs[0]) or added[up] >= MAX_EXTENSIONS:
                break
            added[up] += 1
            spec = replace(specs[best], lr=next_lr(lr, up))
            result = fetch(spec)
            if result is None:  # report-only: the extension is not run yet
                return
            specs.append(spec)
            results.append(result)
            best = max(range(len(specs)), key=lambda i: (results[i]["validation"], -i))
        chosen_lr[(task, r_eq, method)] = specs[best].lr
        if not record:
            return
        for spec, r in zip(specs, results, strict=True):
            grid_rows.append(
                {
                    "spec": asdict(spec),
                    "budget": r_eq,
                    "validation": r["validation"],
                    "diverged": "diverged" in r,
                }
            )
        for seed in profile.seeds:
            spec = replace(specs[best], seed=seed)
            result = ensure(spec)
            if result is not None:
                records.append({"spec": asdict(spec), "budget": r_eq, "result": result})

    for task in tasks:
        for r_eq in budgets:
            for method in methods:
                select(task, r_eq, method)
    return records, grid_rows


def summarize(records: list[dict]) -> list[dict]:
    """One row per (method, r_eq, task): mean/std of the test metric over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        s = rec["spec"]
        groups.setdefault((s["method"], rec.get("budget", s["r_eq"]), s["task"]), []).append(rec)
    rows = []
    for (method, r_eq, task), recs in groups.items():
        tests = [r["result"]["test"] for r in recs]  # a diverged seed counts as NaN, visibly
        spec = recs[0]["spec"]
        rows.append(
            {
                "method": method,
                "r_eq": r_eq,
                "task": task,
                "mean": statistics.fmean(tests),
                "std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                "n_seeds": len(tests),
                "trainable_params": recs[0]["result"]["trainable_params"],
                "peak_trainable_params": recs[0]["result"].get(
                    "peak_trainable_params", recs[0]["result"]["trainable_params"]
                ),
                "adapter_bytes": recs[0]["result"].get("adapter_bytes", 0),
                "lr": spec["lr"],
                "variant": dict(spec["variant"]),
                "metric": recs[0]["result"]["metric"],
                "validation": recs[0]["result"]["validation"],
                "n_test": recs[0]["result"].get("n_test", 0),
            }
        )
    return rows


def rank_share(allocation: dict) -> float:
    """The share of a final split's parameters spent on rank ({layer: [out, in, r, nnz]})."""
    rank = sum(r * (o + i) for o, i, r, _ in allocation.values())
    return rank / max(1, sum(r * (o + i) + k for o, i, r, k in allocation.values()))


def split_summary(records: list[dict], method: str = "spalora") -> list[dict]:
    """How our method split the budget, per (task, r_eq), averaged over the chosen setting's
    seeds: the share of the budget spent on rank, and mean rank / density per module type."""
    from spalora.plot import block_and_kind

    groups: dict[tuple[str, int], list[dict]] = {}
    for rec in records:
        alloc = rec["result"].get("allocation")
        if rec["spec"]["method"] == method and alloc:
            groups.setdefault((rec["spec"]["task"], rec["budget"]), []).append(alloc)
    out = []
    for (task, r_eq), allocs in sorted(groups.items()):
        kinds: dict[str, list[float]] = {}
        blocks: dict[str, list[float]] = {}
        for alloc in allocs:
            for name, (o, i, r, k) in alloc.items():
                block, kind = block_and_kind(name)
                kinds.setdefault(kind, []).append((r, k / (o * i)))
                blocks.setdefault(block, []).append((r, k / (o * i)))

        def means(cells: dict) -> dict[str, tuple[float, float]]:
            return {
                key: (
                    statistics.fmean(r for r, _ in v),
                    statistics.fmean(d for _, d in v),
                )
                for key, v in cells.items()
            }

        out.append(
            {
                "task": task,
                "r_eq": r_eq,
                "seeds": len(allocs),
                "rank_share": statistics.fmean(rank_share(a) for a in allocs),
                "by_kind": means(kinds),
                "by_block": means(blocks),
            }
        )
    return out


def correct_bits(predictions: list[dict]) -> str | None:
    """Which test examples a run got right, as a string of 0s and 1s in test-set order (None
    when the metric is not right-or-wrong per example)."""
    marks = [p["correct"] for p in predictions]
    if not marks or any(m not in (0, 1) for m in marks):
        return None
    return "".join("1" if m else "0" for m in marks)


def paired_gap(a: dict[int, dict], b: dict[int, dict]) -> dict | None:
    """Test score of A minus B on the same test examples, over the seeds both ran, with its
    standard error over the examples. Each example's difference (A's share of seeds that got
    it right minus B's) is one sample, so examples that both get right or both miss add no
    noise: far tighter than the unpaired error of two scores when methods mostly agree.
    `per_seed` is the gap of each seed's pair (in seed order): whether it holds across seeds.
    None when either side lacks per-example results (runs recorded before they were kept)."""
    seeds = sorted(
        s
        for s in set(a) & set(b)
        if a[s].get("test_correct")
        and b[s].get("test_correct")
        and len(a[s]["test_correct"]) == len(b[s]["test_correct"])
    )
    if not seeds:
        return None
    n = len(a[seeds[0]]["test_correct"])
    if any(len(a[s]["test_correct"]) != n for s in seeds):
        return None
    by_seed = [  # one row per seed: each example's difference, A right minus B right
        [int(x) - int(y) for x, y in zip(a[s]["test_correct"], b[s]["test_correct"], strict=True)]
        for s in seeds
    ]
    diff = [statistics.fmean(col) for col in zip(*by_seed, strict=True)]  # per example
    per_seed = [statistics.fmean(row) for row in by_seed]
    gap = statistics.fmean(diff)
    se = statistics.stdev(diff) / math.sqrt(n) if n > 1 else math.inf
    return {"gap": gap, "se": se, "n": n, "seeds": len(seeds), "per_seed": per_seed}


def results_by_seed(records: Iterable[dict]) -> dict[tuple[int, str, str], dict[int, dict]]:
    """{(r_eq, task, method): {seed: result}}: the runs of one setting, for pairing by seed."""
    by: dict[tuple[int, str, str], dict[int, dict]] = {}
    for rec in records:
        s = rec["spec"]
        key = (rec.get("budget", s["r_eq"]), s["task"], s["method"])
        by.setdefault(key, {})[s["seed"]] = rec["result"]
    return by


def paired_gap_summary(records: list[dict], reference: str = "spalora") -> list[dict]:
    """`reference` against every other method, each of its ablations against it, and each
    control against the methods it names (`Method.compare_with`), per (r_eq, task), where both
    kept per-example test results (see paired_gap)."""
    ablations = {n for n, m in METHODS.items() if m.lr_from == reference}
    by = results_by_seed(records)
    order = list(METHODS)
    rows = []
    for (r_eq, task, other), runs in sorted(
        by.items(), key=lambda kv: (kv[0][0], kv[0][1], order.index(kv[0][2]))
    ):
        ref = by.get((r_eq, task, reference))
        if other == reference or ref is None:
            continue
        pair = ((other, runs), (reference, ref))  # an ablation minus ours, else ours minus it
        (a, a_runs), (b, b_runs) = pair if other in ablations else pair[::-1]
        gap = paired_gap(a_runs, b_runs)
        if gap is not None:
            rows.append({"r_eq": r_eq, "task": task, "a": a, "b": b, **gap})
    for (r_eq, task, control), runs in sorted(by.items(), key=lambda kv: kv[0]):
        for other in METHODS[control].compare_with:
            gap = paired_gap(runs, by.get((r_eq, task, other), {}))
            if gap is not None:
                rows.append({"r_eq": r_eq, "task": task, "a": control, "b": other, **gap})
    return rows


def paired_gap_lines(rows: list[dict]) -> list[str]:
    """The paired-gap table of accuracy.md (nothing while no pair has per-example results)."""
    if not rows:
        return []
    lines = [
        "",
        "## Paired test gaps (the same test examples)",
        "",
        "A - B: the difference of the two methods' test scores, averaged over the seeds both "
        "ran, with its standard error over the test examples when each example's difference is "
        "taken as one sample (paired: examples both methods get right, or both miss, add no "
        "noise). Only runs that kept per-example results take part; earlier runs did not. "
        "The paired SE counts the test set's sampling only, not training noise: two runs "
        "with the same batches whose paths drift apart (any change to the method does that) "
        "differ by chance too, so a gap needs to hold across seeds and tasks, not just "
        "exceed this SE, before it says one method is better. The last column is the gap of "
        "each seed's pair on its own (seeds in order): it shows whether the gap holds.",
        "",
        "| r_eq | task | A - B | seeds | examples | gap (points) | paired SE | gap / SE "
        "| per seed |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        z = r["gap"] / r["se"] if r["se"] > 0 else math.nan
        each = " / ".join(f"{100 * g:+.1f}" for g in r["per_seed"])
        lines.append(
            f"| {r['r_eq']} | {r['task']} | {r['a']} - {r['b']} | {r['seeds']} | {r['n']} | "
            f"{100 * r['gap']:+.1f} | {100 * r['se']:.1f} | {z:+.1f} | {each} |"
        )
    return lines


LOSS_TAIL = 0.2  # the training loss is compared over this last fraction of the steps


def ablation_summary(records: list[dict], reference: str = "spalora") -> list[dict]:
    """Our method and each of its ablations, per (r_eq, task): test score and training loss
    over the last LOSS_TAIL of the run, both also as differences to `reference` paired by seed
    (a seed fixes the batches, so a paired difference drops the data order's noise), with the
    rank share of the final split and the share of the adapters' squared norm the cut removed.
    The test score is noisy (see the precision note); the paired training loss is far less so,
    and tells whether a part of the method changes what training reaches at all. Diverged runs
    (no finite test score) are counted apart and left out of every mean and pair."""
    ours = {reference} | {n for n, m in METHODS.items() if m.lr_from == reference}
    by = results_by_seed(r for r in records if r["spec"]["method"] in ours)

    def finite(result: dict) -> bool:
        return math.isfinite(result["test"])

    def tail_loss(result: dict) -> float | None:
        losses = result.get("losses")
        if not losses:
            return None
        return statistics.fmean(losses[-max(1, round(LOSS_TAIL * len(losses))) :])

    def cut(result: dict) -> float | None:
        log = result.get("budget_log") or []
        return next((e["truncated_fraction"] for e in log if "truncated_fraction" in e), None)

    def mean_of(values) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    def paired(runs: dict, ref: dict, value) -> tuple[float | None, int]:
        pairs = [(value(runs[s]), value(ref[s])) for s in runs if s in ref]
        diffs = [a - b for a, b in pairs if a is not None and b is not None]
        return mean_of(diffs), len(diffs)

    rows = []
    order = list(METHODS)
    for (r_eq, task, method), seeds in sorted(
        by.items(), key=lambda kv: (kv[0][0], kv[0][1], order.index(kv[0][2]))
    ):
        runs = {s: r for s, r in seeds.items() if finite(r)}
        ref = {s: r for s, r in by.get((r_eq, task, reference), {}).items() if finite(r)}
        d_test, n_pairs = paired(runs, ref, lambda r: r["test"])
        d_loss, n_loss_pairs = paired(runs, ref, tail_loss)
        is_ref = method == reference
        rows.append(
            {
                "r_eq": r_eq,
                "task": task,
                "method": method,
                "seeds": len(runs),
                "diverged": len(seeds) - len(runs),
                "test": mean_of(r["test"] for r in runs.values()),
                "tail_loss": mean_of(tail_loss(r) for r in runs.values()),
                "d_test": None if is_ref else d_test,
                "d_loss": None if is_ref else d_loss,
                "pairs": None if is_ref else n_pairs,
                "loss_pairs": None if is_ref else n_loss_pairs,
                "rank_share": mean_of(
                    rank_share(r["allocation"]) if r.get("allocation") else None
                    for r in runs.values()
                ),
                "cut": mean_of(cut(r) for r in runs.values()),
            }
        )
    return rows


def ablation_lines(rows: list[dict], reference: str = "spalora") -> list[str]:
    """The ablation table of accuracy.md (nothing while no ablation has a run)."""
    if all(r["method"] == reference for r in rows):
        return []

    def num(value: float | None, fmt: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(scale * value, fmt)

    lines = [
        "",
        f"## Our method's ablations (each at the learning rate chosen for {reference})",
        "",
        f"Seeds: runs with a finite test score (diverged ones counted apart). Δ: difference to "
        f"`{reference}` paired by seed (the same batches), averaged over the pairs. Training "
        f"loss: mean over the last {LOSS_TAIL:.0%} of the steps (a Δ over fewer pairs than the "
        "test's shows their number). Rank share: the share of the final split's parameters "
        "spent on rank. Cut: the share of the adapters' squared norm the truncation removed. "
        "'-': not recorded (the cut: runs from before the controller's log was kept).",
        "",
        "| r_eq | task | method | what it changes | seeds | paired | test | Δ test | "
        "train loss | Δ train loss | rank share | cut |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        what = METHODS[r["method"]].description.split(": ", 1)[-1]
        seeds = f"{r['seeds']}" + (f" + {r['diverged']} diverged" if r["diverged"] else "")
        d_loss = num(r["d_loss"], "+.3f")
        if r["d_loss"] is not None and r["loss_pairs"] != r["pairs"]:
            d_loss += f" ({r['loss_pairs']})"
        lines.append(
            f"| {r['r_eq']} | {r['task']} | {r['method']} | {what} | {seeds} | "
            f"{'-' if r['pairs'] is None else r['pairs']} | {num(r['test'], '.1f', 100)} | "
            f"{num(r['d_test'], '+.1f', 100)} | {num(r['tail_loss'], '.3f')} | {d_loss} | "
            f"{num(r['rank_share'], '.0%')} | {num(r['cut'], '.1%')} |"
        )
    return lines


def plot_splits(splits: list[dict], path: Path) -> Path:
    """Mean rank and density per module type and per block, one line per (task, r_eq)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    for s in splits:
        label = f"{s['task']}, r_eq = {s['r_eq']} (rank share {100 * s['rank_share']:.0f}%)"
        kinds = list(s["by_kind"])
        short = [k.rsplit(".", 1)[-1].removesuffix("_proj") for k in kinds]
        blocks = sorted(s["by_block"], key=lambda b: int(b) if b.isdigit() else -1)
        for col, (keys, ticks, cells) in enumerate(
            ((kinds, short, s["by_kind"]), (blocks, blocks, s["by_block"]))
        ):
            for row in (0, 1):
                values = [cells[k][row] * (100 if row else 1) for k in keys]
                axes[row, col].plot(ticks, values, marker="o", ms=3, label=label)
    axes[0, 0].set_ylabel("mean rank")
    axes[1, 0].set_ylabel("mean sparse density (%)")
    axes[1, 0].set_xlabel("module type")
    axes[1, 1].set_xlabel("block")
    for ax in axes[:, 1]:
        ax.tick_params(axis="x", labelsize=6)
    axes[0, 0].set_title("our method's split, by module type")
    axes[0, 1].set_title("by block (mean over module types)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def precision_note(rows: list[dict], tasks: list[str]) -> list[str]:
    """How far apart two test scores must be to mean anything: the binomial standard error of
    one run's score on each task's test set, at the task's median score over the table."""
    parts = []
    for task in tasks:
        # a diverged seed makes its row's mean NaN: such rows say nothing about the score level
        cells = [
            r for r in rows if r["task"] == task and r.get("n_test") and math.isfinite(r["mean"])
        ]
        if not cells:
            continue
        n = cells[0]["n_test"]
        p = statistics.median(r["mean"] for r in cells)
        se = 100 * math.sqrt(p * (1 - p) / n)
        parts.append(
            f"{task}: {n} test examples, ±{se:.1f} points at {100 * p:.0f}% "
            f"(a difference of two scores: ±{math.sqrt(2) * se:.1f})"
        )
    if not parts:
        return []
    return [
        "Precision of a test score (binomial standard error over the test set; a mean over "
        "seeds averages out training noise, not the test set's): "
        + "; ".join(parts)
        + ". A gap between two methods under about twice its standard error is not evidence "
        "that one is better.",
        "",
    ]


def write_report(
    rows: list[dict],
    grid_rows: list[dict],
    out_dir: str | Path,
    profile: str,
    command: str,
    records: list[dict] | None = None,
) -> list[Path]:
    """accuracy.md (tables), accuracy.csv (CSV_COLUMNS exactly) and accuracy.png (bars with
    error bars), all from the cached runs; with `records`, also our method's budget split
    (a table in accuracy.md and allocation.png)."""
    import csv
    import platform

    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["r_eq"], list(METHODS).index(r["method"]), r["task"]))
    with open(out / "accuracy.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "mean": f"{r['mean']:.4f}", "std": f"{r['std']:.4f}"})
    n_seeds = len(PROFILES[profile].seeds) if profile in PROFILES else 1
    tasks = sorted({r["task"] for r in rows})
    lines = [
        f"# Accuracy at equal budget ({profile} profile)",
        "",
        f"Produced by `{command}` from the cached runs in the benchmark cache (each run "
        "records the package versions it trained with); "
        f"machine: {platform.machine()} CPU, torch {torch.__version__}. "
        "Do not edit: rerun the command.",
        "",
        "Test metric (accuracy for bbc-topic, exact match for arithmetic), mean ± std over "
        "seeds, at the learning rate (and RoSA rank fraction) chosen on the validation split "
        "with seed 0. Budget r_eq: at most r_eq * sum(in + out) trainable parameters over the "
        "adapted layers (fft: every parameter, the reference). 'While training': the most "
        "trainable parameters during the run (our method trains over-provisioned, 1.5x LoRA's "
        "rank at the budget plus 1.5x the nonzeros of RoSA's even split, until it truncates to "
        "the budget at half the run).",
        "",
        *precision_note(rows, tasks),
    ]
    for r_eq in sorted({r["r_eq"] for r in rows}):
        part = [r for r in rows if r["r_eq"] == r_eq]
        lines += [
            f"## r_eq = {r_eq}",
            "",
            "| method | trainable params | while training | adapter file bytes | "
            + " | ".join(tasks)
            + " | average | seeds |",
            "| --- | ---: | ---: | ---: | "
            + " | ".join("---:" for _ in tasks)
            + " | ---: | ---: |",
        ]
        for method in dict.fromkeys(r["method"] for r in part):
            cells = {r["task"]: r for r in part if r["method"] == method}
            means = [cells[t]["mean"] for t in tasks if t in cells]
            avg = f"{100 * statistics.fmean(means):.1f}" if len(means) == len(tasks) else "-"
            any_row = next(iter(cells.values()))
            lines.append(
                f"| {method} | {any_row['trainable_params']:,} | "
                f"{any_row['peak_trainable_params']:,} | {any_row['adapter_bytes']:,} | "
                + " | ".join(cell(cells[t], n_seeds) if t in cells else "-" for t in tasks)
                + f" | {avg} | {min(c['n_seeds'] for c in cells.values())} |"
            )
        lines.append("")
    lines += [
        "## Selection (seed 0, validation split)",
        "",
        "| task | r_eq | method | variant | lr | validation | chosen |",
        "| --- | ---: | --- | --- | ---: | ---: | :---: |",
    ]
    chosen = {(r["task"], r["r_eq"], r["method"], r["lr"], json.dumps(r["variant"])) for r in rows}
    for g in grid_rows:
        s = g["spec"]
        variant = dict(s["variant"])
        budget = g.get("budget", s["r_eq"])
        key = (s["task"], budget, s["method"], s["lr"], json.dumps(variant))
        score = "diverged" if g.get("diverged") else f"{100 * g['validation']:.1f}"
        lines.append(
            f"| {s['task']} | {budget} | {s['method']} | "
            f"{', '.join(f'{k}={v}' for k, v in variant.items()) or '-'} | {s['lr']:g} | "
            f"{score} | {'x' if key in chosen else ''} |"
        )
    splits = split_summary(records or [])
    if splits:
        kinds = list(dict.fromkeys(k for s in splits for k in s["by_kind"]))
        short = [k.rsplit(".", 1)[-1] for k in kinds]
        lines += [
            "",
            "## Our method's split of the budget (after truncation, mean over seeds)",
            "",
            "Per-layer ranks and nonzeros are chosen by the global threshold, not set by hand; "
            "plot: allocation.png. Cells: mean rank / mean sparse density (%) of that module "
            "type over the blocks.",
            "",
            "| task | r_eq | seeds | rank share of budget | " + " | ".join(short) + " |",
            "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in kinds) + " |",
        ]
        for s in splits:
            cells = [
                f"{s['by_kind'][k][0]:.1f} / {100 * s['by_kind'][k][1]:.2f}"
                if k in s["by_kind"]
                else "-"
                for k in kinds
            ]
            lines.append(
                f"| {s['task']} | {s['r_eq']} | {s['seeds']} | {100 * s['rank_share']:.0f}% | "
                + " | ".join(cells)
                + " |"
            )
    lines += ablation_lines(ablation_summary(records or []))
    lines += paired_gap_lines(paired_gap_summary(records or []))
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    paths = [out / "accuracy.md", out / "accuracy.csv", plot_accuracy(rows, out / "accuracy.png")]
    if splits:
        paths.append(plot_splits(splits, out / "allocation.png"))
    return paths


def method_color(name: str) -> str:
    """Grey: the reference; orange: PEFT's; green: our method and its ablations; blue: ours."""
    if name == "fft":
        return "#999999"
    if name.startswith("peft"):
        return "#d08c2b"
    return "#2e7d32" if name.startswith("spalora") else "#1f4e79"


def plot_accuracy(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["r_eq"], r["task"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (r_eq, task) in zip(axes[0], panels, strict=True):
        part = [r for r in rows if r["r_eq"] == r_eq and r["task"] == task]
        names = [r["method"] for r in part]
        ax.bar(
            names,
            [100 * r["mean"] for r in part],
            yerr=[100 * r["std"] for r in part],
            capsize=3,
            color=[method_color(n) for n in names],
        )
        ax.set_title(f"{task}, r_eq = {r_eq}")
        ax.set_ylabel("test metric (%)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_cached(profile, tasks, budgets, methods, cache_dir, model: str = "smollm2-135m"):
    """The records `run_benchmark` would return, from the cache only."""
    return run_benchmark(
        profile, tasks, budgets, methods, cache_dir, model, progress=False, run_missing=False
    )
