"""Adapter methods: the contract (`Method`, `Phase`, events), the registry, and the built-ins
(`lora`, `sparse`, `rosa` as small modules; ours in the `spalora` subpackage)."""

from .base import (
    AFTER_CONTROLLER,
    AFTER_MASK,
    AFTER_STEPS,
    MASKS_SET,
    NEVER,
    RESIZED,
    RESTARTED,
    Controller,
    Method,
    Phase,
    swap_parameters,
)
from .registry import get_method, method_names, register_method

__all__ = [
    "AFTER_CONTROLLER",
    "AFTER_MASK",
    "AFTER_STEPS",
    "MASKS_SET",
    "NEVER",
    "RESIZED",
    "RESTARTED",
    "Controller",
    "Method",
    "Phase",
    "get_method",
    "method_names",
    "register_method",
    "swap_parameters",
]
