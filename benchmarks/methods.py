"""The methods the accuracy benchmark compares, as a registry: a method is one entry.

Every builder takes the frozen base model and the budget as a LoRA-rank equivalent r_eq
(P = r_eq * sum of (in + out) over the adapted layers) and returns the model to train with at
most P trainable parameters. LoRA scales are alpha / r = 2 (PEFT Supra's default) everywhere
but in our method, which has LoRA's alpha at the budget (see _ours).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .spread import build_sparse_credit, build_sparse_sampled, probe_count, probe_stream

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Starting grids, points a factor ~3 apart; the harness extends a grid past its edge whenever the
# choice lands there (accuracy.next_lr), so every method's rate ends up inside its grid.
ADAPTER_LRS = (1e-3, 3e-3, 1e-2)
EVA_MAX_BATCHES = 32  # EVA stops once its components settle; at most this many micro-batches
ROSA_SPARSE_LR_RATIO = 2e-4 / 7e-4
FFT_LRS = (1e-5, 3e-5, 1e-4, 3e-4)


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[nn.Module, int, dict], nn.Module]  # (base, r_eq, variant) -> model
    lr_grid: tuple[float, ...] = ADAPTER_LRS
    # Settings besides the learning rate that are chosen on validation, per budget r_eq.
    variants: Callable[[int], tuple[dict, ...]] = lambda r_eq: ({},)
    description: str = ""
    # Ablations train at the learning rate chosen for this method (no grid of their own).
    lr_from: str | None = None
    # Bumped when a change in the library changes what this method trains: its cached runs
    # then no longer match (the key holds it once > 0) and are trained again, while the other
    # methods' runs stay valid. What each revision changed: docs/results/README.md.
    revision: int = 0
    # The sparse values' learning rate as a fraction of the grid's: RoSA's paper trains S at
    # 2e-4 against LoRA's 7e-4, and at LoRA's rate S destabilises training once the mask is set.
    # Sparse-only keeps the grid's rate: S is all it trains.
    sparse_lr_ratio: float = 1.0
    # LoRA+: the B factors' rate as a multiple of the grid's (TrainConfig.lora_b_lr_ratio).
    lora_b_lr_ratio: float = 1.0
    # Controls: methods this one is paired with in the report, besides our method.
    compare_with: tuple[str, ...] = ()


def rosa_splits(r_eq: int) -> tuple[dict, ...]:
    """Rank fractions 1/4, 1/2, 3/4 of the budget, as far as they give distinct whole ranks
    between 1 and r_eq - 1 (r_eq = 8: ranks 2, 4, 6; r_eq = 2: rank 1 only)."""
    ranks = sorted({r for r in (r_eq // 4, r_eq // 2, (3 * r_eq) // 4) if 1 <= r < r_eq})
    return tuple({"rank_fraction": r / r_eq} for r in ranks)


def adapted_linears(model: nn.Module) -> list[nn.Linear]:
    return [
        m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in LINEAR_NAMES
    ]


def budget_params(model: nn.Module, r_eq: int) -> int:
    """P = r_eq * sum over adapted layers of (in + out)."""
    return r_eq * sum(m.in_features + m.out_features for m in adapted_linears(model))


def trainable_params(model: nn.Module) -> int:
    if hasattr(model, "get_nb_trainable_parameters"):
        return int(model.get_nb_trainable_parameters()[0])
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _spalora(
    method: str,
    fraction: float | None = None,
    mask: str = "fisher",
    warmup: int | None = None,
    nnz_allocation: str = "density",
):
    """Our lora / sparse / rosa; `warmup` fixes the low-rank warm-up (a random support needs
    none), else the profile's; `nnz_allocation` spreads the nonzeros (budget.allocate_nnz)."""

    def build(model: nn.Module, r_eq: int, variant: dict) -> nn.Module:
        from spalora import SpaloraConfig, get_spalora_model

        frac = variant.get("rank_fraction", fraction)
        r = max(1, int((1.0 if method == "lora" else frac or 0.0) * r_eq))
        cfg = SpaloraConfig(
            method=method,
            target_modules=list(LINEAR_NAMES),
            budget=f"r{r_eq}",
            rank_fraction=frac if method == "rosa" else None,
            lora_alpha=2.0 * r,
            lora_dropout=0.0,
            mask_strategy=mask,
            nnz_allocation=nnz_allocation,
            warmup_steps=variant.get("warmup_steps", 40) if warmup is None else warmup,
            mask_batches=probe_count(variant),
            seed=variant.get("seed", 0),
        )
        return get_spalora_model(model, cfg)

    return build


def _ours(**settings):
    """Our method with ONE setting for every task and budget (rank over-provisioned to 1.5x what
    all of P buys, nonzeros to 1.5x the even split's, IRLS refresh every 10 steps, truncation at
    half the run); `settings` switch parts off for the ablations.

    lora_alpha is LoRA's at the budget (2 r_eq), so the rank-ceil(1.5 r_eq) start trains at scale
    2 r_eq / ceil(1.5 r_eq) (4/3 at r_eq = 2 and 8): with Adam a LoRA update grows with the scale
    and with the rank at a given learning rate, and at scale 2 the over-provisioned start took
    larger steps than the other low-rank methods at the same rate (docs/results/README.md,
    revision 3)."""

    def build(model: nn.Module, r_eq: int, variant: dict) -> nn.Module:
        from spalora import SpaloraConfig, get_spalora_model

        cfg = SpaloraConfig(
            method="spalora",
            target_modules=list(LINEAR_NAMES),
            budget=f"r{r_eq}",
            lora_alpha=2.0 * r_eq,  # LoRA's at the budget: scale 2 r_eq / ceil(c r_eq)
            lora_dropout=0.0,
            mask_batches=probe_count(variant),
            seed=variant.get("seed", 0),
            **{
                "overprovision": 1.5,  # c
                "rank_fraction": 0.5,
                "mask_strategy": "fisher",
                "warmup_steps": variant.get("warmup_steps", 40),
                **settings,
            },
        )
        return get_spalora_model(model, cfg)

    return build


def _ours_method(
    name: str,
    description: str,
    sparse_lr_ratio: float = ROSA_SPARSE_LR_RATIO,
    candidate: bool = False,
    lr_from: str | None = None,
    **settings,
) -> Method:
    """Our method or one of its ablations: one revision and, unless an ablation changes it, one
    sparse rate for all of them; the ablations train at the rate chosen for `spalora`, a
    `candidate` for the next revision at its own."""
    return Method(
        name,
        _ours(**settings),
        revision=3,
        sparse_lr_ratio=sparse_lr_ratio,
        lr_from=lr_from or ("spalora" if settings and not candidate else None),
        description=description,
    )


def _candidate(name: str, description: str, lr_from: str | None = None, **settings) -> Method:
    """Issue 25's candidates and their ablations: S at 10x LoRA's rate on a random support from
    step 0 (no warm-up), the budget reached between 10% and 60% of the run; `settings` change
    one part each."""
    base = dict(
        rank_fraction=0.0,
        mask_strategy="random",
        warmup_steps=0,
        reach_budget="cubic",
        prune_from=0.1,
        truncate_at=0.6,
    )
    return _ours_method(
        name, description, sparse_lr_ratio=10.0, candidate=True, lr_from=lr_from,
        **{**base, **settings},
    )  # fmt: skip


def _full(model: nn.Module, r_eq: int, variant: dict) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _peft_lora_config(r_eq: int, **init):
    """PEFT LoRA at the budget, as the `peft-lora` peer trains it; `init` changes its start."""
    from peft import LoraConfig

    return LoraConfig(
        r=r_eq, lora_alpha=2 * r_eq, lora_dropout=0.0, target_modules=list(LINEAR_NAMES), **init
    )


def _peft_lora(model: nn.Module, r_eq: int, variant: dict) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, _peft_lora_config(r_eq))


def _peft_lora_eva(model: nn.Module, r_eq: int, variant: dict) -> nn.Module:
    """PEFT LoRA with EVA's data-driven start (A from the top right-singular vectors of each
    layer's inputs on the run's first micro-batches, B zero, so the model starts unchanged);
    rho = 1 keeps r = r_eq on every layer, so the budget is LoRA's exactly."""
    import itertools

    from peft import EvaConfig, get_peft_model, initialize_lora_eva_weights

    stream = probe_stream(variant, "peft-lora-eva")
    cfg = _peft_lora_config(r_eq, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    peft_model = get_peft_model(model, cfg)
    batches = list(itertools.islice(stream, EVA_MAX_BATCHES))
    initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False)
    return peft_model


def _peft_lora_ga(model: nn.Module, r_eq: int, variant: dict) -> nn.Module:
    """PEFT LoRA with LoRA-GA's start (A, B from the top 2r singular vectors of each layer's
    mean gradient over the run's first `mask_batches` micro-batches, B A subtracted from the
    frozen weight, so the model starts unchanged and B A's first step follows full fine-tuning's).
    PEFT's defaults: ArB2r directions, "stable" scale with gamma 16."""
    import itertools

    from peft import LoraGAConfig, get_peft_model
    from peft.tuners.lora.loraga import preprocess_loraga

    stream = probe_stream(variant, "peft-lora-ga")
    batches = list(itertools.islice(stream, probe_count(variant)))
    cfg = _peft_lora_config(r_eq, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    device = next(model.parameters()).device

    def train_step() -> None:  # PEFT averages the summed gradient over the backward calls
        for batch in batches:
            model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()

    preprocess_loraga(model, cfg, train_step)
    return get_peft_model(model, cfg)


def _peft_shira(model: nn.Module, r_eq: int, variant: dict) -> nn.Module:
    from peft import ShiraConfig, get_peft_model

    cfg = ShiraConfig(r=r_eq, target_modules=list(LINEAR_NAMES), random_seed=variant.get("seed"))
    return get_peft_model(model, cfg)


def supra_sparsity(model: nn.Module, r_eq: int, r: int) -> float:
    """PEFT Supra's one global sparsity that spends what rank r leaves of P, never more."""
    layers = adapted_linears(model)
    left = budget_params(model, r_eq) - r * sum(m.in_features + m.out_features for m in layers)
    # PEFT keeps int(numel * (1 - sparsity)) entries per layer: a density a hair under left/total
    # keeps the floor of every layer's share, so the sum stays within the budget.
    density = left / sum(m.in_features * m.out_features for m in layers)
    return 1.0 - density * (1 - 1e-9)


def _peft_supra(model: nn.Module, r_eq: int, variant: dict) -> nn.Module:
    from peft import SupertuningConfig, get_peft_model

    r = max(1, int(variant.get("rank_fraction", 0.5) * r_eq))  # the split, as RoSA's grid
    cfg = SupertuningConfig(
        r=r,
        lora_alpha=2 * r,
        sparsity=supra_sparsity(model, r_eq, r),
        target_modules=list(LINEAR_NAMES),
    )
    return get_peft_model(model, cfg)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fft", _full, FFT_LRS, description="full fine-tuning (reference, no budget)"),
        Method("lora", _spalora("lora"), description="our LoRA, r = r_eq"),
        Method(
            "sparse", _spalora("sparse"), revision=1, description="our sparse-only, Fisher mask"
        ),
        # Control for PEFT ShiRA: the same entries-only adapter in our code with ShiRA's uniform
        # random support, so the mask is the one thing that differs from `sparse` (which rate
        # each prefers is chosen on validation, as for every method).
        Method(
            "sparse-random",
            _spalora("sparse", mask="random"),
            revision=1,
            description="control: our sparse-only, uniform random mask (ShiRA's support)",
            compare_with=("peft-shira", "sparse"),
        ),
        # Issue 25: PEFT ShiRA spreads its entries as r (m + n) per layer, we at one density;
        # at seed 0 ShiRA led sparse-random by 0.016 nats. Is the spread why?
        Method(
            "sparse-random-lora",
            _spalora("sparse", mask="random", nnz_allocation="lora"),
            revision=1,
            description="control: sparse-random with ShiRA's spread, r (m + n) entries per layer",
            compare_with=("peft-shira", "sparse-random"),
        ),
        # Issue 25: the spread set by each layer's gradient mass at step 0 (benchmarks/spread.py)
        Method(
            "sparse-credit",
            build_sparse_credit(LINEAR_NAMES),
            revision=1,
            description="pilot: random entries spread over layers by size x mean |g| at step 0",
            compare_with=("sparse-random", "sparse-random-lora", "peft-shira"),
        ),
        # Issue 25: within a layer, an entry's mean |g| over the first 8 steps predicts the
        # credit it realizes later (top tenth 2.4x the mean; path_credit --early 8): entries
        # drawn in proportion to it on ShiRA's spread (benchmarks/spread.py)
        Method(
            "sparse-sampled",
            build_sparse_sampled(LINEAR_NAMES),
            revision=1,
            description="pilot: ShiRA's spread, entries drawn in proportion to mean |g| at step 0",
            compare_with=("sparse-random-lora", "peft-shira"),
        ),
        # Issue 25's oracle pilot: does a fixed mixed split beat all-sparse when both parts train
        # from step 0, S on a random support at its own (10x) rate?
        Method(
            "split-random",
            _spalora("rosa", mask="random", warmup=0),
            variants=rosa_splits,
            revision=1,
            sparse_lr_ratio=10.0,
            description="pilot: rank + random support from step 0, S at 10x the rate",
            compare_with=("sparse-random", "peft-shira"),
        ),
        # The oracle above trained its rank part at 1e-3, where LoRA is 0.13 nats worse than at
        # 3e-3 (PEFT LoRA, selection seed 0): each part at its own chosen rate (LoRA 3e-3, S
        # 1e-2, so S at 10/3 of the grid's rate), S spread as ShiRA's.
        Method(
            "split-random-lora",
            _spalora("rosa", mask="random", warmup=0, nnz_allocation="lora"),
            variants=rosa_splits,
            revision=1,
            sparse_lr_ratio=10.0 / 3.0,
            description="pilot: rank + ShiRA-spread random support from step 0, S at 10/3",
            compare_with=("sparse-random-lora", "peft-lora", "peft-shira"),
        ),
        Method(
            "rosa",
            _spalora("rosa"),
            variants=rosa_splits,
            revision=1,
            sparse_lr_ratio=ROSA_SPARSE_LR_RATIO,
            description="our RoSA: LoRA warm-up, Fisher mask, joint; rank fraction on validation",
        ),
        Method("peft-lora", _peft_lora, description="PEFT LoraConfig(r=r_eq)"),
        # Issue 25, direction 6 (a data-driven start for the low-rank part), as PEFT ships it
        Method(
            "peft-lora-eva",
            _peft_lora_eva,
            description="pilot: PEFT LoRA(r=r_eq) with EVA's start (rho 1: LoRA's budget)",
            compare_with=("peft-lora",),
        ),
        Method(
            "peft-lora-ga",
            _peft_lora_ga,
            description="pilot: PEFT LoRA(r=r_eq) with LoRA-GA's gradient start",
            compare_with=("peft-lora",),
        ),
        Method(
            "peft-loraplus",
            _peft_lora,
            lr_grid=(3e-4, 1e-3, 3e-3),
            lora_b_lr_ratio=16.0,
            description="pilot: PEFT LoRA(r=r_eq) trained as LoRA+ (B at 16x A's rate)",
            compare_with=("peft-lora",),
        ),
        Method("peft-shira", _peft_shira, description="PEFT ShiraConfig(r=r_eq), random mask"),
        Method(
            "peft-supra",
            _peft_supra,
            variants=rosa_splits,
            description="PEFT SupertuningConfig: rank + magnitude support; split on validation",
        ),
        _ours_method(
            "spalora", "ours: IRLS rank + sparsity penalties, global allocation, truncation"
        ),
        # Issue 25's candidate for revision 4 (docs/method.md): both parts from step 0, S on a
        # random support as large as all of P buys at 10x LoRA's rate, the budget reached on a
        # cubic schedule between 10% and 60% of the run, pruning keeps Adam's moments.
        _candidate(
            "spalora-gradual",
            "candidate: both parts from step 0, S at 10x, budget reached by cubic pruning",
        ),
        _candidate(
            "spalora-gradual-sparse",
            "candidate's ablation: no rank part (1.5 P random entries pruned to P)",
            lr_from="spalora-gradual",
            start_rank="split",
        ),
        _candidate(
            "spalora-gradual-cut",
            "candidate's ablation: the same start, cut to the budget at once at 60% (no schedule)",
            lr_from="spalora-gradual",
            reach_budget="cut",
        ),
        _candidate(
            "spalora-gradual-lora",
            "candidate with ShiRA's spread at the start: its nonzeros begin in proportion to "
            "m + n; its global magnitude pruning then re-splits them (in practice it keeps each "
            "layer's share, docs/results/README.md)",
            lr_from="spalora-gradual",
            nnz_allocation="lora",
        ),
        _candidate(
            "spalora-exchange",
            "candidate at exactly the budget: random entries from step 0, the weakest swapped for "
            "random new ones (RigL's cosine fraction from 0.3) between 10% and 60% of the run",
            lr_from="spalora-gradual",
            start_rank="split",
            overprovision=1.0,
            reach_budget="exchange",
            exchange_fraction=0.3,
        ),
        _ours_method(
            "spalora-rank-reg",
            "ablation: rank penalty only (global allocation)",
            sparse_reg=0.0,
        ),
        _ours_method(
            "spalora-sparse-reg",
            "ablation: sparsity penalty only (global allocation)",
            rank_reg=0.0,
        ),
        _ours_method(
            "spalora-no-reg",
            "control: neither penalty (allocation and truncation by magnitude alone)",
            rank_reg=0.0,
            sparse_reg=0.0,
        ),
        _ours_method(
            "spalora-uniform",
            "ablation: both penalties, RoSA's even split in every layer",
            allocation="uniform",
        ),
        _ours_method(
            "spalora-residual",
            "ablation: residual mask (gradient outside LoRA's subspace)",
            mask_strategy="residual",
        ),
        _ours_method(
            "spalora-random",
            "ablation: uniform random mask (ShiRA's support) instead of the Fisher mask",
            mask_strategy="random",
        ),
        _ours_method(
            "spalora-random-fullrate",
            "ablation: ShiRA's random mask and its rate (S at the full rate, not 2/7 of it)",
            sparse_lr_ratio=1.0,
            mask_strategy="random",
        ),
    )
}


def build_method(name: str, model: nn.Module, r_eq: int, variant: dict) -> nn.Module:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    torch.manual_seed(variant.get("seed", 0))  # LoRA initialisation follows the run's seed
    return METHODS[name].build(model, r_eq, variant)
