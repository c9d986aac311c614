"""RoSA (Nikdan et al., ICML 2024): low-rank warm-up, a Fisher mask from gradient statistics, then
low-rank and sparse parts trained jointly (the base class's agenda)."""

from __future__ import annotations

from .base import Method


class RoSA(Method):
    name = "rosa"
    description = "low-rank warm-up, mask, joint low-rank + sparse"
