"""Sparse-only adaptation: a support chosen by the mask strategy at the start, then trained."""

from __future__ import annotations

from .base import Method


class Sparse(Method):
    name = "sparse"
    trains_lora = False
    description = "sparse only"
