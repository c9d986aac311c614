"""The config dataclasses are the one source of every default: the CLI flags and the YAML recipes
are built from their fields, so none of them can disagree with a field."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from spalora.cli import FLAGS, build_parser, field_of, resolve_recipe
from spalora.config import (
    RECIPE_SECTIONS,
    DataConfig,
    RunConfig,
    SpaloraConfig,
    TrainConfig,
    recipe_default,
    recipe_fields,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def train_actions() -> dict[str, object]:
    """The `spalora train` parser's actions by destination."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["train"]._actions}


def no_flags() -> dict:
    return resolve_recipe(build_parser().parse_args(["train"]))


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_every_flag_defaults_to_its_field_and_shows_its_help(flag):
    section, key = FLAGS[flag]
    f = field_of(section, key)
    recipe = no_flags()
    assert (recipe[section] if section else recipe)[key] == recipe_default(f)
    action = train_actions()[flag]
    assert action.default is None  # unset: the YAML value or the field's default stands
    assert action.help.replace("%%", "%").startswith(f.metadata["help"])
    assert tuple(action.choices or ()) == tuple(f.metadata.get("choices", ()))


def test_every_recipe_field_has_help_and_recipe_keys_are_exactly_the_fields():
    recipe = no_flags()
    for section, cls in [(None, RunConfig), *RECIPE_SECTIONS.items()]:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        keys = {f.name for f in recipe_fields(cls)}
        part = recipe[section] if section else recipe
        if section is None:
            keys |= set(RECIPE_SECTIONS)
        if section == "adapter":
            keys.add("seed")  # derived: the job's one seed is train.seed
        assert set(part) == keys


def test_flags_of_today_are_kept():
    """The README, docs and scripts spell these; a field rename must not drop one."""
    names = {s for a in train_actions().values() for s in a.option_strings}
    kept = (
        "--config --model --task --data --eval-data --metric --prompt-field --completion-field "
        "--strict --output-dir --method --budget --rank-fraction --r --lora-r --density "
        "--target-modules --mask-strategy --warmup-steps --mask-batches --sparse-warmup-steps "
        "--restart --overprovision --start-rank --rank-reg --sparse-reg --irls-every "
        "--allocation --truncate-at --steps --batch-size --grad-accum --lora-lr --sparse-lr "
        "--seed --max-length --overlong --bf16 --quantize --distributed --eval-every "
        "--eval-limit --val-limit --no-eval --checkpoint-every --resume --no-progress"
    ).split()
    assert set(kept) <= names, sorted(set(kept) - names)


def test_default_run_is_unchanged():
    """`spalora train` with no flags (make demo): RoSA at the LoRA r=8 budget, split evenly."""
    recipe = no_flags()
    adapter = SpaloraConfig(**recipe["adapter"])
    train = TrainConfig(**recipe["train"])
    assert (recipe["model"], recipe["task"], recipe["output_dir"]) == (
        "smollm2-135m",
        "bbc-topic",
        "runs/default",
    )
    assert recipe["eval_batch_size"] == 32 and recipe["quantize"] is None
    assert (adapter.method, adapter.budget, adapter.effective_rank_fraction) == ("rosa", "r8", 0.5)
    assert (adapter.lora_alpha, adapter.lora_dropout, adapter.mask_strategy) == (16, 0, "fisher")
    assert (adapter.warmup_steps, adapter.mask_batches) == (40, 8)
    assert (train.steps, train.batch_size, train.lora_lr, train.sparse_lr) == (150, 8, 1e-3, 3e-4)
    assert train.eval_every == 50


def test_a_python_call_needs_no_evaluation_or_budget():
    """The two recipe-only defaults: a plain TrainConfig evaluates nothing (train() would need
    an evaluate_fn) and a plain SpaloraConfig sizes from r and density."""
    assert TrainConfig().eval_every == 0
    assert SpaloraConfig(method="lora").budget is None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_yaml_keys_are_fields(path):
    loaded = yaml.safe_load(path.read_text())
    top = {f.name for f in recipe_fields(RunConfig)}
    for key, value in loaded.items():
        if key in RECIPE_SECTIONS:
            fields = {f.name for f in recipe_fields(RECIPE_SECTIONS[key])}
            assert set(value) <= fields, f"{path.name} {key}: {sorted(set(value) - fields)}"
        else:
            assert key in top, f"{path.name}: {key}"


def test_default_yaml_writes_out_the_default_run():
    """configs/default.yaml restates the default run: loading it changes nothing."""
    path = next(p for p in CONFIGS if p.name == "default.yaml")
    assert resolve_recipe(build_parser().parse_args(["train", "--config", str(path)])) == (
        no_flags()
    )


def test_unknown_key_in_a_yaml_section(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("adapter:\n  method: lora\n  rank: 4\n")
    with pytest.raises(SystemExit, match=r"unknown keys .*adapter\.rank"):
        resolve_recipe(build_parser().parse_args(["train", "--config", str(cfg)]))


def test_yaml_sizes_replace_the_default_budget(tmp_path):
    """A recipe that sizes by r (and density) is not overridden by the job's default budget."""
    cfg = tmp_path / "r.yaml"
    cfg.write_text("adapter:\n  method: lora\n  r: 4\n")
    adapter = resolve_recipe(build_parser().parse_args(["train", "--config", str(cfg)]))["adapter"]
    assert "budget" not in adapter and SpaloraConfig(**adapter).r == 4
    cfg.write_text("adapter:\n  method: rosa\n  r: 4\n  budget: r16\n")
    adapter = resolve_recipe(build_parser().parse_args(["train", "--config", str(cfg)]))["adapter"]
    assert adapter["budget"] == "r16"


def test_model_and_file_task_defaults_match_their_loaders():
    """The defaults a help text names for the model and the file task are the loaders' own."""
    from spalora.hub import DEFAULT_MODEL
    from spalora.tasks import load_file_task

    assert RunConfig().model == DEFAULT_MODEL
    loader = inspect.signature(load_file_task).parameters
    for f in dataclasses.fields(DataConfig):
        if f.name == "path":
            continue
        assert f.name in loader, f"DataConfig.{f.name} is no option of load_file_task"
        default = loader[f.name].default
        if isinstance(default, str):
            assert f"(default {default})" in f.metadata["help"]


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (TrainConfig, {"steps": 0}, "steps"),
        (TrainConfig, {"batch_size": 0}, "batch_size"),
        (TrainConfig, {"lora_lr": float("nan")}, "lora_lr"),
        (TrainConfig, {"sparse_lr": -1.0}, "sparse_lr"),
        (TrainConfig, {"max_grad_norm": 0.0}, "max_grad_norm"),
        (TrainConfig, {"overlong": "cut"}, "overlong"),
        (SpaloraConfig, {"lora_alpha": float("nan")}, "lora_alpha"),
        (SpaloraConfig, {"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern"),
        (SpaloraConfig, {"r": 2.5}, "r"),
    ],
)
def test_constructors_refuse_values_that_cannot_work_naming_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        cls(**kwargs)


def test_unbounded_clipping_and_zero_rates_stay_allowed():
    TrainConfig(max_grad_norm=float("inf"), lora_lr=0.0, sparse_lr=0)


def test_a_budget_rank_above_a_layer_is_not_refused():
    """Only an explicit r too large for a layer is an error; a budget's rank is the solver's."""
    from spalora import get_spalora_model

    from .conftest import tiny_llama

    model = get_spalora_model(tiny_llama(), SpaloraConfig(method="lora", budget="r40"))
    assert {a.r for a in model.allocations} == {40}
    with pytest.raises(ValueError, match=r"^r=40 exceeds .* \(16x32\)"):
        get_spalora_model(
            tiny_llama(), SpaloraConfig(method="lora", r=40, target_modules=["k_proj"])
        )
