"""Training-loss curves of cached accuracy runs, windowed and averaged over seeds.

The test scores of two methods are a few hundred examples apart in noise; their training losses
on the same seed are not (a seed fixes the batches), so the curves show whether a change alters
what training reaches. Reads the benchmark cache, including runs of earlier method revisions kept
under `superseded/`, and prints one row per (method, revision, variant, learning rate):

    python -m benchmarks.loss_curves --task arithmetic --methods spalora,rosa,peft-lora \
        --chosen --plot runs/loss-arithmetic.png

"rev" is the method revision a run was trained at (`Method.revision`; each record states it).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.accuracy import LOSS_TAIL
from benchmarks.methods import METHODS


def load(cache: Path, task: str, methods: list[str] | None) -> dict[tuple, dict[int, list]]:
    groups: dict[tuple, dict[int, list]] = {}
    for path in sorted(cache.glob("*.json")) + sorted(cache.glob("superseded/*.json")):
        record = json.loads(path.read_text())
        s, losses = record["spec"], record["result"].get("losses")
        if s["task"] != task or not losses or (methods and s["method"] not in methods):
            continue
        variant = ",".join(f"{k}={v}" for k, v in s["variant"]) or "-"
        key = (s["method"], str(record.get("revision", "?")), variant, s["lr"], s["r_eq"])
        groups.setdefault(key, {})[s["seed"]] = losses
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--methods", help="comma-separated (default: all)")
    ap.add_argument("--cache", default="benchmarks/cache/accuracy-full")
    ap.add_argument("--window", type=int, default=15, help="steps per window")
    ap.add_argument(
        "--tail", type=float, default=LOSS_TAIL, help="last fraction of steps to average"
    )
    ap.add_argument("--seeds", help="only these seeds, e.g. 0 (default: all)")
    ap.add_argument("--chosen", action="store_true", help="only settings trained with >1 seed")
    ap.add_argument("--plot", help="also draw the curves to this PNG")
    args = ap.parse_args()
    methods = args.methods.split(",") if args.methods else None
    groups = load(Path(args.cache), args.task, methods)
    if args.chosen:  # before --seeds, so "--chosen --seeds 0" is seed 0 of the chosen settings
        groups = {k: g for k, g in groups.items() if len(g) > 1}
    if args.seeds:
        keep = {int(x) for x in args.seeds.split(",")}
        groups = {k: {s: v for s, v in g.items() if s in keep} for k, g in groups.items()}
    groups = {k: g for k, g in groups.items() if g}
    if not groups:
        raise SystemExit(f"no cached runs with losses for task {args.task!r} and those filters")
    lengths = {len(v) for g in groups.values() for v in g.values()}
    if len(lengths) > 1:
        raise SystemExit(
            f"the selected runs have different lengths ({sorted(lengths)} steps); "
            "narrow them with --methods or --seeds"
        )
    (steps,) = lengths
    starts = list(range(0, steps - args.window + 1, args.window))
    print(f"Training loss on {args.task}, mean over the seeds listed, {args.window}-step windows")
    print()
    print(
        "| method | rev | variant | lr | r_eq | seeds | "
        + " | ".join(f"{a}-{a + args.window}" for a in starts)
        + f" | last {args.tail:.0%} |"
    )
    print("| --- | --- | --- | ---: | ---: | --- | " + "---: | " * (len(starts) + 1))
    curves = {}

    def order(key: tuple) -> tuple:
        method, rev, variant, lr, r_eq = key
        rank = list(METHODS).index(method) if method in METHODS else len(METHODS)
        return rank, int(rev) if rev.isdigit() else -1, variant, lr, r_eq

    for key in sorted(groups, key=order):
        runs = groups[key]
        mean = [statistics.fmean(v[i] for v in runs.values()) for i in range(steps)]
        curves[key] = mean
        windows = [statistics.fmean(mean[a : a + args.window]) for a in starts]
        tail = statistics.fmean(mean[-max(1, round(args.tail * steps)) :])
        method, rev, variant, lr, r_eq = key
        print(
            f"| {method} | {rev} | {variant} | {lr:g} | {r_eq} | "
            f"{','.join(map(str, sorted(runs)))} | "
            + " | ".join(f"{w:.3f}" for w in windows)
            + f" | {tail:.3f} |"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 5))
        smooth = max(1, args.window // 3)
        for (method, rev, variant, lr, _), mean in curves.items():
            xs = range(smooth - 1, steps)
            ys = [statistics.fmean(mean[i - smooth + 1 : i + 1]) for i in xs]
            ax.plot(xs, ys, label=f"{method} rev {rev} {variant} lr {lr:g}", lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss (mean over seeds, {smooth}-step moving average)")
        ax.set_title(f"{args.task}: training loss of cached runs")
        ax.legend(fontsize=7)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
