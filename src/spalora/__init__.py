"""spalora: jointly trained sparse + low-rank adapters (LoRA, SpA, RoSA) for transformers."""

from .budget import LayerAllocation, LayerShape, parse_budget, solve_budget
from .config import SpaloraConfig
from .functional import sparse_lora_linear
from .layer import SpaloraLinear
from .masks import apply_masks, collect_statistics
from .model import SpaloraModel, get_spalora_model
from .schedule import MaskSchedule, SpaloraCallback

__version__ = "0.1.0"

__all__ = [
    "LayerAllocation",
    "LayerShape",
    "MaskSchedule",
    "SpaloraCallback",
    "SpaloraConfig",
    "SpaloraLinear",
    "SpaloraModel",
    "apply_masks",
    "collect_statistics",
    "get_spalora_model",
    "parse_budget",
    "solve_budget",
    "sparse_lora_linear",
]
