"""The fused autograd function for y = x (W + S)^T + b + scale * (drop(x) A^T) B^T.

Precision: W + S is formed in W's dtype, as merging would; with a bf16 base, a sparse update
smaller than W's bf16 rounding step is invisible in the forward (its gradient is still exact in
fp32). Keep the base in fp32 (the default here) where that matters.

Why one Function: the layer input x is saved once for every gradient (LoRA's and the sparse
values'), and the values' gradient is a sampled product (SDDMM) on the mask only: no dense
gradient of W is ever formed. The dense W + S is either formed here out of place, in forward and
again in backward (a weight-sized copy each time), or, with `sparse_in_weight=True`, already held
by `weight`: SpaloraLinear keeps W0 + S written into its base weight at the mask (nnz writes per
forward) so that training pays no weight-sized copy at all. Measured on the 2-core CPU
(benchmarks/layer_speed.py): torch.sparse CSR matmuls are slower than a dense matmul with W + S,
and `torch.sparse.sampled_addmm` is the fastest way to the values' gradient.

A quantized base passes `weight` as a callable that returns a fresh dense W (dequantized): it is
called in forward and again in backward, S is added to that temporary in place, and no dense W
is saved between them (only the quantized store, held by the callable's module).
"""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def add_sparse(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor):
    """Dense W + S as a new tensor (W untouched), S given by coordinates and values."""
    return weight.index_put((rows, cols), values.to(weight.dtype), accumulate=True)


def sampled_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape
) -> torch.Tensor:
    """(G^T X) at the mask only, in CSR order; half types go through fp32 (no bf16 kernel)."""
    nnz = col.numel()
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    template = torch.sparse_csr_tensor(
        crow,
        col,
        torch.zeros(nnz, dtype=dtype, device=x.device),
        shape,
        check_invariants=False,  # the layer validated the mask when it was set or loaded
    )
    out = torch.sparse.sampled_addmm(template, grad_out.t().to(dtype), x.to(dtype), beta=0.0)
    return out.values()


def _dense_weight(weight_fn, rows, cols, values) -> torch.Tensor:
    """W from a dequantizing callable, plus S in place when given (the tensor is our own)."""
    w = weight_fn()
    if values is not None:
        w.index_put_((rows, cols), values.to(w.dtype), accumulate=True)
    return w


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1, t.shape[-1])


def _dropped(t: torch.Tensor, keep: torch.Tensor | None, keep_prob: float) -> torch.Tensor:
    """Inverted dropout with a given bool keep-mask (1 byte per element saved, not 4)."""
    if keep is None:
        return t
    return t.masked_fill(~keep, 0.0).mul_(1.0 / keep_prob)


class SparseLoraLinearFunction(torch.autograd.Function):
    """Forward and backward of a frozen linear layer plus a LoRA and a fixed-mask sparse delta.

    Arguments (tensors may be None when that part is off):
      x (..., in); weight (out, in), frozen, or a callable returning a fresh dense one (a
      quantized base: called in forward and in backward, never saved); bias (out,), frozen;
      lora_A (r, in), lora_B (out, r), scale: float;
      values (nnz,), crow (out+1,), col (nnz,), rows (nnz,): the sparse delta in CSR order;
      drop_mask: a bool tensor shaped like x, True where LoRA's input is kept, or None;
      keep_prob: the kept fraction (kept inputs are scaled by 1/keep_prob, as nn.Dropout does);
      sparse_in_weight: True when `weight` already holds W + S (values then only get a gradient).
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        scale,
        values,
        crow,
        col,
        rows,
        drop_mask,
        keep_prob,
        sparse_in_weight,
    ):
        use_sparse = values is not None
        add = use_sparse and not sparse_in_weight
        ctx.weight_fn = None
        if callable(weight):  # a quantized base: dequantized here and again in backward
            ctx.weight_fn, weight = weight, None
            w_eff = _dense_weight(ctx.weight_fn, rows, col, values if add else None)
        else:
            w_eff = add_sparse(weight, rows, col, values) if add else weight
        out = torch.nn.functional.linear(x, w_eff, bias)
        lora_h = None
        if lora_A is not None:
            xd = _dropped(x, drop_mask, keep_prob)
            lora_h = (xd @ lora_A.t().to(x.dtype)).to(out.dtype)  # (..., r): small, saved for dB
            # out += scale * h B^T in one addmm: no (tokens x out) temporaries. Everything is
            # cast to out's dtype, which autocast may have lowered to bf16.
            out2 = out.view(-1, out.shape[-1])
            out2.addmm_(lora_h.reshape(-1, lora_h.shape[-1]), lora_B.t().to(out.dtype), alpha=scale)
        ctx.scale = scale
        ctx.keep_prob = keep_prob
        ctx.use_sparse = use_sparse
        ctx.add_sparse = add
        ctx.shape = tuple(w_eff.shape)
        ctx.save_for_backward(x, weight, lora_A, lora_B, values, crow, col, rows, drop_mask, lora_h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, values, crow, col, rows, drop_mask, lora_h = ctx.saved_tensors
        scale = ctx.scale
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        cd = g2.dtype  # compute dtype of the backward (the output's: bf16 under autocast)
        x2 = x.reshape(-1, x.shape[-1]).to(cd)
        grad_x = grad_A = grad_B = grad_values = None
        needs = ctx.needs_input_grad

        if needs[0]:
            if ctx.weight_fn is not None:  # a quantized base: dequantized again
                w_eff = _dense_weight(ctx.weight_fn, rows, col, values if ctx.add_sparse else None)
            else:
                w_eff = add_sparse(weight, rows, col, values) if ctx.add_sparse else weight
            grad_x = g2 @ w_eff.to(cd)
            del w_eff  # a temporary dense W is freed before the LoRA part
        if lora_A is not None and (needs[0] or needs[3] or needs[4]):
            # The scale goes on the small (N, r) factors, never on a (N, out) or (N, in) tensor.
            gB = (g2 @ lora_B.to(cd)).mul_(scale)  # (N, r)
            if needs[0]:
                if drop_mask is None:
                    grad_x.addmm_(gB, lora_A.to(cd))
                else:
                    lora_dx = _dropped(gB @ lora_A.to(cd), _flat(drop_mask), ctx.keep_prob)
                    grad_x.add_(lora_dx)
            if needs[3]:
                xd = _dropped(x2, _flat(drop_mask), ctx.keep_prob)
                grad_A = (gB.t() @ xd).to(lora_A.dtype)
            if needs[4]:
                h = lora_h.reshape(-1, lora_h.shape[-1]).to(cd) * scale
                grad_B = (g2.t() @ h).to(lora_B.dtype)
        if ctx.use_sparse and needs[6]:
            grad_values = sampled_weight_grad(g2, x2, crow, col, ctx.shape).to(values.dtype)
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        nones = (None,) * 6  # crow, col, rows, drop_mask, keep_prob, sparse_in_weight
        return grad_x, None, None, grad_A, grad_B, None, grad_values, *nones


def sparse_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scale: float = 1.0,
    values: torch.Tensor | None = None,
    crow: torch.Tensor | None = None,
    col: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    drop_mask: torch.Tensor | None = None,
    keep_prob: float = 1.0,
    sparse_in_weight: bool = False,
) -> torch.Tensor:
    """Functional entry point; see SparseLoraLinearFunction. The base weight must be frozen.

    By default `weight` is W and W + S is formed here; pass `sparse_in_weight=True` when `weight`
    already holds W + S (the values, crow, col are then used for the values' gradient only).
    `weight` may also be a callable returning a fresh dense W (see the module docstring).
    """
    if not callable(weight) and weight.requires_grad:
        raise ValueError("sparse_lora_linear trains adapters only: the base weight must be frozen")
    return SparseLoraLinearFunction.apply(
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        float(scale),
        values,
        crow,
        col,
        rows,
        drop_mask,
        float(keep_prob),
        bool(sparse_in_weight),
    )


def reference_linear(
    x, weight, bias, lora_A, lora_B, scale, values, rows, cols, drop_mask=None, keep_prob=1.0
):
    """Plain-autograd dense reference: x (W + scale B A + dense(S))^T + b, for tests."""
    w = weight.clone()
    if values is not None:
        dense_s = torch.zeros_like(weight).index_put((rows, cols), values, accumulate=True)
        w = w + dense_s
    out = torch.nn.functional.linear(x, w, bias)
    if lora_A is not None:
        xd = x if drop_mask is None else x * drop_mask.to(x.dtype) / keep_prob
        out = out + scale * torch.nn.functional.linear(xd, lora_B @ lora_A)
    return out
