"""Methods by name: the built-ins (imported when first asked for) and any a user registers.

The config checks a method's name here without importing any method's code, so configs stay a
leaf of the package; `get_method` imports a built-in on first use."""

from __future__ import annotations

import functools
import importlib

from .base import Method

BUILTIN = {  # name -> "module:class" under spalora.methods
    "lora": "lora:LoRA",
    "sparse": "sparse:Sparse",
    "rosa": "rosa:RoSA",
    "spalora": "spalora:Spalora",
}
_registered: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make `method` available by its name to configs, models and the training loop."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a Method instance, got {type(method).__name__}")
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{type(method).__name__} has no name")
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in method; choose another name")
    _registered[name] = method
    return method


def method_names() -> tuple[str, ...]:
    return (*BUILTIN, *_registered)


def get_method(name: str) -> Method:
    """The method called `name`; one ValueError listing the known ones otherwise."""
    if name in _registered:
        return _registered[name]
    if name not in BUILTIN:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return _builtin(name)


@functools.cache
def _builtin(name: str) -> Method:
    module, cls = BUILTIN[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)()
