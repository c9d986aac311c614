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
    the layer and its shape; nothing is written. (A budget's rank is the solver's: not refused.)"""

    def tiny(*args, **kwargs):
        return tiny_llama(), word_tokenizer()

    monkeypatch.setattr(hub, "load_model_and_tokenizer", tiny)
    data = write_data(tmp_path, None)
    with pytest.raises(SystemExit) as info:
        main(train_args(tmp_path, data, "--method", "lora", "--r", "1000"))
    text = str(info.value)
    assert text.startswith("error: r=1000 exceeds the smaller dimension of layer ")
    assert "model.layers.0.self_attn.q_proj (32x32)" in text and "\n" not in text
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), "something was written"
