"""`python -m benchmarks analyze`: how well does each layer's fine-tuning update compress?

For every adapted layer, the update D = W_tuned - W_base is approximated at a parameter count
P_layer = r_eq * (in + out), three ways: the best rank-r_eq matrix (Eckart-Young, from D's
singular values), the best k-sparse matrix (its k = P_layer largest entries), and a low-rank +
sparse split of the same count (rank r plus k = P_layer - r * (in + out) entries, fitted by
alternating projections: L = best rank-r of D - S, S = top-k of D - L), with the split fraction
that fits best among 1/4, 1/2, 3/4. The relative error ||D - approx||_F / ||D||_F is reported per
layer and averaged (weighted by ||D||^2, so it is the error of the whole update). If low-rank +
sparse fits better than either alone at equal count, joint adapters have room to win.
"""

from __future__ import annotations

import csv
import platform
from pathlib import Path

import torch

from .methods import LINEAR_NAMES

BUDGETS = (1, 2, 4, 8, 16, 32)
SPLITS = (0.25, 0.5, 0.75)
COLUMNS = ("layer", "r_eq", "params", "rank_error", "sparse_error", "hybrid_error", "hybrid_rank")


def layer_updates(base: torch.nn.Module, tuned: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: W_tuned - W_base} for the adapted linear layers, in float32."""
    tuned_weights = dict(tuned.named_parameters())
    out = {}
    for name, p in base.named_parameters():
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer.rsplit(".", 1)[-1] in LINEAR_NAMES:
            if name not in tuned_weights or tuned_weights[name].shape != p.shape:
                raise ValueError(f"the tuned model has no {name} of shape {tuple(p.shape)}")
            out[layer] = (tuned_weights[name].detach().float() - p.detach().float()).cpu()
    if not out:
        raise ValueError(f"no layers named {LINEAR_NAMES} in the base model")
    return out


def top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """x with all but its k largest-magnitude entries set to zero."""
    if k <= 0:
        return torch.zeros_like(x)
    flat = x.flatten()
    idx = flat.abs().topk(min(k, flat.numel())).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(x)


def best_rank(x: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation of x (truncated SVD)."""
    if r <= 0:
        return torch.zeros_like(x)
    if r + 10 < min(x.shape) // 2:  # randomized SVD: ~20x cheaper here, accurate for small r
        with torch.random.fork_rng():  # reproducible without touching the caller's RNG
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(x, q=r + 10, niter=6)
        return (u[:, :r] * s[:r]) @ v[:, :r].T
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def rank_errors(delta: torch.Tensor, ranks) -> dict[int, float]:
    s2 = torch.linalg.svdvals(delta.double()) ** 2
    total = s2.sum()
    return {r: float((s2[r:].sum() / total).sqrt()) for r in ranks}


def sparse_errors(delta: torch.Tensor, counts) -> dict[int, float]:
    sq = (delta.double().flatten() ** 2).sort(descending=True).values
    # suffix[k] = energy outside the k largest entries (exactly 0 once k covers them all)
    suffix = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])
    return {k: float((suffix[min(k, sq.numel())] / suffix[0]).sqrt()) for k in counts}


def hybrid_error(delta: torch.Tensor, r: int, k: int, iters: int = 8) -> float:
    """Relative error of rank-r + k-sparse fitted by alternating projections."""
    s = torch.zeros_like(delta)
    for _ in range(iters):
        low = best_rank(delta - s, r)
        s = top_k(delta - low, k)
    return float(torch.linalg.norm(delta - low - s) / torch.linalg.norm(delta))


def analyze_layer(name: str, delta: torch.Tensor, budgets=BUDGETS, splits=SPLITS) -> list[dict]:
    m, n = delta.shape
    unit = m + n
    ranks = rank_errors(delta, budgets)
    sparse = sparse_errors(delta, [b * unit for b in budgets])
    rows = []
    for b in budgets:
        best = (ranks[b], b)  # all on rank is one of the splits
        for frac in splits:
            r = int(frac * b)
            if 1 <= r < b:
                best = min(best, (hybrid_error(delta, r, (b - r) * unit), r))
        best = min(best, (sparse[b * unit], 0))
        rows.append(
            {
                "layer": name,
                "r_eq": b,
                "params": b * unit,
                "rank_error": ranks[b],
                "sparse_error": sparse[b * unit],
                "hybrid_error": best[0],
                "hybrid_rank": best[1],
                "energy": float(delta.double().pow(2).sum()),
            }
        )
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per budget: errors of the whole update (energy-weighted over layers)."""
    out = []
    for b in sorted({r["r_eq"] for r in rows}):
        part = [r for r in rows if r["r_eq"] == b]
        energy = sum(r["energy"] for r in part)

        def pooled(key: str, part=part, energy=energy) -> float:
            return (sum(r[key] ** 2 * r["energy"] for r in part) / energy) ** 0.5

        out.append(
            {
                "r_eq": b,
                "rank_error": pooled("rank_error"),
                "sparse_error": pooled("sparse_error"),
                "hybrid_error": pooled("hybrid_error"),
                "hybrid_wins": sum(
                    r["hybrid_error"] < min(r["rank_error"], r["sparse_error"]) - 1e-9 for r in part
                ),
                "layers": len(part),
            }
        )
    return out


def run_analysis(base, tuned, out_dir, command: str, progress: bool = True, budgets=BUDGETS):
    from tqdm.auto import tqdm

    deltas = layer_updates(base, tuned)
    rows = []
    for name, delta in tqdm(deltas.items(), desc="layers", disable=not progress):
        rows += analyze_layer(name, delta, budgets)
    summary = summarize(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "analyze.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: f"{v:.5f}" if isinstance(v, float) else v for k, v in r.items()})
    lines = [
        "# How well do fine-tuning updates compress?",
        "",
        f"Produced by `{command}`; machine: {platform.machine()} CPU, torch {torch.__version__}.",
        "",
        "Relative Frobenius error of the best approximation of every adapted layer's update at "
        "r_eq * (in + out) parameters, pooled over layers (weighted by each layer's update "
        "energy). Hybrid: rank + sparse at the same count, best split of 1/4, 1/2, 3/4 (or all "
        "rank / all sparse when those fit better), by alternating projections. Per-layer numbers "
        "in analyze.csv.",
        "",
        "| r_eq | low-rank | sparse | low-rank + sparse | layers where hybrid beats both |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        lines.append(
            f"| {s['r_eq']} | {s['rank_error']:.3f} | {s['sparse_error']:.3f} | "
            f"{s['hybrid_error']:.3f} | {s['hybrid_wins']} / {s['layers']} |"
        )
    (out / "analyze.md").write_text("\n".join(lines) + "\n")
    return [out / "analyze.md", out / "analyze.csv", plot_errors(summary, out / "analyze.png")]


def plot_errors(summary: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [s["r_eq"] for s in summary]
    for key, label in (
        ("rank_error", "low-rank"),
        ("sparse_error", "sparse"),
        ("hybrid_error", "low-rank + sparse"),
    ):
        ax.plot(x, [s[key] for s in summary], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget r_eq (parameters = r_eq * (in + out) per layer)")
    ax.set_ylabel("relative error of the update")
    ax.set_title("compressing the fine-tuning update")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
