"""SpaloraLinear: a frozen Linear (or transformers Conv1D) plus scale * B A + S.

The sparse part S has a fixed mask stored as CSR buffers (int32 where the sizes allow, so no
32,767 limit on matrix sides) and trainable values in CSR order. Until a mask is chosen
(crow[-1] != nnz) the sparse part is off and its values receive no gradient.

W0 + S lives in the base weight while the sparse part is in use: the first forward that uses it
saves the original entries W0[mask] (nnz values, in W's dtype) and writes W0[mask] + S there;
every later forward rewrites those nnz entries from the current values (cheap, and needs no
version counter: fused optimizers change parameters without bumping it). So training never
copies a whole weight. W0 is put back by `restore_base_weight()`, which everything that needs
the original weight calls first: `base_weight()`, merge, a disabled forward, `disable_adapter()`,
`unload()`, mask changes, resize, adapter loads, and `state_dict()` (so a saved state never holds
W0 + S). Reading `base_layer.weight` directly after a forward, though, shows W0 + S at the mask:
use `base_weight()`. A restore is an in-place change autograd sees, so a graph built by an adapted
forward cannot be backpropagated after one (autograd raises rather than use the wrong weight).

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

from .functional import sparse_lora_linear


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


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 - 1 else torch.int64


def csr_from_flat(flat: torch.Tensor, n_rows: int, n_cols: int):
    """CSR (crow, col) of a set of flat row-major indices; also returns the row of each entry."""
    flat = torch.unique(flat.to(torch.int64))  # sorted, so entries come in CSR order
    rows = torch.div(flat, n_cols, rounding_mode="floor")
    cols = flat - rows * n_cols
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=flat.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    dt = index_dtype(max(n_rows * n_cols, flat.numel() + 1))
    return crow.to(dt), cols.to(dt), rows


def _restore_hook(module: SpaloraLinear, *_args) -> None:
    module.restore_base_weight()


def _refresh_hook(module: SpaloraLinear, _keys) -> None:
    module.refresh_rows()


class SpaloraLinear(nn.Module):
    """A frozen Linear/Conv1D plus a LoRA part of rank `r` and a sparse part of `nnz` entries."""

    sparse_in_weight: bool = True  # keep W0 + S written in the base weight (see module doc)
    quantized_from: dict | None = None  # a merge's dequantize_base(): the base's former format

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        nnz: int = 0,
    ) -> None:
        super().__init__()
        out_f, in_f = layer_shape(base_layer)
        if r < 0 or nnz < 0 or nnz > out_f * in_f:
            raise ValueError(f"invalid adapter size r={r}, nnz={nnz} for a {out_f}x{in_f} layer")
        self.base_layer = base_layer
        self.out_features, self.in_features = out_f, in_f
        self.conv1d = is_conv1d(base_layer)
        self.lora_dropout = float(lora_dropout)
        self.merged = False
        self.disabled = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self._warned_merged = False
        # (rows, cols, W0 at them) while the base weight holds W0 + S there, else None
        self._w0: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._w0_key: tuple = ()
        self.resize(r, nnz, lora_alpha)
        self.reset_lora()
        # Any load path (ours, Trainer resume, a plain load_state_dict) re-derives the row index;
        # W0 goes back first, so a load replacing the base weight or the mask finds it pristine.
        # (Module-level functions, not lambdas: the module stays picklable.)
        self._register_load_state_dict_pre_hook(_restore_hook, with_module=True)
        self.register_load_state_dict_post_hook(_refresh_hook)
        # A state dict (the base model's included) holds W0, never W0 + S.
        self.register_state_dict_pre_hook(_restore_hook)

    # ----------------------------------------------------------------- parts
    def resize(self, r: int, nnz: int, lora_alpha: float) -> None:
        """Give the layer adapter tensors of rank `r` and `nnz` entries, all zero, no mask.

        The tensors are new Parameter objects: an optimizer that held the old ones must be told
        (spalora.adaptive does this when it truncates a layer to its share of the budget).
        """
        self._check_not_merged("resize")
        self.restore_base_weight()  # the old mask's entries, before its buffers go
        out_f, in_f = self.out_features, self.in_features
        if r < 0 or nnz < 0 or nnz > out_f * in_f:
            raise ValueError(f"invalid adapter size r={r}, nnz={nnz} for a {out_f}x{in_f} layer")
        w = self.base_layer.weight
        factory = {
            "device": w.device,
            "dtype": torch.float32 if w.dtype.is_floating_point else None,
        }
        self.r, self.nnz = int(r), int(nnz)
        self.lora_alpha = float(lora_alpha)
        self.scale = self.lora_alpha / self.r if self.r > 0 else 0.0
        if self.r > 0:
            self.lora_A = nn.Parameter(torch.zeros(self.r, in_f, **factory))
            self.lora_B = nn.Parameter(torch.zeros(out_f, self.r, **factory))
        else:
            self.lora_A = self.lora_B = None
        if self.nnz > 0:
            dt = index_dtype(max(out_f * in_f, self.nnz + 1))
            self.sparse_values = nn.Parameter(torch.zeros(self.nnz, **factory))
            self.register_buffer("sparse_crow", torch.zeros(out_f + 1, dtype=dt, device=w.device))
            self.register_buffer("sparse_col", torch.zeros(self.nnz, dtype=dt, device=w.device))
            self.register_buffer(
                "sparse_rows",
                torch.zeros(self.nnz, dtype=torch.int64, device=w.device),
                persistent=False,
            )
        else:
            self.sparse_values = None
            for buf in ("sparse_crow", "sparse_col", "sparse_rows"):
                self._buffers.pop(buf, None)
        self._mask_ready = False  # cached: reading crow on an accelerator would sync every step

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """A Kaiming-uniform (as PEFT and RoSA), B zero: the wrapped layer starts identical."""
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

    def _check_not_merged(self, action: str) -> None:
        if self.merged:
            raise RuntimeError(f"cannot {action} while the adapter is merged: unmerge it first")

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

    def _mask_key(self) -> tuple:
        return (id(self.sparse_col), self.sparse_col._version, self.sparse_crow._version)

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
    def _sparse_weight(self) -> torch.Tensor:
        """The base weight as (out, in), holding W0 + S at the mask (written here)."""
        if self._w0 is not None and self._w0_key != self._mask_key():
            self.restore_base_weight()  # the mask buffers changed behind our back
        w = self._weight_view()
        if self._w0 is None:  # W holds W0: save W0 at the mask, then write W0 + S
            rows = self.sparse_rows.clone()
            cols = self.sparse_col.to(torch.int64, copy=True)
            self._w0 = (rows, cols, w[rows, cols])  # advanced indexing: a copy
            self._w0_key = self._mask_key()
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
        target.index_put_((rows, cols), w0 + self.sparse_values.detach().to(w.dtype))
        return w

    def set_mask(self, flat_indices: torch.Tensor) -> None:
        """Fix the sparse support: `nnz` distinct row-major flat indices into the (out, in) weight.

        Values are reset to zero, so the adapted layer's output is unchanged by this call.
        """
        self._check_not_merged("set a mask")
        self.restore_base_weight()  # at the old mask
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

    def set_sparse(self, flat_indices: torch.Tensor, values: torch.Tensor) -> None:
        """Set the mask and the values at it (values in the order of `flat_indices`)."""
        flat = torch.as_tensor(flat_indices, device=self.sparse_crow.device).reshape(-1)
        order = torch.argsort(flat)
        self.set_mask(flat)  # validates; stores entries sorted by flat index (CSR order)
        with torch.no_grad():
            self.sparse_values.copy_(values.reshape(-1)[order.to(values.device)])

    def refresh_rows(self) -> None:
        """Re-derive the row of each nonzero and the mask state from crow (after a load)."""
        self.restore_base_weight()  # at the mask W0 + S was written for (saved with W0)
        self._mask_ready = self.nnz > 0 and int(self.sparse_crow[-1]) == self.nnz
        if not self._mask_ready:
            return
        counts = (self.sparse_crow[1:] - self.sparse_crow[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(
            torch.arange(self.out_features, device=counts.device), counts
        )
        with torch.no_grad():
            self.sparse_rows.copy_(rows)

    def mask_flat_indices(self) -> torch.Tensor:
        return self.sparse_rows * self.in_features + self.sparse_col.to(torch.int64)

    def sparse_dense(self) -> torch.Tensor:
        """S as a dense (out, in) fp32 tensor (zero where no mask is set)."""
        w = self.base_layer.weight
        s = torch.zeros(self.out_features, self.in_features, device=w.device, dtype=torch.float32)
        if self.mask_ready:
            s.index_put_(
                (self.sparse_rows, self.sparse_col.long()), self.sparse_values.detach().float()
            )
        return s

    def delta_weight(self) -> torch.Tensor:
        """scale * B A + S as a dense (out, in) fp32 tensor."""
        delta = self.sparse_dense()
        if self.r > 0:
            delta += self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return delta

    def num_adapter_parameters(self) -> int:
        return self.r * (self.in_features + self.out_features) + self.nnz

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_sparse = self.mask_ready
        if self.merged and self.training and torch.is_grad_enabled() and not self._warned_merged:
            warnings.warn(
                "a merged spalora layer is being trained: its adapter gets no gradient "
                "(call unmerge_adapter() first)",
                stacklevel=2,
            )
            self._warned_merged = True
        if self.merged or self.disabled or (self.r == 0 and not use_sparse):
            self.restore_base_weight()  # the base layer alone runs with W0
            return self.base_layer(x)
        drop_mask, keep = None, 1.0 - self.lora_dropout
        if self.r > 0 and self.training and self.lora_dropout > 0:
            # bool: cheaper to draw and to keep than floats; drawn in fp32 (bf16 rand is coarse)
            drop_mask = torch.rand(x.shape, device=x.device) < keep
        quantized = self.quantized
        in_weight = use_sparse and self.sparse_in_weight and not quantized
        if quantized:  # dequantized in the function, in forward and backward: never kept
            weight = self.base_layer.dequantize
        elif in_weight:
            weight = self._sparse_weight()  # W0 + S, written into the base weight
        else:  # W0; with the switch off, W0 + S is formed out of place by the function
            self.restore_base_weight()
            weight = self._weight_view()
        return sparse_lora_linear(
            x,
            weight,
            self.base_layer.bias,
            self.lora_A,
            self.lora_B,
            self.scale,
            self.sparse_values if use_sparse else None,
            self.sparse_crow if use_sparse else None,
            self.sparse_col if use_sparse else None,
            self.sparse_rows if use_sparse else None,
            drop_mask,
            keep,
            sparse_in_weight=in_weight,
        )

    # ----------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + delta in place; forward then runs the base layer alone."""
        if self.merged:
            return
        if self.r > 0 or self.mask_ready:  # a delta to add: a quantized base cannot hold it
            self.dequantize_base()
        w = self.base_weight()  # W0 (S is in delta)
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - delta (the original W up to rounding in W's dtype)."""
        if not self.merged:
            return
        if not self.quantized:  # (still quantized: nothing was added)
            w = self.base_weight()
            w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.conv1d else "Linear"
        if self.quantized:
            kind = f"{self.base_layer.quant_type} {kind}"
        return (
            f"{kind}({self.in_features}->{self.out_features}), r={self.r}, "
            f"nnz={self.nnz} (density {self.nnz / (self.in_features * self.out_features):.4%}), "
            f"mask_ready={self.mask_ready}, merged={self.merged}"
        )
