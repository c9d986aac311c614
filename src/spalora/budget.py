"""Budget solver: "0.5% of the model", "as many as LoRA r=16" or a count -> r and nnz per layer.

Rank is uniform across layers (RoSA's choice): r = floor(rank_fraction * P / sum(m + n)). What the
rank part leaves is spent on nonzeros in proportion to each layer's size (the same density
everywhere, to within one entry; or, with nnz_allocation="lora", in proportion to m + n as PEFT
ShiRA sizes its layers), with largest-remainder rounding so the total lands on the
budget exactly whenever the sparse part is on, and never above it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    name: str
    out_features: int
    in_features: int

    @property
    def rank_unit(self) -> int:
        return self.out_features + self.in_features

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class LayerAllocation:
    name: str
    out_features: int
    in_features: int
    r: int
    nnz: int

    @property
    def params(self) -> int:
        return self.r * (self.out_features + self.in_features) + self.nnz

    @property
    def density(self) -> float:
        return self.nnz / (self.out_features * self.in_features)


_REQ = re.compile(r"^(?:lora[-_:=]?)?r[-_:=]?(\d+)$", re.IGNORECASE)


def parse_budget(budget: int | float | str, shapes: list[LayerShape], model_params: int) -> int:
    """A budget in trainable parameters.

    Accepted: an int (absolute count); "0.5%" (of all model parameters); a float in (0, 1)
    (fraction of the model); "r16" / "lora-r16" / "r=16" (LoRA-rank equivalent: 16 * sum(m + n)).
    """
    if isinstance(budget, bool):
        raise ValueError(f"invalid budget {budget!r}")
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, float):
        if not 0 < budget < 1:
            raise ValueError(f"a float budget is a fraction of the model in (0, 1), got {budget}")
        value = int(budget * model_params)
    elif isinstance(budget, str):
        text = budget.strip().replace(",", "").replace("_", "")
        m = _REQ.match(text)
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct < 100:
                raise ValueError(f"a percentage budget must lie in (0, 100), got {budget!r}")
            value = int(pct / 100.0 * model_params)
        elif m:
            value = int(m.group(1)) * sum(s.rank_unit for s in shapes)
        elif text.isdigit():
            value = int(text)
        else:
            raise ValueError(
                f"cannot parse budget {budget!r}: use a count (2000000), a percentage ('0.5%') "
                "or a LoRA-rank equivalent ('r16')"
            )
    else:
        raise ValueError(f"invalid budget {budget!r}")
    if value <= 0:
        raise ValueError(f"budget must be positive, got {budget!r}")
    return value


NNZ_ALLOCATIONS = ("density", "lora")


def allocate_nnz(shapes: list[LayerShape], total: int, by: str = "density") -> list[int]:
    """Split `total` nonzeros across layers, summing to `total`: in proportion to each layer's
    size (by="density": the same density everywhere, RoSA's) or to what one LoRA rank costs
    there, m + n (by="lora": PEFT ShiRA's r (m + n) per layer)."""
    if by not in NNZ_ALLOCATIONS:
        raise ValueError(f"nnz_allocation must be one of {NNZ_ALLOCATIONS}, got {by!r}")
    weight = [s.numel if by == "density" else s.rank_unit for s in shapes]
    return allocate_nnz_by_weight(shapes, total, weight)


def allocate_nnz_by_weight(shapes: list[LayerShape], total: int, weight: list[float]) -> list[int]:
    """`total` nonzeros in proportion to `weight`, largest remainders rounded up. A layer's
    share above its size goes to the others (water-filling), so every count fits its layer."""
    capacity = sum(s.numel for s in shapes)
    if not 0 <= total <= capacity:
        raise ValueError(
            f"{total} nonzeros do not fit the {capacity} entries of the targeted layers"
        )
    finite = all(0 <= w < math.inf for w in weight)
    if len(weight) != len(shapes) or not finite or not sum(weight) > 0:
        raise ValueError("weights must be one finite non-negative number per layer, not all zero")
    counts = [0] * len(shapes)
    open_, left = {i for i in range(len(shapes)) if weight[i] > 0}, total
    while left > 0:
        if not open_:  # only zero-weight layers have room: fill them by size
            open_ = {i for i in range(len(shapes)) if counts[i] < shapes[i].numel}
            weight = [float(s.numel) for s in shapes]
        norm = sum(weight[i] for i in open_)
        exact = {i: left * weight[i] / norm for i in open_}
        full = {i for i in open_ if counts[i] + exact[i] >= shapes[i].numel}
        if full:  # these layers fill up; the rest is shared again among the others
            for i in full:
                left -= shapes[i].numel - counts[i]
                counts[i] = shapes[i].numel
            open_ -= full
            continue
        base = {i: int(exact[i]) for i in open_}
        leftover = left - sum(base.values())
        order = sorted(open_, key=lambda i: (-(exact[i] - base[i]), i))
        for i in open_:
            counts[i] += base[i]
        for i in order[:leftover]:
            counts[i] += 1
        left = 0
    return counts


def solve_budget(
    shapes: list[LayerShape],
    budget: int,
    rank_fraction: float,
    use_sparse: bool = True,
    nnz_allocation: str = "density",
) -> list[LayerAllocation]:
    """Per-layer (r, nnz) whose total is as close to `budget` as possible and never above it;
    the nonzeros spread over layers as `nnz_allocation` says (see allocate_nnz)."""
    if not shapes:
        raise ValueError("no layers to allocate a budget to")
    if not 0.0 <= rank_fraction <= 1.0:
        raise ValueError(f"rank_fraction must lie in [0, 1], got {rank_fraction}")
    unit = sum(s.rank_unit for s in shapes)
    r = int(rank_fraction * budget // unit) if rank_fraction > 0 else 0
    if rank_fraction > 0 and r == 0:
        need = math.ceil(unit / rank_fraction)
        raise ValueError(
            f"budget {budget:,} is smaller than one rank unit: rank 1 on every targeted layer "
            f"costs {unit:,} parameters, so rank_fraction={rank_fraction} needs a budget of at "
            f"least {need:,}"
        )
    rest = budget - r * unit
    nnz = [0] * len(shapes)
    if use_sparse and rest > 0:
        nnz = allocate_nnz(shapes, rest, nnz_allocation)
    return [
        LayerAllocation(s.name, s.out_features, s.in_features, r, k)
        for s, k in zip(shapes, nnz, strict=True)
    ]


def format_allocation_table(allocs: list[LayerAllocation], budget: int | None = None) -> str:
    """A per-layer table (grouped by module type when there are many layers)."""
    lines = [f"{'layer':<48} {'shape':>11} {'r':>4} {'nnz':>9} {'density':>8} {'params':>10}"]
    for a in allocs:
        shape = f"{a.out_features}x{a.in_features}"
        lines.append(
            f"{a.name[-48:]:<48} {shape:>11} {a.r:>4} {a.nnz:>9} {a.density:>8.3%} {a.params:>10,}"
        )
    total = sum(a.params for a in allocs)
    tail = f"total trainable: {total:,}"
    if budget is not None:
        tail += f" of budget {budget:,} ({total / budget:.4%} used)"
    lines.append(tail)
    return "\n".join(lines)
