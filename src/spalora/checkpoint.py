"""Resumable training: checkpoints of everything a run needs to continue exactly where it stopped.

A checkpoint folder `checkpoint-<step>` holds the adapter (our safetensors format, masks
included), the optimizer's tensors (safetensors), and `state.json` (step, LR-schedule position,
mask-schedule phase, data position, RNG states, loss history). It is written to a temporary
folder and renamed into place, so a crash during a save leaves the previous checkpoint intact;
only the newest `keep_last` are kept. (Files are not fsynced: a power loss, unlike a killed
process, may still leave a renamed folder with incomplete files.) Resume is bitwise equal on
CPU; on CUDA it also needs torch.use_deterministic_algorithms(True).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_NAME = "state.json"
OPTIM_NAME = "optimizer.safetensors"


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors = {}
    scalars = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            name = f"{idx}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                scalars[name] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [
        {k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: str | Path, model, optimizer, state: dict, keep_last: int = 2) -> Path:
    """Write checkpoint-<step> atomically and prune older ones."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{state['step']}"
    tmp = root / f".tmp-checkpoint-{state['step']}"
    for stale in root.glob(".tmp-checkpoint-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(tmp / "adapter")
    tensors, meta = _optimizer_to_flat(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():  # dropout on a GPU draws from the CUDA generators
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / OPTIM_NAME))
    py_state = random.getstate()
    full = {**state, "optimizer": meta, "python_rng": [py_state[0], list(py_state[1]), py_state[2]]}
    (tmp / STATE_NAME).write_text(json.dumps(full))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # the checkpoint appears whole or not at all
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are skipped)."""
    root = Path(run_dir)
    if not root.exists():
        return []
    found = [p for p in root.glob("checkpoint-*") if (p / STATE_NAME).exists()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))


def read_state(path: str | Path) -> dict:
    """The run state saved in a checkpoint (step, data position, settings signature, ...)."""
    return json.loads((Path(path) / STATE_NAME).read_text())


def load_checkpoint(path: str | Path, model, optimizer) -> dict:
    """Restore adapter values/masks, optimizer and RNG states; returns the saved run state."""
    path = Path(path)
    state = read_state(path)
    adapter = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    model.load_adapter_state(adapter)
    tensors = load_file(str(path / OPTIM_NAME))
    torch.set_rng_state(tensors.pop("rng.torch"))
    cuda_states = [tensors.pop(k) for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    _optimizer_from_flat(optimizer, tensors, state.pop("optimizer"))
    version, inner, gauss = state.pop("python_rng")
    random.setstate((version, tuple(inner), gauss))
    return state
