"""Quantized frozen bases (spalora.quant): int8 in plain torch (always run), NF4 through
bitsandbytes (skipped without the `quant` extra). The adapted layer over a quantized base must
equal the same layer over a full-precision base holding the dequantized W, in output and in every
gradient; training, the gradient masks and merging must work on it."""

import copy
import math

import pytest
import torch
from torch import nn

from spalora import SpaloraConfig, SpaloraLinear, get_spalora_model
from spalora.masks import apply_masks, collect_statistics
from spalora.quant import QuantizedLinear, base_memory, dequantize_model, quantize_base
from spalora.train import TrainConfig, train

from .conftest import WORD_EXAMPLES, tiny_llama, word_tokenizer

OUT, IN, R, NNZ = 12, 10, 3, 17
# float32 outputs of the same arithmetic in another order (a merged W vs W + B A + S)
MERGE_TOL = 1e-5


def four_bit(quant_type: str) -> str:
    if quant_type in ("nf4", "fp4"):
        pytest.importorskip("bitsandbytes")
    return quant_type


QUANT_TYPES = ["int8", "nf4"]


def make_base(conv1d: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(OUT, IN)
        nn.init.normal_(base.weight)
        nn.init.normal_(base.bias)
        return base
    return nn.Linear(IN, OUT)


def with_adapter(base: nn.Module, seed: int = 1) -> SpaloraLinear:
    layer = SpaloraLinear(base, r=R, lora_alpha=6.0, nnz=NNZ)
    g = torch.Generator().manual_seed(seed)
    layer.set_sparse(torch.randperm(OUT * IN, generator=g)[:NNZ], torch.randn(NNZ, generator=g))
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(OUT, R, generator=g) * 0.1)
        layer.lora_A.copy_(torch.randn(R, IN, generator=g) * 0.1)
    return layer


def outputs_and_grads(layer: SpaloraLinear, x: torch.Tensor):
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = [x.grad] + [p.grad for p in (layer.lora_A, layer.lora_B, layer.sparse_values)]
    return out.detach(), grads


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("quant_type", [*QUANT_TYPES, "fp4"])
def test_quantized_layer_equals_float_layer_with_dequantized_weight(quant_type, conv1d):
    """Output and all gradients match a full-precision base holding dequant(W), and the
    sparse path out of place equals the in-weight one used for float bases."""
    base = make_base(conv1d)
    q = QuantizedLinear.from_float(base, four_bit(quant_type))
    float_base = q.to_float()
    assert type(float_base) is type(base)  # Conv1D comes back as a Conv1D
    quantized = with_adapter(q)
    reference = with_adapter(float_base)
    assert quantized.quantized and not reference.quantized
    x = torch.randn(2, 5, IN)
    saved = []  # what autograd keeps between forward and backward: no dense W for a quantized base
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out_q, grads_q = outputs_and_grads(quantized, x)
    assert saved and not any(tuple(t.shape) in ((OUT, IN), (IN, OUT)) for t in saved)
    out_f, grads_f = outputs_and_grads(reference, x)
    torch.testing.assert_close(out_q, out_f, atol=1e-6, rtol=1e-5)
    for gq, gf in zip(grads_q, grads_f, strict=True):
        torch.testing.assert_close(gq, gf, atol=1e-6, rtol=1e-5)
    # base_weight() is the dequantized W, as (out, in), and the store never changes
    torch.testing.assert_close(quantized.base_weight(), reference.base_weight())
    before = q.qweight.clone()
    quantized.base_weight().add_(1.0)
    assert torch.equal(q.qweight, before)
    # the weight error itself is what the format promises
    w = (base.weight.t() if conv1d else base.weight).detach()
    err = (q.dequantize() - w).abs()
    if quant_type == "int8":  # at most half a step of the row's absmax / 127
        assert bool((err <= w.abs().amax(1, keepdim=True) / 254 + 1e-7).all())
    else:  # on a normal or uniform weight NF4 gives ~9%, FP4 ~12% (12 x 10: odd blocks too)
        assert float(err.norm() / w.norm()) < (0.12 if quant_type == "nf4" else 0.16)


def test_int8_storage_and_memory():
    model = tiny_llama()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_base(model, "int8")
    head = model.get_output_embeddings()
    assert isinstance(head, nn.Linear)  # the output head stays full precision
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(quantized) == set(linears) - {"lm_head"}
    for m in quantized.values():
        assert m.qweight.dtype == torch.int8
        assert tuple(m.qweight.shape) == (m.out_features, m.in_features)
    mem = base_memory(model)
    numel = sum(m.in_features * m.out_features for m in quantized.values())
    rows = sum(m.out_features for m in quantized.values())
    assert mem.fp32_bytes == 4 * numel
    assert mem.quantized_bytes == numel + 4 * rows  # 1 byte a weight, one fp32 scale a row
    assert mem.ratio < 0.3
    # a quantized layer's state holds the int8 store, not a float weight
    state = model.state_dict()
    assert state["model.layers.0.mlp.up_proj.qweight"].dtype == torch.int8
    assert "model.layers.0.mlp.up_proj.weight" not in state


def test_nf4_memory():
    pytest.importorskip("bitsandbytes")
    model = quantize_base(tiny_llama(), "nf4")
    mem = base_memory(model)
    sizes = [m.in_features * m.out_features for m in model.modules() if hasattr(m, "qweight")]
    # two weights a byte, one fp32 absmax per block of 64: 0.5625 bytes a weight
    assert mem.quantized_bytes == sum((n + 1) // 2 + 4 * math.ceil(n / 64) for n in sizes)
    assert mem.ratio < 0.15


def test_percent_budget_counts_quantized_layers_at_their_logical_size():
    cfg = SpaloraConfig(method="rosa", budget="10%", rank_fraction=0.5)
    plain = get_spalora_model(tiny_llama(), cfg)
    quantized = get_spalora_model(quantize_base(tiny_llama(), "int8"), cfg)
    assert quantized.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()
    assert [a.nnz for a in quantized.allocations] == [a.nnz for a in plain.allocations]


def test_quantizing_before_or_after_wrapping_is_the_same():
    cfg = SpaloraConfig(method="rosa", r=2, density=0.05, mask_strategy="magnitude")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    before = get_spalora_model(quantize_base(tiny_llama(), "int8"), cfg)
    after = get_spalora_model(tiny_llama(), cfg)
    for layers in (before.adapter_layers(), after.adapter_layers()):
        apply_masks(layers, "magnitude", progress=False)  # a forward writes W0 + S (fp32 base)
    after(input_ids=ids)
    quantize_base(after, "int8")  # the wrapped layers' bases, from W0 (not W0 + S)
    assert all(lay.quantized for lay in after.adapter_layers().values())
    assert isinstance(after.get_output_embeddings(), nn.Linear)
    for a, b in zip(before.adapter_layers().values(), after.adapter_layers().values(), strict=True):
        assert torch.equal(a.base_layer.qweight, b.base_layer.qweight)
    torch.testing.assert_close(before(input_ids=ids).logits, after(input_ids=ids).logits)


@pytest.mark.parametrize("strategy", ["fisher", "grad", "residual", "wanda", "magnitude"])
def test_mask_strategies_on_a_quantized_base(strategy):
    """Gradient strategies rebuild G^T X from hooks: the masks equal those of a float base
    holding the dequantized weights (the same model in full precision)."""
    cfg = SpaloraConfig(method="rosa", r=2, density=0.1, lora_dropout=0.0)
    quantized = get_spalora_model(quantize_base(tiny_llama(), "int8"), cfg)
    reference = get_spalora_model(dequantize_model(quantize_base(tiny_llama(), "int8")), cfg)
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(4))
    data = [{"input_ids": ids, "labels": ids}]
    masks = []
    for model in (quantized, reference):
        g = torch.Generator().manual_seed(5)
        layers = model.adapter_layers()
        for lay in layers.values():  # a nonzero B: residual has a subspace to project out
            with torch.no_grad():
                lay.lora_B.copy_(torch.randn(lay.lora_B.shape, generator=g) * 0.1)
        collector = None
        if strategy != "magnitude":
            collector = collect_statistics(model, layers, strategy, data * 2, 2, progress=False)
        apply_masks(layers, strategy, collector, progress=False)
        masks.append({n: lay.mask_flat_indices().sort().values for n, lay in layers.items()})
    assert all(lay.mask_ready for lay in quantized.adapter_layers().values())
    for name, flat in masks[0].items():
        overlap = len(set(flat.tolist()) & set(masks[1][name].tolist())) / flat.numel()
        assert overlap > 0.9, (name, overlap)  # equal up to ties in float rounding


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_rosa_trains_on_a_quantized_base(quant_type):
    """RoSA (Fisher mask after a LoRA warm-up) through the training loop: the loss goes down,
    the sparse part trains, the base store is untouched, no float weight is kept."""
    model = quantize_base(tiny_llama(), four_bit(quant_type))
    stores = {n: m.qweight.clone() for n, m in model.named_modules() if hasattr(m, "qweight")}
    cfg = SpaloraConfig(
        method="rosa",
        budget="r4",
        rank_fraction=0.5,
        mask_strategy="fisher",
        warmup_steps=3,
        mask_batches=2,
    )
    wrapped = get_spalora_model(model, cfg)
    tcfg = TrainConfig(steps=20, batch_size=8, progress=False, lora_lr=2e-2, sparse_lr=2e-2)
    losses = [h["loss"] for h in train(wrapped, word_tokenizer(), WORD_EXAMPLES, tcfg)["history"]]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    layers = wrapped.adapter_layers()
    assert all(lay.quantized and lay.mask_ready for lay in layers.values())
    assert any(float(lay.sparse_values.detach().abs().sum()) > 0 for lay in layers.values())
    for name, m in wrapped.named_modules():
        if hasattr(m, "qweight"):
            key = name.removeprefix("base_model.").removesuffix(".base_layer")
            assert torch.equal(m.qweight, stores[key])
    floats = [n for n, p in wrapped.named_parameters() if p.dim() == 2 and not p.requires_grad]
    assert floats == ["base_model.model.embed_tokens.weight", "base_model.lm_head.weight"] or (
        floats == ["base_model.model.embed_tokens.weight"]  # a tied head
    )


def trained_on_quantized(quant_type: str, seed: int = 0):
    """A RoSA adapter with a mask and nonzero trained-like values on a quantized tiny model."""
    cfg = SpaloraConfig(method="rosa", r=2, density=0.05, mask_strategy="magnitude")
    wrapped = get_spalora_model(quantize_base(tiny_llama(seed), quant_type), cfg)
    g = torch.Generator().manual_seed(seed + 7)
    apply_masks(wrapped.adapter_layers(), "magnitude", progress=False)
    for lay in wrapped.adapter_layers().values():  # adapter deltas small next to W, as trained
        with torch.no_grad():
            lay.lora_B.copy_(torch.randn(lay.lora_B.shape, generator=g) * 0.01)
            lay.sparse_values.copy_(torch.randn(lay.nnz, generator=g) * 0.005)
    return wrapped


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_full_precision_merge_equals_the_adapted_model(quant_type):
    wrapped = trained_on_quantized(four_bit(quant_type))
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(5))
    adapted = wrapped(input_ids=ids).logits.detach()
    merged = wrapped.merge_and_unload()
    assert not any(isinstance(m, (QuantizedLinear, SpaloraLinear)) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=MERGE_TOL, rtol=0)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_requantized_merge_reports_the_error_it_adds(quant_type, capsys):
    from spalora import quant

    wrapped = trained_on_quantized(four_bit(quant_type))
    exact = copy.deepcopy(wrapped).merge_and_unload()  # W_deq + delta in fp32
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(5))
    adapted = wrapped(input_ids=ids).logits.detach()
    merged, report = quant.merge_and_unload(wrapped, requantize=True)
    assert report is merged.spalora_requantization
    assert "re-quantized 14 merged layers" in capsys.readouterr().err
    layers = {n: m for n, m in merged.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(layers) == set(report.layers) and len(layers) == 14
    sq_err = sq_ref = 0.0
    for name, layer in layers.items():  # the report is the error against the exact merge
        assert layer.quant_type == quant_type
        ref = exact.get_submodule(name).weight
        err = layer.dequantize() - ref
        max_abs, rel = report.layers[name]
        assert max_abs == pytest.approx(float(err.abs().max()), rel=1e-6)
        assert rel == pytest.approx(float(err.norm() / ref.norm()), rel=1e-4)
        sq_err, sq_ref = sq_err + float(err.pow(2).sum()), sq_ref + float(ref.pow(2).sum())
    assert report.relative_error == pytest.approx(math.sqrt(sq_err / sq_ref), rel=1e-4)
    assert 0 < report.relative_error < (0.01 if quant_type == "int8" else 0.2)
    change = (merged(input_ids=ids).logits - adapted).abs().max()
    assert 0 < float(change) < (0.05 if quant_type == "int8" else 0.5)


def test_merge_adapter_and_unmerge_on_a_quantized_base():
    """merge_adapter() dequantizes the merged layers for good (exact and reversible), and a
    second, stored adapter merges into a quantized layer too."""
    wrapped = trained_on_quantized("int8")
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(6))
    adapted = wrapped(input_ids=ids).logits.detach()
    with wrapped.disable_adapter():
        base = wrapped(input_ids=ids).logits.detach()
    wrapped.merge_adapter()
    layers = wrapped.adapter_layers().values()
    assert all(lay.merged and not lay.quantized for lay in layers)
    assert all(lay.quantized_from == {"quant_type": "int8", "blocksize": 64} for lay in layers)
    torch.testing.assert_close(wrapped(input_ids=ids).logits, adapted, atol=MERGE_TOL, rtol=0)
    wrapped.unmerge_adapter()
    torch.testing.assert_close(wrapped(input_ids=ids).logits, adapted, atol=MERGE_TOL, rtol=0)
    with wrapped.disable_adapter():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, base, atol=MERGE_TOL, rtol=0)

    other = trained_on_quantized("int8", seed=0)
    other.add_adapter("b", SpaloraConfig(method="lora", r=2, target_modules=["q_proj"]))
    other.set_adapter("b")
    with torch.no_grad():
        for lay in other.adapter_layers().values():
            lay.lora_B.normal_(0, 0.1)
    with_b = other(input_ids=ids).logits.detach()
    other.set_adapter("default")
    other.merge_adapter(["b"])  # a stored adapter into quantized q_proj bases
    q_proj = other.get_base_model().model.layers[0].self_attn.q_proj
    assert not q_proj.quantized
    other.set_adapter("b")  # b merged: its delta is in the weight, so b's layers run the base
    torch.testing.assert_close(other(input_ids=ids).logits, with_b, atol=MERGE_TOL, rtol=0)


def test_cast_to_bf16_keeps_fp32_scales():
    model = quantize_base(tiny_llama(), "int8").to(torch.bfloat16)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.scale.dtype == torch.float32 and layer.qweight.dtype == torch.int8
    assert layer.dequantize().dtype == torch.bfloat16
    ids = torch.randint(0, 96, (2, 5))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_errors_on_bad_input(monkeypatch):
    with pytest.raises(ValueError, match="quant_type"):
        quantize_base(tiny_llama(), "int3")
    with pytest.raises(ValueError, match="quant_type"):
        QuantizedLinear(4, 4, quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        quantize_base(tiny_llama(), "nf4", blocksize=100)
    with pytest.raises(ValueError, match="matched no"):
        quantize_base(tiny_llama(), "int8", target_modules=["no_such_layer"])
    with pytest.raises(TypeError, match="Embedding"):
        QuantizedLinear.from_float(nn.Embedding(4, 4))
    bad = nn.Linear(3, 2)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="nan"):
        QuantizedLinear.from_float(bad)
    cfg = SpaloraConfig(method="lora", r=2)
    with pytest.raises(ValueError, match="requantize"):  # nothing quantized to re-quantize
        get_spalora_model(tiny_llama(), cfg).merge_and_unload(requantize=True)
    merged = get_spalora_model(tiny_llama(), cfg)
    merged.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge"):
        quantize_base(merged, "int8")
    # 4-bit without the optional extra: a clear ImportError, nothing changed
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes.functional", None)
    model = tiny_llama()
    with pytest.raises(ImportError, match="spalora\\[quant\\]"):
        quantize_base(model, "nf4")
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_train_command_quantizes_the_base(tmp_path, capsys):
    import json

    from spalora.cli import main

    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "completion": e.target}) + "\n" for e in WORD_EXAMPLES
        )
    )
    out = tmp_path / "run"
    main(
        ["train", "--model", str(model_dir), "--task", "file", "--data", str(data)]
        + ["--output-dir", str(out), "--method", "rosa", "--r", "2", "--density", "0.05"]
        + ["--warmup-steps", "2", "--mask-batches", "2", "--steps", "6", "--batch-size", "4"]
        + ["--no-eval", "--no-progress", "--quantize", "int8"]
    )
    assert "base quantized to int8: 14 quantized layers" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["quantize"] == "int8"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(SystemExit):  # argparse refuses other formats
        main(["train", "--quantize", "int4"])
