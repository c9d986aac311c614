"""`python -m benchmarks speed`: one whole-model training step per method, as ratios to the floor.

The protocol's step: SmolLM2-135M, batch 8 x 128 tokens, budget r_eq = 8, forward + backward +
AdamW step. Rows are interleaved round-robin in one process (every row's model lives side by
side), so machine noise hits all alike; the median over repeats is reported. The floor is the
frozen base with no adapter, backward through the activations only (the input embeddings'
output requires grad): work every PEFT method must do. Peak resident memory comes from a fresh
process per row (`python -m benchmarks.speed --memory ROW`), so rows do not share a peak; it
is reset after the row is built, so for sparse/RoSA it excludes the mask statistics (reported in
their own row).
Mask generation (the Fisher statistics of RoSA over 8 micro-batches, then the top-k) is timed
and measured in its own fresh process too.
`rosa-int8` is RoSA on a base whose adapted projections are stored as int8 (spalora.quant,
weight-only, dequantized per layer in forward and backward); the `base_weights_mb` column gives
the adapted projections' frozen weights as stored, in every row.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .methods import LINEAR_NAMES, build_method

ROWS = (
    "floor",
    "peft-lora",
    "lora",
    "sparse",
    "rosa",
    "rosa-int8",
    "peft-supra",
    "spalora",
    "spalora-final",
    "spalora-gradual",
    "spalora-exchange",
)
CSV_COLUMNS = (
    "row",
    "step_s_median",
    "ratio_to_floor",
    "ratio_to_peft_lora",
    "peak_rss_mb",
)  # exactly the issue's columns; the base weights' size is in speed.md
R_EQ = 8
MASK_BATCHES = 8
PAIRED = (  # (row, reference) ratios reported round by round: the issues' targets
    ("lora", "peft-lora"),
    ("rosa", "peft-lora"),
    ("spalora", "rosa"),
    ("spalora-final", "rosa"),
    ("spalora-gradual", "peft-lora"),
    ("spalora-exchange", "peft-lora"),
)


def fixed_batch(vocab: int, batch: int = 8, tokens: int = 128, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, tokens), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def build_row(row: str, load_model) -> tuple[torch.nn.Module, torch.optim.Optimizer | None, ...]:
    """The model of `row`, ready for its training step (masks already chosen), its optimizer,
    and the schedule its steps must drive (our method's penalties), or None.

    `spalora` is our method's compress phase (1.5x the rank all of the budget buys, 1.5x the even
    split's nonzeros, IRLS penalty steps after each optimizer step and a refresh every 10): its
    most expensive phase.
    `spalora-final` is after truncation, at exactly the budget with per-layer ranks (those of a
    truncation after 2 steps here: the total is the budget's, the split is not a trained one).
    `spalora-gradual` is issue 25's candidate before its budget falls (3 P: rank 1.5 r_eq and
    1.5 P random entries, penalty steps): its most expensive phase.
    `spalora-exchange` is the second candidate: P random entries with penalty steps (its exchange,
    every 10 steps in its window, is timed apart by `exchange_seconds`).
    """
    model, _ = load_model()
    model.train()
    if row.endswith("-int8"):  # before wrapping, as QLoRA; the fp32 weights are freed
        from spalora.quant import quantize_base

        quantize_base(model, "int8", target_modules=list(LINEAR_NAMES))
    if row == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # backward through every layer's activations
        return model, None, None
    variant = {"rank_fraction": 0.5, "warmup_steps": 0, "mask_batches": 1, "seed": 0}
    method = row.removesuffix("-final").removesuffix("-int8")
    wrapped = build_method(method, model, R_EQ, variant)
    schedule = None
    if method in ("sparse", "rosa", "spalora", "spalora-gradual", "spalora-exchange"):
        from spalora.schedule import MaskSchedule

        # the measured step comes after the mask: choose it first (and for spalora-final,
        # truncate at step 2 of a 4-step schedule); compress goes on for 10^6 steps
        total = 4 if row == "spalora-final" else 10**6
        schedule = MaskSchedule(wrapped, progress=False, total_steps=total)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if schedule is not None:
        vocab = model.config.vocab_size
        step(wrapped, fixed_batch(vocab, seed=1), None, schedule)
        if row == "spalora-final":
            step(wrapped, fixed_batch(vocab, seed=2), optimizer, schedule)
        wrapped.zero_grad(set_to_none=True)
        expected = "compress" if row.startswith("spalora") and row != "spalora-final" else "joint"
        assert schedule.phase == expected, (row, schedule.phase)
        if schedule.phase == "joint":
            schedule = None
    return wrapped, optimizer, schedule


def step(model, batch: dict, optimizer, schedule=None) -> None:
    loss = model(**batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if schedule is not None:
        schedule.step(optimizer)


def time_rows(rows, load_model, repeats: int, warmup: int = 2, progress: bool = True) -> dict:
    """{row: [seconds per step]} with rows interleaved round-robin."""
    from tqdm.auto import tqdm

    built = {
        row: build_row(row, load_model) for row in tqdm(rows, desc="building", disable=not progress)
    }
    vocab = next(iter(built.values()))[0].config.vocab_size
    batch = fixed_batch(vocab)
    times: dict[str, list[float]] = {row: [] for row in rows}
    for i in tqdm(range(warmup + repeats), desc="timing", disable=not progress):
        for row, (model, opt, schedule) in built.items():
            start = time.perf_counter()
            step(model, batch, opt, schedule)
            if i >= warmup:
                times[row].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], row: str, ref: str) -> tuple[float, float, float]:
    """Median and quartiles of row/ref step-time ratios taken round by round: the two steps of a
    round run back to back, so a slow spell of the machine hits both and cancels out."""
    ratios = [a / b for a, b in zip(times[row], times[ref], strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q2, q1, q3


def mask_generation(load_model) -> dict:
    """Time and peak memory of RoSA's Fisher mask: 8 micro-batches of statistics, then top-k."""
    from spalora.schedule import MaskSchedule

    model, _ = load_model()
    variant = {"rank_fraction": 0.5, "warmup_steps": 0, "mask_batches": MASK_BATCHES, "seed": 0}
    wrapped = build_method("rosa", model, R_EQ, variant)
    wrapped.train()
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
    step(wrapped, fixed_batch(model.config.vocab_size, seed=9), opt)  # warm-up, not timed
    schedule = MaskSchedule(wrapped, progress=False)
    start = time.perf_counter()
    for i in range(MASK_BATCHES):
        step(wrapped, fixed_batch(model.config.vocab_size, seed=10 + i), opt)
        select = time.perf_counter()
        schedule.step(opt)
    done = time.perf_counter()
    assert schedule.phase == "joint"
    return {"mask_total_s": done - start, "mask_select_s": done - select}


def exchange_seconds(load_model, repeats: int = 3) -> float:
    """Median time of one exchange of spalora-exchange at its largest fraction (30% of the
    budget removed and grown again), after one training step so that the entries differ."""
    model, opt, schedule = build_row("spalora-exchange", load_model)
    step(model, fixed_batch(model.config.vocab_size, seed=3), opt, schedule)
    ctl = schedule.controller
    budget = ctl.budget - round(float(ctl.cfg.exchange_fraction) * ctl.budget)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ctl.prune(budget, opt)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def base_weights_mb(model: torch.nn.Module) -> float:
    """MiB of the adapted projections' frozen weights (q, k, v, o, gate, up, down) as stored:
    4 bytes a weight in fp32, 1 + a scale per row in int8 (PEFT's and ours alike)."""
    from spalora.quant import QuantizedLinear

    total = 0
    for name, module in model.named_modules():
        parts = name.split(".")
        if parts[-1] == "base_layer":  # a wrapper's frozen layer (PEFT or ours): its parent's name
            parts.pop()
        if parts[-1] not in LINEAR_NAMES:
            continue
        if isinstance(module, QuantizedLinear):
            total += module.nbytes
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total / 2**20


def reset_peak() -> None:
    """Restart the VmHWM high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak includes building the row


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM on Linux: ru_maxrss survives fork + exec, so
    a child of a large parent would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_of(row: str, model_name: str) -> dict:
    """Peak RSS of a fresh process that builds `row` and runs 3 steps (or mask generation)."""
    cmd = [sys.executable, "-m", "benchmarks.speed", "--memory", row, "--model", model_name]
    root = Path(__file__).resolve().parents[1]  # `benchmarks` is importable from the repo root
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_loader(model_name: str):
    """A no-argument loader of `model_name`, as build_row and mask_generation take."""
    from spalora.hub import load_model_and_tokenizer

    return functools.partial(load_model_and_tokenizer, model_name)


def _memory_main(row: str, model_name: str) -> None:
    load_model = model_loader(model_name)

    if row == "mask":
        result = mask_generation(load_model)
    else:
        model, opt, schedule = build_row(row, load_model)
        reset_peak()  # the row's steps, not the mask statistics gathered while building it
        batch = fixed_batch(model.config.vocab_size)
        for _ in range(3):
            step(model, batch, opt, schedule)
        result = {"base_weights_mb": base_weights_mb(model)}
    print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))


def run_speed(
    out_dir: str | Path,
    repeats: int = 10,
    model_name: str = "smollm2-135m",
    rows=ROWS,
    memory: bool = True,
    progress: bool = True,
    command: str = "python -m benchmarks speed",
) -> list[Path]:
    """Time the rows, measure memory and the mask, write speed.md and speed.csv."""
    load_model = model_loader(model_name)
    times = time_rows(rows, load_model, repeats, progress=progress)
    memories = {row: memory_of(row, model_name) for row in rows} if memory else {}
    mask = memory_of("mask", model_name) if memory else mask_generation(load_model)
    if "spalora-exchange" in rows:
        mask["exchange_s"] = exchange_seconds(load_model)
    table = speed_table(rows, times, memories)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "speed.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    lines = speed_lines(table, times, mask, repeats, command)
    (out / "speed.md").write_text("\n".join(lines))
    return [out / "speed.md", out / "speed.csv"]


def speed_table(rows, times: dict, memories: dict) -> list[dict]:
    """One row per method: median step time, its ratios, peak memory and base weights."""
    median = {row: statistics.median(t) for row, t in times.items()}
    table = []
    for row in rows:
        table.append(
            {
                "row": row,
                "step_s_median": f"{median[row]:.3f}",
                "ratio_to_floor": f"{median[row] / median['floor']:.3f}"
                if "floor" in median
                else "",
                "ratio_to_peft_lora": (
                    f"{median[row] / median['peft-lora']:.3f}" if "peft-lora" in median else ""
                ),
                "peak_rss_mb": f"{memories[row]['peak_rss_mb']:.0f}" if row in memories else "",
                "base_weights_mb": (
                    f"{memories[row]['base_weights_mb']:.4g}" if row in memories else ""
                ),
            }
        )
    return table


def speed_lines(table: list[dict], times: dict, mask: dict, repeats: int, command: str) -> list:
    """speed.md: the setting, the table, the round-by-round ratios, the mask's cost."""
    lines = [
        "# Speed and memory per training step",
        "",
        f"Produced by `{command}`; machine: {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. Do not edit: rerun it.",
        "",
        f"SmolLM2-135M-Instruct, one training step (forward + backward + AdamW) on a batch of "
        f"8 x 128 tokens, budget r_eq = {R_EQ} (sparse and RoSA: masks already chosen; RoSA "
        f"and Supra: half the budget on rank; spalora: our method's compress phase, rank 1.5 r_eq "
        f"and 1.5x the even split's nonzeros with IRLS penalty steps, and spalora-final: after "
        f"truncation to the budget; spalora-gradual: issue 25's candidate before its budget "
        f"falls, rank 1.5 r_eq and 1.5 P random entries with penalty steps; spalora-exchange: the "
        f"second candidate, P random entries with penalty steps; rosa-int8: RoSA "
        f"with the adapted projections of the frozen base stored as int8, weight-only). Rows "
        f"interleaved in one process, median of "
        f"{repeats} steps after 2 warm-up rounds; peak resident memory from a fresh process per "
        "row (3 steps, the peak reset after the model is built and its masks chosen). Base "
        "weights: the adapted projections' frozen weights as stored (MiB).",
        "",
        "| row | step (s, median) | x floor | x PEFT LoRA | peak RSS (MB) | base weights (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table:
        lines.append(
            f"| {r['row']} | {r['step_s_median']} | {r['ratio_to_floor']} | "
            f"{r['ratio_to_peft_lora']} | {r['peak_rss_mb']} | {r['base_weights_mb']} |"
        )
    pairs = [(row, ref) for row, ref in PAIRED if row in times and ref in times]
    if pairs:
        lines += [
            "",
            "Ratios taken round by round (each round runs every row once, back to back), "
            "median [quartiles] over the rounds: less sensitive to the machine's slow spells "
            "than the ratio of the medians above.",
            "",
            "| row | reference | ratio per round | quartiles |",
            "| --- | --- | ---: | ---: |",
        ]
        for row, ref in pairs:
            mid, q1, q3 = paired_ratio(times, row, ref)
            lines.append(f"| {row} | {ref} | {mid:.3f} | {q1:.3f} - {q3:.3f} |")
    lines += [
        "",
        f"Mask generation (RoSA, Fisher, {MASK_BATCHES} micro-batches of 8 x 128 tokens during "
        f"training, then the per-layer top-k): {mask['mask_total_s']:.1f} s in all for the "
        f"{MASK_BATCHES} steps, of which {mask['mask_select_s']:.2f} s is the selection; peak "
        f"RSS {mask.get('peak_rss_mb', float('nan')):.0f} MB (fresh process).",
        "",
    ]
    if "exchange_s" in mask:
        lines += [
            f"One exchange of spalora-exchange (30% of the budget removed and grown again, its "
            f"largest): {mask['exchange_s']:.2f} s, once every 10 steps between 10% and 60% of "
            "the run.",
            "",
        ]
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    _memory_main(args.memory, args.model)
