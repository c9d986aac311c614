"""Where the time of one training step goes, per method: torch.profiler's operator table.

    python benchmarks/profile_step.py [--rows rosa,peft-lora] [--top 15]

Uses the speed benchmark's step (SmolLM2-135M, 8 x 128 tokens, r_eq = 8, masks chosen) and
prints, for each row, the operators with the most self CPU time over 3 profiled steps, after 2
warm-up steps. Writes docs/results/profile_step.md.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from spalora.bench.speed import build_row, fixed_batch, step
from spalora.hub import load_model_and_tokenizer

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="peft-lora,lora,rosa")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    lines = [
        "# Where a training step's time goes",
        "",
        f"Produced by `python benchmarks/profile_step.py --rows {args.rows}`; "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        "Self CPU time per operator over 3 steps (after 2 warm-up steps), SmolLM2-135M, "
        "8 x 128 tokens, r_eq = 8.",
        "",
    ]
    for row in args.rows.split(","):
        model, opt = build_row(row, load_model_and_tokenizer)
        batch = fixed_batch(model.config.vocab_size)
        for _ in range(2):
            step(model, batch, opt)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step(model, batch, opt)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        print(f"== {row}\n{table}")
        lines += [f"## {row}", "", "```", table, "```", ""]
        del model, opt
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "profile_step.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
