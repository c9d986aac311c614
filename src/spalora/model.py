"""SpaloraModel: injects SpaloraLinear layers into a transformers model, PEFT-style.

`get_spalora_model(model, config)` wraps; `save_pretrained` writes adapter_config.json +
adapter_model.safetensors (masks inside); `SpaloraModel.from_pretrained(base, dir)` reloads after
checking every tensor against the model; `merge_and_unload`, `unload`, `merge_adapter`,
`unmerge_adapter` and `disable_adapter()` behave as in PEFT.

Jobs live elsewhere: several adapters, switching, merging and disabling in
spalora.multi_adapter (a mixin of SpaloraModel); which layers and sizes in spalora.plan and
spalora.targeting; adapter folders in spalora.serialization; the tensors, their math and the
W0 + S cache in the layers (spalora.layer). The model only loops over layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .budget import LayerAllocation, format_allocation_table
from .config import SpaloraConfig
from .layer import DEFAULT_ADAPTER, SpaloraLinear, is_quantized
from .multi_adapter import MultiAdapterMixin
from .plan import (
    ADAPTER_KEYS,
    AdapterPlan,
    base_numel,
    layer_density,
    layer_sizes,
    plan_adapter,
    resolve_allocation,
    uniform_allocation,
)
from .quant import finish_merge
from .serialization import (
    check_adapter_name,
    read_adapter,
    split_state,
    validate_adapter_state,
    write_adapter,
)
from .targeting import find_target_modules, set_submodule

__all__ = [  # the planning and file helpers keep their former home here too
    "ADAPTER_KEYS",
    "DEFAULT_ADAPTER",
    "SpaloraModel",
    "find_target_modules",
    "get_spalora_model",
    "layer_density",
    "resolve_allocation",
    "uniform_allocation",
    "validate_adapter_state",
]


class SpaloraModel(MultiAdapterMixin, nn.Module):
    """A base model with spalora adapters; forwards everything else to the base model.

    Holds one or several named adapters (see the module docstring). `spalora_config` and
    `allocations` are the active adapter's.
    """

    def __init__(
        self, model: nn.Module, config: SpaloraConfig, adapter_name: str = DEFAULT_ADAPTER
    ) -> None:
        super().__init__()
        check_adapter_name(adapter_name)
        plan = plan_adapter(model, config)
        cfg = plan.config
        # Build every layer before touching the model, so a bad size leaves it unchanged.
        generator = torch.Generator().manual_seed(cfg.seed)
        layers = {}
        for a in plan.allocations:
            base = model.get_submodule(a.name)
            alpha = layer_sizes(cfg, a.name)[2]
            layer = SpaloraLinear(base, a.r, alpha, cfg.lora_dropout, a.nnz, adapter_name)
            layer.reset_lora(generator)
            layer.train(base.training)  # new modules start in train mode; follow the model's
            layers[a.name] = layer
        for p in model.parameters():
            p.requires_grad_(False)
        for name, layer in layers.items():
            set_submodule(model, name, layer)
        self.base_model = model
        self.training = model.training
        self._plans: dict[str, AdapterPlan] = {adapter_name: plan}  # in the order added
        self._active = adapter_name
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
            plans = self.__dict__.get("_plans")
            if plans is not None and name in plans[self.__dict__["_active"]].extras:
                return plans[self.__dict__["_active"]].extras[name]  # the active adapter's
            return getattr(self.base_model, name)

    # ------------------------------------------------------------ parameters
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
        return adapter, base_numel(self.base_model) + adapter

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------- the active plan
    @property
    def spalora_config(self) -> SpaloraConfig:
        """The active adapter's configuration (`.config` stays the base model's, as in PEFT)."""
        return self._plans[self._active].config

    @property
    def allocations(self) -> list[LayerAllocation]:
        """The active adapter's per-layer sizes."""
        return self._plans[self._active].allocations

    def sync_allocations(self) -> None:
        """Re-read every layer's rank, nonzeros and alpha after layers were resized."""
        plan, layers = self._plans[self._active], self.adapter_layers()
        plan.allocations = [
            LayerAllocation(
                a.name, a.out_features, a.in_features, layers[a.name].r, layers[a.name].nnz
            )
            for a in plan.allocations
        ]
        cfg = plan.config
        cfg.rank_pattern = {a.name: a.r for a in plan.allocations}
        cfg.nnz_pattern = {a.name: a.nnz for a in plan.allocations}
        cfg.alpha_pattern = {
            n: lay.lora_alpha for n, lay in layers.items() if lay.lora_alpha != cfg.lora_alpha
        }

    def resize_layers(self, config: SpaloraConfig) -> None:
        """Give every layer the sizes a saved configuration describes (values zero, no masks):
        how a truncated run's checkpoint is loaded into a freshly built over-provisioned model."""
        for name, layer in self.adapter_layers().items():
            layer.resize(*layer_sizes(config, name))
        self.sync_allocations()

    def allocation_table(self) -> str:
        return format_allocation_table(self.allocations)

    # ------------------------------------------------------------- save/load
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """An adapter's tensors on the CPU, keyed `<layer>.<tensor>` (the active one's default)."""
        name = self._active if adapter_name is None else adapter_name
        return {
            f"{layer_name}.{attr}": value.contiguous().cpu()
            for layer_name, layer in self.adapter_layers(name).items()
            for attr, value in layer.adapter(name).tensors().items()
        }

    def save_pretrained(
        self, save_directory: str | Path, selected_adapters: list[str] | None = None
    ) -> None:
        """Write adapter_config.json and adapter_model.safetensors (masks included).

        With several adapters (all, or `selected_adapters`), "default" goes to the folder itself
        and every other one to the subfolder named after it, as PEFT lays them out.
        """
        out = Path(save_directory)
        for name in self._names(self.adapters if selected_adapters is None else selected_adapters):
            plan = self._plans[name]
            target = out if name == DEFAULT_ADAPTER else out / name
            write_adapter(target, plan.config, plan.allocations, self.adapter_state_dict(name))

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
        check_adapter_name(adapter_name)
        config, state = read_adapter(adapter_dir, adapter_name)
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
        tensors = split_state(state)
        for name, layer in layers.items():
            layer.load_adapter_tensors(tensors.get(name, {}))

    # ----------------------------------------------------------------- merge
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
        formats = {  # before merging, which dequantizes
            n: lay.base_layer.spec() if lay.quantized else lay.quantized_from
            for n, lay in self.wrapped_layers().items()
            if lay.quantized or lay.quantized_from
        }
        if requantize and not formats:
            raise ValueError("requantize=True, but no adapted layer of this model is quantized")
        self.merge_adapter(adapter_names)
        self._unwrap()
        if formats or any(is_quantized(m) for m in self.base_model.modules()):
            finish_merge(self.base_model, formats, requantize)
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove the adapters without merging (merged ones are subtracted first); returns the
        original base model."""
        self.unmerge_adapter()
        self._unwrap()
        return self.base_model

    def _unwrap(self) -> None:
        """Put every base layer back in place of its wrapper; only the active adapter's plan
        is kept."""
        for name, layer in self.wrapped_layers().items():
            layer.restore_base_weight()  # an unmerged layer may hold W0 + S after a forward
            set_submodule(self.base_model, name, layer.base_layer)
        self._plans = {self._active: self._plans[self._active]}


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
