"""SpaloraModel: injects SpaloraLinear layers into a transformers model, PEFT-style.

`get_spalora_model(model, config)` wraps; `save_pretrained` writes adapter_config.json +
adapter_model.safetensors (masks inside); `SpaloraModel.from_pretrained(base, dir)` reloads after
checking every tensor against the model; `merge_and_unload`, `unload`, `merge_adapter`,
`unmerge_adapter` and `disable_adapter()` behave as in PEFT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

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
from .config import WEIGHTS_NAME, SpaloraConfig
from .layer import SpaloraLinear, is_adaptable, layer_shape

ADAPTER_KEYS = ("lora_A", "lora_B", "sparse_values", "sparse_crow", "sparse_col")


def _matches(name: str, patterns: list[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_target_modules(model: nn.Module, config: SpaloraConfig) -> list[str]:
    """Names of the Linear/Conv1D modules selected by target_modules minus exclude_modules.

    "all-linear" takes every Linear/Conv1D except the output head (as PEFT does). A list matches
    exact names or name suffixes; a plain string is a regex matched against the full name.
    """
    output_head = None
    if hasattr(model, "get_output_embeddings"):
        output_head = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():
        if isinstance(module, SpaloraLinear) or not is_adaptable(module):
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
        available = sorted({n.split(".")[-1] for n, m in model.named_modules() if is_adaptable(m)})
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
    shapes = [LayerShape(n, *layer_shape(modules[n])) for n in names]
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
            return overprovisioned(uniform, config.overprovision)
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
    total = sum(p.numel() for p in model.parameters())
    budget = parse_budget(config.budget, shapes, total)
    return solve_budget(shapes, budget, config.effective_rank_fraction, config.uses_sparse)


def overprovisioned(allocs: list[LayerAllocation], c: float) -> list[LayerAllocation]:
    """c times each layer's rank (rounded up) and nonzeros (capped at the layer's size): what our
    method trains with until it truncates to the budget."""
    return [
        dataclasses.replace(
            a, r=math.ceil(c * a.r), nnz=min(a.out_features * a.in_features, round(c * a.nnz))
        )
        for a in allocs
    ]


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class SpaloraModel(nn.Module):
    """A base model with spalora adapters; forwards everything else to the base model."""

    def __init__(self, model: nn.Module, config: SpaloraConfig) -> None:
        super().__init__()
        config = dataclasses.replace(config)  # the caller's config stays reusable
        names = find_target_modules(model, config)
        if config.rank_pattern or config.nnz_pattern:  # a saved adapter: exactly its layers
            saved = set(config.rank_pattern) | set(config.nnz_pattern)
            names = [n for n, _ in model.named_modules() if n in saved]
        allocs = resolve_allocation(model, config, names)
        # Build every layer before touching the model, so a bad size leaves it unchanged.
        generator = torch.Generator().manual_seed(config.seed)
        layers = []
        for a in allocs:
            base = model.get_submodule(a.name)
            alpha = float(config.alpha_pattern.get(a.name, config.lora_alpha))
            layer = SpaloraLinear(base, a.r, alpha, config.lora_dropout, a.nnz)
            layer.reset_lora(generator)
            layer.train(base.training)  # new modules start in train mode; follow the model's
            layers.append(layer)
        self.allocations = allocs
        if config.method == "spalora" and config.budget is not None:
            # what the method truncates to: recomputed from the budget, so a reloaded
            # (over-provisioned or already truncated) adapter knows it too
            shapes = [LayerShape(a.name, a.out_features, a.in_features) for a in allocs]
            self.uniform_allocations = uniform_allocation(model, config, shapes)
            self.budget_params = sum(a.params for a in self.uniform_allocations)
        config.rank_pattern = {a.name: a.r for a in allocs}
        config.nnz_pattern = {a.name: a.nnz for a in allocs}
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(
                getattr(model, "config", None), "_name_or_path", None
            )
        self.spalora_config = config  # `.config` stays the base model's (PEFT: peft_config)
        for p in model.parameters():
            p.requires_grad_(False)
        for a, layer in zip(allocs, layers, strict=True):
            _set_submodule(model, a.name, layer)
        self.base_model = model
        self.training = model.training

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
        base = sum(p.numel() for n, p in self.base_model.named_parameters() if not _is_adapter(n))
        return adapter, base + adapter

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

    # ------------------------------------------------------------- save/load
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
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

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write adapter_config.json and adapter_model.safetensors (masks included)."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.spalora_config.save(out)
        save_file(
            self.adapter_state_dict(),
            str(out / WEIGHTS_NAME),
            metadata={
                "format": "pt",
                "spalora_config": json.dumps(self.spalora_config.to_dict()),
                # [out, in] per adapted layer: lets plots show densities without the base model
                "shapes": json.dumps(
                    {a.name: [a.out_features, a.in_features] for a in self.allocations}
                ),
            },
        )

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False
    ) -> SpaloraModel:
        """Wrap `model` with a saved adapter, checking every shape and index first.

        On any mismatch a ValueError names the tensor and the model is left untouched.
        """
        adapter_dir = Path(adapter_dir)
        config = SpaloraConfig.load(adapter_dir)
        weights = adapter_dir / WEIGHTS_NAME
        if not weights.exists():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {adapter_dir}")
        state = load_file(str(weights))
        validate_adapter_state(model, config, state)
        wrapped = cls(model, config)
        wrapped.load_adapter_state(state)
        wrapped.train(is_trainable)
        if not is_trainable:
            for p in wrapped.parameters():
                p.requires_grad_(False)
        return wrapped

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
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
    def merge_adapter(self) -> None:
        for layer in self.adapter_layers().values():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for layer in self.adapter_layers().values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Fold every delta into its base weight and return the plain base model."""
        for name, layer in self.adapter_layers().items():
            layer.merge()
            _set_submodule(self.base_model, name, layer.base_layer)
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove the adapters without merging; returns the original base model."""
        for name, layer in self.adapter_layers().items():
            layer.unmerge()
            layer.restore_base_weight()  # a forward may have written W0 + S into it
            _set_submodule(self.base_model, name, layer.base_layer)
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (merged layers are unmerged meanwhile).

        Base weights hold W0 inside the block (a forward may have written W0 + S into them; that
        is undone here), so a graph of an adapted forward from before the block cannot be
        backpropagated after it: run the base model's forward first, as TRL's DPO does.
        """
        layers = list(self.adapter_layers().values())
        merged = [layer for layer in layers if layer.merged]
        for layer in merged:
            layer.unmerge()
        for layer in layers:
            layer.restore_base_weight()
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False
            for layer in merged:
                layer.merge()


def _is_adapter(param_name: str) -> bool:
    return param_name.rpartition(".")[2] in ADAPTER_KEYS


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
    model: nn.Module, config: SpaloraConfig, verbose: bool = False
) -> SpaloraModel:
    """Wrap `model` with spalora adapters as described by `config` (PEFT's get_peft_model)."""
    wrapped = SpaloraModel(model, config)
    if verbose:
        print(wrapped.allocation_table())
    return wrapped
