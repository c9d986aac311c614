"""Where the time of one training step goes, per method: torch.profiler's operator table.

    python -m benchmarks.profile_step [--rows peft-lora,lora,rosa] [--top 15]

Uses the speed benchmark's step (SmolLM2-135M, 8 x 128 tokens, r_eq = 8, masks chosen) and
prints, for each row, the operators with the most self CPU time over 3 profiled steps, after 2
warm-up steps, then the operators that account for each row's extra time over the first row
(per step). Writes docs/results/profile_step.md (or --out). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.speed import build_row, fixed_batch, model_loader, step

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
STEPS = 3


def self_seconds_per_step(prof) -> dict[str, float]:
    """{operator: self CPU seconds per profiled step}."""
    return {e.key: e.self_cpu_time_total / 1e6 / STEPS for e in prof.key_averages()}


def extra_table(per_op: dict[str, dict[str, float]], ref: str, top: int) -> list[str]:
    """Markdown: per row, the operators whose self time per step grew most over `ref`'s."""
    lines = []
    base = per_op[ref]
    for row, ops in per_op.items():
        if row == ref:
            continue
        total = sum(ops.values()) - sum(base.values())
        diffs = sorted(
            ((op, ops.get(op, 0.0) - base.get(op, 0.0)) for op in set(ops) | set(base)),
            key=lambda kv: -abs(kv[1]),
        )[:top]
        lines += [
            f"### {row} over {ref}: {total:+.3f} s self CPU per step in all",
            "",
            "| operator | extra s per step |",
            "| --- | ---: |",
            *(f"| `{op}` | {d:+.3f} |" for op, d in diffs),
            "",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="peft-lora,lora,rosa")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    rows = args.rows.split(",")
    lines = [
        "# Where a training step's time goes",
        "",
        f"Produced by `python -m benchmarks.profile_step --rows {args.rows}`; "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Self CPU time per operator over {STEPS} steps (after 2 warm-up steps), model "
        f"{args.model}, 8 x 128 tokens, r_eq = 8; the profiler's own overhead inflates every "
        "row alike. The first section lists, per row, the operators whose time grew most over "
        f"the first row ({rows[0]}); then each row's full table.",
        "",
    ]
    per_op, tables = {}, []
    for row in rows:
        model, opt, schedule = build_row(row, model_loader(args.model))
        batch = fixed_batch(model.config.vocab_size)
        for _ in range(2):
            step(model, batch, opt, schedule)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(STEPS):
                step(model, batch, opt, schedule)
        per_op[row] = self_seconds_per_step(prof)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        print(f"== {row}\n{table}", flush=True)
        tables += [f"## {row}", "", "```", table, "```", ""]
        del model, opt, schedule
    lines += ["## Extra time over " + rows[0], "", *extra_table(per_op, rows[0], args.top)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_step.md").write_text("\n".join(lines + tables))


if __name__ == "__main__":
    main()
