"""Layer micro-benchmark: forward + backward of one adapted linear layer, as ratios to the floor.

Rows are interleaved (round-robin) in one process so that machine noise hits all alike; the
median over repeats is reported. The floor is the frozen layer with grad_x only (work every
PEFT method must do). Writes docs/results/layer_speed.md and .csv.

    python benchmarks/layer_speed.py [--tokens 1024] [--repeats 30]
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from spalora.layer import SpaloraLinear

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


class IndexAddSparse(nn.Module):
    """Alternative kept for comparison: S via plain-autograd index_put (dense grad of S)."""

    def __init__(self, base: nn.Linear, flat: torch.Tensor):
        super().__init__()
        self.base = base
        self.rows, self.cols = flat // base.in_features, flat % base.in_features
        self.values = nn.Parameter(torch.zeros(flat.numel()))

    def forward(self, x):
        w = self.base.weight.index_put((self.rows, self.cols), self.values, accumulate=True)
        return nn.functional.linear(x, w, self.base.bias)


class CsrSparse(nn.Module):
    """Alternative kept for comparison: W x + S x with torch.sparse CSR and built-in autograd."""

    def __init__(self, base: nn.Linear, flat: torch.Tensor):
        super().__init__()
        self.base = base
        flat = flat.sort().values
        rows, cols = flat // base.in_features, flat % base.in_features
        self.register_buffer("idx", torch.stack([rows, cols]))
        self.values = nn.Parameter(torch.zeros(flat.numel()))

    def forward(self, x):
        s = torch.sparse_coo_tensor(self.idx, self.values, self.base.weight.shape).to_sparse_csr()
        x2 = x.reshape(-1, x.shape[-1])
        return self.base(x) + torch.sparse.mm(s, x2.t()).t().reshape(*x.shape[:-1], -1)


def make_rows(out_f: int, in_f: int, r: int, density: float, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
    nnz = int(density * out_f * in_f)
    flat = torch.randperm(out_f * in_f)[:nnz]
    rows: dict[str, nn.Module] = {"floor": base}
    lora = SpaloraLinear(base, r=r, lora_alpha=16)
    with torch.no_grad():
        lora.lora_B.normal_()
    rows[f"lora r={r}"] = lora
    sp = SpaloraLinear(base, r=0, nnz=nnz)
    sp.set_mask(flat)
    rows[f"sparse d={density:.0%}"] = sp
    half_nnz = nnz // 2
    both = SpaloraLinear(base, r=r // 2, lora_alpha=16, nnz=half_nnz)
    both.set_mask(flat[:half_nnz])
    rows[f"lora r={r // 2} + sparse d={density / 2:.1%}"] = both
    try:
        import peft

        class One(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(in_f, out_f, bias=False)
                self.lin.weight.data.copy_(base.weight)

            def forward(self, x):
                return self.lin(x)

        pm = peft.get_peft_model(
            One(), peft.LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=["lin"])
        )
        rows[f"peft lora r={r}"] = pm
    except ImportError:
        pass
    rows[f"alt: sparse via autograd index_put d={density:.0%}"] = IndexAddSparse(base, flat)
    rows[f"alt: sparse via torch.sparse CSR d={density:.0%}"] = CsrSparse(base, flat)
    return rows


def time_step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    params = [p for p in module.parameters() if p.requires_grad]
    start = time.perf_counter()
    out = module(x)
    out.backward(g)
    elapsed = time.perf_counter() - start
    x.grad = None
    for p in params:
        p.grad = None
    return elapsed


def run(tokens: int, repeats: int, r: int, density: float) -> list[dict]:
    results = []
    for out_f, in_f in [(1536, 576), (576, 1536)]:
        rows = make_rows(out_f, in_f, r, density)
        x = torch.randn(tokens, in_f, requires_grad=True)
        g = torch.randn(tokens, out_f)
        times: dict[str, list[float]] = {k: [] for k in rows}
        for _ in range(3):
            for mod in rows.values():
                time_step(mod, x, g)
        for _ in range(repeats):
            for name, mod in rows.items():
                times[name].append(time_step(mod, x, g))
        floor = statistics.median(times["floor"])
        for name in rows:
            med = statistics.median(times[name])
            results.append(
                {
                    "shape": f"{out_f}x{in_f}",
                    "row": name,
                    "ms_median": med * 1e3,
                    "ratio_to_floor": med / floor,
                }
            )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = run(args.tokens, args.repeats, args.r, args.density)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "layer_speed.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["shape", "row", "ms_median", "ratio_to_floor"])
        w.writeheader()
        for row in results:
            w.writerow(
                {
                    **row,
                    "ms_median": f"{row['ms_median']:.3f}",
                    "ratio_to_floor": f"{row['ratio_to_floor']:.3f}",
                }
            )
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [
        "# Layer speed: forward + backward of one adapted layer",
        "",
        f"Command: `python benchmarks/layer_speed.py --tokens {args.tokens} --repeats "
        f"{args.repeats}` ({machine}). fp32, {args.tokens} tokens, rows interleaved in one "
        "process, median of repeats; ratio = time / frozen layer (grad_x only).",
        "",
        "| shape | row | ms (median) | ratio to floor |",
        "| --- | --- | ---: | ---: |",
    ]
    for row in results:
        lines.append(
            f"| {row['shape']} | {row['row']} | {row['ms_median']:.2f} | "
            f"{row['ratio_to_floor']:.2f} |"
        )
    (args.out / "layer_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
