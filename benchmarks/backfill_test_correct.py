"""Add per-example test results to cached benchmark runs that saved their model.

Runs recorded before the harness kept `test_correct` (which test examples a run got right) cannot
be paired by example in the report. Those whose trained model was saved (our method's adapters,
full fine-tuning checkpoints, under runs/bench-full/) are scored again on the test split; the
record gains `test_correct` only when the new score equals the cached one exactly, so a saved
model that a later run overwrote is never attributed to the wrong record.

    HF_HUB_OFFLINE=1 python benchmarks/backfill_test_correct.py --methods spalora \
        --task arithmetic --lr 3e-3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spalora.bench.accuracy import correct_bits
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(ROOT / "benchmarks/cache/accuracy-full"))
    ap.add_argument("--methods", default="spalora", help="comma-separated method names")
    ap.add_argument("--task", help="only this task's runs")
    ap.add_argument("--lr", type=float, help="only runs at this learning rate")
    ap.add_argument("--dry-run", action="store_true", help="list the runs, score none")
    args = ap.parse_args()
    methods = set(args.methods.split(","))
    tasks: dict[str, object] = {}
    for path in sorted(Path(args.cache).glob("*.json")):
        record = json.loads(path.read_text())
        spec, result = record["spec"], record["result"]
        saved = result.get("saved_model")
        if spec["method"] not in methods or result.get("test_correct") or not saved:
            continue
        if (args.task and spec["task"] != args.task) or (args.lr and spec["lr"] != args.lr):
            continue
        lr, seed = spec["lr"], spec["seed"]
        label = f"{spec['method']} {spec['task']} r{spec['r_eq']} lr {lr:g} seed {seed}"
        if not Path(saved).is_dir():
            print(f"{label}: saved model {saved} is gone; left as it is")
            continue
        if args.dry_run:
            print(f"{label}: would score {saved}")
            continue
        task = tasks.setdefault(spec["task"], get_task(spec["task"], seed=0))
        model, tokenizer = load_trained(spec["method"], spec["model"], saved)
        scored = evaluate_task(model, tokenizer, task, task.test, progress=False, desc="test")
        if scored["value"] != result["test"]:
            print(
                f"{label}: test {scored['value']:.4f} now, {result['test']:.4f} when trained; "
                "the saved model is not this run's (left as it is)"
            )
            continue
        result["test_correct"] = correct_bits(scored["predictions"])
        path.write_text(json.dumps(record, indent=1))
        print(f"{label}: test {scored['value']:.4f} reproduced; per-example results added")


if __name__ == "__main__":
    main()
