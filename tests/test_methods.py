"""The Method contract: a method defined in this file, outside the package, trains through the
public API (config, model, training loop, save and load) without any change to spalora; and the
built-ins' agendas are the tables the schedule runs."""

import math

import pytest
import torch

from spalora import SpaloraConfig, SpaloraModel, get_spalora_model
from spalora.methods import (
    AFTER_CONTROLLER,
    AFTER_MASK,
    AFTER_STEPS,
    RESIZED,
    Method,
    Phase,
    get_method,
    method_names,
    register_method,
    registry,
    swap_parameters,
)
from spalora.train import TrainConfig, lr_factor, train

from .conftest import WORD_EXAMPLES, tiny_llama, word_tokenizer

CUT_AFTER = 3  # the toy controller's step


class KeepFirstComponent:
    """Trains wide, then keeps rank 1 of every layer (its first row of A, column of B) and halves
    every learning rate from then on."""

    def __init__(self, model: SpaloraModel) -> None:
        self.model = model
        self.log: list[dict] = []
        self.finished = False

    def step(self, step: int, optimizer) -> tuple[str, ...]:
        self.log.append({"step": step})
        if step < CUT_AFTER:
            return ()
        swaps = {}
        for layer in self.model.adapter_layers().values():
            A, B = layer.lora_A.detach()[:1].clone(), layer.lora_B.detach()[:, :1].clone()
            old = (layer.lora_A, layer.lora_B)
            layer.resize(1, 0, layer.scale)  # alpha = scale * r keeps scale * B A's first part
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
            swaps.update(zip(old, (layer.lora_A, layer.lora_B), strict=True))
        if optimizer is not None:
            swap_parameters(optimizer, swaps)
        self.model.sync_allocations()
        self.finished = True
        return (RESIZED,)

    def lr_scale(self, step: int) -> float:
        return 0.5 if self.finished else 1.0

    def state_dict(self) -> dict:
        return {"finished": self.finished}

    def load_state_dict(self, state: dict) -> None:
        self.finished = state["finished"]


class Narrowing(Method):
    name = "toy-narrowing"
    trains_sparse = False
    trains_over_budget = True

    def validate(self, config) -> None:
        if config.r < 2:
            raise ValueError("toy-narrowing needs r >= 2 to narrow from")

    def agenda(self, config) -> tuple[Phase, ...]:
        return (Phase("wide", AFTER_CONTROLLER), Phase("narrow"))

    def controller(self, model, total_steps, start_step, input_rms, progress):
        return KeepFirstComponent(model)


@pytest.fixture
def toy():
    method = register_method(Narrowing())
    yield method
    registry._registered.pop(method.name)


def test_a_method_defined_outside_the_package_trains_saves_and_reloads(toy, tmp_path):
    """Its agenda drives the phases, its controller's events reach the loop (the optimizer
    trains the new tensors), its lr_scale sets the rate, and the adapter reloads exactly."""
    torch.manual_seed(0)
    model = get_spalora_model(tiny_llama(), SpaloraConfig(method=toy.name, r=4))
    assert {lay.r for lay in model.adapter_layers().values()} == {4}
    cfg = TrainConfig(steps=8, batch_size=2, lora_lr=1e-2, lr_warmup_steps=0, progress=False)
    result = train(model, word_tokenizer(), WORD_EXAMPLES, cfg)
    rows = [h for h in result["history"] if "loss" in h]
    assert [h["phase"] for h in rows] == ["wide"] * CUT_AFTER + ["narrow"] * (8 - CUT_AFTER)
    assert all(math.isfinite(h["loss"]) for h in rows)
    layers = model.adapter_layers().values()
    assert {lay.r for lay in layers} == {1}
    assert model.spalora_config.rank_pattern == {n: 1 for n in model.adapter_layers()}
    # the loop trained the swapped-in tensors: B moved after the cut
    assert all(lay.lora_B.abs().sum() > 0 for lay in layers)
    assert result["final_phase"] == "narrow"
    model.save_pretrained(tmp_path / "toy")
    again = SpaloraModel.from_pretrained(tiny_llama(), tmp_path / "toy")
    x = torch.randint(0, 100, (2, 7))
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits)


def test_the_toy_controller_sets_the_learning_rate(toy):
    """The rate each step trains at: the loop's own decay, times the controller's 0.5 from the
    first step after the cut."""
    model = get_spalora_model(tiny_llama(), SpaloraConfig(method=toy.name, r=4))
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"] / self.param_groups[0]["initial_lr"])
        return real_step(self, *args, **kwargs)

    cfg = TrainConfig(steps=6, batch_size=2, lora_lr=1e-2, lr_warmup_steps=0, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", spy)
        result = train(model, word_tokenizer(), WORD_EXAMPLES, cfg)
    expected = [lr_factor(i, 0, 6) * (0.5 if i >= CUT_AFTER else 1.0) for i in range(6)]
    assert seen == pytest.approx(expected)
    assert [h["lr"] for h in result["history"] if "loss" in h] == pytest.approx(expected)


def test_a_method_validates_its_own_settings(toy):
    with pytest.raises(ValueError, match="toy-narrowing needs r >= 2"):
        SpaloraConfig(method=toy.name, r=1)


def test_unknown_and_clashing_methods_are_refused():
    with pytest.raises(ValueError, match=r"method must be one of \('lora', 'sparse', 'rosa'"):
        SpaloraConfig(method="nope")
    with pytest.raises(ValueError, match="'rosa' is a built-in method"):
        register_method(type("Clash", (Method,), {"name": "rosa"})())
    with pytest.raises(TypeError, match="takes a Method instance"):
        register_method(Narrowing)


def test_builtin_agendas_are_rosas_table():
    """lora: joint only; sparse: mask, joint; rosa: warm-up, mask, joint; ours: a compress
    phase under its controller between the mask and joint training."""
    cfg = SpaloraConfig(method="rosa", budget="r4", warmup_steps=5)

    def table(name, **kw):
        c = SpaloraConfig(**{**{"budget": "r4", "warmup_steps": 5}, "method": name, **kw})
        return [(p.name, p.ends, p.length) for p in get_method(name).agenda(c)]

    assert method_names()[:4] == ("lora", "sparse", "rosa", "spalora")
    assert table("lora") == [("joint", "never", 0)]
    assert table("sparse") == [("collect", AFTER_MASK, 0), ("joint", "never", 0)]
    assert table("rosa") == [
        ("warmup", AFTER_STEPS, 5),
        ("collect", AFTER_MASK, 0),
        ("joint", "never", 0),
    ]
    assert table("rosa", warmup_steps=0) == [("collect", AFTER_MASK, 0), ("joint", "never", 0)]
    assert table("spalora") == [
        ("warmup", AFTER_STEPS, 5),
        ("collect", AFTER_MASK, 0),
        ("compress", AFTER_CONTROLLER, 0),
        ("joint", "never", 0),
    ]
    assert cfg.uses_lora and cfg.uses_sparse and cfg.effective_rank_fraction == 0.5
