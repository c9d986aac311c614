"""`spalora plot RUN_DIR`: PNGs of a run — loss over steps (phases shaded) with the validation
metric over steps, and the adapter's per-layer rank and density as heat maps over layers x module
type."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .config import WEIGHTS_NAME, SpaloraConfig

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
PHASE_COLORS = {
    "warmup": "#dbe9f6",
    "collect": "#fde2c4",
    "compress": "#e4f2dc",
    "joint": "#ffffff",
}


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no history.jsonl in {run_dir} (is it a `spalora train` run?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(history: list[dict], out: Path) -> Path:
    """Training loss (phases shaded) and, when the run evaluated on its validation split, the
    validation numbers over steps in a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [h for h in history if "loss" in h]
    evals = [h for h in history if "validation" in h]
    if not train_rows:
        raise FileNotFoundError("history.jsonl has no training steps yet")
    n_panels = 2 if evals else 1
    fig, axes = plt.subplots(n_panels, 1, figsize=(7, 3.6 * n_panels), sharex=True, squeeze=False)
    ax = axes[0, 0]
    steps = [h["step"] for h in train_rows]
    losses = [h["loss"] for h in train_rows]
    start = 0
    for i in range(1, len(train_rows) + 1):  # shade each phase's span of steps
        if i == len(train_rows) or train_rows[i]["phase"] != train_rows[start]["phase"]:
            phase = train_rows[start]["phase"]
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
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title("training loss")
    if evals:
        vax = axes[1, 0]
        names = list(dict.fromkeys(k for h in evals for k in h["validation"]))
        for name in names:
            points = [(h["step"], h["validation"][name]) for h in evals if name in h["validation"]]
            target = vax if name != "loss" else vax.twinx()
            style = {"color": "#d08c2b", "ls": "--"} if name == "loss" else {"color": "#1f4e79"}
            target.plot(*zip(*points, strict=True), marker="o", label=f"validation {name}", **style)
            target.set_ylabel(f"validation {name}")
            target.legend(loc="lower right" if name != "loss" else "upper right")
        vax.set_title("validation split during training")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def block_and_kind(name: str) -> tuple[str, str]:
    """("3", "mlp.down_proj") for "model.layers.3.mlp.down_proj"; ("-", name) without a block
    index. The kind keeps the parent (attn.c_proj and mlp.c_proj stay apart)."""
    match = re.search(r"\.(\d+)\.", name)
    return (match.group(1), name[match.end() :]) if match else ("-", name)


def layer_grid(config: SpaloraConfig) -> tuple[list[str], list[str], dict]:
    """(block indices, module types, {(block, type): (r, nnz)}) from the saved per-layer sizes."""
    cells: dict[tuple[str, str], tuple[int, int]] = {}
    for name in sorted(set(config.rank_pattern) | set(config.nnz_pattern)):
        cells[block_and_kind(name)] = (
            config.rank_pattern.get(name, 0),
            config.nnz_pattern.get(name, 0),
        )
    blocks = sorted(
        {b for b, _ in cells}, key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0)
    )
    found = list(dict.fromkeys(k for _, k in cells))
    rank_of = {m: i for i, m in enumerate(MODULE_ORDER)}
    kinds = sorted(found, key=lambda k: rank_of.get(k.rsplit(".", 1)[-1], len(MODULE_ORDER)))
    return blocks, kinds, cells


def saved_shapes(adapter_dir: Path) -> dict[str, tuple[int, int]]:
    """{layer: (out, in)} from the adapter file's metadata (empty for adapters saved without)."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / WEIGHTS_NAME), framework="pt") as fh:
        metadata = fh.metadata() or {}
    return {k: tuple(v) for k, v in json.loads(metadata.get("shapes", "{}")).items()}


def plot_allocation(adapter_dir: Path, out: Path) -> Path:
    """Heat maps of rank and sparse density per layer (rows: module type, columns: block)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    config = SpaloraConfig.load(adapter_dir)
    shapes = saved_shapes(adapter_dir)
    blocks, kinds, cells = layer_grid(config)
    rank = np.zeros((len(kinds), len(blocks)))
    sparse = np.zeros((len(kinds), len(blocks)))
    names = {
        block_and_kind(name): name for name in set(config.rank_pattern) | set(config.nnz_pattern)
    }
    for (b, k), (r, n) in cells.items():
        rank[kinds.index(k), blocks.index(b)] = r
        shape = shapes.get(names.get((b, k), ""))
        sparse[kinds.index(k), blocks.index(b)] = 100 * n / (shape[0] * shape[1]) if shape else n
    sparse_title = "sparse density per layer (%)" if shapes else "sparse nonzeros per layer"
    fig, axes = plt.subplots(2, 1, figsize=(max(6, len(blocks) * 0.3 + 2), 1.2 * len(kinds) + 2.5))
    for ax, data, title in ((axes[0], rank, "rank r per layer"), (axes[1], sparse, sparse_title)):
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
    """Write every plot the run's files allow; returns the PNG paths. An adapter folder (no
    history, an adapter_config.json) gets its allocation plot."""
    run = Path(run_dir)
    if (run / "adapter_config.json").exists() and not (run / "history.jsonl").exists():
        return [plot_allocation(run, run / "allocation.png")]
    written = [plot_loss(read_history(run), run / "loss.png")]
    if (run / "adapter" / "adapter_config.json").exists():
        written.append(plot_allocation(run / "adapter", run / "allocation.png"))
    return written
