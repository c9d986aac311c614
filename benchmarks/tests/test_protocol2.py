"""Protocol 2: held-out NLL per example, selection seeds outside the key, protocol-1 keys kept."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import accuracy, heldout
from benchmarks.runs import ensure_runs, parse_seeds, parse_variant, specs_for
from spalora.data import collate, encode_example
from spalora.evaluate import completion_nll
from tests.conftest import WORD_EXAMPLES, tiny_llama, word_tokenizer

from .test_bench import toy_task


def test_completion_nll_is_each_examples_own_mean_token_loss():
    """Batched and length-sorted, each example's NLL equals the model's own loss on it alone,
    and greedy_match is true exactly where the argmax reproduces the completion."""
    torch.manual_seed(0)
    model, tok = tiny_llama(), word_tokenizer()
    examples = WORD_EXAMPLES[:7]
    out = completion_nll(model, tok, examples, batch_size=3, progress=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for e, nll, match in zip(examples, out["nll"], out["greedy_match"], strict=True):
        batch = collate([encode_example(tok, e, 512)], pad)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
        target = batch["labels"][0, 1:]
        keep = target != -100
        assert nll == pytest.approx(float(model(**batch).loss), rel=1e-5)
        assert match == bool((logits[keep].argmax(-1) == target[keep]).all())


def test_protocol1_keys_are_unchanged_by_the_new_profile_fields():
    spec = accuracy.RunSpec("lora", (), 1e-3, 0, "bbc-topic", 8, accuracy.PROFILES["full"], "m")
    as_dict = accuracy.spec_from_dict(
        {k: v for k, v in __import__("dataclasses").asdict(spec).items()}
    )
    assert as_dict.key() == spec.key()
    assert "protocol" not in accuracy.profile_key(accuracy.PROFILES["full"])


def test_protocol2_key_ignores_which_seeds_are_reported_but_not_sizes():
    p = accuracy.PROFILES["v2"]
    spec = accuracy.RunSpec("lora", (), 1e-3, 3, "arithmetic", 2, p, "m")
    assert replace(spec, profile=replace(p, seeds=(1, 2, 3))).key() == spec.key()
    assert replace(spec, profile=replace(p, selection_seeds=(0,))).key() == spec.key()
    assert replace(spec, profile=replace(p, n_test=2000)).key() != spec.key()
    assert replace(spec, profile=accuracy.PROFILES["v2-600"]).key() != spec.key()
    assert 0 in p.selection_seeds and not set(p.selection_seeds) & set(p.seeds)


def test_protocol2_run_records_per_example_nll_and_eval_time(tmp_path):
    profile = replace(
        accuracy.PROFILES["v2"], steps=4, batch_size=4, warmup_steps=2, mask_batches=1,
        accuracy_limit=3,
    )  # fmt: skip
    accuracy.PROFILES["v2-test"] = profile
    try:
        specs = specs_for("v2-test", "toy", 2, "lora", 1e-3, [1, 2])
        results = ensure_runs(
            specs, tmp_path, load_model=lambda n: (tiny_llama(), word_tokenizer()),
            load_task=toy_task,
        )  # fmt: skip
        # a selection seed's run is read for its validation NLL only: the test set goes unscored
        (selecting,) = ensure_runs(
            specs_for("v2-test", "toy", 2, "lora", 1e-3, [0]), tmp_path,
            load_model=lambda n: (tiny_llama(), word_tokenizer()), load_task=toy_task,
        )  # fmt: skip
    finally:
        del accuracy.PROFILES["v2-test"]
    task = toy_task("toy")
    for r in results:
        assert len(r["validation_nll"]) == len(task.validation) == r["n_validation"]
        assert len(r["test_nll"]) == len(task.test)
        assert len(r["test_correct"]) == 3 == r["n_test_accuracy"]
        assert r["test_nll_mean"] == pytest.approx(sum(r["test_nll"]) / len(r["test_nll"]), 1e-3)
        assert r["eval_seconds"] > 0 and r["train_seconds"] > 0 and r["build_seconds"] >= 0
        assert all(math.isfinite(x) for x in r["test_nll"])
    assert results[0]["test_nll"] != results[1]["test_nll"]  # seeds differ
    assert selecting["n_test"] == 0 and not {"test", "test_nll", "test_correct"} & set(selecting)
    assert len(selecting["validation_nll"]) == len(task.validation)
    assert selecting["validation_nll_mean"] == pytest.approx(-selecting["validation"])
    # cached: a second call trains nothing and returns the same records
    again = ensure_runs(specs, tmp_path, load_model=None, load_task=None)
    assert again == results


def test_runs_command_rejects_bad_input_in_one_line():
    with pytest.raises(ValueError, match="unknown method"):
        specs_for("v2", "arithmetic", 2, "nope", 1e-3, [1])
    with pytest.raises(ValueError, match="unknown profile"):
        specs_for("v9", "arithmetic", 2, "lora", 1e-3, [1])
    with pytest.raises(ValueError, match="positive"):
        specs_for("v2", "arithmetic", 2, "lora", -1.0, [1])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_variant(["rank_fraction"])
    with pytest.raises(ValueError, match="cross-fitted: name a fold"):
        heldout.load_task("bbc-topic", accuracy.PROFILES["v2"])
    with pytest.raises(ValueError, match="cross-fitted: name a fold"):
        heldout.load_task(f"bbc-topic/fold{heldout.FOLDS}", accuracy.PROFILES["v2"])
    with pytest.raises(ValueError, match="no protocol-2 split"):
        heldout.load_task("gsm-symbolic", accuracy.PROFILES["v2"])
    assert parse_seeds("1-3,7") == [1, 2, 3, 7]
    assert fft_is_filed_without_budget()


def fft_is_filed_without_budget() -> bool:
    return specs_for("v2", "arithmetic", 2, "fft", 3e-4, [1])[0].r_eq == 0


def test_bbc_folds_partition_the_headlines_and_never_leak():
    """Cross-fitting: the 5 test folds cover every distinct headline once, each topic spread
    evenly, and no fold's test headline is in its own training or validation set."""
    from spalora.tasks import load_bbc_headlines

    tasks = [heldout.bbc_fold(k) for k in range(heldout.FOLDS)]
    tested = [e.prompt for t in tasks for e in t.test]
    assert len(tested) == len(set(tested)) == len(load_bbc_headlines())
    for t in tasks:
        seen = {e.prompt for e in t.train} | {e.prompt for e in t.validation}
        assert not seen & {e.prompt for e in t.test}
        assert len(seen) + len(t.test) == len(tested)
        counts = {}
        for e in t.test:
            counts[e.target] = counts.get(e.target, 0) + 1
        assert max(counts.values()) - min(counts.values()) < 40  # stratified
    assert [heldout.fold_of("bbc-topic", s) for s in (0, 1, 5, 6)] == [
        "bbc-topic/fold0", "bbc-topic/fold1", "bbc-topic/fold0", "bbc-topic/fold1",
    ]  # fmt: skip
    assert heldout.fold_of("arithmetic", 3) == "arithmetic"


@pytest.mark.parametrize("device", [None, "cpu"])
def test_runs_command_reports_a_committed_run_without_training(device, capsys):
    """`python -m benchmarks runs` as the pilot queue calls it (with and without --device)
    finds the committed protocol-2 run and prints its line; nothing trains."""
    from benchmarks.__main__ import main

    cache = Path(__file__).parents[1] / "cache" / "accuracy-v2"
    argv = ["runs", "--profile", "v2", "--task", "arithmetic", "--r-eq", "2", "--method", "lora"]
    argv += ["--lr", "1e-3", "--seeds", "1", "--cache", str(cache), "--no-progress"]
    argv += [] if device is None else ["--device", device]
    assert main(argv) == 0
    assert "test nll 1.0344" in capsys.readouterr().out
