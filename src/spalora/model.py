"""SpaloraModel: injects SpaloraLinear layers into a transformers model, PEFT-style.

`get_spalora_model(model, config)` wraps; `save_pretrained` writes adapter_config.json +
adapter_model.safetensors (masks inside); `SpaloraModel.from_pretrained(base, dir)` reloads after
checking every tensor against the model; `merge_and_unload`, `unload`, `merge_adapter`,
`unmerge_adapter` and `disable_adapter()` behave as in PEFT.

Several adapters (`add_adapter`, `load_adapter`, `set_adapter`, `delete_adapter`): the layers hold
only the active adapter's tensors, so the fused forward is the single-adapter one; the others wait
in `SpaloraModel` (configuration, sizes, tensors) until `set_adapter` resizes the layers and copies
them in. Layers an adapter does not target get r=0, nnz=0 while it is active (the base layer alone
runs). A merged adapter's delta lives in the base weights and is tracked per adapter, so it stays
merged while another is active, and unmerging subtracts exactly the delta that was added.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .budget import (
    LayerAllocation,
    LayerShape,
    format_allocation_table,
    parse_budget,
    solve_budget,
)
from .config import CONFIG_NAME, WEIGHTS_NAME, SpaloraConfig
from .layer import SpaloraLinear, is_adaptable, is_quantized, layer_shape

ADAPTER_KEYS = ("lora_A", "lora_B", "sparse_values", "sparse_crow", "sparse_col")
DEFAULT_ADAPTER = "default"
# attributes only an adapter of method="spalora" with a budget has (see SpaloraModel.__init__)
_EXTRA_ATTRS = ("uniform_allocations", "budget_params")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def _matches(name: str, patterns: list[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_target_modules(
    model: nn.Module, config: SpaloraConfig, include_wrapped: bool = False
) -> list[str]:
    """Names of the Linear/Conv1D modules selected by target_modules minus exclude_modules.

    "all-linear" takes every Linear/Conv1D except the output head (as PEFT does). A list matches
    exact names or name suffixes; a plain string is a regex matched against the full name.
    `include_wrapped` also selects layers already wrapped (adding a second adapter to a model).
    """
    output_head = None
    if hasattr(model, "get_output_embeddings"):
        output_head = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():
        if isinstance(module, SpaloraLinear):
            if not include_wrapped:
                continue
        elif not is_adaptable(module):
            continue
        if "base_layer" in name.split("."):
            continue
        if config.target_modules == "all-linear":
            hit = module is not output_head
        else:
            hit = _matches(name, config.target_modules)
        if hit and not _matches(name, config.exclude_modules):
            names.append(name)
    if not names:
        available = sorted(
            {
                n.split(".")[-1]
                for n, m in model.named_modules()
                if (is_adaptable(m) or isinstance(m, SpaloraLinear))
                and "base_layer" not in n.split(".")
            }
        )
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no Linear/Conv1D module. "
            f"Module names in this model include: {available}"
        )
    return names


def layer_density(name: str, config: SpaloraConfig) -> float | None:
    """The density of one layer: the first density_pattern key that matches it, else density."""
    for key, value in config.density_pattern.items():
        if name == key or name.endswith("." + key) or re.fullmatch(key, name):
            return float(value)
    return config.density


def resolve_allocation(
    model: nn.Module, config: SpaloraConfig, names: list[str]
) -> list[LayerAllocation]:
    """Per-layer r and nnz from saved patterns, a budget, or r + density."""
    modules = dict(model.named_modules())
    shapes = [LayerShape(n, *layer_shape(_unwrapped(modules[n]))) for n in names]
    if config.rank_pattern or config.nnz_pattern:
        return [
            LayerAllocation(
                s.name,
                s.out_features,
                s.in_features,
                int(config.rank_pattern.get(s.name, 0)),
                int(config.nnz_pattern.get(s.name, 0)),
            )
            for s in shapes
        ]
    if config.budget is not None:
        uniform = uniform_allocation(model, config, shapes)
        if config.method == "spalora":
            rank = None
            if config.start_rank == "budget":  # the rank all of the budget buys (LoRA's)
                budget = parse_budget(config.budget, shapes, _base_numel(model))
                rank = solve_budget(shapes, budget, 1.0, use_sparse=False)[0].r
            return overprovisioned(uniform, config.overprovision, rank)
        return uniform
    r = int(config.r) if config.uses_lora else 0
    if config.uses_sparse:
        if config.density is None and not config.density_pattern:
            raise ValueError(f"method {config.method!r} needs a density or a budget")
        nnz = []
        for s in shapes:
            density = layer_density(s.name, config)
            nnz.append(max(1, int(density * s.numel)) if density else 0)
    else:
        nnz = [0] * len(shapes)
    return [
        LayerAllocation(s.name, s.out_features, s.in_features, r, k)
        for s, k in zip(shapes, nnz, strict=True)
    ]


def uniform_allocation(
    model: nn.Module, config: SpaloraConfig, shapes: list[LayerShape]
) -> list[LayerAllocation]:
    """RoSA's split of the budget: one rank everywhere, the rest as the same density."""
    # base parameters only: a second adapter's "0.5%" must not count the first one's
    total = _base_numel(model)
    budget = parse_budget(config.budget, shapes, total)
    return solve_budget(shapes, budget, config.effective_rank_fraction, config.uses_sparse)


def overprovisioned(
    allocs: list[LayerAllocation], c: float, rank: int | None = None
) -> list[LayerAllocation]:
    """c times each layer's rank (or c times `rank` when given; rounded up, at most the layer's
    smaller side) and nonzeros (capped at the layer's size): what our method trains with until
    it truncates to the budget."""
    return [
        dataclasses.replace(
            a,
            r=min(math.ceil(c * (a.r if rank is None else rank)), a.out_features, a.in_features),
            nnz=min(a.out_features * a.in_features, round(c * a.nnz)),
        )
        for a in allocs
    ]


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, SpaloraLinear) else module


@dataclasses.dataclass
class _Plan:
    """An adapter's resolved configuration (per-layer patterns filled in) and sizes."""

    config: SpaloraConfig
    allocations: list[LayerAllocation]
    extras: dict[str, Any]  # _EXTRA_ATTRS, for method="spalora" with a budget


def _plan_adapter(model: nn.Module, config: SpaloraConfig, wrapped: bool = False) -> _Plan:
    """Which layers an adapter takes and their sizes; `config` is copied, never mutated."""
    config = dataclasses.replace(config)  # the caller's config stays reusable
    names = find_target_modules(model, config, include_wrapped=wrapped)
    if config.rank_pattern or config.nnz_pattern:  # a saved adapter: exactly its layers
        saved = set(config.rank_pattern) | set(config.nnz_pattern)
        names = [n for n, _ in model.named_modules() if n in saved]
    allocs = resolve_allocation(model, config, names)
    extras: dict[str, Any] = {}
    if config.method == "spalora" and config.budget is not None:
        # what the method truncates to: recomputed from the budget, so a reloaded
        # (over-provisioned or already truncated) adapter knows it too
        shapes = [LayerShape(a.name, a.out_features, a.in_features) for a in allocs]
        uniform = uniform_allocation(model, config, shapes)
        extras = {"uniform_allocations": uniform, "budget_params": sum(a.params for a in uniform)}
    config.rank_pattern = {a.name: a.r for a in allocs}
    config.nnz_pattern = {a.name: a.nnz for a in allocs}
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(
            getattr(model, "config", None), "_name_or_path", None
        )
    return _Plan(config, allocs, extras)


def _layer_tensors(layer: SpaloraLinear) -> dict[str, torch.Tensor]:
    """Copies of a layer's adapter tensors (what an inactive adapter keeps)."""
    tensors = {}
    if layer.r > 0:
        tensors["lora_A"] = layer.lora_A.detach().clone()
        tensors["lora_B"] = layer.lora_B.detach().clone()
    if layer.nnz > 0:
        tensors["sparse_values"] = layer.sparse_values.detach().clone()
        tensors["sparse_crow"] = layer.sparse_crow.clone()
        tensors["sparse_col"] = layer.sparse_col.clone()
    return tensors


@dataclasses.dataclass
class _StoredAdapter:
    """An inactive adapter: everything `set_adapter` needs to put it back into the layers."""

    plan: _Plan
    tensors: dict[str, dict[str, torch.Tensor]]  # layer name -> lora_A, ..., sparse_col
    trainable: bool = True

    def sizes(self, name: str) -> tuple[int, int, float]:
        """(r, nnz, lora_alpha) of one layer; (0, 0, lora_alpha) where it is not targeted."""
        cfg = self.plan.config
        return (
            int(cfg.rank_pattern.get(name, 0)),
            int(cfg.nnz_pattern.get(name, 0)),
            float(cfg.alpha_pattern.get(name, cfg.lora_alpha)),
        )

    @torch.no_grad()
    def delta(self, name: str, layer: SpaloraLinear) -> torch.Tensor:
        """scale * B A + S of one layer as dense fp32 on the layer's device: the same arithmetic
        as SpaloraLinear.delta_weight, so merge and unmerge cancel as they do for the active one."""
        t = self.tensors.get(name, {})
        dev = layer.base_layer.weight.device
        delta = torch.zeros(layer.out_features, layer.in_features, device=dev, dtype=torch.float32)
        if "sparse_values" in t:
            values = t["sparse_values"].to(dev)
            crow = t["sparse_crow"].to(dev, torch.int64)
            if int(crow[-1]) == values.numel():  # a mask was chosen (else the part is off)
                rows = torch.repeat_interleave(
                    torch.arange(layer.out_features, device=dev), crow[1:] - crow[:-1]
                )
                delta.index_put_((rows, t["sparse_col"].to(dev, torch.int64)), values.float())
        if "lora_A" in t:
            a, b = t["lora_A"].to(dev).float(), t["lora_B"].to(dev).float()
            delta += (self.sizes(name)[2] / a.shape[0]) * (b @ a)
        return delta

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{attr}": v.contiguous().cpu()
            for name, tensors in self.tensors.items()
            for attr, v in tensors.items()
        }


def _write_adapter(
    out: Path, config: SpaloraConfig, allocations: list[LayerAllocation], state: dict
) -> None:
    """adapter_config.json + adapter_model.safetensors of one adapter."""
    out.mkdir(parents=True, exist_ok=True)
    config.save(out)
    save_file(
        state,
        str(out / WEIGHTS_NAME),
        metadata={
            "format": "pt",
            "spalora_config": json.dumps(config.to_dict()),
            # [out, in] per adapted layer: lets plots show densities without the base model
            "shapes": json.dumps({a.name: [a.out_features, a.in_features] for a in allocations}),
        },
    )


def _adapter_dir(adapter_dir: str | Path, adapter_name: str) -> Path:
    """Where an adapter named `adapter_name` lies under `adapter_dir`: its own subfolder, as
    save_pretrained writes non-default adapters, when there is one; else the folder itself."""
    adapter_dir = Path(adapter_dir)
    sub = adapter_dir / adapter_name
    if adapter_name != DEFAULT_ADAPTER and (sub / CONFIG_NAME).exists():
        return sub
    return adapter_dir


def _read_adapter(
    adapter_dir: str | Path, adapter_name: str
) -> tuple[SpaloraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a saved adapter (its subfolder for a named one, if any)."""
    folder = _adapter_dir(adapter_dir, adapter_name)
    config = SpaloraConfig.load(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
    return config, load_file(str(weights))


def _check_name(adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not _NAME_RE.fullmatch(adapter_name):
        raise ValueError(
            f"adapter name {adapter_name!r} must be a non-empty string of letters, digits, "
            "'_', '-' and '.' (it names a subfolder when saved)"
        )


class SpaloraModel(nn.Module):
    """A base model with spalora adapters; forwards everything else to the base model.

    Holds one or several named adapters; the layers carry the active one's tensors (see the
    module docstring). `spalora_config` and `allocations` are the active adapter's.
    """

    def __init__(
        self, model: nn.Module, config: SpaloraConfig, adapter_name: str = DEFAULT_ADAPTER
    ) -> None:
        super().__init__()
        _check_name(adapter_name)
        plan = _plan_adapter(model, config)
        config = plan.config
        # Build every layer before touching the model, so a bad size leaves it unchanged.
        generator = torch.Generator().manual_seed(config.seed)
        layers = []
        for a in plan.allocations:
            base = model.get_submodule(a.name)
            alpha = float(config.alpha_pattern.get(a.name, config.lora_alpha))
            layer = SpaloraLinear(base, a.r, alpha, config.lora_dropout, a.nnz)
            layer.reset_lora(generator)
            layer.train(base.training)  # new modules start in train mode; follow the model's
            layers.append(layer)
        self.allocations = plan.allocations
        for key, value in plan.extras.items():
            setattr(self, key, value)
        self.spalora_config = config  # `.config` stays the base model's (PEFT: peft_config)
        for p in model.parameters():
            p.requires_grad_(False)
        for a, layer in zip(plan.allocations, layers, strict=True):
            _set_submodule(model, a.name, layer)
        self.base_model = model
        self.training = model.training
        self._active = adapter_name
        self._adapter_order = [adapter_name]  # every adapter's name, in the order added
        self._stored: dict[str, _StoredAdapter] = {}  # the inactive adapters
        # inactive adapter -> the layers whose base weight holds its delta
        self._stored_merged: dict[str, set[str]] = {}
        self._disabled = False  # inside disable_adapter()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None):
        """Activation checkpointing of the base model, with inputs that require grad so the
        adapters inside checkpointed blocks still get gradients (as PEFT does)."""
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        if hasattr(self.base_model, "activation_checkpointing_enable"):  # transformers >= 5
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.base_model.enable_input_require_grads()

    # ------------------------------------------------------------ delegation
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        """The base model's forward (named arguments let HF Trainer keep these columns)."""
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if labels is not None:
            kwargs["labels"] = labels
        return self.base_model(**kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    # ---------------------------------------------------------------- layers
    def adapter_layers(self) -> dict[str, SpaloraLinear]:
        """The layers the active adapter targets (with one adapter: every wrapped layer)."""
        names = {a.name for a in self.allocations}
        return {n: m for n, m in self._wrapped_layers().items() if n in names}

    def _wrapped_layers(self) -> dict[str, SpaloraLinear]:
        """Every wrapped layer: the union of all adapters' targets."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, SpaloraLinear)}

    def lora_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.adapter_layers().values():
            if layer.r > 0:
                yield layer.lora_A
                yield layer.lora_B

    def sparse_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.adapter_layers().values():
            if layer.nnz > 0:
                yield layer.sparse_values

    def parameter_groups(self, lora_lr: float = 7e-4, sparse_lr: float = 2e-4) -> list[dict]:
        """Optimizer groups with RoSA's separate learning rates for LoRA and sparse values."""
        groups = []
        lora = list(self.lora_parameters())
        sparse = list(self.sparse_parameters())
        if lora:
            groups.append({"params": lora, "lr": lora_lr, "name": "lora"})
        if sparse:
            groups.append({"params": sparse, "lr": sparse_lr, "name": "sparse"})
        return groups

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(adapter parameters, all parameters): the budget counts every sparse value."""
        adapter = sum(lay.num_adapter_parameters() for lay in self.adapter_layers().values())
        return adapter, _base_numel(self.base_model) + adapter

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def sync_allocations(self) -> None:
        """Re-read every layer's rank, nonzeros and alpha after layers were resized."""
        layers = self.adapter_layers()
        self.allocations = [
            LayerAllocation(
                a.name, a.out_features, a.in_features, layers[a.name].r, layers[a.name].nnz
            )
            for a in self.allocations
        ]
        cfg = self.spalora_config
        cfg.rank_pattern = {a.name: a.r for a in self.allocations}
        cfg.nnz_pattern = {a.name: a.nnz for a in self.allocations}
        cfg.alpha_pattern = {
            n: lay.lora_alpha for n, lay in layers.items() if lay.lora_alpha != cfg.lora_alpha
        }

    def resize_layers(self, config: SpaloraConfig) -> None:
        """Give every layer the sizes a saved configuration describes (values zero, no masks):
        how a truncated run's checkpoint is loaded into a freshly built over-provisioned model."""
        for name, layer in self.adapter_layers().items():
            layer.resize(
                int(config.rank_pattern.get(name, 0)),
                int(config.nnz_pattern.get(name, 0)),
                float(config.alpha_pattern.get(name, config.lora_alpha)),
            )
        self.sync_allocations()

    def allocation_table(self) -> str:
        return format_allocation_table(self.allocations)

    # -------------------------------------------------------------- adapters
    @property
    def active_adapter(self) -> str:
        """The name of the adapter the layers hold (and that trains)."""
        return self._active

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's spelling: a list, here always of one name."""
        return [self._active]

    @property
    def adapters(self) -> list[str]:
        """Every adapter's name, in the order they were added."""
        return list(self._adapter_order)

    def list_adapters(self) -> list[str]:
        return self.adapters

    def get_adapter_config(self, adapter_name: str | None = None) -> SpaloraConfig:
        """An adapter's configuration, per-layer patterns filled in (default: the active one)."""
        if adapter_name is None or adapter_name == self._active:
            return self.spalora_config
        self._check_known(adapter_name)
        return self._stored[adapter_name].plan.config

    @property
    def merged_adapters(self) -> list[str]:
        """Adapters whose delta is (at least partly) in the base weights."""
        active_merged = any(lay.merged for lay in self._wrapped_layers().values())
        return [
            n
            for n in self._adapter_order
            if n in self._stored_merged or (n == self._active and active_merged)
        ]

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self._adapter_order:
            raise ValueError(  # as PEFT
                f"no adapter named {adapter_name!r}; this model has {self._adapter_order}"
            )

    def _check_new(self, adapter_name: str) -> None:
        _check_name(adapter_name)
        if adapter_name in self._adapter_order:
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

    def add_adapter(self, adapter_name: str, config: SpaloraConfig) -> None:
        """Add a new, untrained adapter (initialised as `get_spalora_model` would); the active
        adapter stays active: `set_adapter(adapter_name)` to train it."""
        self._check_new(adapter_name)
        plan = _plan_adapter(self.base_model, config, wrapped=True)
        # initial tensors exactly as a fresh single-adapter model draws them (same seed, order)
        generator = torch.Generator().manual_seed(plan.config.seed)
        tensors = {}
        for a in plan.allocations:
            base = _unwrapped(self.base_model.get_submodule(a.name))
            alpha = float(plan.config.alpha_pattern.get(a.name, plan.config.lora_alpha))
            fresh = SpaloraLinear(base, a.r, alpha, plan.config.lora_dropout, a.nnz)
            fresh.reset_lora(generator)
            tensors[a.name] = _layer_tensors(fresh)
        self._wrap_missing(plan.allocations)
        self._stored[adapter_name] = _StoredAdapter(plan, tensors, trainable=True)
        self._adapter_order.append(adapter_name)

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
        config, state = _read_adapter(adapter_dir, adapter_name)
        validate_adapter_state(self.base_model, config, state, wrapped=True)
        plan = _plan_adapter(self.base_model, config, wrapped=True)
        tensors: dict[str, dict[str, torch.Tensor]] = {a.name: {} for a in plan.allocations}
        for key, value in state.items():
            name, _, attr = key.rpartition(".")
            tensors[name][attr] = value
        self._wrap_missing(plan.allocations)
        self._stored[adapter_name] = _StoredAdapter(plan, tensors, trainable=is_trainable)
        self._adapter_order.append(adapter_name)

    def _wrap_missing(self, allocations: list[LayerAllocation]) -> None:
        """Wrap the layers a new adapter targets that no adapter took yet (r=0, nnz=0 for the
        others: their forward is the base layer's)."""
        cfg = self.spalora_config
        like = next(iter(self._wrapped_layers().values()), None)
        for a in allocations:
            base = self.base_model.get_submodule(a.name)
            if isinstance(base, SpaloraLinear):
                continue
            layer = SpaloraLinear(base, 0, cfg.lora_alpha, cfg.lora_dropout, 0)
            layer.train(base.training)
            layer.disabled = self._disabled
            if like is not None and "sparse_in_weight" in vars(like):  # set per layer (FSDP)
                layer.sparse_in_weight = like.sparse_in_weight
            _set_submodule(self.base_model, a.name, layer)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter: the layers get its tensors.

        The layers' adapter parameters are replaced by new Parameter objects: an optimizer built
        before holds the previous adapter's (now detached) copies, so train one adapter at a time
        and build the optimizer (and any MaskSchedule/SpaloraCallback) after set_adapter, as with
        PEFT. Merged adapters stay merged: their delta stays in the base weights.
        """
        self._check_known(adapter_name)
        self._check_enabled("switch adapters")
        if adapter_name == self._active:
            return
        self._stash_active()
        self._activate(adapter_name)

    def _stash_active(self) -> None:
        """Move the active adapter's configuration and tensors out of the layers."""
        self.sync_allocations()  # its patterns as the layers now are (a truncation may resize)
        layers = self.adapter_layers()
        params = [
            p
            for lay in layers.values()
            for p in (lay.lora_A, lay.lora_B, lay.sparse_values)
            if p is not None
        ]
        extras = {k: self.__dict__[k] for k in _EXTRA_ATTRS if k in self.__dict__}
        plan = _Plan(self.spalora_config, self.allocations, extras)
        tensors = {n: _layer_tensors(lay) for n, lay in layers.items()}
        trainable = any(p.requires_grad for p in params) if params else True
        merged = {n for n, lay in self._wrapped_layers().items() if lay.merged}
        self._stored[self._active] = _StoredAdapter(plan, tensors, trainable)
        if merged:
            self._stored_merged[self._active] = merged
        for lay in self._wrapped_layers().values():
            lay.merged = False  # its delta stays in the weight, tracked in _stored_merged

    def _activate(self, adapter_name: str) -> None:
        """Resize every wrapped layer to a stored adapter and copy its tensors in."""
        stored = self._stored.pop(adapter_name)
        merged = self._stored_merged.pop(adapter_name, set())
        cfg = stored.plan.config
        for name, layer in self._wrapped_layers().items():
            layer.merged = False
            r, nnz, alpha = stored.sizes(name)
            layer.resize(r, nnz, alpha)  # puts W0 back at the old mask first
            layer.lora_dropout = float(cfg.lora_dropout)
            with torch.no_grad():
                for attr, value in stored.tensors.get(name, {}).items():
                    getattr(layer, attr).copy_(value)
            layer.refresh_rows()
            for p in (layer.lora_A, layer.lora_B, layer.sparse_values):
                if p is not None:
                    p.requires_grad_(stored.trainable)
            layer.merged = name in merged
            layer._warned_merged = False
        for key in _EXTRA_ATTRS:
            self.__dict__.pop(key, None)
        for key, value in stored.plan.extras.items():
            setattr(self, key, value)
        self.spalora_config = cfg
        self.allocations = stored.plan.allocations
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
            others = [n for n in self._adapter_order if n != adapter_name]
            if not others:
                raise ValueError(
                    f"{adapter_name!r} is the only adapter: unload() removes it from the model"
                )
            self._check_enabled("delete the active adapter")
            warnings.warn(
                f"deleted the active adapter {adapter_name!r}; {others[0]!r} is active now",
                stacklevel=2,
            )
            self._activate(others[0])  # the deleted adapter's tensors are dropped, not stored
        else:
            del self._stored[adapter_name]
        self._adapter_order.remove(adapter_name)

    # ------------------------------------------------------------- save/load
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """An adapter's tensors on the CPU, keyed `<layer>.<tensor>` (the active one's default)."""
        if adapter_name is not None and adapter_name != self._active:
            self._check_known(adapter_name)
            return self._stored[adapter_name].state_dict()
        state = {}
        for name, layer in self.adapter_layers().items():
            if layer.r > 0:
                state[f"{name}.lora_A"] = layer.lora_A.detach()
                state[f"{name}.lora_B"] = layer.lora_B.detach()
            if layer.nnz > 0:
                state[f"{name}.sparse_values"] = layer.sparse_values.detach()
                state[f"{name}.sparse_crow"] = layer.sparse_crow
                state[f"{name}.sparse_col"] = layer.sparse_col
        return {k: v.contiguous().cpu() for k, v in state.items()}

    def save_pretrained(
        self, save_directory: str | Path, selected_adapters: list[str] | None = None
    ) -> None:
        """Write adapter_config.json and adapter_model.safetensors (masks included).

        With several adapters (all, or `selected_adapters`), "default" goes to the folder itself
        and every other one to the subfolder named after it, as PEFT lays them out.
        """
        out = Path(save_directory)
        names = self._names(self._adapter_order if selected_adapters is None else selected_adapters)
        for name in names:
            target = out if name == DEFAULT_ADAPTER else out / name
            if name == self._active:
                _write_adapter(
                    target, self.spalora_config, self.allocations, self.adapter_state_dict()
                )
            else:
                plan = self._stored[name].plan
                _write_adapter(target, plan.config, plan.allocations, self.adapter_state_dict(name))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_dir: str | Path,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
    ) -> SpaloraModel:
        """Wrap `model` with a saved adapter, checking every shape and index first.

        On any mismatch a ValueError names the tensor and the model is left untouched. For a
        folder holding several adapters this loads one (`adapter_name`'s subfolder when there is
        one, else the folder itself); add the others with `load_adapter`.
        """
        _check_name(adapter_name)
        config, state = _read_adapter(adapter_dir, adapter_name)
        validate_adapter_state(model, config, state)
        wrapped = cls(model, config, adapter_name=adapter_name)
        wrapped.load_adapter_state(state)
        wrapped.train(is_trainable)
        if not is_trainable:
            for p in wrapped.parameters():
                p.requires_grad_(False)
        return wrapped

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors into the active adapter (same sizes; e.g. resuming a run)."""
        layers = self.adapter_layers()
        if any(layer.merged for layer in layers.values()):
            raise RuntimeError("cannot load adapter weights while merged: unmerge_adapter() first")
        validate_adapter_state(self.base_model, self.spalora_config, state, wrapped=True)
        for layer in layers.values():
            layer.restore_base_weight()  # W0 at the old mask, before the mask is replaced
        with torch.no_grad():
            for key, value in state.items():
                name, _, attr = key.rpartition(".")
                getattr(layers[name], attr).copy_(value)
        for layer in layers.values():
            layer.refresh_rows()

    # ----------------------------------------------------------------- merge
    def merge_adapter(self, adapter_names: str | list[str] | None = None) -> None:
        """Add the named adapters' deltas (default: the active one's) to the base weights.

        A merged inactive adapter stays in the weights while another is active, which then adds
        its own delta on top; a merged active adapter's layers run the base layer alone.
        """
        names = self._names(adapter_names)
        self._check_enabled("merge adapters")
        for name in names:
            if name == self._active:
                for layer in self.adapter_layers().values():
                    layer.merge()
            else:
                self._merge_stored(name, set(self._stored[name].tensors))

    def _merge_stored(self, adapter_name: str, layer_names: set[str]) -> None:
        stored = self._stored[adapter_name]
        done = self._stored_merged.setdefault(adapter_name, set())
        layers = self._wrapped_layers()
        with torch.no_grad():
            for name in sorted(layer_names - done):
                layers[name].dequantize_base()  # a quantized base cannot hold W + delta
                w = layers[name].base_weight()  # W as merged so far, W0 + S put back first
                w.add_(stored.delta(name, layers[name]).to(w.dtype))
                done.add(name)

    def unmerge_adapter(self, adapter_names: str | list[str] | None = None) -> None:
        """Subtract merged deltas from the base weights: every merged adapter's (newest first),
        or only the named ones'."""
        if adapter_names is None:
            names = self.merged_adapters[::-1]
            if self._active not in names:  # a layer merged by hand is still unmerged here
                names.append(self._active)
        else:
            names = self._names(adapter_names)
        for name in names:
            if name == self._active:
                for layer in self._wrapped_layers().values():
                    layer.unmerge()
            else:
                self._unmerge_stored(name)

    def _unmerge_stored(self, adapter_name: str) -> None:
        stored = self._stored[adapter_name]
        layers = self._wrapped_layers()
        with torch.no_grad():
            for name in sorted(self._stored_merged.pop(adapter_name, set())):
                w = layers[name].base_weight()
                w.sub_(stored.delta(name, layers[name]).to(w.dtype))

    def merge_and_unload(
        self, adapter_names: list[str] | None = None, requantize: bool = False
    ) -> nn.Module:
        """Fold the active adapter's delta (or the named adapters') into the base weights and
        return the plain base model. Adapters merged before stay in the weights; the others are
        dropped. The wrapper is consumed.

        On a quantized base (spalora.quant) the result is in full precision: every quantized
        layer dequantized, the merged ones holding W_deq + delta. `requantize=True` quantizes
        the merged layers again in their format instead; the error this adds (against the exact
        W_deq + delta) is printed and kept in the result's `spalora_requantization`.
        """
        layers = self._wrapped_layers()
        formats = {  # before merging, which dequantizes
            n: lay.base_layer.spec() if lay.quantized else lay.quantized_from
            for n, lay in layers.items()
            if lay.quantized or lay.quantized_from
        }
        if requantize and not formats:
            raise ValueError("requantize=True, but no adapted layer of this model is quantized")
        self.merge_adapter(adapter_names)
        for name, layer in self._wrapped_layers().items():
            layer.restore_base_weight()  # an unmerged layer may hold W0 + S after a forward
            _set_submodule(self.base_model, name, layer.base_layer)
        self._forget_stored()
        if formats or any(is_quantized(m) for m in self.base_model.modules()):
            from .quant import finish_merge

            finish_merge(self.base_model, formats, requantize)
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove the adapters without merging (merged ones are subtracted first); returns the
        original base model."""
        self.unmerge_adapter()
        for name, layer in self._wrapped_layers().items():
            layer.restore_base_weight()  # a forward may have written W0 + S into it
            _set_submodule(self.base_model, name, layer.base_layer)
        self._forget_stored()
        return self.base_model

    def _forget_stored(self) -> None:
        self._stored.clear()
        self._stored_merged.clear()
        self._adapter_order = [self._active]

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
        layers = list(self._wrapped_layers().values())
        merged = [layer for layer in layers if layer.merged]
        stored_merged = {n: set(s) for n, s in self._stored_merged.items()}
        for layer in merged:
            layer.unmerge()
        for name in reversed(stored_merged):
            self._unmerge_stored(name)
        for layer in layers:
            layer.restore_base_weight()
            layer.disabled = True
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            for layer in self._wrapped_layers().values():
                layer.disabled = False
            for name, layer_names in stored_merged.items():
                if name in self._stored:
                    self._merge_stored(name, layer_names)
            for layer in merged:
                layer.merge()


def _is_adapter(param_name: str) -> bool:
    return param_name.rpartition(".")[2] in ADAPTER_KEYS


def _base_numel(model: nn.Module) -> int:
    """Base parameters (adapters excluded), a quantized layer's weight at its logical size."""
    n = sum(p.numel() for name, p in model.named_parameters() if not _is_adapter(name))
    return n + sum(m.in_features * m.out_features for m in model.modules() if is_quantized(m))


def validate_adapter_state(
    model: nn.Module, config: SpaloraConfig, state: dict[str, torch.Tensor], wrapped: bool = False
) -> None:
    """Check that a saved adapter fits `model`: names, sizes, shapes and CSR indices."""
    modules = dict(model.named_modules())
    expected: set[str] = set()
    names = set(config.rank_pattern) | set(config.nnz_pattern)
    for name in sorted(names):
        module = modules.get(name)
        if module is None:
            raise ValueError(f"adapter layer {name!r} does not exist in this model")
        if wrapped and isinstance(module, SpaloraLinear):
            module = module.base_layer
        if not is_adaptable(module):
            raise ValueError(f"adapter layer {name!r} is a {type(module).__name__}, not a Linear")
        out_f, in_f = layer_shape(module)
        r = int(config.rank_pattern.get(name, 0))
        k = int(config.nnz_pattern.get(name, 0))
        if r < 0 or k < 0 or k > out_f * in_f:
            raise ValueError(f"adapter layer {name!r}: r={r}, nnz={k} do not fit {out_f}x{in_f}")
        shapes = {}
        if r > 0:
            shapes["lora_A"] = (r, in_f)
            shapes["lora_B"] = (out_f, r)
        if k > 0:
            shapes["sparse_values"] = (k,)
            shapes["sparse_crow"] = (out_f + 1,)
            shapes["sparse_col"] = (k,)
        for attr, shape in shapes.items():
            key = f"{name}.{attr}"
            expected.add(key)
            if key not in state:
                raise ValueError(f"adapter file lacks tensor {key!r}")
            if tuple(state[key].shape) != shape:
                raise ValueError(
                    f"tensor {key!r} has shape {tuple(state[key].shape)}, but the model's layer "
                    f"({out_f}x{in_f}, r={r}, nnz={k}) needs {shape}"
                )
        if k > 0:
            crow = state[f"{name}.sparse_crow"].to(torch.int64)
            col = state[f"{name}.sparse_col"].to(torch.int64)
            if state[f"{name}.sparse_col"].dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{name}.sparse_col must hold int32/int64 indices")
            if int(crow[-1]) == 0 and not bool((crow != 0).any()):
                continue  # saved before its mask was chosen
            if int(crow[0]) != 0 or int(crow[-1]) != k or bool((crow[1:] < crow[:-1]).any()):
                raise ValueError(
                    f"{name}.sparse_crow is not a valid CSR row pointer for {k} entries"
                )
            if bool((col < 0).any()) or bool((col >= in_f).any()):
                raise ValueError(f"{name}.sparse_col has indices outside [0, {in_f})")
            rows = torch.repeat_interleave(torch.arange(out_f), crow[1:] - crow[:-1])
            flat = rows * in_f + col
            if bool((flat[1:] <= flat[:-1]).any()):
                raise ValueError(f"{name}: sparse indices are not sorted and unique within rows")
    extra = sorted(set(state) - expected)
    if extra:
        raise ValueError(
            f"adapter file has tensors this configuration does not expect: {extra[:5]}"
        )


def get_spalora_model(
    model: nn.Module,
    config: SpaloraConfig,
    verbose: bool = False,
    adapter_name: str = DEFAULT_ADAPTER,
) -> SpaloraModel:
    """Wrap `model` with spalora adapters as described by `config` (PEFT's get_peft_model)."""
    wrapped = SpaloraModel(model, config, adapter_name=adapter_name)
    if verbose:
        print(wrapped.allocation_table())
    return wrapped
