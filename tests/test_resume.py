"""Resumable runs: an interrupted run resumed from its checkpoint ends with the same adapter, bit
for bit, as an uninterrupted run of the same seed; a crash during a save keeps the last one."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from spalora import SpaloraConfig, get_spalora_model
from spalora import train as train_module
from spalora.checkpoint import list_checkpoints
from spalora.train import TrainConfig, train

from .conftest import WORD_EXAMPLES, tiny_llama, word_tokenizer

ADAPTER = dict(method="rosa", r=2, density=0.05, warmup_steps=3, mask_batches=2, lora_dropout=0.1)


def run(tmp, steps=14, resume=False, every=4, adapter=None, **train_kw):
    model = get_spalora_model(tiny_llama(), SpaloraConfig(**(adapter or ADAPTER)))
    cfg = TrainConfig(
        **{
            "steps": steps,
            "batch_size": 8,
            "lora_lr": 1e-2,
            "sparse_lr": 1e-2,
            "progress": False,
            "checkpoint_dir": str(tmp),
            "checkpoint_every": every,
            "resume": resume,
            "seed": 3,
            **train_kw,
        }
    )
    out = train(model, word_tokenizer(), WORD_EXAMPLES, cfg)
    return model.adapter_state_dict(), out


@pytest.mark.parametrize("lora_b_lr_ratio", [1.0, 16.0])  # LoRA+: B in groups of its own
def test_resume_after_interruption_is_bitwise_equal(tmp_path, monkeypatch, lora_b_lr_ratio):
    kw = {"lora_b_lr_ratio": lora_b_lr_ratio}
    full, full_out = run(tmp_path / "full", **kw)

    calls = {"n": 0}
    real = train_module.completion_loss

    def crash_on_11th(model, batch):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt("simulated kill")
        return real(model, batch)

    monkeypatch.setattr(train_module, "completion_loss", crash_on_11th)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", **kw)
    monkeypatch.setattr(train_module, "completion_loss", real)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["checkpoint-8"]
    resumed, out = run(tmp_path / "cut", resume=True, **kw)
    assert out["resumed_from"] == 8 and full_out["resumed_from"] is None
    assert out["steps_run"] == 14 and out["mask_step"] == full_out["mask_step"] == 5
    assert [h["loss"] for h in out["history"]] == [h["loss"] for h in full_out["history"]]
    for key, value in full.items():
        assert torch.equal(resumed[key], value), key


def test_checkpoints_are_pruned_and_crash_during_save_keeps_previous(tmp_path, monkeypatch):
    run(tmp_path, steps=12, every=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["checkpoint-10", "checkpoint-12"]  # step 4 fell in mask collection

    from spalora import checkpoint as ck

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken_save)
    with pytest.raises(OSError):
        ck.save_checkpoint(
            tmp_path,
            get_spalora_model(tiny_llama(), SpaloraConfig(**ADAPTER)),
            torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]),
            {"step": 14},
        )
    assert [p.name for p in list_checkpoints(tmp_path)] == names  # the half save is ignored
    assert load_file(str(tmp_path / "checkpoint-12" / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """A small random Llama with SmolLM2's tokenizer, saved as a local model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from spalora.hub import smollm2_folder

    folder = tmp_path_factory.mktemp("small-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_folder()).save_pretrained(folder)
    return folder


def cli(model_dir, out, *extra):
    return [
        sys.executable,
        "-m",
        "spalora.cli",
        "train",
        "--model",
        str(model_dir),
        "--output-dir",
        str(out),
        "--steps",
        "80",
        "--batch-size",
        "4",
        "--budget",
        "r2",
        "--warmup-steps",
        "3",
        "--mask-batches",
        "2",
        "--checkpoint-every",
        "5",
        "--no-eval",
        "--no-progress",
        *extra,
    ]


def test_sigkill_then_resume_matches_uninterrupted_run(small_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(
        cli(small_model_dir, tmp_path / "full"),
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        cli(small_model_dir, cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600  # as the runs' own timeouts: a loaded machine starts slowly
    while not (cut / "checkpoints" / "checkpoint-10").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name.rsplit("-", 1)[1]) for p in list_checkpoints(cut / "checkpoints"))
    assert 10 <= killed_at < 80, killed_at  # it really stopped partway
    assert not (cut / "adapter").exists()
    done = subprocess.run(
        cli(small_model_dir, cut, "--resume"),
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert f"resumed from {cut / 'checkpoints' / f'checkpoint-{killed_at}'}" in done.stderr
    want = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:  # bitwise: same seed, same data order, same RNG and optimizer states
        assert torch.equal(want[key], got[key]), key


def test_checkpoints_of_another_run_are_refused(tmp_path):
    run(tmp_path, steps=8, every=4)
    with pytest.raises(ValueError, match="earlier run"):
        run(tmp_path, steps=8, every=4)  # would prune or later resume the old run's files
    with pytest.raises(ValueError, match="cannot be resumed"):
        run(tmp_path, steps=10, every=4, resume=True)  # a different LR schedule length


def test_resume_with_a_changed_recipe_names_every_field_that_differs(tmp_path, capsys):
    """Whatever changes what is trained (method, sizes, mask, rates, steps) refuses a resume,
    each field named; what does not (checkpoint spacing, progress) may change."""
    run(tmp_path, steps=8, every=4)
    other = ADAPTER | {"method": "sparse", "mask_strategy": "random", "lora_dropout": 0.0}
    with pytest.raises(ValueError) as info:
        run(
            tmp_path, steps=8, every=4, resume=True, adapter=other, lora_lr=0.5, max_length=64,
            lora_b_lr_ratio=4.0,
        )  # fmt: skip
    message = str(info.value)
    for field in (
        "adapter.method='rosa' (now 'sparse')",
        "adapter.mask_strategy='fisher' (now 'random')",
        "adapter.lora_dropout=0.1 (now 0.0)",
        "train.lora_lr=0.01 (now 0.5)",
        "train.max_length=256 (now 64)",
        "train.lora_b_lr_ratio=1.0 (now 4.0)",
    ):
        assert field in message, (field, message)
    _, out = run(tmp_path, steps=8, every=2, resume=True)  # spacing is no part of the recipe
    assert out["resumed_from"] == 8


def test_a_checkpoint_from_before_loraplus_resumes_as_plain_lora_only(tmp_path):
    """Checkpoints written before `lora_b_lr_ratio` existed trained plain LoRA (ratio 1): they
    resume under it and are refused under another ratio, by name."""
    import json

    run(tmp_path, steps=8, every=4)
    for ck in list_checkpoints(tmp_path):
        state = json.loads((ck / "state.json").read_text())
        del state["recipe"]["train.lora_b_lr_ratio"]
        (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"train\.lora_b_lr_ratio=1\.0 \(now 16\.0\)"):
        run(tmp_path, steps=8, every=4, resume=True, lora_b_lr_ratio=16.0)
    _, out = run(tmp_path, steps=8, every=4, resume=True)
    assert out["resumed_from"] == 8


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    _, out = run(tmp_path / "empty", steps=4, every=4, resume=True)
    assert out["resumed_from"] is None and out["steps_run"] == 4
    assert f"no checkpoint in {tmp_path / 'empty'}; starting a fresh run" in capsys.readouterr().err


def test_nan_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = train_module.completion_loss
    calls = {"n": 0}

    def nan_on_7th(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(train_module, "completion_loss", nan_on_7th)
    model = get_spalora_model(tiny_llama(), SpaloraConfig(**ADAPTER))
    log = tmp_path / "history.jsonl"
    cfg = TrainConfig(
        steps=12,
        batch_size=8,
        progress=False,
        checkpoint_dir=str(tmp_path / "ck"),
        checkpoint_every=2,
        log_path=str(log),
    )
    with pytest.raises(FloatingPointError, match="loss is nan at step 6"):
        train(model, word_tokenizer(), WORD_EXAMPLES, cfg)
    # step 4 fell in mask collection; the newest checkpoint is the last step before the NaN
    assert [p.name for p in list_checkpoints(tmp_path / "ck")] == ["checkpoint-2", "checkpoint-6"]
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))  # written as the run went
    assert all(math.isfinite(r["loss"]) for r in rows)
    saved = load_file(
        str(tmp_path / "ck" / "checkpoint-6" / "adapter" / "adapter_model.safetensors")
    )
    assert all(torch.isfinite(v.float()).all() for v in saved.values())


def test_gradient_accumulation_matches_the_larger_batch():
    """2 x 4 micro-batches equal one batch of 8 here (equal completion lengths, no dropout).

    (LoRA only: mask statistics count micro-batches, so a mask would see other sums.)"""
    adapters = []
    for batch_size, accum in ((8, 1), (4, 2)):
        cfg = SpaloraConfig(method="lora", r=2, lora_dropout=0.0)
        model = get_spalora_model(tiny_llama(), cfg)
        tc = TrainConfig(
            steps=8,
            batch_size=batch_size,
            grad_accum=accum,
            lora_lr=1e-2,
            sparse_lr=1e-2,
            progress=False,
            seed=3,
        )
        out = train(model, word_tokenizer(), WORD_EXAMPLES, tc)
        assert out["steps_run"] == 8
        adapters.append(model.adapter_state_dict())
    for key, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], value, rtol=1e-4, atol=1e-6)


EVERY_PHASE = {  # short runs whose checkpoints fall in every phase of each method's agenda
    "lora": dict(method="lora", r=2, lora_dropout=0.1),
    "sparse": dict(method="sparse", density=0.05, mask_batches=2),
    "rosa": dict(method="rosa", r=2, density=0.05, warmup_steps=3, mask_batches=2),
    "spalora": dict(
        method="spalora", budget="r2", warmup_steps=3, mask_batches=2, truncate_at=11, irls_every=3
    ),
    "spalora-cubic": dict(  # a checkpoint between prunes carries pruned Adam moments
        method="spalora",
        budget="r2",
        warmup_steps=0,
        mask_strategy="random",
        rank_fraction=0.0,
        reach_budget="cubic",
        prune_from=0.1,
        truncate_at=13,
        irls_every=3,
    ),
    "spalora-exchange": dict(  # checkpoints between exchanges carry the regrowth generator
        method="spalora",
        budget="r2",
        warmup_steps=0,
        mask_strategy="random",
        rank_fraction=0.0,
        overprovision=1.0,
        start_rank="split",
        reach_budget="exchange",
        exchange_fraction=0.5,
        prune_from=0.1,
        truncate_at=13,
        irls_every=3,
    ),
}


@pytest.mark.parametrize("name", list(EVERY_PHASE))
def test_resume_from_every_checkpoint_is_bitwise_equal(name, tmp_path):
    """Resumed from each checkpoint of a 16-step run (warm-up, joint, and for ours each point
    between IRLS refreshes before and after the cut), every method ends with the uninterrupted
    run's adapter bit for bit, the same losses and the same budget log."""
    import shutil

    full, full_out = run(
        tmp_path / "full", steps=16, every=2, adapter=EVERY_PHASE[name], keep_last=100
    )
    points = list_checkpoints(tmp_path / "full")
    assert len(points) >= 5
    for point in points:
        here = tmp_path / point.name
        shutil.copytree(tmp_path / "full", here)
        for later in list_checkpoints(here):
            if int(later.name.split("-")[1]) > int(point.name.split("-")[1]):
                shutil.rmtree(later)
        resumed, out = run(
            here, steps=16, every=2, adapter=EVERY_PHASE[name], resume=True, keep_last=100
        )
        where = f"{name} from {point.name}"
        assert out["resumed_from"] == int(point.name.split("-")[1]), where
        assert [h.get("loss") for h in out["history"]] == [
            h.get("loss") for h in full_out["history"]
        ], where
        assert out["budget_log"] == full_out["budget_log"], where
        assert resumed.keys() == full.keys(), where
        for key, value in full.items():
            assert torch.equal(resumed[key], value), f"{where}: {key}"
