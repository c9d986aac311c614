"""End to end on a tiny random Llama: every method trains, the schedule runs, Trainer works."""

import pytest
import torch

from spalora import MaskSchedule, SpaloraCallback, SpaloraConfig, get_spalora_model
from spalora.tasks import Example
from spalora.train import TrainConfig, train

from .conftest import WORD_EXAMPLES, tiny_llama, word_tokenizer


def fixed_batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 96, (8, 16), generator=g)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("method", ["lora", "sparse", "rosa"])
def test_loss_goes_down_with_each_method(method):
    cfg = SpaloraConfig(
        method=method,
        budget="r4",
        rank_fraction=0.5,
        warmup_steps=3,
        mask_batches=2,
        lora_dropout=0.0,
    )
    model = get_spalora_model(tiny_llama(), cfg)
    model.train()
    schedule = MaskSchedule(model, progress=False)
    opt = torch.optim.AdamW(model.parameter_groups(2e-2, 2e-2))
    batch = fixed_batch()
    losses, phases = [], []
    for _ in range(25):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step(opt)
        phases.append(schedule.phase)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    if method == "lora":
        assert set(phases) == {"joint"}
    else:
        assert phases[-1] == "joint"
        layers = model.adapter_layers().values()
        assert all(lay.mask_ready for lay in layers)
        assert any(lay.sparse_values.abs().sum() > 0 for lay in layers)  # S really trained
        if method == "rosa":
            assert phases[:2] == ["warmup", "warmup"] and "collect" in phases
            assert schedule.mask_step == 3 + 2


def test_sparse_values_frozen_until_mask():
    cfg = SpaloraConfig(method="rosa", r=2, density=0.05, warmup_steps=2, mask_batches=1)
    model = get_spalora_model(tiny_llama(), cfg)
    model.train()
    schedule = MaskSchedule(model, progress=False)
    opt = torch.optim.AdamW(model.parameter_groups(1e-2, 1e-2))
    model(**fixed_batch()).loss.backward()
    assert all(p.grad is None for p in model.sparse_parameters())
    assert all(p.grad is not None for p in model.lora_parameters())
    opt.step()
    opt.zero_grad()
    schedule.step(opt)
    assert schedule.phase == "warmup"


def test_restart_recipe_resets_adapters_and_optimizer():
    cfg = SpaloraConfig(
        method="rosa",
        r=2,
        density=0.05,
        warmup_steps=3,
        mask_batches=1,
        restart_after_mask=True,
        lora_dropout=0.0,
    )
    model = get_spalora_model(tiny_llama(), cfg)
    init_a = {n: lay.lora_A.detach().clone() for n, lay in model.adapter_layers().items()}
    model.train()
    schedule = MaskSchedule(model, progress=False)
    opt = torch.optim.AdamW(model.parameter_groups(1e-2, 1e-2))
    for _ in range(4):
        model(**fixed_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step(opt)
    assert schedule.restarted and schedule.phase == "joint"
    for name, layer in model.adapter_layers().items():
        assert torch.equal(layer.lora_A, init_a[name])
        assert not layer.lora_B.any() and not layer.sparse_values.any()
        assert layer.mask_ready
    assert not opt.state


def test_training_recipe_with_restart_runs_full_joint_phase():
    tok, examples = word_tokenizer(), WORD_EXAMPLES
    cfg = SpaloraConfig(
        method="rosa", r=2, density=0.05, warmup_steps=4, mask_batches=2, restart_after_mask=True
    )
    model = get_spalora_model(tiny_llama(), cfg)
    out = train(
        model,
        tok,
        examples,
        TrainConfig(steps=10, batch_size=8, progress=False, lora_lr=1e-2, sparse_lr=1e-2),
    )
    assert out["mask_step"] == 6
    assert out["steps_run"] == 16  # 6 before the restart + 10 from step 0
    assert out["history"][-1]["loss"] < out["history"][0]["loss"]


def test_trainer_runs_mask_schedule(tmp_path):
    from transformers import Trainer, TrainingArguments

    cfg = SpaloraConfig(
        method="rosa", r=2, density=0.05, warmup_steps=2, mask_batches=2, lora_dropout=0.0
    )
    model = get_spalora_model(tiny_llama(), cfg)
    batch = fixed_batch()
    rows = [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in range(8)]
    callback = SpaloraCallback(model, progress=False)
    opt = torch.optim.AdamW(model.parameter_groups(1e-2, 1e-2))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        report_to=[],
        logging_steps=100,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, callbacks=[callback], optimizers=(opt, None)
    )
    trainer.train()
    assert callback.schedule.phase == "joint" and callback.schedule.mask_step == 4
    # the callback scales the sparse group's next rate: (8 - 4 + 1) / 10 of the LoRA group's
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["sparse"] == pytest.approx(0.5 * lrs["lora"])
    assert all(lay.mask_ready for lay in model.adapter_layers().values())
    assert any(lay.sparse_values.abs().sum() > 0 for lay in model.adapter_layers().values())


def test_completion_loss_equals_model_loss():
    from spalora.losses import completion_loss

    model = tiny_llama()
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(ids, -100)
    labels[0, 6:8] = ids[0, 6:8]
    labels[1, 3:5] = ids[1, 3:5]
    labels[2, 9] = ids[2, 9]
    mask = torch.ones_like(ids)
    mask[2, 9:] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    want = model(**batch).loss
    got = completion_loss(model, batch)
    torch.testing.assert_close(got, want)


def test_restart_is_not_triggered_before_any_training():
    cfg = SpaloraConfig(
        method="sparse", density=0.05, mask_strategy="random", restart_after_mask=True
    )
    schedule = MaskSchedule(get_spalora_model(tiny_llama(), cfg), progress=False)
    assert schedule.phase == "joint" and not schedule.restarted


def test_overlong_rule_truncates_or_drops_and_reports():
    from spalora.data import encode_examples

    tok = word_tokenizer()
    short = Example("w2 w3", "w4")
    long_prompt = Example(" ".join(f"w{i}" for i in range(10, 40)), "w5 w6")
    long_target = Example("w2", " ".join(f"w{i}" for i in range(10, 40)))
    rows, report = encode_examples(tok, [short, long_prompt, long_target], 20, "truncate")
    assert report == (
        "2 of 3 examples exceed 20 tokens: 1 truncated (prompt cut from its start), "
        "1 dropped (rule 'truncate')"
    )
    assert len(rows) == 2 and len(rows[1]["input_ids"]) == 20
    assert rows[1]["input_ids"][-3:-1] == tok("w5 w6", add_special_tokens=False)["input_ids"]
    assert sum(x != -100 for x in rows[1]["labels"]) == 3  # the whole completion + EOS kept
    rows, report = encode_examples(tok, [short, long_prompt], 20, "drop")
    assert len(rows) == 1 and report.endswith(
        "0 truncated (prompt cut from its start), 1 dropped (rule 'drop')"
    )
    assert encode_examples(tok, [short], 20)[1] is None
    with pytest.raises(ValueError, match="all 1 examples are longer"):
        encode_examples(tok, [long_target], 20, "truncate")
    with pytest.raises(ValueError, match="overlong must be one of"):
        encode_examples(tok, [short], 20, "wrap")


def test_bf16_autocast_trains():
    model = get_spalora_model(
        tiny_llama(), SpaloraConfig(method="rosa", budget="r4", warmup_steps=2, mask_batches=1)
    )
    cfg = TrainConfig(
        steps=12, batch_size=8, bf16=True, progress=False, lora_lr=2e-2, sparse_lr=2e-2
    )
    seen = []  # dtype of an attention projection's output: bf16 only under autocast
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    result = train(model, word_tokenizer(), WORD_EXAMPLES, cfg)
    handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    losses = [h["loss"] for h in result["history"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)  # adapters stay fp32


def test_periodic_validation_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from spalora.evaluate import completion_loss_of

    tok = word_tokenizer()
    model = get_spalora_model(tiny_llama(), SpaloraConfig(method="lora", r=2))
    calls = []

    def on_validation(m):
        calls.append(m.training)
        return {"loss": completion_loss_of(m, tok, WORD_EXAMPLES[:16], progress=False)["loss"]}

    cfg = TrainConfig(
        steps=7,
        batch_size=8,
        eval_every=3,
        progress=False,
        log_path=str(tmp_path / "history.jsonl"),
        tensorboard_dir=str(tmp_path / "tb"),
    )
    result = train(model, tok, WORD_EXAMPLES, cfg, on_validation)
    evals = [h for h in result["history"] if "validation" in h]
    assert [h["step"] for h in evals] == [3, 6] and calls == [True, True]
    assert model.training  # evaluation put the model back in training mode
    logged = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(logged) == 7 + 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 7
    assert [e.step for e in events.Scalars("validation/loss")] == [3, 6]
    with pytest.raises(ValueError, match="no evaluate_fn"):
        train(model, tok, WORD_EXAMPLES, TrainConfig(steps=1, eval_every=1, progress=False))


def test_loss_evaluation_counts_every_completion_token():
    from spalora.data import collate, encode_example
    from spalora.evaluate import completion_loss_of

    tok = word_tokenizer()
    model = tiny_llama()
    examples = WORD_EXAMPLES[:5] + [Example("w3 w4 w5", "w60 w61 w62 w63 w64")]
    got = completion_loss_of(model, tok, examples, batch_size=2, progress=False)
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in examples:  # one at a time: a token-weighted mean, not a mean of batch means
            batch = collate([encode_example(tok, ex)], 0)
            k = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * k
            n += k
    assert got["tokens"] == n and abs(got["loss"] - total / n) < 1e-5


def test_sparse_learning_rate_warms_up_after_the_mask():
    """Adam's first step moves every fresh value by its full learning rate (a sign step): the
    sparse values must enter at 1/sparse_warmup_steps of it, then ramp up linearly."""
    from spalora.train import lr_factor

    def first_sparse_step(sparse_warmup_steps):
        cfg = SpaloraConfig(
            method="rosa",
            r=2,
            density=0.05,
            warmup_steps=2,
            mask_batches=1,
            lora_dropout=0.0,
            sparse_warmup_steps=sparse_warmup_steps,
        )
        model = get_spalora_model(tiny_llama(), cfg)
        # masks are set after step 3 (2 warm-up + 1 collect): step index 3 is the first joint one
        out = train(
            model,
            word_tokenizer(),
            WORD_EXAMPLES,
            TrainConfig(steps=4, batch_size=8, progress=False, lora_lr=1e-2, sparse_lr=1e-2),
        )
        assert out["mask_step"] == 3
        moved = max(float(p.detach().abs().max()) for p in model.sparse_parameters())
        return moved, 1e-2 * lr_factor(3, TrainConfig().lr_warmup_steps, 4)

    moved, lr = first_sparse_step(4)
    assert moved == pytest.approx(lr / 4, rel=1e-3)
    moved, lr = first_sparse_step(0)  # the old behaviour, still available
    assert moved == pytest.approx(lr, rel=1e-3)


def test_group_lr_scale_ramps_only_the_sparse_group():
    cfg = SpaloraConfig(method="rosa", r=2, density=0.05, warmup_steps=1, mask_batches=1)
    schedule = MaskSchedule(get_spalora_model(tiny_llama(), cfg), progress=False)
    assert schedule.group_lr_scale("sparse") == 1.0  # before the mask nothing is scaled
    schedule.mask_step, schedule.steps = 7, 7
    ramp = []
    for _ in range(12):
        ramp.append(schedule.group_lr_scale("sparse"))
        assert schedule.group_lr_scale("lora") == 1.0
        schedule.steps += 1
    assert ramp == pytest.approx([0.1 * i for i in range(1, 11)] + [1.0, 1.0])
    schedule.config.restart_after_mask = True  # the restarted run warms up everything anyway
    schedule.steps = 7
    assert schedule.group_lr_scale("sparse") == 1.0


@pytest.mark.parametrize("peft", [False, True])
def test_loraplus_moves_b_at_its_ratio_and_a_at_the_rate(peft):
    """LoRA+ (lora_b_lr_ratio): Adam's first step moves each B entry by its group's full rate (a
    sign step) and leaves A still (B = 0 gives A no gradient), so B's first move is exactly the
    ratio times plain LoRA's; our layers and PEFT's alike, the sparse values untouched."""

    def first_step(ratio: float) -> dict:
        torch.manual_seed(0)
        if peft:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
            model = get_peft_model(tiny_llama(), lora)
        else:
            cfg = SpaloraConfig(method="rosa", r=2, density=0.05, warmup_steps=5, mask_batches=1)
            model = get_spalora_model(tiny_llama(), cfg)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        cfg = TrainConfig(
            steps=1, batch_size=8, progress=False, lora_lr=1e-2, sparse_lr=1e-2,
            lora_b_lr_ratio=ratio,
        )  # fmt: skip
        train(model, word_tokenizer(), WORD_EXAMPLES, cfg)
        moved = {
            n: (p.detach() - before[n]).abs() for n, p in model.named_parameters() if n in before
        }
        return moved

    plain, plus = first_step(1.0), first_step(16.0)
    b = [n for n in plain if "lora_B" in n]
    assert b and all(torch.allclose(plus[n], 16 * plain[n], rtol=1e-4, atol=0) for n in b)
    assert all(plus[n].max() > 0 for n in b)
    assert all(not plus[n].any() and not plain[n].any() for n in plain if "lora_A" in n)
    if not peft:
        assert all(not plus[n].any() for n in plain if "sparse_values" in n)


def test_loraplus_ratio_must_be_positive():
    with pytest.raises(ValueError, match=r"^lora_b_lr_ratio\b"):
        TrainConfig(lora_b_lr_ratio=0.0)
