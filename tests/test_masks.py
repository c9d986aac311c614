"""Mask strategies against dense references; exact per-layer counts; user callables."""

import pytest
import torch

from spalora import SpaloraConfig, get_spalora_model
from spalora.masks import apply_masks, collect_statistics

from .conftest import tiny_llama


def micro_batches(n, seed=11):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (3, 10), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def dense_reference(strategy, data):
    """Sum over micro-batches of the dense weight gradient (squared for fisher), plain autograd."""
    model = tiny_llama()
    model.train()
    acc = {}
    for batch in data:
        model.zero_grad()
        model(**batch).loss.backward()
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                g = mod.weight.grad.detach().clone()
                acc[name] = acc.get(name, 0) + (g * g if strategy == "fisher" else g)
    return acc


@pytest.mark.parametrize("method", ["rosa", "sparse"])
@pytest.mark.parametrize("strategy", ["fisher", "grad"])
def test_gradient_masks_equal_dense_topk(method, strategy):
    data = micro_batches(3)
    ref = dense_reference(strategy, data)
    wrapped = get_spalora_model(
        tiny_llama(), SpaloraConfig(method=method, r=2, density=0.1, lora_dropout=0.0)
    )
    layers = wrapped.adapter_layers()
    collector = collect_statistics(wrapped, layers, strategy, data, num_batches=3, progress=False)
    assert collector.batches == 3
    apply_masks(layers, strategy, collector, progress=False)
    for name, layer in layers.items():
        score = ref[name].abs() if strategy == "grad" else ref[name]
        torch.testing.assert_close(collector.scores(name, layer), score, rtol=1e-4, atol=1e-9)
        want = set(torch.topk(score.reshape(-1), layer.nnz).indices.tolist())
        got = set(layer.mask_flat_indices().tolist())
        assert got == want, name
    # collection leaves no gradient behind and does not touch the adapter
    assert all(p.grad is None for p in wrapped.parameters())


def test_wanda_uses_input_norms():
    data = micro_batches(2)
    wrapped = get_spalora_model(
        tiny_llama(), SpaloraConfig(method="sparse", density=0.2, target_modules=["down_proj"])
    )
    layers = wrapped.adapter_layers()
    inputs = {}
    mod = wrapped.base_model.model.layers[0].mlp.down_proj
    h = mod.register_forward_hook(lambda m, i, o: inputs.setdefault("x", []).append(i[0]))
    collector = collect_statistics(wrapped, layers, "wanda", data, num_batches=2, progress=False)
    h.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs["x"]])
    score = mod.base_layer.weight.abs() * x.norm(dim=0)
    torch.testing.assert_close(collector.scores("model.layers.0.mlp.down_proj", mod), score)


def test_magnitude_and_random_and_callable():
    wrapped = get_spalora_model(tiny_llama(), SpaloraConfig(method="sparse", density=0.25))
    layers = wrapped.adapter_layers()
    apply_masks(layers, "magnitude", progress=False)
    for layer in layers.values():
        w = layer.base_weight().abs().reshape(-1)
        assert set(layer.mask_flat_indices().tolist()) == set(
            torch.topk(w, layer.nnz).indices.tolist()
        )
    apply_masks(layers, "random", seed=1, progress=False)
    first = {n: lay.mask_flat_indices().clone() for n, lay in layers.items()}
    apply_masks(layers, "random", seed=1, progress=False)
    assert all(torch.equal(first[n], lay.mask_flat_indices()) for n, lay in layers.items())

    def diagonal_first(name, weight, k):  # a user strategy returning scores
        return -torch.arange(weight.numel(), dtype=torch.float32).reshape(weight.shape)

    apply_masks(layers, diagonal_first, progress=False)
    for layer in layers.values():
        assert layer.mask_flat_indices().tolist() == list(range(layer.nnz))

    def wrong_count(name, weight, k):
        m = torch.zeros_like(weight, dtype=torch.bool)
        m.view(-1)[: k + 1] = True
        return m

    with pytest.raises(ValueError, match="expected"):
        apply_masks(layers, wrong_count, progress=False)


def test_per_layer_nnz_pattern_is_honored():
    model = tiny_llama()
    pattern = {"model.layers.0.self_attn.q_proj": 5, "model.layers.1.mlp.up_proj": 77}
    cfg = SpaloraConfig(method="sparse", nnz_pattern=pattern, rank_pattern={})
    wrapped = get_spalora_model(model, cfg)
    data = micro_batches(2)
    layers = wrapped.adapter_layers()
    assert sorted(layers) == sorted(pattern)
    collector = collect_statistics(wrapped, layers, "fisher", data, 2, progress=False)
    apply_masks(layers, "fisher", collector, progress=False)
    for name, k in pattern.items():
        assert layers[name].nnz == k and layers[name].mask_flat_indices().numel() == k


def test_density_pattern_per_layer_is_honored():
    cfg = SpaloraConfig(
        method="sparse",
        density=0.1,
        density_pattern={"down_proj": 0.25, r".*layers\.1\.self_attn\.q_proj": 0.5},
    )
    wrapped = get_spalora_model(tiny_llama(), cfg)
    layers = wrapped.adapter_layers()
    collector = collect_statistics(wrapped, layers, "fisher", micro_batches(1), 1, progress=False)
    apply_masks(layers, "fisher", collector, progress=False)
    for name, layer in layers.items():
        numel = layer.out_features * layer.in_features
        d = (
            0.25
            if name.endswith("down_proj")
            else 0.5
            if name == "model.layers.1.self_attn.q_proj"
            else 0.1
        )
        assert layer.nnz == int(d * numel) == layer.mask_flat_indices().numel(), name
    with pytest.raises(ValueError, match="density_pattern"):
        SpaloraConfig(method="sparse", density_pattern={"q_proj": 1.0})


def test_evaluation_forwards_are_not_mask_statistics(token_batch):
    """Validation or generation during the collect phase must not feed the mask (wanda counts
    activations without gradients, so it would otherwise see them)."""
    from spalora.masks import MaskCollector

    model = get_spalora_model(tiny_llama(), SpaloraConfig(method="sparse", density=0.1))
    layers = dict(model.adapter_layers())
    collector = MaskCollector(layers, "wanda").attach()
    model.eval()
    with torch.no_grad():
        model(**token_batch)
    assert collector.batches == 0 and not collector.stats
    model.train()
    with torch.no_grad():
        model(**token_batch)
    assert collector.batches == 1
    collector.detach()
