"""spalora: jointly trained sparse + low-rank adapters (LoRA, SpA, RoSA) for transformers."""

# ruff: noqa: E402  (the logger is quietened before the imports below bring in peft)
import logging

# bitsandbytes (the `quant` extra), which peft imports when installed, warns on the CPU that an
# optional kernel it would download is missing: spalora never uses that kernel (spalora.quant).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

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
