"""Several named adapters on one model: add, load, switch, delete, merge and disable them.

Every wrapped layer holds every adapter (an empty one, r = nnz = 0, where an adapter does not
target it), so switching only tells the layers which one is active, and merging one adapter asks
each of its layers to add its own delta: the tensors, their math and the W0 + S cache are the
layers'. What is kept here is each adapter's plan (configuration and per-layer sizes), in the
order the adapters were added, and which one is active.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .config import SpaloraConfig
from .layer import SpaloraLinear, check_size
from .plan import AdapterPlan, layer_sizes, plan_adapter
from .serialization import (
    check_adapter_name,
    check_finite,
    read_adapter,
    split_state,
    validate_adapter_state,
)
from .targeting import set_submodule


def _new_layers(
    model: nn.Module, plan: AdapterPlan, others: dict[str, AdapterPlan]
) -> dict[str, SpaloraLinear]:
    """Wrappers for the layers `plan` targets that are not wrapped yet, each holding an empty
    slot (r = nnz = 0) for every adapter in `others` (nothing is attached to the model here)."""
    layers = {}
    first, *rest = others
    for a in plan.allocations:
        base = model.get_submodule(a.name)
        if isinstance(base, SpaloraLinear):
            continue
        cfg = others[first].config
        layer = SpaloraLinear(base, 0, cfg.lora_alpha, cfg.lora_dropout, 0, adapter_name=first)
        for name in rest:
            cfg = others[name].config
            layer.add_adapter(name, 0, cfg.lora_alpha, cfg.lora_dropout, 0)
        layer.train(base.training)  # new modules start in train mode; follow the model's
        layers[a.name] = layer
    return layers


def _fill_adapter(
    layers: dict[str, SpaloraLinear],
    adapter_name: str,
    plan: AdapterPlan,
    state: dict[str, torch.Tensor] | None = None,
    trainable: bool = True,
) -> None:
    """Give every layer the adapter at its planned size (empty where it is not targeted): with
    `state`'s tensors, else initialised as a fresh model would be (same seed, same order)."""
    cfg = plan.config
    generator = torch.Generator().manual_seed(cfg.seed)
    tensors = split_state(state) if state is not None else None
    targeted = [a.name for a in plan.allocations]
    for name in targeted + sorted(set(layers) - set(targeted)):
        r, nnz, alpha = layer_sizes(cfg, name)
        adapter = layers[name].add_adapter(
            adapter_name, r, alpha, cfg.lora_dropout, nnz, trainable, init=tensors is None
        )
        if tensors is None:
            adapter.reset_lora(generator)
        else:
            adapter.load(tensors.get(name, {}))


class MultiAdapterMixin:
    """The adapter-level API of SpaloraModel, which sets `base_model`, `_plans` (name -> plan,
    in the order added), `_active` (a name in `_plans`) and `_disabled`, and provides
    `sync_allocations()`."""

    base_model: nn.Module
    _plans: dict[str, AdapterPlan]
    _active: str
    _disabled: bool

    # ---------------------------------------------------------------- layers
    def wrapped_layers(self) -> dict[str, SpaloraLinear]:
        """Every wrapped layer: the union of all adapters' targets."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, SpaloraLinear)}

    def adapter_layers(self, adapter_name: str | None = None) -> dict[str, SpaloraLinear]:
        """The layers an adapter targets (default: the active one's)."""
        names = {a.name for a in self._plan(adapter_name).allocations}
        return {n: m for n, m in self.wrapped_layers().items() if n in names}

    # -------------------------------------------------------------- adapters
    @property
    def active_adapter(self) -> str:
        """The name of the adapter the layers run (and that trains)."""
        return self._active

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's spelling: a list, here always of one name."""
        return [self._active]

    @property
    def adapters(self) -> list[str]:
        """Every adapter's name, in the order they were added."""
        return list(self._plans)

    def list_adapters(self) -> list[str]:
        return self.adapters

    def get_adapter_config(self, adapter_name: str | None = None) -> SpaloraConfig:
        """An adapter's configuration, per-layer patterns filled in (default: the active one)."""
        return self._plan(adapter_name).config

    @property
    def merged_adapters(self) -> list[str]:
        """Adapters whose delta is (at least partly) in the base weights."""
        merged = {n for lay in self.wrapped_layers().values() for n in lay.merged_adapters}
        return [n for n in self._plans if n in merged]

    def add_adapter(self, adapter_name: str, config: SpaloraConfig) -> None:
        """Add a new, untrained adapter (initialised as `get_spalora_model` would); the active
        adapter stays active: `set_adapter(adapter_name)` to train it."""
        self._check_new(adapter_name)
        self._attach(adapter_name, plan_adapter(self.base_model, config, wrapped=True))

    def load_adapter(
        self, adapter_dir: str | Path, adapter_name: str, is_trainable: bool = False
    ) -> None:
        """Load a saved adapter next to the present ones, without reloading the base model.

        `adapter_dir` is the adapter's folder, or a folder written by `save_pretrained` with
        several adapters (then its subfolder `adapter_name` is used when there is one). The
        adapter is not activated (as in PEFT): `set_adapter(adapter_name)`. Checked like
        `from_pretrained`: on a mismatch a ValueError names the tensor and nothing changes.
        """
        self._check_new(adapter_name)
        config, state = read_adapter(adapter_dir, adapter_name)
        validate_adapter_state(self.base_model, config, state, wrapped=True)
        plan = plan_adapter(self.base_model, config, wrapped=True)
        self._attach(adapter_name, plan, state, trainable=is_trainable)

    def _attach(
        self,
        adapter_name: str,
        plan: AdapterPlan,
        state: dict[str, torch.Tensor] | None = None,
        trainable: bool = True,
    ) -> None:
        """Wrap the layers no adapter took yet, then give every wrapped layer the adapter."""
        for a in plan.allocations:  # every size checked before the model changes
            check_size(a.out_features, a.in_features, a.r, a.nnz)
        like = next(iter(self.wrapped_layers().values()), None)
        for name, layer in _new_layers(self.base_model, plan, self._plans).items():
            layer.set_adapter(self._active)
            layer.disabled = self._disabled
            if like is not None and "sparse_in_weight" in vars(like):  # set per layer (FSDP)
                layer.sparse_in_weight = like.sparse_in_weight
            set_submodule(self.base_model, name, layer)
        _fill_adapter(self.wrapped_layers(), adapter_name, plan, state, trainable)
        self._plans[adapter_name] = plan

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter: the layers run and train it.

        No tensor is copied: each adapter's parameters stay the same objects, so an optimizer
        built for one adapter stays valid for it after switching away and back. Inactive
        adapters get no gradient (requires_grad is off while inactive). Merged adapters stay
        merged: their delta stays in the base weights.
        """
        self._check_known(adapter_name)
        self._check_enabled("switch adapters")
        if adapter_name == self._active:
            return
        self.sync_allocations()  # the leaving adapter's patterns as its layers now are
        for layer in self.wrapped_layers().values():
            layer.set_adapter(adapter_name)
        self._active = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its tensors. Deleting the active one activates the first of the
        others (as PEFT does, with a warning); the only adapter cannot be deleted (use unload())."""
        self._check_known(adapter_name)
        if adapter_name in self.merged_adapters:
            raise RuntimeError(
                f"adapter {adapter_name!r} is merged into the base weights: "
                f"unmerge_adapter([{adapter_name!r}]) first"
            )
        if adapter_name == self._active:
            others = [n for n in self._plans if n != adapter_name]
            if not others:
                raise ValueError(
                    f"{adapter_name!r} is the only adapter: unload() removes it from the model"
                )
            self._check_enabled("delete the active adapter")
            warnings.warn(
                f"deleted the active adapter {adapter_name!r}; {others[0]!r} is active now",
                stacklevel=2,
            )
            self.set_adapter(others[0])
        for layer in self.wrapped_layers().values():
            layer.delete_adapter(adapter_name)
        del self._plans[adapter_name]

    def _plan(self, adapter_name: str | None) -> AdapterPlan:
        if adapter_name is None:
            return self._plans[self._active]
        self._check_known(adapter_name)
        return self._plans[adapter_name]

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self._plans:
            raise ValueError(  # as PEFT
                f"no adapter named {adapter_name!r}; this model has {list(self._plans)}"
            )

    def _check_new(self, adapter_name: str) -> None:
        check_adapter_name(adapter_name)
        if adapter_name in self._plans:
            raise ValueError(
                f"an adapter named {adapter_name!r} exists already: delete_adapter() it first "
                "or choose another name"
            )

    def _check_enabled(self, action: str) -> None:
        if self._disabled:
            raise RuntimeError(f"cannot {action} inside disable_adapter(): leave the block first")

    def _names(self, adapter_names: str | Iterable[str] | None) -> list[str]:
        if adapter_names is None:
            return [self._active]
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._check_known(name)
        return names

    # ----------------------------------------------------------------- merge
    def merge_adapter(self, adapter_names: str | list[str] | None = None) -> None:
        """Add the named adapters' deltas (default: the active one's) to the base weights.

        A merged inactive adapter stays in the weights while another is active, which then adds
        its own delta on top; a merged active adapter's layers run the base layer alone.
        """
        names = self._names(adapter_names)
        self._check_enabled("merge adapters")
        for name in names:  # every adapter checked before any weight changes
            self.check_finite_adapter(name, f"cannot merge adapter {name!r}")
        for name in names:
            for layer in self.adapter_layers(name).values():
                layer.merge([name])

    def check_finite_adapter(self, adapter_name: str, action: str) -> None:
        """Refuse an adapter holding NaN or inf: folded into the weights (or exported), it
        would make every output NaN. The ValueError names the tensor, `action` starts it."""
        for layer_name, layer in self.adapter_layers(adapter_name).items():
            tensors = layer.adapter(adapter_name).tensors()
            check_finite({f"{layer_name}.{k}": v for k, v in tensors.items()}, action)

    def unmerge_adapter(self, adapter_names: str | list[str] | None = None) -> None:
        """Subtract merged deltas from the base weights: every merged adapter's (newest first),
        or only the named ones'."""
        names = None if adapter_names is None else self._names(adapter_names)
        for layer in self.wrapped_layers().values():
            layer.unmerge(names)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (merged adapters are unmerged meanwhile).

        Base weights hold W0 inside the block (a forward may have written W0 + S into them; that
        is undone here), so a graph of an adapted forward from before the block cannot be
        backpropagated after it: run the base model's forward first, as TRL's DPO does. Adapters
        can be added or loaded inside the block, not switched, merged or deleted.
        """
        if self._disabled:
            yield  # nested: the outer block restores
            return
        merged = {}
        for name, layer in self.wrapped_layers().items():
            merged[name] = layer.unmerge()
            layer.restore_base_weight()
            layer.disabled = True
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            for name, layer in self.wrapped_layers().items():
                layer.disabled = False
                layer.merge([n for n in merged.get(name, []) if n in layer.adapter_names])
