"""W0 + S kept in the base weight: outputs and gradients as before, W0 back wherever it is read."""

import pytest
import torch
from torch import nn

from spalora import SpaloraConfig, SpaloraLinear, get_spalora_model
from spalora.functional import reference_linear, sparse_lora_linear
from spalora.masks import apply_masks, static_scores

from .conftest import tiny_llama
from .test_model import trained_adapter

OUT, IN, R, NNZ = 12, 10, 3, 17


def make_base(conv1d: bool, seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(OUT, IN)
        nn.init.normal_(base.weight)
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(IN, OUT)
    return base.to(dtype)


def make_layer(conv1d: bool = False, dtype=torch.float32, seed: int = 0) -> SpaloraLinear:
    layer = SpaloraLinear(make_base(conv1d, seed, dtype), r=R, lora_alpha=6.0, nnz=NNZ)
    g = torch.Generator().manual_seed(seed + 1)
    flat = torch.randperm(OUT * IN, generator=g)[:NNZ]
    layer.set_sparse(flat, torch.randn(NNZ, generator=g))
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(OUT, R, generator=g) * 0.1)
    return layer


def w0_of(layer: SpaloraLinear) -> torch.Tensor:
    """The original weight as (out, in), read without the layer's help."""
    w = layer.base_layer.weight.detach()
    return (w.t() if layer.conv1d else w).clone()


def reference(layer: SpaloraLinear, w0: torch.Tensor, x: torch.Tensor):
    """Output and gradients (x, A, B, values) of the float64 dense reference."""
    d = torch.float64
    x64 = x.detach().to(d).requires_grad_()
    a = layer.lora_A.detach().to(d).requires_grad_()
    b = layer.lora_B.detach().to(d).requires_grad_()
    v = layer.sparse_values.detach().to(d).requires_grad_()
    cols = layer.sparse_col.long()
    bias = layer.base_layer.bias.detach().to(d)
    out = reference_linear(x64, w0.to(d), bias, a, b, layer.scale, v, layer.sparse_rows, cols)
    return out, x64, (a, b, v)


def mask_entries(layer: SpaloraLinear, w: torch.Tensor) -> torch.Tensor:
    return w[layer.sparse_rows, layer.sparse_col.long()]


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_training_steps_match_dense_reference(conv1d, fused):
    """Outputs and every gradient equal the float64 reference after each optimizer step; fused
    AdamW changes the values without bumping their version counter, which must not matter."""
    layer = make_layer(conv1d)
    w0 = w0_of(layer)
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B, layer.sparse_values], lr=0.05, fused=fused)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        x = torch.randn(3, 4, IN, generator=g).requires_grad_()
        gout = torch.randn(3, 4, OUT, generator=g)
        out = layer(x)
        ref, x64, leaves = reference(layer, w0, x)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        out.backward(gout)
        ref.backward(gout.double())
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
        params = (layer.lora_A, layer.lora_B, layer.sparse_values)
        for p, want in zip(params, leaves, strict=True):
            torch.testing.assert_close(p.grad.double(), want.grad, rtol=1e-5, atol=1e-5)
        # the base weight holds W0 + S at the mask only, and W0 elsewhere
        w_now = layer._weight_view().detach()
        s = layer.sparse_dense()
        torch.testing.assert_close(w_now, w0 + s, rtol=0, atol=0)
        opt.step()
        opt.zero_grad()
    assert not torch.equal(layer.base_weight(), w0 + layer.sparse_dense())
    assert torch.equal(layer.base_weight(), w0)  # exactly W0 again


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_bitwise_equal_to_out_of_place_path(dtype):
    """W0 + S written in place rounds exactly as the old out-of-place W + S did."""
    layer = make_layer(dtype=dtype)
    w0 = w0_of(layer)
    x = torch.randn(5, IN, dtype=dtype)
    for _ in range(2):
        out = layer(x)
        old = sparse_lora_linear(
            x,
            w0,
            layer.base_layer.bias,
            layer.lora_A,
            layer.lora_B,
            layer.scale,
            layer.sparse_values,
            layer.sparse_crow,
            layer.sparse_col,
            layer.sparse_rows,
        )
        assert torch.equal(out, old)
        with torch.no_grad():
            layer.sparse_values.add_(0.5)


def test_functional_sparse_in_weight_matches_reference():
    g = torch.Generator().manual_seed(2)
    layer = make_layer()
    w0 = w0_of(layer).double()
    cols = layer.sparse_col.long()
    v = layer.sparse_values.detach().double().requires_grad_()
    w_plus_s = w0.index_put((layer.sparse_rows, cols), v.detach(), accumulate=True)
    x = torch.randn(6, IN, generator=g, dtype=torch.float64, requires_grad=True)
    out = sparse_lora_linear(
        x,
        w_plus_s,
        None,
        values=v,
        crow=layer.sparse_crow,
        col=layer.sparse_col,
        rows=layer.sparse_rows,
        sparse_in_weight=True,
    )
    ref = reference_linear(x, w0, None, None, None, 1.0, v, layer.sparse_rows, cols)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gout = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, v], gout)
    want = torch.autograd.grad(ref, [x, v], gout)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_values_changed_through_data_are_seen():
    layer = make_layer()
    w0 = w0_of(layer)
    x = torch.randn(4, IN)
    layer(x)
    layer.sparse_values.data.mul_(-3.0)  # no version bump
    ref, _, _ = reference(layer, w0, x)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_micro_batches_and_checkpointing_backprop():
    """Several forwards before their backwards, and a checkpointed recompute, stay valid."""
    from torch.utils.checkpoint import checkpoint

    layer = make_layer()
    w0 = w0_of(layer)
    xs = [torch.randn(4, IN) for _ in range(3)]
    outs = [layer(xs[0]), layer(xs[1]), checkpoint(layer, xs[2], use_reentrant=False)]
    sum(o.square().sum() for o in outs).backward()
    got = layer.sparse_values.grad.clone()
    v = layer.sparse_values.detach().double().requires_grad_()
    total = 0
    for x in xs:
        ref = reference_linear(
            x.double(),
            w0.double(),
            layer.base_layer.bias.detach().double(),
            layer.lora_A.detach().double(),
            layer.lora_B.detach().double(),
            layer.scale,
            v,
            layer.sparse_rows,
            layer.sparse_col.long(),
        )
        total = total + ref.square().sum()
    total.backward()
    torch.testing.assert_close(got.double(), v.grad, rtol=1e-5, atol=1e-5)


def test_restoring_under_a_pending_graph_raises_not_silently_wrong():
    layer = make_layer()
    x = torch.randn(4, IN, requires_grad=True)
    out = layer(x)
    layer.base_weight()  # writes W0 back in place
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()


def test_writing_s_under_a_pending_graph_of_w0_raises():
    """A graph that saved W0 (a disabled forward) is not silently given W0 + S."""
    layer = make_layer()
    x = torch.randn(4, IN, requires_grad=True)
    layer.disabled = True
    out0 = layer(x)
    layer.disabled = False
    out1 = layer(x)  # writes W0 + S into the weight out0's graph saved
    with pytest.raises(RuntimeError, match="inplace"):
        (out0.sum() + out1.sum()).backward()


def test_first_forward_in_inference_mode_then_training():
    layer = make_layer()
    w0 = w0_of(layer)
    x = torch.randn(4, IN)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer.sparse_values.add_(1.0)
    xg = x.clone().requires_grad_()
    out = layer(xg)
    out.sum().backward()
    ref, _, _ = reference(layer, w0, x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.base_weight(), w0)


def test_mask_changes_resize_and_state_dict_restore_w0():
    layer = make_layer()
    w0 = w0_of(layer)
    x = torch.randn(4, IN)
    layer(x)
    assert not torch.equal(w0_of(layer), w0)  # W0 + S is in the weight now
    sd = layer.state_dict()
    assert torch.equal(sd["base_layer.weight"], w0)  # a state dict holds W0
    layer(x)
    # a new mask: W0 returns at the old one, the output is the base + LoRA output
    layer.set_mask(torch.arange(NNZ))
    assert torch.equal(w0_of(layer), w0)
    with torch.no_grad():
        layer.sparse_values.fill_(0.25)
    ref, _, _ = reference(layer, w0, x)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    layer.resize(2, 5, 4.0)
    assert torch.equal(w0_of(layer), w0)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)  # B = 0, no mask
    # loading a state dict (another base weight, another mask) into a layer whose weight holds
    # W0 + S: the loaded base weight must survive, with no old W0 written over it
    other = make_layer(seed=1)
    other_w0 = w0_of(other)
    other(x)
    fresh = make_layer(seed=0)
    fresh(x)
    fresh.load_state_dict(other.state_dict())
    assert torch.equal(w0_of(fresh), other_w0)
    torch.testing.assert_close(fresh(x), other(x), rtol=0, atol=0)
    assert torch.equal(fresh.base_weight(), other_w0)


def test_magnitude_mask_sees_w0_not_w0_plus_s():
    layer = make_layer()
    w0 = w0_of(layer)
    with torch.no_grad():
        layer.sparse_values.fill_(1e3)  # would dominate |W| if S were read
    layer(torch.randn(2, IN))
    scores = static_scores(layer, "magnitude", torch.Generator())
    assert torch.equal(scores, w0.abs())


def test_merge_unmerge_disable_and_unload_give_w0(token_batch):
    base = tiny_llama()
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    plain = base(**token_batch).logits
    wrapped = trained_adapter(base)  # rosa, r=2, density 0.05, random mask, nonzero values
    layers = wrapped.adapter_layers()
    adapted = wrapped(**token_batch).logits
    # the wrapped model's state dict holds W0, and the next forward is unchanged
    sd = wrapped.base_model.state_dict()
    for name in layers:
        assert torch.equal(sd[name + ".base_layer.weight"], w0[name + ".weight"])
    torch.testing.assert_close(wrapped(**token_batch).logits, adapted, rtol=0, atol=0)
    with wrapped.disable_adapter():
        for name, layer in layers.items():
            assert torch.equal(layer.base_layer.weight, w0[name + ".weight"])
        torch.testing.assert_close(wrapped(**token_batch).logits, plain, rtol=0, atol=0)
    torch.testing.assert_close(wrapped(**token_batch).logits, adapted, rtol=0, atol=0)
    wrapped.merge_adapter()
    torch.testing.assert_close(wrapped(**token_batch).logits, adapted, rtol=1e-5, atol=1e-5)
    wrapped.unmerge_adapter()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, w0[name + ".weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(wrapped(**token_batch).logits, adapted, rtol=1e-5, atol=1e-5)
    out = wrapped.unload()
    for name in layers:  # W0 up to the rounding of merge + unmerge
        torch.testing.assert_close(
            out.get_submodule(name).weight, w0[name + ".weight"], rtol=0, atol=1e-6
        )


def test_unload_after_forward_is_exactly_w0(token_batch):
    base = tiny_llama()
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    wrapped = get_spalora_model(base, SpaloraConfig(method="sparse", density=0.1))
    layers = wrapped.adapter_layers()
    apply_masks(layers, "magnitude", progress=False)
    with torch.no_grad():
        for layer in layers.values():
            layer.sparse_values.fill_(0.3)
    wrapped(**token_batch)
    out = wrapped.unload()
    for k, v in out.state_dict().items():
        assert torch.equal(v, w0[k]), k
    for name in layers:  # read directly, not through a state dict hook
        assert torch.equal(out.get_submodule(name).weight, w0[name + ".weight"])


def test_load_adapter_state_with_another_mask_after_a_forward(token_batch):
    def adapter(mask_seed: int, value_seed: int):
        wrapped = get_spalora_model(tiny_llama(), SpaloraConfig(method="rosa", r=2, density=0.05))
        apply_masks(wrapped.adapter_layers(), "random", seed=mask_seed, progress=False)
        g = torch.Generator().manual_seed(value_seed)
        with torch.no_grad():
            for p in wrapped.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        return wrapped

    source = adapter(3, 7)
    want = source(**token_batch).logits
    target = adapter(4, 8)
    target(**token_batch)  # W0 + S at target's own mask
    target.load_adapter_state(source.adapter_state_dict())
    torch.testing.assert_close(target(**token_batch).logits, want, rtol=0, atol=0)
    w0 = tiny_llama().state_dict()
    for name, layer in target.adapter_layers().items():
        assert torch.equal(layer.base_weight(), w0[name + ".weight"])


def test_layer_pickles_with_w0_plus_s_in_its_weight(tmp_path):
    layer = make_layer()
    w0 = w0_of(layer)
    x = torch.randn(3, IN)
    out = layer(x)
    torch.save(layer, tmp_path / "layer.pt")
    copy = torch.load(tmp_path / "layer.pt", weights_only=False)
    torch.testing.assert_close(copy(x), out, rtol=0, atol=0)
    assert torch.equal(copy.base_weight(), w0)
