"""SpaloraLinear: a frozen Linear (or transformers Conv1D) plus scale * B A + S per adapter.

A layer holds every adapter it has, keyed by adapter name (`adapters`, one `SpaloraAdapter` each,
PEFT's layout); one of them is active and runs in the forward, the others wait in place, so
switching (`set_adapter`) copies no tensor. Each adapter's sparse part S has a fixed mask stored
as CSR buffers (int32 where the sizes allow, so no 32,767 limit on matrix sides) and trainable
values in CSR order. Until a mask is chosen (crow[-1] != nnz) the sparse part is off and its
values receive no gradient. The active adapter's fields are also readable on the layer itself
(`layer.lora_A`, `layer.r`, `layer.set_mask(...)`, ...).

W0 + S lives in the base weight while the active adapter's sparse part is in use: the first
forward that uses it saves the original entries W0[mask] (nnz values, in W's dtype) and writes
W0[mask] + S there; every later forward rewrites those nnz entries from the current values
(cheap, and needs no version counter: fused optimizers change parameters without bumping it). So
training never copies a whole weight. W0 is put back by `restore_base_weight()`, which everything
that needs the original weight calls first: `base_weight()`, merge, a disabled forward, adapter
switches, `unload()`, mask changes, resize, adapter loads, and `state_dict()` (so a saved state
never holds W0 + S). Reading `base_layer.weight` directly after a forward, though, shows W0 + S at
the mask: use `base_weight()`. A restore is an in-place change autograd sees, so a graph built by
an adapted forward cannot be backpropagated after one (autograd raises rather than use the wrong
weight). "W0" is the base weight with the merged adapters' deltas in it, if any.

`sparse_in_weight` (per layer, default True) switches this off: W + S is then formed out of place
in each forward and backward (a weight-sized copy). Needed where the base weight is not this
process's own tensor, e.g. sharded by FSDP (spalora.distributed turns it off there).

A quantized base (spalora.quant) is never written: its W is dequantized inside the fused function,
in forward and again in backward, and S is added to that temporary; `base_weight()` returns the
dequantized W, and merging first replaces the base by a full-precision copy (`dequantize_base`).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .csr import csr_from_flat, index_dtype, mask_is_set, rows_from_crow, scatter_dense
from .functional import sparse_lora_linear

DEFAULT_ADAPTER = "default"
# an adapter's tensors, as named in state dicts and saved adapters (`<layer>.<key>`)
ADAPTER_KEYS = ("lora_A", "lora_B", "sparse_values", "sparse_crow", "sparse_col")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) stores the weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_quantized(module: nn.Module) -> bool:
    """A spalora.quant.QuantizedLinear: a frozen Linear whose weight is stored quantized."""
    return getattr(module, "spalora_quantized", False) is True


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized(module)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    if is_quantized(module):
        return module.out_features, module.in_features
    raise TypeError(f"cannot adapt {type(module).__name__}: only Linear and Conv1D are supported")


def check_size(out_features: int, in_features: int, r: int, nnz: int) -> None:
    """Raise a ValueError unless rank `r` and `nnz` nonzeros fit an (out, in) weight."""
    if r < 0 or nnz < 0 or nnz > out_features * in_features:
        raise ValueError(
            f"invalid adapter size r={r}, nnz={nnz} for a {out_features}x{in_features} layer"
        )


class SpaloraAdapter(nn.Module):
    """One adapter of one layer: LoRA factors of rank `r` and `nnz` sparse values on a mask.

    Owns the delta's math (scale * B A + S); the layer owns the base weight and its W0 + S cache,
    so mask changes go through the layer (which puts W0 back first).
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        r: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        nnz: int = 0,
        **factory,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.lora_dropout = float(lora_dropout)
        self.trainable = True  # requires_grad of its parameters while it is the active adapter
        self.resize(r, nnz, lora_alpha, **factory)

    def resize(self, r: int, nnz: int, lora_alpha: float, **factory) -> None:
        """New tensors of rank `r` and `nnz` entries, all zero, no mask (new Parameter objects)."""
        out_f, in_f = self.out_features, self.in_features
        check_size(out_f, in_f, r, nnz)
        self.r, self.nnz = int(r), int(nnz)
        self.lora_alpha = float(lora_alpha)
        self.scale = self.lora_alpha / self.r if self.r > 0 else 0.0
        if self.r > 0:
            self.lora_A = nn.Parameter(torch.zeros(self.r, in_f, **factory))
            self.lora_B = nn.Parameter(torch.zeros(out_f, self.r, **factory))
        else:
            self.lora_A = self.lora_B = None
        device = factory.get("device")
        if self.nnz > 0:
            dt = index_dtype(max(out_f * in_f, self.nnz + 1))
            self.sparse_values = nn.Parameter(torch.zeros(self.nnz, **factory))
            self.register_buffer("sparse_crow", torch.zeros(out_f + 1, dtype=dt, device=device))
            self.register_buffer("sparse_col", torch.zeros(self.nnz, dtype=dt, device=device))
            self.register_buffer(
                "sparse_rows",
                torch.zeros(self.nnz, dtype=torch.int64, device=device),
                persistent=False,
            )
        else:
            self.sparse_values = None
            for buf in ("sparse_crow", "sparse_col", "sparse_rows"):
                self._buffers.pop(buf, None)
        self._mask_ready = False  # cached: reading crow on an accelerator would sync every step

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """A Kaiming-uniform (as PEFT and RoSA), B zero: the adapted layer starts unchanged."""
        if self.r == 0:
            return
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) bound
            a = torch.empty_like(self.lora_A, device="cpu").uniform_(
                -bound, bound, generator=generator
            )
            self.lora_A.copy_(a)
            self.lora_B.zero_()

    @property
    def mask_ready(self) -> bool:
        return self._mask_ready

    @property
    def has_delta(self) -> bool:
        """Whether the delta can be nonzero (a merge must then write the base weight)."""
        return self.r > 0 or self._mask_ready

    def set_mask(self, flat_indices: torch.Tensor) -> None:
        """Fix the support: `nnz` distinct row-major flat indices; values reset to zero."""
        flat = torch.as_tensor(flat_indices, device=self.sparse_crow.device).reshape(-1)
        numel = self.out_features * self.in_features
        if flat.numel() != self.nnz or torch.unique(flat).numel() != self.nnz:
            raise ValueError(f"mask needs exactly {self.nnz} distinct indices, got {flat.numel()}")
        if int(flat.min()) < 0 or int(flat.max()) >= numel:
            raise ValueError(f"mask indices must lie in [0, {numel})")
        crow, col, rows = csr_from_flat(flat, self.out_features, self.in_features)
        with torch.no_grad():
            self.sparse_crow.copy_(crow)
            self.sparse_col.copy_(col)
            self.sparse_rows.copy_(rows)
            self.sparse_values.zero_()
        self._mask_ready = True

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors (keys as `tensors()` gives them, same sizes) in; masks included."""
        for attr, value in tensors.items():
            getattr(self, attr).copy_(value)
        self.refresh_rows()

    def refresh_rows(self) -> None:
        """Re-derive the row of each nonzero and the mask state from crow (after a load)."""
        self._mask_ready = self.nnz > 0 and mask_is_set(self.sparse_crow, self.nnz)
        if self._mask_ready:
            with torch.no_grad():
                self.sparse_rows.copy_(rows_from_crow(self.sparse_crow))

    def mask_flat_indices(self) -> torch.Tensor:
        return self.sparse_rows * self.in_features + self.sparse_col.to(torch.int64)

    def sparse_dense(self, device: torch.device | None = None) -> torch.Tensor:
        """S as a dense (out, in) fp32 tensor (zero where no mask is set)."""
        if self._mask_ready:
            values = self.sparse_values.detach()
            return scatter_dense(self.sparse_rows, self.sparse_col, values, self._shape())
        return torch.zeros(self._shape(), device=device, dtype=torch.float32)

    def delta_weight(self, device: torch.device | None = None) -> torch.Tensor:
        """scale * B A + S as a dense (out, in) fp32 tensor (merge and unmerge use exactly this)."""
        delta = self.sparse_dense(device)
        if self.r > 0:
            delta += self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return delta

    def num_parameters(self) -> int:
        return self.r * (self.in_features + self.out_features) + self.nnz

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a saved adapter holds for this layer (detached, not copied), in file order."""
        out = {}
        if self.r > 0:
            out["lora_A"], out["lora_B"] = self.lora_A.detach(), self.lora_B.detach()
        if self.nnz > 0:
            out["sparse_values"] = self.sparse_values.detach()
            out["sparse_crow"], out["sparse_col"] = self.sparse_crow, self.sparse_col
        return out

    def _shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def extra_repr(self) -> str:
        density = self.nnz / (self.in_features * self.out_features)
        return f"r={self.r}, nnz={self.nnz} (density {density:.4%}), mask_ready={self.mask_ready}"


def _key(adapter_name: str) -> str:
    """The ModuleDict key of an adapter name ('.' is not allowed there; ':' is not in names)."""
    return adapter_name.replace(".", ":")


def _restore_hook(module: FrozenBase, *_args) -> None:
    module.restore_base_weight()


def _refresh_hook(module: SpaloraLinear, _keys) -> None:
    module.refresh_rows()


def _legacy_keys_hook(module: SpaloraLinear, state_dict: dict, prefix: str, *_args) -> None:
    """State dicts written when a layer held one adapter (`<layer>.lora_A`, e.g. a Trainer
    checkpoint) load into the active adapter (`<layer>.adapters.<name>.lora_A`)."""
    for attr in ADAPTER_KEYS:
        if prefix + attr in state_dict:
            key = f"{prefix}adapters.{_key(module.active_adapter)}.{attr}"
            state_dict[key] = state_dict.pop(prefix + attr)


def _active(attr: str) -> property:
    """A read-only view of the active adapter's field `attr` on the layer."""
    return property(lambda self: getattr(self.adapter(), attr), doc=f"The active adapter's {attr}.")


class FrozenBase(nn.Module):
    """A frozen Linear/Conv1D (or quantized) base layer whose weight may hold W0 + S at a mask.

    Owns the base weight: reading W0 (`base_weight`), writing W0 + S for a forward
    (`_sparse_weight`) and putting W0 back (`restore_base_weight`); see the module docstring.
    """

    sparse_in_weight: bool = True  # keep W0 + S written in the base weight (see module doc)
    quantized_from: dict | None = None  # a merge's dequantize_base(): the base's former format

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = layer_shape(base_layer)
        self.conv1d = is_conv1d(base_layer)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        # (rows, cols, W0 at them) while the base weight holds W0 + S there, else None
        self._w0: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._w0_key: tuple = ()
        # Any load path (ours, Trainer resume, a plain load_state_dict) finds W0 in the weight,
        # so a load replacing the base weight or the mask starts from it; a state dict (the base
        # model's included) holds W0, never W0 + S. (Module-level functions, not lambdas: the
        # module stays picklable.)
        self._register_load_state_dict_pre_hook(_restore_hook, with_module=True)
        self.register_state_dict_pre_hook(_restore_hook)

    @property
    def quantized(self) -> bool:
        """Whether the base layer stores its weight quantized (spalora.quant)."""
        return is_quantized(self.base_layer)

    def dequantize_base(self) -> None:
        """Replace a quantized base by a full-precision copy of its W, for good (no-op otherwise).

        What merging does first: W + delta cannot be written into a quantized store exactly. The
        layer's memory grows to full precision; the format is kept in `quantized_from`, so
        merge_and_unload(requantize=True) can quantize the merged weight the same way.
        """
        if self.quantized:
            self.quantized_from = self.base_layer.spec()
            self.base_layer = self.base_layer.to_float()
            self.conv1d = is_conv1d(self.base_layer)

    def base_weight(self) -> torch.Tensor:
        """The original frozen weight W0 as (out, in) (a view for Conv1D).

        Puts W0 back into the base layer's storage if a forward had written W0 + S there. For a
        quantized base: the dequantized W, a fresh tensor (writing to it changes nothing).
        """
        self.restore_base_weight()
        return self._weight_view()

    def _weight_view(self, w: torch.Tensor | None = None) -> torch.Tensor:
        w = self.base_layer.weight if w is None else w
        return w.t() if self.conv1d else w

    @staticmethod
    def _mask_key(adapter: SpaloraAdapter) -> tuple:
        return (id(adapter.sparse_col), adapter.sparse_col._version, adapter.sparse_crow._version)

    @torch.no_grad()
    def restore_base_weight(self) -> None:
        """Write W0 back at the mask where a forward had written W0 + S (no-op otherwise)."""
        if self._w0 is None:
            return
        rows, cols, w0 = self._w0
        w = self._weight_view()
        # a normal in-place write: autograd sees it, so a graph that saved W0 + S cannot be
        # backpropagated with W0 by mistake
        w.index_put_((rows.to(w.device), cols.to(w.device)), w0.to(w.device, w.dtype))
        self._w0 = None

    @torch.no_grad()
    def _sparse_weight(self, adapter: SpaloraAdapter) -> torch.Tensor:
        """The base weight as (out, in), holding W0 + S at the mask (written here)."""
        if self._w0 is not None and self._w0_key != self._mask_key(adapter):
            self.restore_base_weight()  # the mask buffers changed behind our back
        w = self._weight_view()
        if self._w0 is None:  # W holds W0: save W0 at the mask, then write W0 + S
            rows = adapter.sparse_rows.clone()
            cols = adapter.sparse_col.to(torch.int64, copy=True)
            self._w0 = (rows, cols, w[rows, cols])  # advanced indexing: a copy
            self._w0_key = self._mask_key(adapter)
            target = w  # bumps W's version: a graph that saved W0 must not see W0 + S
        else:
            # W already holds W0 + S; the values may have changed since (an optimizer step), or
            # not (a micro-batch, a checkpointed recompute): rewriting unchanged values leaves
            # every byte as it was, so this write leaves the version alone (via .data), which
            # keeps graphs of earlier forwards with the same values valid.
            target = self._weight_view(self.base_layer.weight.data)
        rows, cols, w0 = self._w0
        if rows.device != w.device or w0.dtype != w.dtype:  # the module moved or was cast
            self._w0 = rows, cols, w0 = (rows.to(w.device), cols.to(w.device), w0.to(w))
        target.index_put_((rows, cols), w0 + adapter.sparse_values.detach().to(w.dtype))
        return w


class SpaloraLinear(FrozenBase):
    """A frozen Linear/Conv1D plus named adapters (LoRA part of rank `r`, sparse part of `nnz`
    entries); the arguments size the first adapter, `adapter_name`, which is active."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        nnz: int = 0,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        check_size(*layer_shape(base_layer), r, nnz)  # before the base is touched
        super().__init__(base_layer)
        self.disabled = False
        self.adapters = nn.ModuleDict()  # every adapter of this layer; one is active
        self.active_adapter = adapter_name
        self.merged_adapters: list[str] = []  # adapters whose delta is in the base weight
        self._warned_merged = False
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, nnz)
        self._register_load_state_dict_pre_hook(_legacy_keys_hook, with_module=True)
        # after any load (W0 was put back first): rows and mask state from the loaded crow
        self.register_load_state_dict_post_hook(_refresh_hook)

    # -------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        return [k.replace(":", ".") for k in self.adapters]

    def adapter(self, adapter_name: str | None = None) -> SpaloraAdapter:
        """An adapter of this layer by name (default: the active one)."""
        key = _key(self.active_adapter if adapter_name is None else adapter_name)
        if key not in self.adapters:
            raise KeyError(f"this layer has no adapter {adapter_name!r}: {self.adapter_names}")
        return self.adapters[key]

    def add_adapter(
        self,
        adapter_name: str,
        r: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        nnz: int = 0,
        trainable: bool = True,
        init: bool = True,
    ) -> SpaloraAdapter:
        """A new adapter, inactive unless it is the first: A Kaiming-uniform (`init`; else
        zero, for tensors about to be loaded), B zero, no mask."""
        if _key(adapter_name) in self.adapters:
            raise ValueError(f"this layer has an adapter {adapter_name!r} already")
        factory = self._factory()
        adapter = SpaloraAdapter(
            self.out_features, self.in_features, r, lora_alpha, lora_dropout, nnz, **factory
        )
        if init:
            adapter.reset_lora()
        adapter.trainable = trainable
        adapter.requires_grad_(trainable and adapter_name == self.active_adapter)
        self.adapters[_key(adapter_name)] = adapter
        return adapter

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the one the forward runs (and that trains); copies no tensor."""
        new = self.adapter(adapter_name)
        if adapter_name == self.active_adapter:
            return
        self.restore_base_weight()  # at the old adapter's mask
        old = self.adapter()
        params = list(old.parameters())
        if params:  # a freeze (or unfreeze) done while active is kept
            old.trainable = any(p.requires_grad for p in params)
        old.requires_grad_(False)
        new.requires_grad_(new.trainable)
        self.active_adapter = adapter_name
        self._warned_merged = False

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop an inactive, unmerged adapter and its tensors."""
        self.adapter(adapter_name)
        if adapter_name == self.active_adapter or adapter_name in self.merged_adapters:
            raise RuntimeError(f"cannot delete the active or a merged adapter ({adapter_name!r})")
        del self.adapters[_key(adapter_name)]

    def _factory(self) -> dict:
        w = self.base_layer.weight
        return {"device": w.device, "dtype": torch.float32 if w.dtype.is_floating_point else None}

    # -------------------------------------------- the active adapter's parts
    def resize(self, r: int, nnz: int, lora_alpha: float) -> None:
        """Give the active adapter tensors of rank `r` and `nnz` entries, all zero, no mask.

        The tensors are new Parameter objects: an optimizer that held the old ones must be told
        (our method's controller does this when it truncates a layer to its share of the budget).
        """
        self._check_not_merged("resize")
        self.restore_base_weight()  # the old mask's entries, before its buffers go
        self.adapter().resize(r, nnz, lora_alpha, **self._factory())

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        self.adapter().reset_lora(generator)

    def set_mask(self, flat_indices: torch.Tensor) -> None:
        """Fix the active adapter's sparse support: `nnz` distinct row-major flat indices into
        the (out, in) weight. Values are reset to zero, so the layer's output is unchanged."""
        self._check_not_merged("set a mask")
        self.restore_base_weight()  # at the old mask
        self.adapter().set_mask(flat_indices)

    def set_sparse(self, flat_indices: torch.Tensor, values: torch.Tensor) -> None:
        """Set the mask and the values at it (values in the order of `flat_indices`)."""
        flat = torch.as_tensor(flat_indices, device=self.sparse_crow.device).reshape(-1)
        order = torch.argsort(flat)
        self.set_mask(flat)  # validates; stores entries sorted by flat index (CSR order)
        with torch.no_grad():
            self.sparse_values.copy_(values.reshape(-1)[order.to(values.device)])

    def load_adapter_tensors(
        self, tensors: dict[str, torch.Tensor], adapter_name: str | None = None
    ) -> None:
        """Copy saved tensors into an adapter (default: the active one), its mask included."""
        if adapter_name is None or adapter_name == self.active_adapter:
            self._check_not_merged("load adapter weights")
            self.restore_base_weight()  # W0 at the old mask, before the mask is replaced
        self.adapter(adapter_name).load(tensors)

    def refresh_rows(self) -> None:
        """Re-derive every adapter's rows and mask state from crow (after a load)."""
        self.restore_base_weight()  # at the mask W0 + S was written for (saved with W0)
        for adapter in self.adapters.values():
            adapter.refresh_rows()

    def mask_flat_indices(self) -> torch.Tensor:
        return self.adapter().mask_flat_indices()

    def sparse_dense(self, adapter_name: str | None = None) -> torch.Tensor:
        """An adapter's S as a dense (out, in) fp32 tensor (default: the active one's)."""
        return self.adapter(adapter_name).sparse_dense(self.base_layer.weight.device)

    def delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """An adapter's scale * B A + S as a dense (out, in) fp32 tensor (default: active)."""
        return self.adapter(adapter_name).delta_weight(self.base_layer.weight.device)

    def num_adapter_parameters(self, adapter_name: str | None = None) -> int:
        return self.adapter(adapter_name).num_parameters()

    @property
    def merged(self) -> bool:
        """Whether the active adapter's delta is in the base weight (the forward is then the
        base layer's alone)."""
        return self.active_adapter in self.merged_adapters

    def _check_not_merged(self, action: str) -> None:
        if self.merged:
            raise RuntimeError(f"cannot {action} while the adapter is merged: unmerge it first")

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[_key(self.active_adapter)]
        use_sparse = adapter.mask_ready
        merged = self.active_adapter in self.merged_adapters
        if merged and self.training and torch.is_grad_enabled() and not self._warned_merged:
            warnings.warn(
                "a merged spalora layer is being trained: its adapter gets no gradient "
                "(call unmerge_adapter() first)",
                stacklevel=2,
            )
            self._warned_merged = True
        if merged or self.disabled or (adapter.r == 0 and not use_sparse):
            self.restore_base_weight()  # the base layer alone runs with W0
            return self.base_layer(x)
        drop_mask, keep = None, 1.0 - adapter.lora_dropout
        if adapter.r > 0 and self.training and adapter.lora_dropout > 0:
            # bool: cheaper to draw and to keep than floats; drawn in fp32 (bf16 rand is coarse)
            drop_mask = torch.rand(x.shape, device=x.device) < keep
        quantized = self.quantized
        in_weight = use_sparse and self.sparse_in_weight and not quantized
        if quantized:  # dequantized in the function, in forward and backward: never kept
            weight = self.base_layer.dequantize
        elif in_weight:
            weight = self._sparse_weight(adapter)  # W0 + S, written into the base weight
        else:  # W0; with the switch off, W0 + S is formed out of place by the function
            self.restore_base_weight()
            weight = self._weight_view()
        return sparse_lora_linear(
            x,
            weight,
            self.base_layer.bias,
            adapter.lora_A,
            adapter.lora_B,
            adapter.scale,
            adapter.sparse_values if use_sparse else None,
            adapter.sparse_crow if use_sparse else None,
            adapter.sparse_col if use_sparse else None,
            adapter.sparse_rows if use_sparse else None,
            drop_mask,
            keep,
            sparse_in_weight=in_weight,
        )

    # ----------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """W <- W + delta of each named adapter (default: the active one) not merged yet.

        A merged active adapter's forward runs the base layer alone; a merged inactive one stays
        in the weight under whichever adapter is active.
        """
        for name in [self.active_adapter] if adapter_names is None else adapter_names:
            adapter = self.adapter(name)
            if name in self.merged_adapters:
                continue
            if adapter.has_delta:  # a delta to add: a quantized base cannot hold it
                self.dequantize_base()
                w = self.base_weight()  # W as merged so far (S of the active one put back)
                w.add_(self.delta_weight(name).to(w.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, adapter_names: list[str] | None = None) -> list[str]:
        """W <- W - delta of the merged adapters (all, or the named ones), newest first: the
        original W up to rounding in W's dtype. Returns the names taken out, oldest first."""
        names = [n for n in self.merged_adapters if adapter_names is None or n in adapter_names]
        for name in reversed(names):
            if not self.quantized:  # (still quantized: nothing was added)
                w = self.base_weight()
                w.sub_(self.delta_weight(name).to(w.dtype))
            self.merged_adapters.remove(name)
        return names

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.conv1d else "Linear"
        if self.quantized:
            kind = f"{self.base_layer.quant_type} {kind}"
        return (
            f"{kind}({self.in_features}->{self.out_features}), active={self.active_adapter!r}, "
            f"merged={self.merged_adapters}"
        )


# The active adapter's fields, read-only on the layer (resize and set_mask change them).
ACTIVE_FIELDS = (
    "r", "nnz", "lora_alpha", "scale", "lora_dropout", "lora_A", "lora_B", "sparse_values",
    "sparse_crow", "sparse_col", "sparse_rows", "mask_ready",
)  # fmt: skip
for _field in ACTIVE_FIELDS:
    setattr(SpaloraLinear, _field, _active(_field))
del _field
