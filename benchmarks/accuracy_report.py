"""The accuracy benchmark's report: accuracy.md (tables), accuracy.csv and the plots
(accuracy.png, allocation.png), written from the cached records alone
(`benchmarks.accuracy` runs and caches them; `benchmarks.accuracy_stats` summarizes them)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .accuracy_stats import LOSS_TAIL, ablation_summary, paired_gap_summary, split_summary
from .methods import METHODS

CSV_COLUMNS = ("method", "r_eq", "task", "mean", "std", "n_seeds", "trainable_params")


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
    # imported here: `benchmarks.accuracy` imports this module to re-export its names
    from .accuracy import PROFILES

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["r_eq"], list(METHODS).index(r["method"]), r["task"]))
    write_csv(rows, out / "accuracy.csv")
    n_seeds = len(PROFILES[profile].seeds) if profile in PROFILES else 1
    tasks = sorted({r["task"] for r in rows})
    splits = split_summary(records or [])
    lines = [
        *header_lines(profile, command),
        *precision_note(rows, tasks),
        *budget_table_lines(rows, tasks, n_seeds),
        *selection_lines(rows, grid_rows),
        *split_lines(splits),
        *ablation_lines(ablation_summary(records or [])),
        *paired_gap_lines(paired_gap_summary(records or [])),
    ]
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    paths = [out / "accuracy.md", out / "accuracy.csv", plot_accuracy(rows, out / "accuracy.png")]
    if splits:
        paths.append(plot_splits(splits, out / "allocation.png"))
    return paths


def write_csv(rows: list[dict], path: Path) -> None:
    """accuracy.csv: CSV_COLUMNS exactly, one line per row, scores to 4 decimals."""
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "mean": f"{r['mean']:.4f}", "std": f"{r['std']:.4f}"})


def header_lines(profile: str, command: str) -> list[str]:
    """accuracy.md's title and what its numbers are: the command, machine, metric, budget."""
    import platform

    import torch

    return [
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
    ]


def budget_table_lines(rows: list[dict], tasks: list[str], n_seeds: int) -> list[str]:
    """One table per r_eq: each method's sizes and its cell per task, with their average."""
    lines = []
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
    return lines


def selection_lines(rows: list[dict], grid_rows: list[dict]) -> list[str]:
    """The seed-0 grid with its validation scores, the chosen setting of each marked."""
    lines = [
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
    return lines


def split_lines(splits: list[dict]) -> list[str]:
    """Our method's split of the budget per (task, r_eq) (nothing without a split recorded)."""
    if not splits:
        return []
    kinds = list(dict.fromkeys(k for s in splits for k in s["by_kind"]))
    short = [k.rsplit(".", 1)[-1] for k in kinds]
    lines = [
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
    return lines


def cell(row: dict, seeds: int = 1) -> str:
    """Mean ± std in percent; a setting with fewer than `seeds` seeds done says how many."""
    if row["n_seeds"] < 2:
        return f"{100 * row['mean']:.1f} (seed 0 only)"
    text = f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"
    return text + (f" ({row['n_seeds']} seeds)" if row["n_seeds"] < seeds else "")


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
