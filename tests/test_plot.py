"""`spalora plot` writes real PNGs from a run folder; a folder without a run is a clear error."""

import json

import pytest

from spalora import SpaloraConfig, get_spalora_model
from spalora.cli import main
from spalora.plot import layer_grid, saved_shapes

from .conftest import tiny_llama


def test_plot_writes_pngs(tmp_path, capsys):
    phases = ["warmup"] * 4 + ["collect"] * 2 + ["joint"] * 6
    with open(tmp_path / "history.jsonl", "w") as fh:
        for i, ph in enumerate(phases):
            fh.write(json.dumps({"step": i, "loss": 2.0 / (i + 1), "phase": ph, "lr": 1.0}) + "\n")
            if i % 4 == 3:  # periodic validation rows, as train(eval_every=4) writes them
                row = {"step": i + 1, "validation": {"accuracy": i / 12, "loss": 1 / (i + 1)}}
                fh.write(json.dumps(row) + "\n")
    wrapped = get_spalora_model(
        tiny_llama(), SpaloraConfig(method="rosa", budget="r2", rank_fraction=0.5)
    )
    wrapped.save_pretrained(tmp_path / "adapter")
    assert main(["plot", str(tmp_path)]) == 0
    for name in ("loss.png", "allocation.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "allocation.png" in capsys.readouterr().out
    blocks, kinds, cells = layer_grid(wrapped.spalora_config)
    assert blocks == ["0", "1"] and kinds[:3] == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
    ]
    assert len(cells) == 14
    shapes = saved_shapes(tmp_path / "adapter")
    assert shapes["model.layers.1.mlp.down_proj"] == (32, 48)  # (out, in) of the tiny model
    assert set(shapes) == set(wrapped.spalora_config.rank_pattern)


def test_plot_of_an_adapter_folder_draws_its_allocation(tmp_path, capsys):
    wrapped = get_spalora_model(
        tiny_llama(), SpaloraConfig(method="rosa", budget="r2", rank_fraction=0.5)
    )
    wrapped.save_pretrained(tmp_path)
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "allocation.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "loss.png").exists()
    assert "allocation.png" in capsys.readouterr().out


def test_plot_needs_a_run(tmp_path):
    with pytest.raises(SystemExit, match="no history.jsonl"):
        main(["plot", str(tmp_path)])


def test_gpt2_module_names_do_not_collide():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64))
    wrapped = get_spalora_model(
        model, SpaloraConfig(method="lora", r=2, target_modules=["c_attn", "c_proj", "c_fc"])
    )
    blocks, kinds, cells = layer_grid(wrapped.spalora_config)
    assert len(cells) == 8 and {"attn.c_proj", "mlp.c_proj"} <= set(kinds)
