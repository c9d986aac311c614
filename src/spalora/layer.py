"""SpaloraLinear: a frozen Linear (or transformers Conv1D) plus scale * B A + S.

The sparse part S has a fixed mask stored as CSR buffers (int32 where the sizes allow, so no
32,767 limit on matrix sides) and trainable values in CSR order. Until a mask is chosen
(crow[-1] != nnz) the sparse part is off and its values receive no gradient.
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


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
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


class SpaloraLinear(nn.Module):
    """A frozen Linear/Conv1D plus a LoRA part of rank `r` and a sparse part of `nnz` entries."""

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
        self.r = int(r)
        self.nnz = int(nnz)
        self.lora_alpha = float(lora_alpha)
        self.scale = self.lora_alpha / self.r if self.r > 0 else 0.0
        self.lora_dropout = float(lora_dropout)
        self.merged = False
        self.disabled = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        w = base_layer.weight
        factory = {
            "device": w.device,
            "dtype": torch.float32 if w.dtype.is_floating_point else None,
        }
        if self.r > 0:
            self.lora_A = nn.Parameter(torch.empty(self.r, in_f, **factory))
            self.lora_B = nn.Parameter(torch.zeros(out_f, self.r, **factory))
            self.reset_lora()
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
        self._warned_merged = False
        self._mask_ready = False  # cached: reading crow on an accelerator would sync every step
        # Any load path (ours, Trainer resume, a plain load_state_dict) re-derives the row index.
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_rows())

    # ----------------------------------------------------------------- parts
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

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as (out, in) (a view for Conv1D)."""
        w = self.base_layer.weight
        return w.t() if self.conv1d else w

    def set_mask(self, flat_indices: torch.Tensor) -> None:
        """Fix the sparse support: `nnz` distinct row-major flat indices into the (out, in) weight.

        Values are reset to zero, so the adapted layer's output is unchanged by this call.
        """
        self._check_not_merged("set a mask")
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

    def refresh_rows(self) -> None:
        """Re-derive the row of each nonzero and the mask state from crow (after a load)."""
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
            return self.base_layer(x)
        drop_mask, keep = None, 1.0 - self.lora_dropout
        if self.r > 0 and self.training and self.lora_dropout > 0:
            # bool: cheaper to draw and to keep than floats; drawn in fp32 (bf16 rand is coarse)
            drop_mask = torch.rand(x.shape, device=x.device) < keep
        return sparse_lora_linear(
            x,
            self.base_weight(),
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
        )

    # ----------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + delta in place; forward then runs the base layer alone."""
        if self.merged:
            return
        w = self.base_weight()
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - delta (the original W up to rounding in W's dtype)."""
        if not self.merged:
            return
        w = self.base_weight()
        w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.conv1d else "Linear"
        return (
            f"{kind}({self.in_features}->{self.out_features}), r={self.r}, "
            f"nnz={self.nnz} (density {self.nnz / (self.in_features * self.out_features):.4%}), "
            f"mask_ready={self.mask_ready}, merged={self.merged}"
        )
