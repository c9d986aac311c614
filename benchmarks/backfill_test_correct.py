"""Add per-example test results to cached benchmark runs recorded before they were kept.

Runs recorded without `test_correct` (which test examples a run got right) cannot be paired by
example in the report. A run whose trained model was saved (our method's adapters, full
fine-tuning checkpoints, under runs/bench-full/) is scored again on the test split; with
`--retrain`, a run without one is trained again from its cached configuration (its key must
still match: same code revision and package versions). Either way the record gains
`test_correct` only when the new test score equals the cached one exactly, so a saved model that
a later run overwrote, or a retrain that did not reproduce, is never attributed to the record.

    HF_HUB_OFFLINE=1 python -m benchmarks.backfill_test_correct --methods spalora --chosen
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m benchmarks.backfill_test_correct \\
        --methods rosa --chosen --task arithmetic --retrain   # ~10 minutes a run here

Retrain with the thread count the run had (the queues' one thread): the thread count changes
the floating-point summation order, and a run trained otherwise may not reproduce exactly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.accuracy import correct_bits, read_cached, run_one, spec_from_dict
from spalora.evaluate import evaluate_task
from spalora.hub import load_model_and_tokenizer
from spalora.model import SpaloraModel
from spalora.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent


def load_trained(method: str, model_name: str, saved: str):
    """The trained model a run saved: an adapter on the base, or a full checkpoint."""
    if method == "fft":
        from transformers import AutoModelForCausalLM

        _, tokenizer = load_model_and_tokenizer(model_name)
        return AutoModelForCausalLM.from_pretrained(saved), tokenizer
    base, tokenizer = load_model_and_tokenizer(model_name)
    return SpaloraModel.from_pretrained(base, saved), tokenizer


def chosen_keys(cache: Path, profile: str, found: list[dict]) -> set[str]:
    """Keys of the runs the report uses (each method's chosen setting, all its seeds)."""
    tasks = sorted({s["task"] for s in found})
    budgets = sorted({s["r_eq"] for s in found})
    methods = sorted({s["method"] for s in found})
    records, _ = read_cached(profile, tasks, budgets, methods, cache, found[0]["model"])
    return {spec_from_dict(r["spec"]).key() for r in records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(ROOT / "benchmarks/cache/accuracy-full"))
    ap.add_argument("--profile", default="full", help="the profile the cache holds")
    ap.add_argument("--methods", default="spalora", help="comma-separated method names")
    ap.add_argument("--task", help="only this task's runs")
    ap.add_argument("--lr", type=float, help="only runs at this learning rate")
    ap.add_argument("--chosen", action="store_true", help="only the runs the report uses")
    ap.add_argument("--retrain", action="store_true", help="train runs that saved no model")
    ap.add_argument("--dry-run", action="store_true", help="list the runs, score none")
    args = ap.parse_args()
    methods = set(args.methods.split(","))
    todo = []
    for path in sorted(Path(args.cache).glob("*.json")):
        record = json.loads(path.read_text())
        spec, result = record["spec"], record["result"]
        skip = result.get("test_correct") or "diverged" in result or "test" not in result
        if spec["method"] not in methods or skip:  # no test: a selection run, never scored
            continue
        if (args.task and spec["task"] != args.task) or (args.lr and spec["lr"] != args.lr):
            continue
        todo.append((path, record))
    if args.chosen and todo:
        keep = chosen_keys(Path(args.cache), args.profile, [r["spec"] for _, r in todo])
        todo = [(path, record) for path, record in todo if path.stem in keep]
    tasks: dict[str, object] = {}
    for path, record in todo:
        spec, result = record["spec"], record["result"]
        saved = result.get("saved_model")
        lr, seed = spec["lr"], spec["seed"]
        variant = ",".join(f"{k}={v}" for k, v in spec["variant"])
        label = f"{spec['method']}{f'[{variant}]' if variant else ''} {spec['task']} "
        label += f"r{spec['r_eq']} lr {lr:g} seed {seed}"
        has_model = bool(saved) and Path(saved).is_dir()
        if not has_model and not args.retrain:
            print(f"{label}: no saved model (--retrain trains it again)")
            continue
        run = spec_from_dict(spec)
        if not has_model and run.key() != path.stem:
            print(f"{label}: its configuration no longer gives its key; not retrained")
            continue
        if args.dry_run:
            print(f"{label}: would {'score ' + saved if has_model else 'train it again'}")
            continue
        if spec["task"] not in tasks:  # built once per task, not once per run
            tasks[spec["task"]] = get_task(spec["task"], seed=0)
        task = tasks[spec["task"]]
        if has_model:
            model, tokenizer = load_trained(spec["method"], spec["model"], saved)
            scored = evaluate_task(model, tokenizer, task, task.test, progress=False, desc="test")
            test, bits = scored["value"], correct_bits(scored["predictions"])
        else:
            again = run_one(run, load_model_and_tokenizer, tasks.__getitem__, progress=False)
            test, bits = again["test"], again.get("test_correct")
        if test != result["test"] or bits is None:
            print(
                f"{label}: test {test:.4f} now, {result['test']:.4f} when cached; not this "
                "run's result (left as it is)"
            )
            continue
        result["test_correct"] = bits
        path.write_text(json.dumps(record, indent=1))
        print(f"{label}: test {test:.4f} reproduced; per-example results added", flush=True)


if __name__ == "__main__":
    main()
