"""`python -m benchmarks runs`: train (or find in the cache) named runs at a fixed rate, seed by
seed: the pilots of protocol 2 (seed noise, admission of conditions) are lists of such runs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from .accuracy import PROFILES, Cache, RunSpec, run_one, task_loader
from .methods import METHODS


def parse_seeds(text: str) -> list[int]:
    """'1-8' -> [1..8]; '1,3,5' -> [1, 3, 5]."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


def parse_variant(items: list[str]) -> tuple[tuple[str, float], ...]:
    """['rank_fraction=0.5'] -> (('rank_fraction', 0.5),)."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--variant takes KEY=VALUE, got {item!r}")
        out.append((key, float(value)))
    return tuple(sorted(out))


def specs_for(
    profile: str, task: str, r_eq: int, method: str, lr: float, seeds: list[int], variant=()
) -> list[RunSpec]:
    """The runs named; full fine-tuning has no budget (its runs are filed under r_eq 0)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; available: {sorted(PROFILES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    if lr <= 0 or lr != lr:
        raise ValueError(f"--lr must be a positive number, got {lr}")
    run_r = 0 if method == "fft" else r_eq
    p = PROFILES[profile]
    return [RunSpec(method, variant, lr, s, task, run_r, p, "smollm2-135m") for s in seeds]


def fetch_or_train(
    cache: Cache, spec: RunSpec, train: Callable[[RunSpec], dict] | None, tag: str = "runs"
) -> dict | None:
    """The spec's cached result; else, with `train`, its freshly trained (and cached) result;
    else None (report-only)."""
    if (found := cache.get(spec)) is not None:
        return found["result"]
    if train is None:
        return None
    print(f"[{tag}] {spec.label()}", file=sys.stderr, flush=True)
    result = train(spec)
    cache.put(spec, result)
    line = f"diverged: {result['diverged']}" if "diverged" in result else summary_line(result)
    print(f"[{tag}]   {line}", file=sys.stderr, flush=True)
    return result


def ensure_runs(
    specs: list[RunSpec],
    cache_dir: str | Path,
    load_model: Callable | None = None,
    progress: bool = False,
    load_task: Callable | None = None,
    device: str = "cpu",
) -> list[dict]:
    """Each spec's cached result, training the missing ones in order (each cached on finish)."""
    from spalora.hub import load_model_and_tokenizer

    load_model = load_model or load_model_and_tokenizer
    cache = Cache(cache_dir)

    def train(spec: RunSpec) -> dict:
        loader = load_task or task_loader(spec.profile)
        return run_one(spec, load_model, loader, progress, device=device)

    return [fetch_or_train(cache, spec, train) for spec in specs]


def summary_line(result: dict) -> str:
    nll = result.get("test_nll_mean")
    if "test" in result:
        head = (f"test nll {nll:.4f} " if nll is not None else "") + f"test {result['test']:.4f}"
    else:  # a selection seed's run: validation only
        head = f"validation nll {result['validation_nll_mean']:.4f}"
    return (
        f"{head} (train {result.get('train_seconds', 0):.0f} s, "
        f"eval {result.get('eval_seconds', 0):.0f} s)"
    )
