"""SpaloraConfig: what to adapt and how, in PEFT's style (one dataclass, saved as JSON)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("lora", "sparse", "rosa", "spalora")
MASK_STRATEGIES = ("fisher", "grad", "residual", "magnitude", "wanda", "random")
ALLOCATIONS = ("global", "uniform")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class SpaloraConfig:
    """Configuration of a spalora adapter.

    Sizes come either from `r` + `density` directly, or from a `budget` (absolute count, "0.5%" of
    the model, or "r16" for as many parameters as LoRA r=16 on the targeted layers) split by
    `rank_fraction` between rank and nonzeros. The solver writes the result per layer into
    `rank_pattern` / `nnz_pattern`, so a saved adapter reloads with exactly its shapes.
    """

    method: str = "rosa"
    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] | str | None = None
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    density: float | None = None
    budget: int | str | None = None
    rank_fraction: float | None = None
    # Mask schedule (RoSA): LoRA-only warm-up, gradient collection, then joint training.
    mask_strategy: str = "fisher"
    warmup_steps: int = 64
    mask_batches: int = 8
    restart_after_mask: bool = False
    # The sparse values join training mid-run, where Adam's first steps move every one of them by
    # about the full learning rate at once (a sign step): their learning rate ramps up linearly
    # over this many steps after the masks are set, as every parameter's does at step 0.
    sparse_warmup_steps: int = 10
    seed: int = 0
    # Per-layer densities overriding `density`: {"mlp.down_proj": 0.02, r".*\.0\..*": 0.05}; a key
    # matches a module whose name equals it or ends with "." + key, or fully matches it as a regex.
    density_pattern: dict[str, float] = field(default_factory=dict)
    # Our method (method="spalora"): train over-provisioned (`overprovision` x the rank and the
    # nonzeros the budget allows) under IRLS rank and sparsity penalties, split the budget across
    # layers at one global threshold (`allocation="global"`; "uniform" keeps RoSA's split in
    # every layer), then truncate to exactly the budget at `truncate_at` (a fraction of the run's
    # steps, or an absolute step when >= 1). See spalora.adaptive.
    overprovision: float = 1.5
    # Where the over-provisioned rank starts: "budget" = overprovision x the rank the whole budget
    # would buy (LoRA's), so the allocation can reach pure LoRA and beyond in the layers that
    # need it; "split" = overprovision x the `rank_fraction` split's rank (the first version,
    # whose ranks sat at that cap in most layers). The candidate nonzeros are always
    # overprovision x the split's.
    start_rank: str = "budget"
    rank_reg: float = 10.0
    sparse_reg: float = 10.0
    irls_every: int = 10
    allocation: str = "global"
    truncate_at: float = 0.5
    rewarm_steps: int = 5
    # Filled by the solver / at save time; reloading uses them verbatim.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    nnz_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # per-layer lora_alpha
    base_model_name_or_path: str | None = None
    peft_type: str = "SPALORA"
    spalora_version: str = "0.1.0"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a clear message on settings that cannot work."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.mask_strategy, str) and self.mask_strategy not in MASK_STRATEGIES:
            raise ValueError(
                f"mask_strategy must be one of {MASK_STRATEGIES} or a callable, "
                f"got {self.mask_strategy!r}"
            )
        if self.density is not None and not (0.0 < float(self.density) < 1.0):
            raise ValueError(f"density must lie in (0, 1), got {self.density}")
        for key, value in self.density_pattern.items():
            if not (0.0 < float(value) < 1.0):
                raise ValueError(f"density_pattern[{key!r}] must lie in (0, 1), got {value}")
        if self.rank_fraction is not None and not (0.0 <= float(self.rank_fraction) <= 1.0):
            raise ValueError(f"rank_fraction must lie in [0, 1], got {self.rank_fraction}")
        if self.uses_lora and self.budget is None and int(self.r) < 1:
            raise ValueError(f"r must be >= 1 for method {self.method!r}, got {self.r}")
        if not (0.0 <= float(self.lora_dropout) < 1.0):
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.warmup_steps < 0 or self.mask_batches < 1 or self.sparse_warmup_steps < 0:
            raise ValueError(
                "warmup_steps and sparse_warmup_steps must be >= 0 and mask_batches >= 1"
            )
        if self.method == "spalora":
            if self.overprovision < 1.0:
                raise ValueError(f"overprovision must be >= 1, got {self.overprovision}")
            if self.start_rank not in ("budget", "split"):
                raise ValueError(f"start_rank must be 'budget' or 'split', got {self.start_rank!r}")
            if self.rank_reg < 0 or self.sparse_reg < 0:
                raise ValueError("rank_reg and sparse_reg must be >= 0")
            if self.irls_every < 1 or self.rewarm_steps < 0:
                raise ValueError("irls_every must be >= 1 and rewarm_steps >= 0")
            if self.allocation not in ALLOCATIONS:
                raise ValueError(
                    f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}"
                )
            if float(self.truncate_at) <= 0:
                raise ValueError(f"truncate_at must be > 0, got {self.truncate_at}")
            if self.restart_after_mask:
                raise ValueError(
                    "restart_after_mask is RoSA's recipe; method='spalora' has its own"
                )
            if self.budget is None and not (self.rank_pattern or self.nnz_pattern):
                raise ValueError("method='spalora' needs a budget (it splits one across layers)")
        if self.method == "lora" and self.density is not None:
            raise ValueError("density is set but method='lora' has no sparse part")

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "rosa", "spalora")

    @property
    def uses_sparse(self) -> bool:
        return self.method in ("sparse", "rosa", "spalora")

    @property
    def effective_rank_fraction(self) -> float:
        if self.method == "lora":
            return 1.0
        if self.method == "sparse":
            return 0.0
        return 0.5 if self.rank_fraction is None else float(self.rank_fraction)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if callable(self.mask_strategy):
            d["mask_strategy"] = getattr(self.mask_strategy, "__name__", "callable")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpaloraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SpaloraConfig keys: {unknown}")
        data = dict(data)
        if data.get("mask_strategy") not in MASK_STRATEGIES:
            data["mask_strategy"] = "fisher"  # a saved user callable: the mask itself is saved
        return cls(**data)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> SpaloraConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        return cls.from_dict(json.loads(path.read_text()))
