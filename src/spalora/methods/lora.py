"""LoRA: a low-rank update B A on every targeted layer, trained from the first step."""

from __future__ import annotations

from typing import Any

from .base import Method


class LoRA(Method):
    name = "lora"
    trains_sparse = False
    description = "low-rank only"

    def validate(self, config: Any) -> None:
        if config.density is not None:
            raise ValueError("density is set but method='lora' has no sparse part")
