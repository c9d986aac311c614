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
    return parser


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
    commands = {"accuracy": cmd_accuracy, "speed": cmd_speed, "analyze": cmd_analyze}
    for path in commands[args.bench](args, _command(argv)):
        print(f"[benchmarks] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
