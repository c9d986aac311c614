"""A checkpoint with a truncated or corrupt file is skipped with a warning naming the file, so a
resume falls back to the previous intact checkpoint, as it does when state.json is missing."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from spalora import SpaloraConfig, get_spalora_model
from spalora.checkpoint import list_checkpoints, load_checkpoint, read_state, save_checkpoint

from .conftest import tiny_llama
from .test_resume import ADAPTER, run

FILES = {
    "state": "state.json",
    "optimizer": "optimizer.safetensors",
    "adapter-weights": "adapter/adapter_model.safetensors",
    "adapter-config": "adapter/adapter_config.json",
}


def two_checkpoints(root):
    """checkpoint-4 and checkpoint-8 of a tiny model, written by save_checkpoint itself."""
    model = get_spalora_model(tiny_llama(), SpaloraConfig(**ADAPTER))
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (4, 8):
        save_checkpoint(root, model, optimizer, {"step": step, "history": []})
    return model, optimizer


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damaged", list(FILES))
def test_a_truncated_file_skips_the_checkpoint_with_a_warning_naming_it(tmp_path, damaged):
    two_checkpoints(tmp_path)
    bad = tmp_path / "checkpoint-8" / FILES[damaged]
    truncate(bad)
    with pytest.warns(UserWarning) as caught:
        found = list_checkpoints(tmp_path)
    assert found == [tmp_path / "checkpoint-4"]
    message = str(caught[0].message)
    assert message.startswith(f"skipping damaged checkpoint {tmp_path / 'checkpoint-8'}: {bad}")
    assert message.endswith("an earlier intact checkpoint is used instead, if there is one")
    assert "\n" not in message


def test_a_missing_state_file_still_skips_the_checkpoint_silently(tmp_path):
    two_checkpoints(tmp_path)
    (tmp_path / "checkpoint-8" / "state.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-4"]


def test_read_state_names_a_truncated_state_file(tmp_path):
    two_checkpoints(tmp_path)
    state = tmp_path / "checkpoint-8" / "state.json"
    truncate(state)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(state))} is not valid JSON \("):
        read_state(tmp_path / "checkpoint-8")
    state.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"state\.json holds no run state \(no 'step' key\)$"):
        read_state(tmp_path / "checkpoint-8")


def test_load_checkpoint_names_a_corrupt_or_non_finite_file(tmp_path):
    model, optimizer = two_checkpoints(tmp_path)
    weights = tmp_path / "checkpoint-8" / "adapter" / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith(".lora_A"))
    state[key][0, 0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(weights))}: tensor '{key}' holds 1"):
        load_checkpoint(tmp_path / "checkpoint-8", model, optimizer)
    truncate(tmp_path / "checkpoint-4" / "optimizer.safetensors")
    optim = re.escape(str(tmp_path / "checkpoint-4" / "optimizer.safetensors"))
    with pytest.raises(ValueError, match=rf"^{optim} is not a readable safetensors file \("):
        load_checkpoint(tmp_path / "checkpoint-4", model, optimizer)


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_truncated(tmp_path):
    run(tmp_path, steps=12, every=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-12"]
    truncate(tmp_path / "checkpoint-12" / "state.json")
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*checkpoint-12: .*state"):
        _, out = run(tmp_path, steps=12, every=2, resume=True)
    assert out["resumed_from"] == 10 and out["steps_run"] == 12
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-12"]
