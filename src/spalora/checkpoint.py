"""Resumable training: checkpoints of everything a run needs to continue exactly where it stopped.

A checkpoint folder `checkpoint-<step>` holds the adapter (our safetensors format, masks
included), the optimizer's tensors (safetensors), and `state.json` (step, LR-schedule position,
mask-schedule phase, data position, RNG states, loss history). It is written to a temporary
folder and renamed into place, so a crash during a save leaves the previous checkpoint intact;
only the newest `keep_last` are kept. (Files are not fsynced: a power loss, unlike a killed
process, may still leave a renamed folder with incomplete files.) Resume is bitwise equal on
CPU; on CUDA it also needs torch.use_deterministic_algorithms(True). Each checkpoint records the
recipe that trained it (`training_recipe`), and a resume that would change it is refused, each
differing field named (`check_resumable`). A checkpoint with a damaged file (truncated JSON or
safetensors) is skipped with a warning naming the file, so a resume falls back to the previous
intact one (`list_checkpoints`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import WEIGHTS_NAME, SpaloraConfig, TrainConfig, recipe_fields
from .serialization import check_finite, check_tensor_file, read_config, read_tensors

STATE_NAME = "state.json"
OPTIM_NAME = "optimizer.safetensors"

# The TrainConfig fields that change what is trained (a resume must keep them); the others
# (where files go, how often to evaluate or checkpoint, progress) may change between runs.
TRAINED_FIELDS = (
    "steps",
    "batch_size",
    "grad_accum",
    "lora_lr",
    "sparse_lr",
    "lr_warmup_steps",
    "max_grad_norm",
    "max_length",
    "seed",
    "overlong",
    "bf16",
    "lora_b_lr_ratio",
)
# Recipe keys added after checkpoints already existed, with the value those checkpoints trained
# with: a checkpoint that lacks one resumes under that value and is refused under another.
LATER_RECIPE_KEYS = {"train.lora_b_lr_ratio": 1.0}


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


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states: the CPU generator and, on a GPU, the current device's."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def save_checkpoint(
    run_dir: str | Path,
    model,
    optimizer,
    state: dict,
    keep_last: int = 2,
    rank_rng: list[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically and prune older ones.

    Several processes: rank 0 alone writes, with every rank's RNG states in `rank_rng` (from
    `rng_state()` on each rank), so each rank's dropout continues its own stream on resume.
    """
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
    for r, states in enumerate(rank_rng or []):
        for kind, value in states.items():
            tensors[f"rng.rank{r}.{kind}"] = value.cpu()
    state, state_tensors = split_tensors(state)  # e.g. a controller's weights
    tensors.update(state_tensors)
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


TENSOR_REF = "__tensor__"


def split_tensors(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """`state` for JSON, each tensor in it replaced by {"__tensor__": key}, and the tensors by
    key (saved beside the optimizer's): a schedule's state may hold tensors, exactly kept."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"state.{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous()
            return {TENSOR_REF: key}
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v) for v in x]
        return x

    return walk(state), tensors


def join_tensors(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `split_tensors`."""
    if isinstance(state, dict):
        if set(state) == {TENSOR_REF}:
            return tensors[state[TENSOR_REF]]
        return {k: join_tensors(v, tensors) for k, v in state.items()}
    if isinstance(state, list):
        return [join_tensors(v, tensors) for v in state]
    return state


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Intact checkpoints, oldest first.

    Temporary folders of an interrupted save and folders without state.json are skipped; so is
    a checkpoint with a damaged file, with a warning naming it, so that a resume falls back to
    the previous intact checkpoint rather than failing on a parser's error."""
    root = Path(run_dir)
    if not root.exists():
        return []
    found = []
    for path in root.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if not match or not (path / STATE_NAME).exists():
            continue
        problem = checkpoint_problem(path)
        if problem is not None:
            warnings.warn(
                f"skipping damaged checkpoint {path}: {problem}; an earlier intact checkpoint "
                "is used instead, if there is one",
                stacklevel=2,
            )
            continue
        found.append((int(match[1]), path))
    return [path for _, path in sorted(found)]


def checkpoint_problem(path: str | Path) -> str | None:
    """Why a checkpoint cannot be loaded (a truncated or corrupt file, named), or None. Reads
    state.json, the adapter's config and the safetensors headers, no tensor."""
    path = Path(path)
    try:
        read_state(path)
        check_tensor_file(path / OPTIM_NAME)
        read_config(path / "adapter")
        check_tensor_file(path / "adapter" / WEIGHTS_NAME)
    except (ValueError, OSError) as exc:
        return str(exc)
    return None


def read_state(path: str | Path) -> dict:
    """The run state saved in a checkpoint (step, data position, settings signature, ...); a
    truncated or invalid state.json is a ValueError naming the file."""
    file = Path(path) / STATE_NAME
    try:
        state = json.loads(file.read_text())
    except ValueError as exc:  # truncated, not JSON, not UTF-8
        raise ValueError(f"{file} is not valid JSON ({exc})") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{file} holds no run state (no 'step' key)")
    return state


def load_checkpoint(path: str | Path, model, optimizer, rank: int = 0) -> dict:
    """Restore adapter values/masks, optimizer and RNG states; returns the saved run state.

    Every rank of a distributed run loads the same files; `rank` picks its own RNG states.
    """
    path = Path(path)
    state = read_state(path)
    adapter_file = path / "adapter" / WEIGHTS_NAME
    adapter = read_tensors(adapter_file)
    check_finite(adapter, adapter_file)
    model.load_adapter_state(adapter)
    tensors = read_tensors(path / OPTIM_NAME)
    rng = {k: tensors.pop(k) for k in [t for t in tensors if t.startswith("rng.")]}
    state = join_tensors(
        state, {k: tensors.pop(k) for k in list(tensors) if k.startswith("state.")}
    )
    own = f"rng.rank{rank}."
    if own + "torch" in rng:  # written by a distributed run
        torch.set_rng_state(rng[own + "torch"])
        if own + "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[own + "cuda"])
    else:
        torch.set_rng_state(rng["rng.torch"])
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
    _optimizer_from_flat(optimizer, tensors, state.pop("optimizer"))
    version, inner, gauss = state.pop("python_rng")
    random.setstate((version, tuple(inner), gauss))
    return state


def training_recipe(
    adapter: SpaloraConfig | None, cfg: TrainConfig, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every setting that decides the trained adapter, as flat "section.key" -> JSON value.

    Written into each checkpoint, so a resume can refuse a changed recipe by name; `extra` holds
    a job's own keys (model, task, data)."""
    out: dict[str, Any] = {f"train.{key}": getattr(cfg, key) for key in TRAINED_FIELDS}
    if adapter is not None:
        saved = adapter.to_dict()
        keys = [f.name for f in recipe_fields(SpaloraConfig)] + ["seed"]
        out.update({f"adapter.{key}": saved[key] for key in keys})
    out.update(extra or {})
    return json.loads(json.dumps(out, default=str))  # as state.json holds it: lists, not tuples


def _differences(saved: dict, now: dict) -> list[str]:
    return [
        f"{key}={saved.get(key)!r} (now {now.get(key)!r})"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]


def check_resumable(
    checkpoint: str | Path, recipe: dict[str, Any], signature: dict[str, Any] | None = None
) -> None:
    """Refuse to resume `checkpoint` with another recipe, naming every field that differs.

    `signature` (data size, world size) is known only once the data is encoded; without it the
    recipe alone is compared (a job does this before it loads the model). Checkpoints written
    before recipes were recorded compare their signature only."""
    state = read_state(checkpoint)
    diffs: list[str] = []
    if "recipe" in state:
        diffs += _differences(LATER_RECIPE_KEYS | state["recipe"], recipe)
        keys = ("n_examples", "world_size")  # the rest of the signature is in the recipe
    else:
        keys = tuple(set(state.get("signature") or {}) | set(signature or {}))
    if signature is not None:
        saved = state.get("signature") or {}
        diffs += _differences(
            {k: saved.get(k) for k in keys if k in saved or k in signature},
            {k: signature.get(k) for k in keys if k in saved or k in signature},
        )
    if diffs:
        raise ValueError(
            f"{checkpoint} cannot be resumed with these settings; its run was trained with "
            f"{', '.join(diffs)}. Resume with the run's own settings, or train into another "
            "output folder"
        )
