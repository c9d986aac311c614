"""Protocol 2's decision tables: per condition, every method's paired gap to the best peer and to
our method, in held-out NLL (primary) and accuracy, with SEs that count seed noise and the
per-seed signs; also `paired.csv`. Runs come from the cache or are trained (selection first)."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from . import select
from .accuracy import PROFILES, Cache, RunSpec, run_one, task_loader
from .heldout import CROSS_FITTED, fold_of
from .power import PairedGap, matrix, nested_gap, paired_gap
from .runs import fetch_or_train

OURS = "spalora"
NOT_PEERS = ("fft",)  # the reference; our method and its ablations are not peers either
PAIRED_COLUMNS = (
    "task", "r_eq", "steps", "metric", "method", "reference", "gap", "se", "n_test", "n_seeds",
)  # fmt: skip


def is_peer(method: str) -> bool:
    return method not in NOT_PEERS and not method.startswith(OURS)


def collect(
    profile_name: str,
    task: str,
    r_eq: int,
    methods: list[str],
    cache_dir: str | Path,
    n_seeds: int,
    run_missing: bool,
    load_model: Callable | None = None,
    progress: bool = False,
    load_task: Callable | None = None,
    device: str = "cpu",
) -> dict[str, dict]:
    """{method: {"choice": Choice, "runs": {seed: result}}}: selection, then reported seeds."""
    from spalora.hub import load_model_and_tokenizer

    profile = PROFILES[profile_name]
    if n_seeds > len(profile.seeds):
        raise ValueError(f"profile {profile_name} reports at most {len(profile.seeds)} seeds")
    load_task = load_task or task_loader(profile)
    load_task(fold_of(task, 0))  # a task the protocol cannot size says so before training
    cache = Cache(cache_dir)
    load_model = load_model or load_model_and_tokenizer

    def train(spec: RunSpec) -> dict:
        return run_one(spec, load_model, load_task, progress, device=device)

    def ensure(spec: RunSpec) -> dict | None:
        return fetch_or_train(cache, spec, train if run_missing else None, tag="v2")

    out = {}
    for method in methods:
        first = profile.selection_seeds[0]
        choice = select.choose(method, fold_of(task, first), r_eq, profile, ensure)
        runs = {}
        if choice.spec is not None:
            for seed in profile.seeds[:n_seeds]:
                spec = replace(choice.spec, seed=seed, task=fold_of(task, seed))
                if (found := ensure(spec)) is not None:
                    runs[seed] = found
        out[method] = {"choice": choice, "runs": runs}
    return out


def gap(a: dict[int, dict], b: dict[int, dict], metric: str, nested: bool) -> PairedGap | None:
    """Paired gap a - b over shared seeds; `nested`: each seed has its own test fold."""
    key = "test_nll" if metric == "nll" else "test_correct"

    def values(r: dict) -> list[float]:
        return r[key] if metric == "nll" else [float(c == "1") for c in r[key]]

    shared = sorted(set(a) & set(b))
    if len(shared) < 2:
        return None
    if nested:
        return nested_gap({s: matrix({s: values(a[s])}, {s: values(b[s])})[0] for s in shared})
    return paired_gap(matrix({s: values(a[s]) for s in shared}, {s: values(b[s]) for s in shared}))


def decision_rows(
    collected: dict[str, dict], nested: bool, ours: str = OURS
) -> tuple[list[dict], str | None]:
    """Rows of the table and the best peer (lowest mean test NLL among peers with 2+ seeds);
    `ours` is the method every row is also paired with (a candidate revision, say)."""
    done = {m: c["runs"] for m, c in collected.items() if len(c["runs"]) >= 2}

    def mean_nll(m: str) -> float:
        return statistics.fmean(r["test_nll_mean"] for r in done[m].values())

    peers = [m for m in done if is_peer(m)]
    best = min(peers, key=mean_nll) if peers else None
    rows = []
    for m in sorted(done, key=mean_nll):
        row = {
            "method": m,
            "lr": collected[m]["choice"].spec.lr,
            "variant": collected[m]["choice"].spec.variant,
            "n_seeds": len(done[m]),
            "nll": mean_nll(m),
            "acc": statistics.fmean(100 * r["test"] for r in done[m].values()),
        }
        for ref_name, ref in (("best", best), ("ours", ours if ours in done else None)):
            for metric in ("nll", "accuracy"):
                g = None if ref in (None, m) else gap(done[m], done[ref], metric, nested)
                row[f"{ref_name}_{metric}"] = g
            row[f"{ref_name}_name"] = ref
        rows.append(row)
    return rows, best


def fmt_gap(g: PairedGap | None, metric: str) -> str:
    if g is None:
        return ""
    scale, digits = (1.0, 4) if metric == "nll" else (100.0, 1)
    signs = "".join("+" if x > 0 else "-" if x < 0 else "0" for x in g.per_seed)
    return f"{scale * g.gap:+.{digits}f} ± {scale * g.se:.{digits}f} ({signs})"


def write_decision(
    conditions: dict[tuple, dict[str, dict]], out: Path, command: str, ours: str = OURS
) -> list[Path]:
    """docs/results/accuracy-v2.md (one decision table per condition) and paired.csv."""
    lines = [
        "# Accuracy at equal budget, protocol 2 (decision tables)",
        "",
        f"Produced by `{command}` from the cached runs. Do not edit: rerun the command.",
        "",
        "Primary metric: held-out completion NLL per example (mean token NLL of the answer given "
        "the question; nats, lower is better), paired by example and seed. Accuracy (points) on "
        "the first test examples beside it. Gap = method minus reference; ± one SE counting "
        "seed noise and test sampling; signs per reported seed. Settings chosen on validation "
        "NLL at selection seeds that no reported mean uses.",
        "",
    ]
    csv_rows = []
    for (task, r_eq, steps), collected in conditions.items():
        rows, best = decision_rows(collected, nested=task in CROSS_FITTED, ours=ours)
        lines += [
            f"## {task}, r_eq = {r_eq}, {steps} steps",
            "",
            f"Best peer: {best or '(none with 2 seeds yet)'}. Ours: {ours}.",
            "",
            "| method | setting | seeds | test NLL | acc | Δ NLL vs best peer | Δ acc vs best peer "
            "| Δ NLL vs ours | Δ acc vs ours |",
            "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |",
        ]
        for r in rows:
            setting = ",".join(f"{k}={v:g}" for k, v in r["variant"]) + f" lr={r['lr']:g}"
            lines.append(
                f"| {r['method']} | {setting.strip()} | {r['n_seeds']} | {r['nll']:.4f} "
                f"| {r['acc']:.1f} | {fmt_gap(r['best_nll'], 'nll')} "
                f"| {fmt_gap(r['best_accuracy'], 'accuracy')} | {fmt_gap(r['ours_nll'], 'nll')} "
                f"| {fmt_gap(r['ours_accuracy'], 'accuracy')} |"
            )
            for ref in ("best", "ours"):
                for metric in ("nll", "accuracy"):
                    if (g := r[f"{ref}_{metric}"]) is not None:
                        csv_rows.append(
                            [task, r_eq, steps, metric, r["method"], r[f"{ref}_name"],
                             f"{g.gap:.6f}", f"{g.se:.6f}", g.n_test, g.n_seeds]
                        )  # fmt: skip
        pending = [m for m, c in collected.items() if c["choice"].pending]
        excluded = [
            f"{m} lr={s.lr:g}: {why}"
            for m, c in collected.items()
            for s, why in c["choice"].excluded
        ]
        if pending:
            lines += ["", f"Selection not finished: {', '.join(pending)}."]
        if excluded:
            lines += ["", "Excluded at selection: " + "; ".join(excluded) + "."]
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    md = out / "accuracy-v2.md"
    md.write_text("\n".join(lines))
    path = out / "paired.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PAIRED_COLUMNS)
        writer.writerows(csv_rows)
    return [md, path]
