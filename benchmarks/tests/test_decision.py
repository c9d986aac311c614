"""Protocol 2 end to end on a tiny model: selection at seed 0, reported seeds, decision table and
paired.csv with the columns the protocol names."""

import csv
from dataclasses import replace

import pytest

from benchmarks import accuracy
from benchmarks.decision import PAIRED_COLUMNS, collect, write_decision
from tests.conftest import tiny_llama, word_tokenizer

from .test_bench import toy_task


@pytest.fixture
def tiny_profile():
    p = replace(accuracy.PROFILES["v2"], steps=3, batch_size=4, accuracy_limit=4, seeds=(1, 2))
    accuracy.PROFILES["v2-tiny"] = p
    yield "v2-tiny"
    del accuracy.PROFILES["v2-tiny"]


def test_decision_table_and_paired_csv(tmp_path, tiny_profile):
    pytest.importorskip("peft")
    kwargs = dict(
        load_model=lambda n: (tiny_llama(), word_tokenizer()), load_task=toy_task, n_seeds=2
    )
    collected = collect(tiny_profile, "toy", 2, ["lora", "peft-lora"], tmp_path, run_missing=True,
                        **kwargs)  # fmt: skip
    for m in ("lora", "peft-lora"):
        c = collected[m]
        assert c["choice"].spec.seed == 0 and sorted(c["runs"]) == [1, 2]
    md, paired = write_decision({("toy", 2, 3): collected}, tmp_path / "out", "cmd")
    text = md.read_text()
    assert "## toy, r_eq = 2, 3 steps" in text and "Best peer: " in text
    rows = list(csv.reader(paired.open()))
    assert tuple(rows[0]) == PAIRED_COLUMNS
    body = rows[1:]
    assert {r[3] for r in body} == {"nll", "accuracy"}
    assert all(r[8] == str(len(toy_task("toy").test)) or r[3] == "accuracy" for r in body)
    assert len(body) == 2  # the other method vs the best peer; no `spalora`: no "vs ours" rows
    # a candidate named as ours: every other row is paired with it too
    md, paired = write_decision({("toy", 2, 3): collected}, tmp_path / "o2", "cmd", ours="lora")
    assert "Ours: lora." in md.read_text()
    rows2 = list(csv.reader(paired.open()))[1:]
    assert len(rows2) == 4 and {(r[3], r[4], r[5]) for r in rows2} >= {
        ("nll", "peft-lora", "lora"),
        ("accuracy", "peft-lora", "lora"),
    }
    # report-only from the same cache trains nothing and gives the same table
    again = collect(tiny_profile, "toy", 2, ["lora", "peft-lora"], tmp_path, run_missing=False,
                    **kwargs)  # fmt: skip
    assert {m: c["runs"] for m, c in again.items()} == {m: c["runs"] for m, c in collected.items()}


def test_a_task_without_a_protocol2_split_says_so_before_training(tmp_path):
    with pytest.raises(ValueError, match="no protocol-2 split"):
        collect("v2", "gsm-symbolic", 2, ["lora"], tmp_path, 2, run_missing=True)
    with pytest.raises(ValueError, match="at most 8 seeds"):
        collect("v2", "arithmetic", 2, ["lora"], tmp_path, 9, run_missing=True)


def test_v2_command_refuses_ours_outside_the_methods(tmp_path):
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit, match="--ours spalora-gradual is not among --methods lora"):
        main(["v2", "--methods", "lora", "--ours", "spalora-gradual", "--cache", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing trained
