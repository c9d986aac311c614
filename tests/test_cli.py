"""CLI argument handling (no model is loaded on bad input)."""

import pytest

from spalora.cli import build_parser, main, resolve_recipe


def test_bad_density_fails_before_loading():
    with pytest.raises(SystemExit, match="density must lie in"):
        main(["train", "--method", "sparse", "--density", "1.5"])


def test_yaml_then_flags(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("adapter:\n  method: sparse\n  budget: '0.1%'\ntrain:\n  steps: 7\n")
    args = build_parser().parse_args(
        ["train", "--config", str(cfg), "--steps", "9", "--sparse-warmup-steps", "0"]
    )
    recipe = resolve_recipe(args)
    assert recipe["adapter"]["method"] == "sparse" and recipe["adapter"]["budget"] == "0.1%"
    assert recipe["train"]["steps"] == 9
    assert recipe["adapter"]["sparse_warmup_steps"] == 0
    assert recipe["adapter"]["mask_strategy"] == "fisher"  # default kept


def test_unknown_yaml_key(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("optimizer: sgd\n")
    with pytest.raises(SystemExit, match="unknown keys"):
        resolve_recipe(build_parser().parse_args(["train", "--config", str(cfg)]))


def test_explicit_sizes_replace_default_budget():
    args = build_parser().parse_args(["train", "--r", "4", "--density", "0.01"])
    recipe = resolve_recipe(args)
    assert "budget" not in recipe["adapter"] and recipe["adapter"]["r"] == 4


def test_sizes_and_budget_together_is_an_error():
    with pytest.raises(SystemExit, match="not both"):
        resolve_recipe(build_parser().parse_args(["train", "--r", "4", "--budget", "r8"]))


def test_seed_and_single_target_name():
    args = build_parser().parse_args(["train", "--seed", "3", "--target-modules", "q_proj"])
    recipe = resolve_recipe(args)
    assert recipe["train"]["seed"] == 3 and recipe["adapter"]["seed"] == 3
    assert recipe["adapter"]["target_modules"] == ["q_proj"]
    args = build_parser().parse_args(["train", "--target-modules", r".*\.(q|v)_proj"])
    assert resolve_recipe(args)["adapter"]["target_modules"] == r".*\.(q|v)_proj"


def test_file_task_errors_come_before_the_model_loads(tmp_path):
    with pytest.raises(SystemExit, match="error: .*missing.jsonl"):
        main(["train", "--task", "file", "--data", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit, match="file task only"):
        main(["train", "--task", "bbc-topic", "--data", str(tmp_path / "x.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(SystemExit, match="bad.jsonl row 2: missing 'completion'"):
        main(["train", "--task", "file", "--data", str(bad), "--strict"])
    with pytest.raises(SystemExit, match="has 1 usable examples; at least 10 are needed"):
        main(["train", "--task", "file", "--data", str(bad)])


@pytest.mark.parametrize("recipe", ["default", "demo", "rosa-paper", "spalora", "spalora-gradual"])
def test_shipped_recipes_build_valid_configs(recipe):
    """Every YAML in configs/ resolves to a valid adapter and training configuration."""
    from pathlib import Path

    from spalora import SpaloraConfig
    from spalora.train import TrainConfig

    path = Path(__file__).resolve().parents[1] / "configs" / f"{recipe}.yaml"
    resolved = resolve_recipe(build_parser().parse_args(["train", "--config", str(path)]))
    adapter = SpaloraConfig(**resolved["adapter"])
    TrainConfig(**resolved["train"])
    if recipe == "spalora":
        assert adapter.method == "spalora" and adapter.budget == "r8"
    if recipe == "spalora-gradual":
        assert adapter.reach_budget == "cubic" and adapter.mask_strategy == "random"
    if recipe == "demo":  # the default run, shorter: same method, budget, model and task
        default = resolve_recipe(build_parser().parse_args(["train"]))
        assert (adapter.method, adapter.budget) == ("rosa", "r8")
        assert (resolved["model"], resolved["task"]) == (default["model"], default["task"])
        assert resolved["train"]["steps"] < default["train"]["steps"] and resolved["eval_limit"]
