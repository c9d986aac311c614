"""`spalora train` as a recipe, on a tiny Llama and a JSONL task: what it refuses before the model
loads (a changed recipe on resume, a finished run, an unwritable output folder, a missing GPU),
what it never loses (a failed final save), and what it caches (the zero-shot score)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from spalora import hub
from spalora.cli import main

from .conftest import WORD_EXAMPLES, tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    """A tiny random Llama saved as a model folder, and a JSONL task file for it."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    data = root / "data.jsonl"
    with open(data, "w") as fh:
        for ex in WORD_EXAMPLES:
            fh.write(json.dumps({"prompt": ex.prompt, "completion": ex.target}) + "\n")
    return str(root / "model"), str(data)


def train_args(tiny, out, *extra) -> list[str]:
    model, data = tiny
    return [
        "train", "--model", model, "--task", "file", "--data", data, "--output-dir", str(out),
        "--method", "rosa", "--r", "2", "--density", "0.05", "--warmup-steps", "2",
        "--mask-batches", "2", "--steps", "6", "--batch-size", "4", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: the refusal must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(hub, "load_model_and_tokenizer", refuse)


def test_resume_with_a_changed_recipe_is_refused_naming_each_field(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--checkpoint-every", "3", "--no-eval")) == 0
    kept = (out / "adapter" / "adapter_config.json", out / "metrics.json")
    files = {p: p.read_bytes() for p in kept}

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(hub, "load_model_and_tokenizer", refuse)
    changed = ["--resume", "--no-eval", "--method", "lora", "--lora-lr", "0.5"]
    changed += ["--mask-strategy", "random", "--steps", "9"]
    with pytest.raises(SystemExit) as info:
        main(train_args(tiny, out, *changed))
    message = str(info.value)
    assert message.startswith("error: ") and "cannot be resumed" in message
    assert "\n" not in message
    for field in (
        "adapter.method='rosa' (now 'lora')",
        "train.lora_lr=0.001 (now 0.5)",
        "adapter.mask_strategy='fisher' (now 'random')",
        "train.steps=6 (now 9)",
        "adapter.density=0.05 (now None)",
    ):
        assert field in message, (field, message)
    # sizes by a budget instead of r and density: named too
    with pytest.raises(SystemExit, match=r"adapter\.budget=None \(now 'r8'\).*rank_fraction"):
        main(_with_budget(tiny, out))
    assert {p: p.read_bytes() for p in files} == files  # nothing of the refused run written


def _with_budget(tiny, out) -> list[str]:
    args = train_args(tiny, out, "--resume", "--no-eval", "--rank-fraction", "0.8")
    i = args.index("--r")
    del args[i : i + 4]  # --r 2 --density 0.05
    return args + ["--budget", "r8"]


def test_resume_with_the_same_recipe_continues_and_without_checkpoint_starts_fresh(
    tiny, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--resume", "--checkpoint-every", "3", "--no-eval")) == 0
    err = capsys.readouterr().err
    assert f"resume: no checkpoint in {out / 'checkpoints'}; starting a fresh run" in err
    # the same recipe (progress, evaluation and checkpoint spacing may change) resumes
    assert main(train_args(tiny, out, "--resume", "--checkpoint-every", "2", "--no-eval")) == 0
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-6'}" in capsys.readouterr().err


def test_a_finished_run_is_kept_unless_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--no-eval")) == 0
    adapter = out / "adapter" / "adapter_model.safetensors"
    first = adapter.read_bytes()
    with pytest.raises(SystemExit, match=r"error: .* holds a finished run .*--overwrite"):
        main(train_args(tiny, out, "--no-eval", "--seed", "1"))
    assert adapter.read_bytes() == first
    with pytest.raises(SystemExit, match="not both"):
        main(train_args(tiny, out, "--no-eval", "--overwrite", "--resume"))
    assert main(train_args(tiny, out, "--no-eval", "--seed", "1", "--overwrite")) == 0
    assert adapter.read_bytes() != first  # replaced by the seed-1 run


def test_overwrite_removes_the_earlier_runs_checkpoints(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--no-eval", "--checkpoint-every", "3")) == 0
    args = train_args(tiny, out, "--no-eval", "--checkpoint-every", "2", "--overwrite")
    assert main(args) == 0
    assert re.search(r"removing the earlier run's \d checkpoint\(s\)", capsys.readouterr().err)
    names = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert names == ["checkpoint-4", "checkpoint-6"]  # this run's only (step 2: mask statistics)


def test_an_output_folder_that_is_a_file_or_not_writable_fails_first(
    tiny, tmp_path, monkeypatch, no_model_load
):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(SystemExit, match=r"^error: output folder .*taken is a file"):
        main(train_args(tiny, a_file))
    from spalora.recipes import output

    def read_only(*args, **kwargs):  # what a read-only folder answers (root writes anyway)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(output.tempfile, "TemporaryFile", read_only)
    with pytest.raises(SystemExit, match=r"^error: cannot write to output folder .*Permission"):
        main(train_args(tiny, tmp_path / "ro"))


def test_a_failed_final_save_writes_the_adapter_elsewhere_and_says_where(
    tiny, tmp_path, monkeypatch, capsys
):
    from spalora.model import SpaloraModel

    out = tmp_path / "run"
    real = SpaloraModel.save_pretrained

    def full_disk(self, folder, *args, **kwargs):
        if Path(folder) == out / "adapter":
            raise OSError(28, "No space left on device")
        return real(self, folder, *args, **kwargs)

    monkeypatch.setattr(SpaloraModel, "save_pretrained", full_disk)
    assert main(train_args(tiny, out, "--no-eval")) == 1
    err = capsys.readouterr().err
    found = re.search(r"error: could not write the results to .*No space left.* are in (\S+) ", err)
    assert found, err
    fallback = Path(found.group(1))
    assert (fallback / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((fallback / "metrics.json").read_text())["steps_run"] == 6
    import shutil

    shutil.rmtree(fallback)


def test_device_flag_picks_the_gpu_when_there_is_one(tiny, tmp_path, monkeypatch, no_model_load):
    from spalora.recipes import FinetuneConfig, FinetuneRecipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        SystemExit, match="error: device 'cuda' was asked for but torch sees no GPU"
    ):
        main(train_args(tiny, tmp_path / "a", "--device", "cuda"))
    with pytest.raises(SystemExit, match="error: device 'cuda' .* no GPU"):
        main(["eval", "--model", tiny[0], "--device", "cuda"])

    def recipe(device: str) -> FinetuneRecipe:
        from spalora.cli import build_parser, resolve_recipe

        args = build_parser().parse_args(train_args(tiny, tmp_path / "b", "--device", device))
        return FinetuneRecipe(FinetuneConfig.from_recipe(resolve_recipe(args)))

    assert recipe("auto").resolve_device() == torch.device("cpu")
    from spalora.cli import build_parser, resolve_recipe
    from spalora.recipes import JobError

    resolved = resolve_recipe(build_parser().parse_args(train_args(tiny, tmp_path / "c")))
    with pytest.raises(JobError, match="device must be one of"):  # a YAML recipe's typo
        FinetuneConfig.from_recipe(resolved | {"device": "tpu"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert recipe("auto").resolve_device() == torch.device("cuda", 0)  # one process, one GPU
    assert recipe("cpu").resolve_device() == torch.device("cpu")


def test_device_cpu_trains_on_the_cpu(tiny, tmp_path, capsys):
    assert main(train_args(tiny, tmp_path / "run", "--device", "cpu", "--no-eval")) == 0
    assert "on cpu" in capsys.readouterr().err


def test_zero_shot_score_is_cached_per_model_and_examples(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPALORA_CACHE", str(tmp_path / "cache"))
    evaluated = []
    from spalora import evaluate

    real = evaluate.evaluate_task

    def counting(model, tokenizer, task, examples, *args, **kwargs):
        evaluated.append(kwargs.get("desc", args[2] if len(args) > 2 else None))
        return real(model, tokenizer, task, examples, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_task", counting)
    limits = ["--eval-limit", "4", "--val-limit", "4"]
    assert main(train_args(tiny, tmp_path / "a", *limits)) == 0
    assert "zero-shot eval" in evaluated
    evaluated.clear()
    assert main(train_args(tiny, tmp_path / "b", *limits)) == 0
    assert "zero-shot eval" not in evaluated and "(cached: " in capsys.readouterr().out
    zero = [json.loads((tmp_path / r / "metrics.json").read_text())["zero_shot"] for r in "ab"]
    assert zero[0] == zero[1]
    assert main(train_args(tiny, tmp_path / "c", "--eval-limit", "5", "--val-limit", "4")) == 0
    assert "zero-shot eval" in evaluated  # other examples: evaluated again
