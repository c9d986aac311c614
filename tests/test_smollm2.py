"""The real SmolLM2-135M checkpoint (converted from the packaged GGUF once, then cached)."""

import json

import pytest
import torch

from spalora import SpaloraConfig, SpaloraModel, get_spalora_model
from spalora.cli import main
from spalora.data import batches, encode_example

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from spalora.hub import load_model_and_tokenizer

    return load_model_and_tokenizer()


@pytest.fixture(scope="module")
def bbc():
    from spalora.tasks import get_task

    return get_task("bbc-topic")


def test_bbc_split_is_stratified_and_disjoint(bbc):
    # 2,225 articles less repeated headlines; validation is 10% of train, stratified
    assert (len(bbc.train), len(bbc.validation), len(bbc.test)) == (1509, 168, 419)
    splits = [{e.prompt for e in part} for part in (bbc.train, bbc.validation, bbc.test)]
    assert sum(map(len, splits)) == 2096
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert {e.target for e in bbc.validation} == set(bbc.labels)
    counts = {t: sum(e.target == t for e in bbc.test) for t in bbc.labels}
    assert counts == {
        "business": 100,
        "entertainment": 73,
        "politics": 79,
        "sport": 100,
        "tech": 67,
    }
    assert set(counts) == {e.target for e in bbc.train}


def test_rosa_steps_on_smollm2_reduce_loss_and_round_trip(smollm2, bbc, tmp_path):
    model, tok = smollm2
    cfg = SpaloraConfig(
        method="rosa",
        budget="r2",
        rank_fraction=0.5,
        warmup_steps=2,
        mask_batches=1,
        lora_dropout=0.0,
    )
    wrapped = get_spalora_model(model, cfg)
    trainable, _ = wrapped.get_nb_trainable_parameters()
    assert trainable == 2 * 305_280
    from spalora import MaskSchedule

    schedule = MaskSchedule(wrapped, progress=False)
    enc = [encode_example(tok, e) for e in bbc.train[:64]]
    batch = next(batches(enc, 4, tok.pad_token_id, seed=0))
    opt = torch.optim.AdamW(wrapped.parameter_groups(2e-3, 2e-3))
    wrapped.train()
    losses = []
    for _ in range(6):
        loss = wrapped(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step(opt)
        losses.append(loss.item())
    assert schedule.phase == "joint"
    assert losses[-1] < losses[0]
    wrapped.eval()
    with torch.no_grad():
        out = wrapped(**batch).logits
    wrapped.save_pretrained(tmp_path)
    base = wrapped.unload()
    reloaded = SpaloraModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, out)
    reloaded.unload()


def test_cli_train_smoke(tmp_path, capsys):
    rc = main(
        [
            "train",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--warmup-steps",
            "1",
            "--mask-batches",
            "1",
            "--eval-limit",
            "8",
            "--val-limit",
            "4",
            "--eval-every",
            "2",
            "--output-dir",
            str(tmp_path),
            "--budget",
            "r2",
            "--no-progress",
        ]
    )
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["trainable_params"] == 2 * 305_280 and metrics["mask_step"] == 2
    assert metrics["metric"] == "accuracy" and 0.0 <= metrics["test"] <= 1.0
    assert "zero_shot" in metrics and metrics["n_test"] == 8
    assert set(metrics["validation"]) == {"accuracy", "loss"}
    history = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "validation" in h] == [2]  # none at the last step
    assert len([h for h in history if "loss" in h]) == 3
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert "test accuracy after training" in capsys.readouterr().out

    # spalora eval on the saved adapter: the same accuracy as the run's final evaluation
    rc = main(
        [
            "eval",
            "--adapter",
            str(tmp_path / "adapter"),
            "--limit",
            "8",
            "--output-dir",
            str(tmp_path / "ev"),
            "--no-progress",
        ]
    )
    assert rc == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["n"] == 8 and ev["value"] == metrics["test"] and ev["metric"] == "accuracy"
    assert ev["model"] == "smollm2-135m"
    rows = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 8 and {"prediction", "target", "correct"} <= set(json.loads(rows[0]))

    # spalora merge: a plain checkpoint with the adapted model's outputs
    from transformers import AutoModelForCausalLM

    from spalora.hub import load_model_and_tokenizer

    assert (
        main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
        == 0
    )
    base, _ = load_model_and_tokenizer()
    adapted = SpaloraModel.from_pretrained(base, tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - adapted(input_ids=ids).logits).abs().max()
    assert diff < 1e-3
    with pytest.raises(SystemExit, match="sparse part"):
        main(
            [
                "merge",
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "p"),
                "--peft",
            ]
        )


def test_local_folder_loads_like_a_hub_id(smollm2, tmp_path):
    """Any folder (or hub id, on an open machine) goes through AutoModelForCausalLM."""
    from spalora.hub import load_model_and_tokenizer

    from .conftest import tiny_llama

    _, tok = smollm2
    tiny = tiny_llama()
    tiny.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = load_model_and_tokenizer(str(tmp_path))
    ids = torch.randint(0, 96, (1, 5))
    assert torch.equal(model(input_ids=ids).logits, tiny(input_ids=ids).logits)
    assert tok2.pad_token is not None


def test_readme_quickstart_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    losses = module.main(steps=8, out_dir=str(tmp_path / "adapter"))
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_cli_file_task_train_and_eval(tmp_path, capsys):
    """Your own data end to end: JSONL with two bad rows, label metric, train then eval."""
    from spalora.tasks import get_task

    rows = [{"prompt": e.prompt, "completion": e.target} for e in get_task("bbc-topic").test[:40]]
    rows.insert(5, {"prompt": "a headline without a label"})
    rows.insert(9, {"prompt": "", "completion": "sport"})
    data = tmp_path / "headlines.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ["--task", "file", "--data", str(data), "--metric", "label", "--no-progress"]
    rc = main(
        ["train", *common, "--steps", "2", "--batch-size", "2", "--method", "lora"]
        + ["--budget", "r2", "--val-limit", "2", "--output-dir", str(tmp_path / "run")]
    )
    assert rc == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy" and metrics["n_test"] == 4  # 10% of 40 held out
    assert any("skipped 2 of 42 rows" in note for note in metrics["data_notes"])
    assert "skipped 2 of 42 rows" in capsys.readouterr().err
    rc = main(["eval", *common, "--adapter", str(tmp_path / "run" / "adapter")])
    assert rc == 0
    ev = json.loads((tmp_path / "run" / "eval-file" / "metrics.json").read_text())
    assert ev["value"] == metrics["test"] and ev["n"] == 4
    assert "| file | test |" in capsys.readouterr().out
