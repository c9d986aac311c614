"""The base model's score on a task's evaluation examples, cached per model and examples.

A zero-shot score depends only on the base model (its files), the examples and how they are
evaluated, so every run of the same model and task after the first reads it back instead of
spending minutes on it. The key hashes all of those; a changed model folder gets a new key.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ..hub import cache_dir, resolve_model_path


def model_identity(name: str) -> dict[str, Any]:
    """The model's name and, for a local folder (the embedded model's too), its files' sizes
    and modification times: what a cached score was computed from."""
    try:
        folder = Path(resolve_model_path(name))
    except (OSError, ImportError):  # e.g. the embedded model's package is missing
        return {"name": name}
    if not folder.is_dir():
        return {"name": name}
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return {
        "name": name,
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def cache_path(model: str, task, examples, settings: dict[str, Any]) -> Path:
    """Where the zero-shot score of `model` on these `examples` of `task` is kept."""
    blob = json.dumps(
        {
            "model": model_identity(model),
            "task": task.name,
            "metric": task.metric,
            "examples": [[ex.prompt, ex.target] for ex in examples],
            **settings,
        },
        sort_keys=True,
        default=str,
    )
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    return cache_dir() / "zero-shot" / f"{task.name}-{key}.json"


def read_cached(path: Path) -> dict | None:
    """A cached {"metric", "value", "n"}, or None when absent or unreadable."""
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and "value" in row else None


def write_cached(path: Path, row: dict) -> None:
    """Keep a score for later runs; a cache that cannot be written is skipped, not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row))
    except OSError:
        pass


def base_score(
    model,
    tokenizer,
    task,
    examples,
    model_name: str,
    settings: dict[str, Any],
    progress: bool,
    resumed: Path | None = None,
    write: bool = True,
) -> tuple[dict, str]:
    """The base model's score on `examples`: a resumed run's own (`resumed`), else the cached
    one, else evaluated and cached (`write`: this process writes files). Returns the row
    {"metric", "value", "n"} and where it came from."""
    from ..evaluate import evaluate_task

    path = cache_path(model_name, task, examples, settings)
    for source in (resumed, path):
        row = read_cached(source) if source is not None else None
        if row is not None:
            return row, f"cached: {source}"
    started = time.perf_counter()
    result = evaluate_task(
        model, tokenizer, task, examples, settings["batch_size"], progress, "zero-shot eval"
    )
    row = {"metric": task.metric, "value": result["value"], "n": result["n"]}
    if write:
        write_cached(path, row)
    return row, f"{time.perf_counter() - started:.0f} s; cached for later runs"
