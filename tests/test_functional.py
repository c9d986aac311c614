"""The fused function against a dense float64 reference: values and every gradient."""

import pytest
import torch

from spalora.functional import reference_linear, sparse_lora_linear
from spalora.layer import csr_from_flat

OUT, IN, R = 9, 7, 3


def make_case(lora: bool, sparse: bool, dropout: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64}
    x = torch.randn(2, 5, IN, generator=g, **f64).requires_grad_()
    w = torch.randn(OUT, IN, generator=g, **f64)
    b = torch.randn(OUT, generator=g, **f64)
    a = torch.randn(R, IN, generator=g, **f64).requires_grad_() if lora else None
    bb = torch.randn(OUT, R, generator=g, **f64).requires_grad_() if lora else None
    flat = torch.randperm(OUT * IN, generator=g)[:13]
    crow, col, rows = csr_from_flat(flat, OUT, IN)
    vals = torch.randn(13, generator=g, **f64).requires_grad_() if sparse else None
    drop = (torch.rand(2, 5, IN, generator=g) > 0.4) if dropout else None
    return x, w, b, a, bb, vals, crow, col, rows, drop


@pytest.mark.parametrize("lora,sparse", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dropout", [False, True])
def test_matches_dense_reference(lora, sparse, dropout):
    x, w, b, a, bb, vals, crow, col, rows, drop = make_case(lora, sparse, dropout)
    scale = 0.7
    args = (crow, col, rows) if sparse else (None, None, None)
    out = sparse_lora_linear(x, w, b, a, bb, scale, vals, *args, drop, 0.6)
    leaves = [t for t in (x, a, bb, vals) if t is not None]
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)

    ref = reference_linear(x, w, b, a, bb, scale, vals, rows, col.long(), drop, 0.6)
    want = torch.autograd.grad(ref, leaves, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(got, want, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_gradcheck_all_parts():
    x, w, b, a, bb, vals, crow, col, rows, drop = make_case(True, True, True, seed=3)

    def fn(x, a, bb, vals):
        return sparse_lora_linear(x, w, b, a, bb, 0.5, vals, crow, col, rows, drop, 0.6)

    assert torch.autograd.gradcheck(fn, (x, a, bb, vals))


def test_values_grad_is_the_masked_weight_gradient():
    """d(values) equals the dense weight gradient G^T X read at the mask."""
    x, w, b, _, _, vals, crow, col, rows, _ = make_case(False, True, False, seed=5)
    wd = w.clone().requires_grad_()
    g = torch.randn(2, 5, OUT, dtype=torch.float64)
    (dense_grad,) = torch.autograd.grad(torch.nn.functional.linear(x, wd, b), [wd], g)
    out = sparse_lora_linear(x, w, b, None, None, 1.0, vals, crow, col, rows)
    (dv,) = torch.autograd.grad(out, [vals], g)
    torch.testing.assert_close(dv, dense_grad[rows, col.long()])


def test_frozen_weight_required():
    w = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        sparse_lora_linear(torch.randn(2, 4), w)


def test_bf16_input_runs_with_fp32_sparse_path():
    x, w, b, a, bb, vals, crow, col, rows, _ = make_case(True, True, False)
    xb = x.detach().bfloat16().requires_grad_()
    vals32 = vals.detach().float().requires_grad_()
    out = sparse_lora_linear(
        xb,
        w.bfloat16(),
        b.bfloat16(),
        a.detach().float().requires_grad_(),
        bb.detach().float().requires_grad_(),
        0.5,
        vals32,
        crow,
        col,
        rows,
    )
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert vals32.grad is not None and vals32.grad.dtype == torch.float32
    assert torch.isfinite(vals32.grad).all()


def test_autocast_bf16_forward_and_backward():
    """Under CPU autocast the base matmul runs in bf16; the LoRA and sparse parts follow."""
    x, w, b, a, bb, vals, crow, col, rows, _ = make_case(True, True, False)
    x32 = x.detach().float().requires_grad_()
    a32, b32 = a.detach().float().requires_grad_(), bb.detach().float().requires_grad_()
    v32 = vals.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_lora_linear(x32, w.float(), b.float(), a32, b32, 0.5, v32, crow, col, rows)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    ref = reference_linear(
        x.detach(), w, b, a.detach(), bb.detach(), 0.5, vals.detach(), rows, col.long()
    )
    torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.1)
    for t in (x32, a32, b32, v32):
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()
