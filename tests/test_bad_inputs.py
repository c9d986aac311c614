"""Bad inputs to `spalora train`, as a table: each case -> the one `error:` line it must give.

Every case here was accepted before (it trained, crashed later with a traceback, or failed with a
message naming no field or file); now each fails before the model loads and writes nothing.
Extend the table: a case is the flags (and an optional YAML recipe) and a regex the message must
match after "error: ". `test_rank_above_a_layer_is_refused_naming_the_layer` is the one case
that needs the layer shapes, so it loads a tiny model (and still writes nothing).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from spalora import hub
from spalora.cli import main

from .conftest import WORD_EXAMPLES, tiny_llama, word_tokenizer

GOOD_ROWS = "".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(3))
LATIN1_ROW = '{"prompt": "caf\u00e9", "completion": "x"}\n'.encode("latin-1")

# (case id, extra flags, YAML recipe or None, data file bytes or None, message regex)
CASES: list[tuple[str, list[str], str | None, bytes | None, str]] = [
    ("steps-0", ["--steps", "0"], None, None, r"steps must be a whole number >= 1, got 0"),
    ("steps-negative", ["--steps", "-1"], None, None, r"steps must be .* got -1"),
    ("steps-not-a-number", [], "train: {steps: ten}", None, r"steps must be .* got 'ten'"),
    ("batch-size-0", ["--batch-size", "0"], None, None, r"batch_size must be .*>= 1, got 0"),
    ("grad-accum-0", ["--grad-accum", "0"], None, None, r"grad_accum must be .*>= 1, got 0"),
    ("max-length-0", ["--max-length", "0"], None, None, r"max_length must be .*>= 1, got 0"),
    ("lora-lr-negative", ["--lora-lr", "-1"], None, None, r"lora_lr must be a finite number"),
    ("lora-lr-nan", ["--lora-lr", "nan"], None, None, r"lora_lr must be a finite .* got nan"),
    ("lora-lr-inf", ["--lora-lr", "inf"], None, None, r"lora_lr must be a finite .* got inf"),
    ("sparse-lr-nan", ["--sparse-lr", "nan"], None, None, r"sparse_lr must be a finite number"),
    ("checkpoint-every-neg", ["--checkpoint-every", "-2"], None, None, r"checkpoint_every must"),
    ("eval-every-negative", ["--eval-every", "-5"], None, None, r"eval_every must be"),
    ("keep-last-0", [], "train: {keep_last: 0}", None, r"keep_last must be .*>= 1, got 0"),
    ("max-grad-norm-nan", [], "train: {max_grad_norm: .nan}", None, r"max_grad_norm must be"),
    ("lora-alpha-nan", [], "adapter: {lora_alpha: .nan}", None, r"lora_alpha must be a finite"),
    ("lora-alpha-inf", [], "adapter: {lora_alpha: .inf}", None, r"lora_alpha must be a finite"),
    ("warmup-steps-yaml-fraction", [], "adapter: {warmup_steps: 2.5}", None, r"warmup_steps mu"),
    (
        "overprovision-nan",
        ["--method", "spalora", "--budget", "r2", "--overprovision", "nan"],
        None,
        None,
        r"overprovision must be a finite number, got nan",
    ),
    (
        "truncate-at-nan",
        ["--method", "spalora", "--budget", "r2", "--truncate-at", "nan"],
        None,
        None,
        r"truncate_at must be a finite number, got nan",
    ),
    (
        "rank-reg-inf",
        ["--method", "spalora", "--budget", "r2", "--rank-reg", "inf"],
        None,
        None,
        r"rank_reg must be a finite number, got inf",
    ),
    # Data files (item 7): an undecodable row stops a --strict load at that row, naming it; a
    # file with no decodable row, or a JSON document that is not UTF-8, names the file.
    (
        "latin1-row-strict",
        ["--strict"],
        None,
        GOOD_ROWS.encode() + LATIN1_ROW,
        r"data\.jsonl row 4: not UTF-8 text$",
    ),
    (
        "binary-jsonl",
        [],
        None,
        bytes(range(128, 256)) * 8,
        r"data\.jsonl has no usable rows: data\.jsonl: skipped 1 of 1 rows: 1 not UTF-8 text",
    ),
]


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: the refusal must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(hub, "load_model_and_tokenizer", refuse)


def write_data(folder: Path, content: bytes | None) -> Path:
    """The case's data file, or a good one (a usable file task) when it has none."""
    path = folder / "data.jsonl"
    if content is None:
        rows = [{"prompt": ex.prompt, "completion": ex.target} for ex in WORD_EXAMPLES]
        content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(content)
    return path


def train_args(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    out = tmp_path / "out"
    return [
        "train", "--model", "tiny", "--task", "file", "--data", str(data), "--output-dir",
        str(out), "--no-progress", "--no-eval", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "recipe", "data", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_input_gives_one_error_line_before_the_model_loads(
    tmp_path, no_model_load, flags, recipe, data, message
):
    args = train_args(tmp_path, write_data(tmp_path, data), *flags)
    if recipe is not None:
        (tmp_path / "recipe.yaml").write_text(recipe)
        args += ["--config", str(tmp_path / "recipe.yaml")]
    with pytest.raises(SystemExit) as info:
        main(args)
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), "something was written"
    text = str(info.value)
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text
    assert re.search(message, text[len("error: ") :]), text


def test_rank_above_a_layer_is_refused_naming_the_layer(tmp_path, monkeypatch):
    """r=1000 on 16- to 48-wide layers: refused where the per-layer sizes are decided, naming
    the layer and its shape, before the zero-shot evaluation; nothing is written. (A budget's
    rank is the solver's: not refused.)"""
    from spalora.recipes.finetune import FinetuneRecipe

    def tiny(*args, **kwargs):
        return tiny_llama(), word_tokenizer()

    def too_late(*args, **kwargs):
        raise AssertionError("the zero-shot evaluation ran before the adapter was checked")

    monkeypatch.setattr(hub, "load_model_and_tokenizer", tiny)
    monkeypatch.setattr(FinetuneRecipe, "score_zero_shot", too_late)
    data = write_data(tmp_path, None)
    args = [a for a in train_args(tmp_path, data, "--method", "lora", "--r", "1000")]
    with pytest.raises(SystemExit) as info:
        main([a for a in args if a != "--no-eval"])
    text = str(info.value)
    assert text.startswith("error: r=1000 exceeds the smaller dimension of layer ")
    assert "model.layers.0.self_attn.q_proj (32x32)" in text and "\n" not in text
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), "something was written"


# `spalora eval` and `spalora merge` (issue 26, items 3 and 6): a saved adapter damaged as the
# case says, or a --model that does not exist. Each gives one `error:` line naming the file and
# the tensor (or the path), no traceback, and merge writes nothing.
# (case id, command, damage to the adapter folder, --model or None for a real folder, regex)
Damage = tuple[str, str, object] | None  # (file, tensor or None, new value or bytes kept)
Q = "model.layers.0.self_attn.q_proj"
ADAPTER_CASES: list[tuple[str, str, Damage, str | None, str]] = [
    (
        "eval-nan-lora-A",
        "eval",
        ("adapter_model.safetensors", f"{Q}.lora_A", float("nan")),
        None,
        rf"adapter/adapter_model\.safetensors: tensor '{Q}\.lora_A' holds 1 of 64 values that "
        r"are NaN or inf$",
    ),
    (
        "merge-inf-lora-B",
        "merge",
        ("adapter_model.safetensors", f"{Q}.lora_B", float("inf")),
        None,
        rf"adapter_model\.safetensors: tensor '{Q}\.lora_B' holds 1 of 64 values that are NaN",
    ),
    (
        "merge-nan-sparse-values",
        "merge",
        ("adapter_model.safetensors", f"{Q}.sparse_values", float("nan")),
        None,
        rf"adapter_model\.safetensors: tensor '{Q}\.sparse_values' holds 1 of \d+ values",
    ),
    (
        "eval-truncated-weights",
        "eval",
        ("adapter_model.safetensors", None, 0.5),
        None,
        r"adapter/adapter_model\.safetensors is not a readable safetensors file \(.*\)$",
    ),
    (
        "merge-truncated-config",
        "merge",
        ("adapter_config.json", None, 0.5),
        None,
        r"adapter/adapter_config\.json: (Unterminated|Expecting)",
    ),
    (
        "merge-wrong-shape",
        "merge",
        ("adapter_model.safetensors", f"{Q}.lora_A", (2, 33)),
        None,
        rf"tensor '{Q}\.lora_A' has shape \(2, 33\), but the model's layer .* needs \(2, 32\)$",
    ),
    (
        "eval-model-path-missing",
        "eval",
        None,
        "missing/model",
        r"model path .*missing/model does not exist; --model takes the embedded default "
        r"'smollm2-135m', a local model folder, or a hub id \(owner/name\)$",
    ),
    (
        "merge-model-path-missing",
        "merge",
        None,
        "./nowhere",
        r"model path \./nowhere does not exist; --model takes the embedded default",
    ),
    (
        "eval-model-path-is-a-file",
        "eval",
        None,
        "adapter/adapter_config.json",
        r"model path adapter/adapter_config\.json is a file; --model takes the embedded default",
    ),
]


def damage_adapter(folder: Path, damage: Damage) -> None:
    """Save a trained tiny adapter to `folder`, then damage one file as the case says."""
    from safetensors.torch import load_file, save_file

    from .test_model import trained_adapter

    trained_adapter(tiny_llama()).save_pretrained(folder)
    if damage is None:
        return
    name, tensor, value = damage
    path = folder / name
    if tensor is None:  # truncate the file to this fraction of its bytes
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * value)])
        return
    state = load_file(str(path))
    if isinstance(value, tuple):
        state[tensor] = state[tensor].new_zeros(value)
    else:
        state[tensor].view(-1)[0] = value
    save_file(state, str(path))


@pytest.fixture
def tiny_models(monkeypatch) -> list[str]:
    """Model loading resolves the name as the real one does, then gives the tiny model; the
    list holds the names loaded."""
    loaded: list[str] = []

    def tiny(name, *args, **kwargs):
        hub.resolve_model_path(name)
        loaded.append(name)
        return tiny_llama(), word_tokenizer()

    monkeypatch.setattr(hub, "load_model_and_tokenizer", tiny)
    return loaded


@pytest.mark.parametrize(
    ("command", "damage", "model", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in ADAPTER_CASES],
)
def test_bad_adapter_or_model_gives_one_error_line_in_eval_and_merge(
    tmp_path, monkeypatch, capsys, tiny_models, command, damage, model, message
):
    monkeypatch.chdir(tmp_path)
    damage_adapter(tmp_path / "adapter", damage)
    (tmp_path / "base").mkdir()
    args = [command, "--adapter", str(tmp_path / "adapter")]
    args += ["--model", str(tmp_path / model) if model == "missing/model" else model or "base"]
    if command == "eval":
        data = write_data(tmp_path, None)
        args += ["--task", "file", "--data", str(data), "--output-dir", "out", "--no-progress"]
    else:
        args += ["--out", "out"]
    with pytest.raises(SystemExit) as info:
        main(args)
    text = str(info.value)
    assert text.startswith("error: ") and "\n" not in text, text
    assert re.search(message, text[len("error: ") :]), text
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "something was written"
    damaged_file = damage is not None and damage[2] != (2, 33)  # a shape needs the model
    assert not (damaged_file and tiny_models), "the model loaded before the adapter was refused"


def test_a_bug_keeps_its_traceback_and_spalora_debug_shows_one_for_errors(
    tmp_path, monkeypatch, capsys
):
    """Only expected failures become one line: any other exception propagates (a bug's
    traceback is the report); SPALORA_DEBUG=1 prints the traceback of an expected one too."""

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    real = hub.load_model_and_tokenizer
    monkeypatch.setattr(hub, "load_model_and_tokenizer", bug)
    merge = ["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]
    damage_adapter(tmp_path / "adapter", None)
    with pytest.raises(RuntimeError, match="a bug"):
        main([*merge, "--model", str(tmp_path)])
    monkeypatch.setattr(hub, "load_model_and_tokenizer", real)  # refuses the path itself
    monkeypatch.setenv("SPALORA_DEBUG", "1")
    with pytest.raises(SystemExit, match=r"^error: model path .*nowhere does not exist; "):
        main([*merge, "--model", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert "Traceback" in err and "FileNotFoundError" in err


def test_a_hub_id_the_hub_cannot_provide_is_named_with_what_model_takes():
    """Offline (as the suite runs), a well-formed hub id that is not cached: one message naming
    it, in place of the hub client's chained errors."""
    with pytest.raises(OSError) as info:
        hub.load_model_and_tokenizer("someorg/doesnotexist")
    text = str(info.value)
    assert text.startswith(
        "cannot load model 'someorg/doesnotexist': no local folder of that name, and the hub "
        "did not provide it ("
    )
    assert text.endswith(f"); {hub.MODEL_FORMS}") and "\n" not in text


def test_a_diverged_run_ends_with_one_error_line_naming_the_step(tmp_path, monkeypatch, capsys):
    """Training stops on a non-finite loss; the command line says so in one line."""
    from spalora import train as train_module

    def tiny(*args, **kwargs):
        return tiny_llama(), word_tokenizer()

    def nan_loss(model, batch):
        return model(**batch).logits.sum() * float("nan")

    monkeypatch.setattr(hub, "load_model_and_tokenizer", tiny)
    monkeypatch.setattr(train_module, "completion_loss", nan_loss)
    args = train_args(tmp_path, write_data(tmp_path, None), "--method", "lora", "--r", "2")
    with pytest.raises(SystemExit) as info:
        main(args)
    assert str(info.value) == (
        "error: loss is nan at step 0: stopping before the update (the last checkpoint, if any, "
        "is the last good state)"
    )
    assert "Traceback" not in capsys.readouterr().err
