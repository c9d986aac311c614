"""Several adapters on one model: add, load, switch, disable, delete, merge one, save several."""

import pytest
import torch
from safetensors import safe_open

from spalora import SpaloraConfig, SpaloraLinear, SpaloraModel, get_spalora_model
from spalora.masks import apply_masks

from .conftest import tiny_llama, wide_llama

ROSA = SpaloraConfig(method="rosa", r=2, density=0.05)
LORA_QV = SpaloraConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"])
SPARSE_MLP = SpaloraConfig(method="sparse", density=0.1, target_modules=["up_proj", "down_proj"])


def fill(model, seed):
    """Random masks and nonzero values in the active adapter (as after training)."""
    apply_masks(model.adapter_layers(), "random", seed=seed, progress=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def two_adapters():
    """`default` (RoSA, every linear layer) and `b` (LoRA on q/v), both trained; default active."""
    model = get_spalora_model(tiny_llama(), ROSA)
    model.eval()
    fill(model, 7)
    model.add_adapter("b", LORA_QV)
    model.set_adapter("b")
    fill(model, 8)
    model.set_adapter("default")
    return model


def saved_pair(tmp_path):
    """Two adapters trained on separate models and saved to tmp_path/a and tmp_path/b."""
    a = get_spalora_model(tiny_llama(), ROSA)
    fill(a, 3)
    a.save_pretrained(tmp_path / "a")
    b = get_spalora_model(tiny_llama(), SPARSE_MLP)
    fill(b, 4)
    b.save_pretrained(tmp_path / "b")
    return tmp_path / "a", tmp_path / "b"


def test_adapters_differ_and_switch_to_single_adapter_outputs(tmp_path, token_batch):
    model = two_adapters()
    assert model.adapters == model.list_adapters() == ["default", "b"]
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    out_a = logits(model, token_batch)
    model.set_adapter("b")
    assert model.active_adapter == "b"
    assert sorted({n.rsplit(".", 1)[1] for n in model.adapter_layers()}) == ["q_proj", "v_proj"]
    out_b = logits(model, token_batch)
    base = logits(tiny_llama(), token_batch)
    assert not torch.allclose(out_a, out_b)
    assert not torch.allclose(out_a, base) and not torch.allclose(out_b, base)
    model.save_pretrained(tmp_path)
    # each equals a fresh model holding only that adapter, to the bit
    alone_a = SpaloraModel.from_pretrained(tiny_llama(), tmp_path)
    alone_b = SpaloraModel.from_pretrained(tiny_llama(), tmp_path / "b")
    assert torch.equal(logits(alone_a, token_batch), out_a)
    assert torch.equal(logits(alone_b, token_batch), out_b)
    model.set_adapter("default")
    assert torch.equal(logits(model, token_batch), out_a)
    assert model.get_adapter_config("b").method == "lora"
    assert model.spalora_config.method == "rosa"


def test_load_two_saved_adapters_and_switch_back_and_forth(tmp_path, token_batch):
    dir_a, dir_b = saved_pair(tmp_path)
    ref_a = logits(SpaloraModel.from_pretrained(tiny_llama(), dir_a), token_batch)
    ref_b = logits(SpaloraModel.from_pretrained(tiny_llama(), dir_b), token_batch)
    w0 = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    model = SpaloraModel.from_pretrained(tiny_llama(), dir_a)
    model.load_adapter(dir_b, "b")
    assert model.active_adapter == "default"  # loading does not switch (as in PEFT)
    for _ in range(2):
        assert torch.equal(logits(model, token_batch), ref_a)
        model.set_adapter("b")
        assert torch.equal(logits(model, token_batch), ref_b)
        model.set_adapter("default")
    # the base weights still hold W0 exactly after all the W0 + S writes and switches
    for name, layer in model.wrapped_layers().items():
        assert torch.equal(layer.base_weight(), w0[name + ".weight"])
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference
    with pytest.raises(ValueError, match="exists already"):
        model.load_adapter(dir_b, "b")


def test_disable_adapter_runs_the_base_model(token_batch):
    model = two_adapters()
    base = logits(tiny_llama(), token_batch)
    out_a = logits(model, token_batch)
    with model.disable_adapter():
        assert torch.equal(logits(model, token_batch), base)
        with pytest.raises(RuntimeError, match="disable_adapter"):
            model.set_adapter("b")
    assert torch.equal(logits(model, token_batch), out_a)
    model.merge_adapter(["b"])  # an inactive merged adapter is taken out inside the block too
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, token_batch), base, rtol=1e-5, atol=1e-5)
    assert model.merged_adapters == ["b"]
    assert not torch.allclose(logits(model, token_batch), out_a)


def test_delete_adapter(token_batch):
    model = two_adapters()
    model.set_adapter("b")
    out_b = logits(model, token_batch)
    model.set_adapter("default")
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        model.delete_adapter("c")
    with pytest.raises(ValueError, match="no adapter named"):
        model.set_adapter("c")
    with pytest.raises(ValueError, match="exists already"):
        model.add_adapter("b", ROSA)
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter("../x", ROSA)
    with pytest.raises(ValueError, match=r"matched no Linear.*'q_proj'"):
        model.add_adapter("x", SpaloraConfig(method="lora", target_modules=["nope"]))
    assert model.adapters == ["default", "b"]
    model.merge_adapter(["b"])
    with pytest.raises(RuntimeError, match="merged"):
        model.delete_adapter("b")
    model.unmerge_adapter()
    # deleting the active one switches to the other, as PEFT does
    with pytest.warns(UserWarning, match="'b' is active now"):
        model.delete_adapter("default")
    assert model.adapters == ["b"] and model.active_adapter == "b"
    # its tensors are gone from every layer
    assert all(lay.adapter_names == ["b"] for lay in model.wrapped_layers().values())
    torch.testing.assert_close(logits(model, token_batch), out_b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("b")
    model.add_adapter("c", SPARSE_MLP)
    model.delete_adapter("c")
    assert model.adapters == ["b"]
    assert all("c" not in lay.adapter_names for lay in model.wrapped_layers().values())
    with pytest.raises(ValueError, match="no adapter named"):
        model.adapter_state_dict("c")


def _reference_weights(model, adapter):
    """W0 + that adapter's delta for every wrapped layer (dense fp32 arithmetic)."""
    active = model.active_adapter
    model.set_adapter(adapter)
    ref = {
        n: (lay.base_weight() + lay.delta_weight()).clone()
        for n, lay in model.wrapped_layers().items()
    }
    model.set_adapter(active)
    return ref


@pytest.mark.parametrize("how", ["by_name", "merged_then_switched"])
def test_merge_one_adapter_while_the_other_stays(tmp_path, token_batch, how):
    model = two_adapters()
    w0 = {n: lay.base_weight().clone() for n, lay in model.wrapped_layers().items()}
    want_w = _reference_weights(model, "default")
    out_a = logits(model, token_batch)
    model.set_adapter("b")
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    out_b = logits(model, token_batch)
    if how == "by_name":
        model.merge_adapter(["default"])  # b stays active
    else:
        model.set_adapter("default")
        model.merge_adapter()
        model.set_adapter("b")
    assert model.merged_adapters == ["default"] and model.active_adapter == "b"
    for name, layer in model.wrapped_layers().items():
        torch.testing.assert_close(layer.base_weight(), want_w[name], rtol=0, atol=1e-6)
    # W0 + delta_a in a plain model, with b on top: what the merged model must compute
    ref = tiny_llama()
    with torch.no_grad():
        for name, w in want_w.items():
            ref.get_submodule(name).weight.copy_(w)
    ref = SpaloraModel.from_pretrained(ref, tmp_path / "b", adapter_name="b")
    got = logits(model, token_batch)
    torch.testing.assert_close(got, logits(ref, token_batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, out_b, atol=1e-4)
    # the merged adapter active: its layers run the merged base layer alone
    model.set_adapter("default")
    assert all(lay.merged for lay in model.adapter_layers().values())
    torch.testing.assert_close(logits(model, token_batch), out_a, rtol=1e-5, atol=1e-5)
    model.set_adapter("b")
    model.unmerge_adapter()
    assert model.merged_adapters == []
    for name, layer in model.wrapped_layers().items():
        torch.testing.assert_close(layer.base_weight(), w0[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, token_batch), out_b, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_keeps_merged_and_adds_active(token_batch):
    model = two_adapters()
    want = _reference_weights(model, "default")
    delta_b = {}
    model.set_adapter("b")
    for name, layer in model.adapter_layers().items():
        delta_b[name] = layer.delta_weight()
    model.merge_adapter("default")
    out = logits(model, token_batch)
    merged = model.merge_and_unload()  # merges the active b on top of the merged default
    assert not any(isinstance(m, SpaloraLinear) for m in merged.modules())
    for name, w in want.items():
        expected = w + delta_b.get(name, 0.0)
        torch.testing.assert_close(merged.get_submodule(name).weight, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(merged, token_batch), out, rtol=1e-5, atol=1e-5)


def test_unload_subtracts_every_merged_adapter():
    model = two_adapters()
    w0 = tiny_llama().state_dict()
    model.merge_adapter(["default", "b"])
    assert model.merged_adapters == ["default", "b"]
    plain = model.unload()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, w0[key], rtol=0, atol=1e-6)


def test_save_several_and_reload_them(tmp_path, token_batch):
    model = two_adapters()
    model.add_adapter("c", SPARSE_MLP)
    model.set_adapter("c")
    fill(model, 9)
    outs = {}
    for name in model.adapters:
        model.set_adapter(name)
        outs[name] = logits(model, token_batch)
    model.save_pretrained(tmp_path / "all")
    for sub in ("", "b", "c"):
        assert (tmp_path / "all" / sub / "adapter_config.json").exists()
        assert (tmp_path / "all" / sub / "adapter_model.safetensors").exists()
    # the default adapter at the root is what a one-adapter model writes (the safetensors
    # header's metadata order is not fixed, so tensors and metadata are compared)
    alone = SpaloraModel.from_pretrained(tiny_llama(), tmp_path / "all")
    alone.save_pretrained(tmp_path / "alone")
    cfg = "adapter_config.json"
    assert (tmp_path / "alone" / cfg).read_bytes() == (tmp_path / "all" / cfg).read_bytes()
    with (
        safe_open(tmp_path / "alone" / "adapter_model.safetensors", "pt") as x,
        safe_open(tmp_path / "all" / "adapter_model.safetensors", "pt") as y,
    ):
        assert x.metadata() == y.metadata() and sorted(x.keys()) == sorted(y.keys())
        for key in x.keys():
            t, u = x.get_tensor(key), y.get_tensor(key)
            assert t.dtype == u.dtype and torch.equal(t, u)
    # one folder, three adapters, one base model
    loaded = SpaloraModel.from_pretrained(tiny_llama(), tmp_path / "all")
    loaded.load_adapter(tmp_path / "all", "b")  # its subfolder
    loaded.load_adapter(tmp_path / "all" / "c", "c")
    assert loaded.adapters == ["default", "b", "c"]
    for name in ("b", "default", "c", "default"):
        loaded.set_adapter(name)
        assert torch.equal(logits(loaded, token_batch), outs[name])
    only_b = SpaloraModel.from_pretrained(tiny_llama(), tmp_path / "all", adapter_name="b")
    assert only_b.active_adapter == "b"
    assert torch.equal(logits(only_b, token_batch), outs["b"])
    model.save_pretrained(tmp_path / "sel", selected_adapters=["c"])
    assert not (tmp_path / "sel" / "adapter_config.json").exists()
    assert (tmp_path / "sel" / "c" / "adapter_model.safetensors").exists()


def test_training_changes_only_the_active_adapter(token_batch):
    model = two_adapters()
    w0 = {n: lay.base_weight().clone() for n, lay in model.wrapped_layers().items()}
    before_a = model.adapter_state_dict("default")
    model.set_adapter("b")
    before_b = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW(model.parameter_groups(lora_lr=1e-2))  # after set_adapter
    for _ in range(3):
        model(**token_batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after_b = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    assert any(not torch.equal(after_b[k], before_b[k]) for k in before_b)
    after_a = model.adapter_state_dict("default")
    assert all(torch.equal(after_a[k], before_a[k]) for k in before_a)
    for name, layer in model.wrapped_layers().items():
        assert torch.equal(layer.base_weight(), w0[name])
    model.set_adapter("default")  # the trained b is kept while inactive
    model.set_adapter("b")
    assert all(torch.equal(model.adapter_state_dict()[k], v) for k, v in after_b.items())


def test_added_adapter_is_initialised_as_a_fresh_one(token_batch):
    model = get_spalora_model(tiny_llama(), SpaloraConfig(method="lora", r=2))
    fill(model, 5)
    for name, cfg in {
        "p": SpaloraConfig(method="rosa", budget="10%", rank_fraction=0.5, seed=3),
        "s": SpaloraConfig(method="spalora", budget="r2", target_modules=["up_proj"]),
    }.items():
        model.add_adapter(name, cfg)
        fresh = get_spalora_model(tiny_llama(), cfg)
        # the budget counts the base model's parameters, not the other adapters'
        assert model.get_adapter_config(name).nnz_pattern == fresh.spalora_config.nnz_pattern
        state, want = model.adapter_state_dict(name), fresh.adapter_state_dict()
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
        model.set_adapter(name)
        assert model.get_nb_trainable_parameters() == fresh.get_nb_trainable_parameters()
        assert torch.equal(logits(model, token_batch), logits(fresh, token_batch))
    assert [(a.name, a.r, a.nnz) for a in model.uniform_allocations] == [
        (a.name, a.r, a.nnz) for a in fresh.uniform_allocations
    ]
    model.set_adapter("default")
    assert not hasattr(model, "uniform_allocations")  # the spalora adapter's, gone with it


def test_adapter_that_does_not_fit_changes_nothing(tmp_path):

    other = get_spalora_model(
        wide_llama(),
        SPARSE_MLP,
    )
    other.save_pretrained(tmp_path)
    model = get_spalora_model(tiny_llama(), LORA_QV)
    wrapped = set(model.wrapped_layers())
    with pytest.raises(ValueError, match="has shape"):
        model.load_adapter(tmp_path, "x")
    assert model.adapters == ["default"] and set(model.wrapped_layers()) == wrapped


def _tensor_addresses(model):
    """Every adapter tensor of every layer (active or not): the object and its storage."""
    out = {}
    for name, layer in model.wrapped_layers().items():
        for adapter_name in layer.adapter_names:
            for attr, t in layer.adapter(adapter_name).tensors().items():
                out[(name, adapter_name, attr)] = t.data_ptr()
        for key, p in layer.adapters.named_parameters():
            out[(name, key)] = (id(p), p.data_ptr())
    return out


def test_set_adapter_copies_no_tensor(token_batch):
    model = two_adapters()
    model.add_adapter("c", SPARSE_MLP)
    before = _tensor_addresses(model)
    b_params = None
    for name in ("b", "c", "default", "b", "default", "c", "default"):
        model.set_adapter(name)
        logits(model, token_batch)  # W0 + S written for the active adapter's mask
        if name == "b":
            params = [p for g in model.parameter_groups() for p in g["params"]]
            assert b_params is None or all(p is q for p, q in zip(params, b_params, strict=True))
            b_params = params  # an optimizer built for b stays valid across switches
        assert _tensor_addresses(model) == before
    # only the active adapter trains: the others' parameters are frozen while inactive
    model.train()
    model.set_adapter("c")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.c." in n for n in trainable)


def _stored_delta(state, layer_name, out_f, in_f, lora_alpha):
    """scale * B A + S from saved tensors, as the former store of inactive adapters computed it
    (dense fp32): the inactive adapter's delta must not have changed."""
    delta = torch.zeros(out_f, in_f)
    values = state.get(f"{layer_name}.sparse_values")
    if values is not None:
        crow = state[f"{layer_name}.sparse_crow"].to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(out_f), crow[1:] - crow[:-1])
        delta.index_put_((rows, state[f"{layer_name}.sparse_col"].long()), values.float())
    a = state.get(f"{layer_name}.lora_A")
    if a is not None:
        b = state[f"{layer_name}.lora_B"]
        delta += (lora_alpha / a.shape[0]) * (b.float() @ a.float())
    return delta


def test_delta_weight_of_an_inactive_adapter():
    model = get_spalora_model(tiny_llama(), LORA_QV)
    fill(model, 1)
    model.add_adapter("s", SpaloraConfig(method="rosa", r=3, density=0.1, lora_alpha=5.0))
    model.set_adapter("s")
    fill(model, 2)
    state = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    model.set_adapter("default")
    layers = model.adapter_layers("s")
    assert len(layers) == 14 and all(lay.active_adapter == "default" for lay in layers.values())
    for name, layer in layers.items():
        want = _stored_delta(state, name, layer.out_features, layer.in_features, 5.0)
        assert torch.equal(layer.delta_weight("s"), want)
        if name.endswith(("up_proj", "o_proj")):  # not targeted by the active adapter
            assert layer.r == 0 and layer.nnz == 0
            assert torch.equal(layer.delta_weight(), torch.zeros_like(want))


def test_merge_of_an_inactive_adapter_matches_float64(token_batch):
    model = two_adapters()
    model.add_adapter("s", SpaloraConfig(method="rosa", r=3, density=0.1, lora_alpha=5.0))
    model.set_adapter("s")
    fill(model, 11)
    model.set_adapter("default")
    w0 = {n: lay.base_weight().double() for n, lay in model.wrapped_layers().items()}
    state = model.adapter_state_dict("s")
    logits(model, token_batch)  # default's W0 + S sits in the weights when s is merged
    model.merge_adapter("s")
    assert model.merged_adapters == ["s"] and model.active_adapter == "default"
    for name, layer in model.adapter_layers("s").items():
        d = torch.float64
        a, b = state[f"{name}.lora_A"].to(d), state[f"{name}.lora_B"].to(d)
        dense = torch.zeros(layer.out_features, layer.in_features, dtype=d)
        crow = state[f"{name}.sparse_crow"].long()
        rows = torch.repeat_interleave(torch.arange(layer.out_features), crow[1:] - crow[:-1])
        dense[rows, state[f"{name}.sparse_col"].long()] = state[f"{name}.sparse_values"].to(d)
        want = w0[name] + 5.0 / 3 * (b @ a) + dense
        torch.testing.assert_close(layer.base_weight().double(), want, rtol=0, atol=1e-6)
        assert layer.merged_adapters == ["s"] and not layer.merged  # default still runs
    model.unmerge_adapter(["s"])
    for name, layer in model.wrapped_layers().items():
        torch.testing.assert_close(layer.base_weight().double(), w0[name], rtol=0, atol=1e-6)


def test_layer_holds_several_adapters():
    torch.manual_seed(0)
    layer = SpaloraLinear(torch.nn.Linear(9, 12), r=2, nnz=5)
    other = layer.add_adapter("x", r=3, lora_alpha=6.0, nnz=7)
    assert layer.adapter_names == ["default", "x"] and layer.active_adapter == "default"
    assert not any(p.requires_grad for p in other.parameters())  # inactive: frozen
    layer.set_adapter("x")
    assert layer.r == 3 and layer.lora_A is other.lora_A and other.lora_A.requires_grad
    layer.set_sparse(torch.arange(7) * 3, torch.arange(7.0))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 9)
    out_x = layer(x)
    layer.set_adapter("default")
    w = layer.base_weight()
    torch.testing.assert_close(out_x, x @ (w + layer.delta_weight("x")).t() + layer.base_layer.bias)
    layer.merge(["x"])
    torch.testing.assert_close(layer(x), out_x, rtol=1e-5, atol=1e-5)  # default's delta is 0
    with pytest.raises(RuntimeError, match="merged"):
        layer.delete_adapter("x")
    assert layer.unmerge() == ["x"]
    with pytest.raises(RuntimeError, match="active"):
        layer.delete_adapter("default")
    layer.delete_adapter("x")
    assert layer.adapter_names == ["default"]
