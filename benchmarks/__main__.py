"""`python -m benchmarks accuracy|speed|analyze`: the research harness's one entry point, run from
the repository root (the library's own CLI is `spalora`)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    ba = sub.add_parser("accuracy", help="accuracy at equal budget: our methods vs PEFT's")
    ba.add_argument("--profile", choices=["quick", "full"], default="quick")
    ba.add_argument("--tasks", default="bbc-topic,arithmetic")
    ba.add_argument("--budgets", default="8", help="r_eq values, e.g. 2,8")
    ba.add_argument("--methods", help="comma-separated (default: all registered)")
    ba.add_argument("--cache", help="run cache (default benchmarks/cache/accuracy-PROFILE)")
    ba.add_argument("--out", help="tables (default docs/results for full, runs/bench-quick)")
    ba.add_argument("--report-only", action="store_true", help="tables from the cache only")
    ba.add_argument("--no-progress", action="store_true")

    bs = sub.add_parser("speed", help="training-step time and peak memory per method")
    bs.add_argument("--repeats", type=int, default=10, help="timed steps per row (median)")
    bs.add_argument("--out", default="docs/results", help="where speed.md/.csv go")
    bs.add_argument("--model", default="smollm2-135m")
    bs.add_argument("--no-memory", action="store_true", help="skip the per-row processes")
    bs.add_argument(
        "--rows", help="comma-separated subset of the rows (default: all); use another --out"
    )
    bs.add_argument("--no-progress", action="store_true")

    an = sub.add_parser("analyze", help="how well each layer's fine-tuning update compresses")
    an.add_argument(
        "--tuned", required=True, help="fine-tuned model folder (e.g. a harness FFT run)"
    )
    an.add_argument("--base", default="smollm2-135m", help="the model it was tuned from")
    an.add_argument("--budgets", default="1,2,4,8,16,32", help="r_eq values")
    an.add_argument("--out", default="docs/results", help="where analyze.md/.csv/.png go")
    an.add_argument("--no-progress", action="store_true")

    ru = sub.add_parser("runs", help="train (or find cached) named runs at a fixed rate")
    ru.add_argument("--profile", default="v2", help="a harness profile (v2, v2-600, full, quick)")
    ru.add_argument("--task", default="arithmetic")
    ru.add_argument("--r-eq", type=int, default=2, help="budget as a LoRA-rank equivalent")
    ru.add_argument("--method", required=True)
    ru.add_argument("--lr", type=float, required=True)
    ru.add_argument("--seeds", default="1", help="e.g. 1-8 or 1,3")
    ru.add_argument("--variant", action="append", default=[], help="KEY=VALUE, repeatable")
    ru.add_argument("--cache", help="run cache (default benchmarks/cache/accuracy-PROFILE)")
    ru.add_argument("--no-progress", action="store_true")
    add_device(ru)

    pi = sub.add_parser("pilot", help="protocol 2's pilots from the cache: seed noise, admission")
    pi.add_argument(
        "--cache", action="append", help="caches to read (default the v2 and v2-600 caches)"
    )
    pi.add_argument("--out", default="docs/results", help="where pilot.md goes")

    v2 = sub.add_parser("v2", help="protocol 2: selection, reported seeds, decision tables")
    v2.add_argument("--profile", default="v2", help="v2 (150 steps) or v2-600")
    v2.add_argument("--tasks", default="arithmetic")
    v2.add_argument("--budgets", default="2", help="r_eq values, e.g. 1,2")
    v2.add_argument("--methods", required=True, help="comma-separated")
    v2.add_argument("--seeds", type=int, default=5, help="reported seeds per method")
    v2.add_argument("--cache", help="run cache (default benchmarks/cache/accuracy-PROFILE)")
    v2.add_argument("--out", default="docs/results", help="accuracy-v2.md and paired.csv")
    v2.add_argument("--report-only", action="store_true", help="tables from the cache only")
    v2.add_argument(
        "--ours", help="the method every row is also paired with (default spalora; a candidate)"
    )
    v2.add_argument("--no-progress", action="store_true")
    add_device(v2)
    return parser


def cmd_v2(args: argparse.Namespace, command: str) -> list:
    from pathlib import Path

    from .accuracy import PROFILES
    from .decision import collect, write_decision
    from .methods import METHODS

    methods = args.methods.split(",")
    if args.ours is not None and args.ours not in methods:
        raise SystemExit(f"error: --ours {args.ours} is not among --methods {args.methods}")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"error: unknown methods {unknown}; available: {sorted(METHODS)}")
    if args.profile not in PROFILES or PROFILES[args.profile].protocol < 2:
        raise SystemExit(f"error: --profile must be a protocol-2 profile, got {args.profile!r}")
    device, cache = device_and_cache(args)
    steps = PROFILES[args.profile].steps
    conditions = {}
    try:
        for task in args.tasks.split(","):
            for r_eq in (int(b) for b in args.budgets.split(",")):
                conditions[(task, r_eq, steps)] = collect(
                    args.profile, task, r_eq, methods, cache, args.seeds,
                    run_missing=not args.report_only, progress=not args.no_progress,
                    device=device,
                )  # fmt: skip
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    return write_decision(conditions, Path(args.out), command, ours=args.ours or "spalora")


def cmd_pilot(args: argparse.Namespace, command: str) -> list:
    from pathlib import Path

    from .pilot import write_pilot_report

    caches = args.cache or ["benchmarks/cache/accuracy-v2", "benchmarks/cache/accuracy-v2-600"]
    try:
        return write_pilot_report([Path(c) for c in caches], Path(args.out), command)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc


def cmd_runs(args: argparse.Namespace, command: str) -> list:
    from .runs import ensure_runs, parse_seeds, parse_variant, specs_for, summary_line

    try:
        specs = specs_for(
            args.profile,
            args.task,
            args.r_eq,
            args.method,
            args.lr,
            parse_seeds(args.seeds),
            parse_variant(args.variant),
        )
        device, cache = device_and_cache(args)
        results = ensure_runs(specs, cache, progress=not args.no_progress, device=device)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    for spec, result in zip(specs, results, strict=True):
        print(f"{spec.label()}: {summary_line(result)}")
    return []


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: the GPU when there is one. GPU runs go to their own cache (PROFILE-cuda): "
        "they differ from CPU runs in the last digits",
    )


def device_and_cache(args: argparse.Namespace) -> tuple[str, str]:
    from spalora.distributed import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    return str(device), args.cache or f"benchmarks/cache/accuracy-{args.profile}{suffix}"


def _command(argv: list[str]) -> str:
    return " ".join(["python -m benchmarks", *argv])


def speed_rows(text: str | None) -> tuple[str, ...]:
    from .speed import ROWS

    if not text:
        return ROWS
    rows = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"error: unknown speed rows {unknown}; available: {list(ROWS)}")
    return rows


def cmd_speed(args: argparse.Namespace, command: str) -> list:
    from .speed import run_speed

    return run_speed(
        args.out,
        args.repeats,
        args.model,
        rows=speed_rows(args.rows),
        memory=not args.no_memory,
        progress=not args.no_progress,
        command=command,
    )


def cmd_accuracy(args: argparse.Namespace, command: str) -> list:
    from . import accuracy
    from .methods import METHODS

    methods = args.methods.split(",") if args.methods else list(METHODS)
    tasks = args.tasks.split(",")
    budgets = [int(b) for b in args.budgets.split(",")]
    cache = args.cache or f"benchmarks/cache/accuracy-{args.profile}"
    out = args.out or ("docs/results" if args.profile == "full" else "runs/bench-quick")
    try:
        if args.report_only:
            records, grid = accuracy.read_cached(args.profile, tasks, budgets, methods, cache)
        else:
            records, grid = accuracy.run_benchmark(
                args.profile,
                tasks,
                budgets,
                methods,
                cache,
                progress=not args.no_progress,
                save_dir=f"runs/bench-{args.profile}",
            )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    rows = accuracy.summarize(records)
    return accuracy.write_report(rows, grid, out, args.profile, command, records)


def cmd_analyze(args: argparse.Namespace, command: str) -> list:
    from spalora.hub import load_model_and_tokenizer

    from .analyze import run_analysis

    base, _ = load_model_and_tokenizer(args.base)
    tuned, _ = load_model_and_tokenizer(args.tuned)
    budgets = tuple(int(b) for b in args.budgets.split(","))
    try:
        return run_analysis(base, tuned, args.out, command, not args.no_progress, budgets)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    for path in globals()[f"cmd_{args.bench}"](args, _command(argv)):
        print(f"[benchmarks] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
