"""`spalora plot RUN_DIR`: PNGs of a run — loss over steps (phases shaded) and the adapter's
per-layer rank and density as heat maps over layers x module type."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .config import SpaloraConfig

MODULE_ORDER = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "c_attn",
    "c_proj",
    "c_fc",
)
PHASE_COLORS = {"warmup": "#dbe9f6", "collect": "#fde2c4", "joint": "#ffffff"}


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no history.jsonl in {run_dir} (is it a `spalora train` run?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(history: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    start = 0
    for i in range(1, len(history) + 1):  # shade each phase's span of steps
        if i == len(history) or history[i]["phase"] != history[start]["phase"]:
            phase = history[start]["phase"]
            ax.axvspan(
                steps[start] - 0.5,
                steps[i - 1] + 0.5,
                color=PHASE_COLORS.get(phase, "w"),
                label=phase,
                lw=0,
            )
            start = i
    ax.plot(steps, losses, lw=0.8, color="#999999", label="loss")
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    ax.plot(steps, smooth, lw=2, color="#1f4e79", label=f"mean of {window}")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def layer_grid(config: SpaloraConfig) -> tuple[list[str], list[str], dict]:
    """(block indices, module types, {(block, type): (r, nnz)}) from the saved per-layer sizes."""
    cells: dict[tuple[str, str], tuple[int, int]] = {}
    for name in sorted(set(config.rank_pattern) | set(config.nnz_pattern)):
        match = re.search(r"\.(\d+)\.", name)
        block = match.group(1) if match else "-"
        kind = name[match.end() :] if match else name  # e.g. attn.c_proj vs mlp.c_proj
        cells[(block, kind)] = (config.rank_pattern.get(name, 0), config.nnz_pattern.get(name, 0))
    blocks = sorted(
        {b for b, _ in cells}, key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0)
    )
    found = list(dict.fromkeys(k for _, k in cells))
    rank_of = {m: i for i, m in enumerate(MODULE_ORDER)}
    kinds = sorted(found, key=lambda k: rank_of.get(k.rsplit(".", 1)[-1], len(MODULE_ORDER)))
    return blocks, kinds, cells


def plot_allocation(adapter_dir: Path, out: Path, shapes: dict[str, int] | None = None) -> Path:
    """Heat maps of rank and nonzeros per layer (rows: module type, columns: block)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    config = SpaloraConfig.load(adapter_dir)
    blocks, kinds, cells = layer_grid(config)
    rank = np.zeros((len(kinds), len(blocks)))
    nnz = np.zeros((len(kinds), len(blocks)))
    for (b, k), (r, n) in cells.items():
        rank[kinds.index(k), blocks.index(b)] = r
        nnz[kinds.index(k), blocks.index(b)] = n
    fig, axes = plt.subplots(2, 1, figsize=(max(6, len(blocks) * 0.3 + 2), 1.2 * len(kinds) + 2.5))
    for ax, data, title in (
        (axes[0], rank, "rank r per layer"),
        (axes[1], nnz, "sparse nonzeros per layer"),
    ):
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(kinds)), kinds)
        ax.set_xticks(range(len(blocks)), blocks, fontsize=7)
        ax.set_xlabel("block")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write every plot the run's files allow; returns the PNG paths."""
    run = Path(run_dir)
    written = [plot_loss(read_history(run), run / "loss.png")]
    if (run / "adapter" / "adapter_config.json").exists():
        written.append(plot_allocation(run / "adapter", run / "allocation.png"))
    return written
