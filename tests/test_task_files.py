"""The `file` task: formats, bad-row accounting, prompt-grouped splits and metrics."""

import csv
import json
import sys

import pytest

from spalora.tasks import Example
from spalora.tasks.files import exact_match, label_score, load_file_task, split_by_prompt


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(n, start=0):
    return [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(start, n)]


def chat(i):
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"hi {i}"},
            {"role": "assistant", "content": f"hello {i}"},
            {"role": "user", "content": f"what is {i} + 1?"},
            {"role": "assistant", "content": str(i + 1)},
        ]
    }


def all_examples(task):
    return task.train + task.validation + task.test


# ------------------------------------------------------------------ formats
def test_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in pairs(20)) + "\n\n  \n", encoding="utf-8")
    task = load_file_task(path)
    assert task.name == "file" and task.metric == "exact_match" and task.labels is None
    assert (len(task.train), len(task.validation), len(task.test)) == (16, 2, 2)
    assert sorted(e.prompt for e in all_examples(task)) == sorted(r["prompt"] for r in pairs(20))
    assert Example("question 3", "answer 3") in all_examples(task)
    assert task.notes == [
        "data.jsonl (JSONL): 20 of 20 rows usable -> 16 train / 2 validation / 2 test; "
        "validation carved by prompt (seed 0), test carved by prompt (seed 0)"
    ]


def test_json_list_and_custom_fields(tmp_path):
    rows = [{"input": f"q{i}", "output": f"a{i}", "extra": i} for i in range(10)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    task = load_file_task(path, prompt_field="input", completion_field="output")
    assert len(all_examples(task)) == 10 and Example("q7", "a7") in all_examples(task)
    assert task.notes[0].startswith("data.json (JSON): 10 of 10 rows usable -> 8 train")
    with pytest.raises(ValueError, match=r"data.json row 1: missing 'prompt'"):
        load_file_task(path, strict=True)
    path.write_text('{"prompt": "a", "completion": "b"}', encoding="utf-8")
    with pytest.raises(ValueError, match="must hold a JSON list of objects"):
        load_file_task(path)


def test_csv_with_bom_multiline_and_messages_column(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "completion", "messages"])
        writer.writerow(["line one\nline two", "multi", ""])  # lines 2-3
        for i in range(10):  # lines 4-13
            writer.writerow([f"q{i}", f"a{i}", ""])
        writer.writerow(["", "", json.dumps(chat(5)["messages"])])  # line 14
        writer.writerow(["q-bad", "", ""])  # line 15
        writer.writerow(["only", "two"])  # line 16
    task = load_file_task(path, seed=3)
    examples = all_examples(task)
    assert len(examples) == 12
    assert Example("line one\nline two", "multi") in examples
    assert Example("what is 5 + 1?", "6", chat_history(5)) in examples
    assert task.notes[1] == (
        "data.csv: skipped 2 of 14 rows: 1 empty completion (row 15), "
        "1 wrong number of fields (header has 3) (row 16)"
    )
    with pytest.raises(ValueError, match=r"^data.csv row 15: empty completion$"):
        load_file_task(path, strict=True)


def chat_history(i):
    return (("system", "Be brief."), ("user", f"hi {i}"), ("assistant", f"hello {i}"))


def test_messages_history(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(i) for i in range(12)])
    task = load_file_task(path)
    examples = all_examples(task)
    assert len(examples) == 12
    assert Example("what is 4 + 1?", "5", chat_history(4)) in examples
    assert all(len(e.history) == 3 for e in examples)


def test_datasets_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(pairs(30)).save_to_disk(str(tmp_path / "ds"))
    task = load_file_task(tmp_path / "ds")
    assert (len(task.train), len(task.validation), len(task.test)) == (24, 3, 3)
    assert task.notes[0].startswith("ds (datasets Dataset): 30 of 30 rows usable -> 24 train")


def test_datasets_dict_folder_uses_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {
        "train": datasets.Dataset.from_list(pairs(20)),
        "validation": datasets.Dataset.from_list(pairs(25, 20)),
        # one test prompt repeats a train prompt and one row is empty
        "test": datasets.Dataset.from_list(
            pairs(30, 25) + pairs(1) + [{"prompt": " ", "completion": "x"}]
        ),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    task = load_file_task(tmp_path / "dd")
    assert (len(task.train), len(task.validation), len(task.test)) == (20, 5, 5)
    assert task.train == [Example(r["prompt"], r["completion"]) for r in pairs(20)]
    assert task.notes == [
        "dd[train] (datasets DatasetDict): 20 of 20 rows usable -> 20 train / 5 validation / "
        "5 test; validation from dd[validation], test from dd[test]",
        "dd[test]: skipped 1 of 7 rows: 1 empty prompt (row 7)",
        "dd[test]: dropped 1 of 6 examples whose prompt is also in the train data",
    ]
    # without a validation split, validation is carved from train
    del splits["validation"]
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd2"))
    task = load_file_task(tmp_path / "dd2")
    assert (len(task.train), len(task.validation), len(task.test)) == (18, 2, 5)


def test_datasets_missing_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_file_task(tmp_path / "ds")


# ------------------------------------------------------------------ bad rows and errors
BAD_LINES = {
    4: {"prompt": "no completion"},
    6: "{not json",
    9: {"prompt": "again no completion", "completion_": "x"},
    12: {"prompt": "   ", "completion": "x"},
    14: {"prompt": "a number", "completion": 7},
    15: {"prompt": None, "completion": "x"},
    17: {"messages": [{"role": "user", "content": "hi"}]},
    18: ["a", "list"],
}


def write_with_bad_rows(path, n_lines=24):
    lines = []
    for number in range(1, n_lines + 1):
        row = BAD_LINES.get(number, {"prompt": f"q{number}", "completion": f"a{number}"})
        lines.append(row if isinstance(row, str) else json.dumps(row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_rows_are_counted_by_reason(tmp_path):
    task = load_file_task(write_with_bad_rows(tmp_path / "data.jsonl"))
    assert len(all_examples(task)) == 16
    assert task.notes[0].startswith("data.jsonl (JSONL): 16 of 24 rows usable -> 12 train")
    assert task.notes[1] == (
        "data.jsonl: skipped 8 of 24 rows: 2 missing 'completion' (rows 4, 9), "
        "1 invalid JSON (row 6), 1 empty prompt (row 12), 1 non-text 'completion' (row 14), "
        "1 non-text 'prompt' (row 15), "
        "1 messages do not end with a user then an assistant message (row 17), "
        "1 not an object (row 18)"
    )


def test_long_reason_lists_are_cut(tmp_path):
    rows = pairs(12) + [{"prompt": f"x{i}"} for i in range(7)]
    task = load_file_task(write_jsonl(tmp_path / "data.jsonl", rows))
    assert task.notes[1] == (
        "data.jsonl: skipped 7 of 19 rows: 7 missing 'completion' (rows 13, 14, 15, 16, 17, ...)"
    )


def test_strict_raises_at_first_bad_row(tmp_path):
    path = write_with_bad_rows(tmp_path / "data.jsonl")
    with pytest.raises(ValueError, match=r"^data.jsonl row 4: missing 'completion'$"):
        load_file_task(path, strict=True)


LATIN1 = '{"prompt": "caf\u00e9 au lait", "completion": "latin-1"}\n'.encode("latin-1")


def test_an_undecodable_row_is_skipped_and_counted(tmp_path):
    """A latin-1 row in a UTF-8 JSONL or CSV is one bad row, not a failed load."""
    good = "".join(json.dumps(r) + "\n" for r in pairs(12)).encode()
    path = tmp_path / "data.jsonl"
    path.write_bytes(LATIN1 + good + b"\xff\xfe\x00\x01\n")
    task = load_file_task(path)
    assert len(all_examples(task)) == 12
    assert task.notes[1] == "data.jsonl: skipped 2 of 14 rows: 2 not UTF-8 text (rows 1, 14)"
    with pytest.raises(ValueError, match=r"^data.jsonl row 1: not UTF-8 text$"):
        load_file_task(path, strict=True)
    csv_path = tmp_path / "data.csv"
    lines = ["prompt,completion\n", *(f"q{i},a{i}\n" for i in range(12))]
    csv_path.write_bytes("".join(lines[:3]).encode() + "q\u00e9,x\n".encode("latin-1")
                         + "".join(lines[3:]).encode())  # fmt: skip
    task = load_file_task(csv_path)
    assert task.notes[1] == "data.csv: skipped 1 of 13 rows: 1 not UTF-8 text (row 4)"
    with pytest.raises(ValueError, match=r"^data.csv row 4: not UTF-8 text$"):
        load_file_task(csv_path, strict=True)


def test_binary_and_undecodable_whole_files_name_the_file(tmp_path):
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(bytes(range(128, 256)) * 4 + b"\n" + bytes(range(200, 256)))
    with pytest.raises(ValueError, match=r"^blob.jsonl has no usable rows: .*not UTF-8 text"):
        load_file_task(binary)
    doc = tmp_path / "data.json"
    doc.write_bytes(b"[" + LATIN1.strip() + b"]")
    with pytest.raises(ValueError, match=r"^data.json is not UTF-8 text \(byte 16: "):
        load_file_task(doc)


def test_malformed_messages(tmp_path):
    bad = [
        {"messages": "not json"},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {
            "messages": [
                {"role": "assistant", "content": "x"},
                {"role": "assistant", "content": "y"},
            ]
        },
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
    ]
    task = load_file_task(write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(10)] + bad))
    assert task.notes[1] == (
        "c.jsonl: skipped 4 of 14 rows: 1 'messages' is not a list (row 11), "
        "1 malformed message (need role system/user/assistant and text content) (row 12), "
        "1 messages do not end with a user then an assistant message (row 13), "
        "1 empty completion (row 14)"
    )


def test_empty_and_unusable_files(tmp_path):
    for name in ("e.jsonl", "e.json", "e.csv"):
        (tmp_path / name).write_text("", encoding="utf-8")
        with pytest.raises(ValueError, match=rf"^{name} has no usable rows \(it is empty\)$"):
            load_file_task(tmp_path / name)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}, {"text": "y"}])
    with pytest.raises(ValueError, match=r"bad.jsonl has no usable rows: .*2 missing 'prompt'"):
        load_file_task(path)


def test_too_small(tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", pairs(9))
    with pytest.raises(ValueError, match=r"small.jsonl has 9 usable examples; at least 10"):
        load_file_task(path)
    same_prompt = [{"prompt": "same", "completion": f"c{i}"} for i in range(12)]
    with pytest.raises(ValueError, match="only 1 distinct prompts"):
        load_file_task(write_jsonl(tmp_path / "same.jsonl", same_prompt))


def test_unsupported_and_missing_paths(tmp_path):
    (tmp_path / "data.txt").write_text("prompt\tcompletion\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported data file 'data.txt': expected .jsonl"):
        load_file_task(tmp_path / "data.txt")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_file_task(tmp_path / "nope.jsonl")
    (tmp_path / "folder").mkdir()
    pytest.importorskip("datasets")
    with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
        load_file_task(tmp_path / "folder")


def test_bad_arguments(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", pairs(20))
    with pytest.raises(ValueError, match="unknown metric 'bleu'; choose from exact, label"):
        load_file_task(path, metric="bleu")
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 0.5\); got 0.5"):
        load_file_task(path, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 0.5\); got 0"):
        load_file_task(path, validation_fraction=0)


# ------------------------------------------------------------------ splits
def repeated_prompts(n_prompts=50, copies=3):
    return [
        {"prompt": f"q{i}", "completion": f"a{i}.{c}"}
        for i in range(n_prompts)
        for c in range(copies)
    ]


def test_split_groups_prompts_and_is_deterministic(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", repeated_prompts())
    task = load_file_task(path, test_fraction=0.2, validation_fraction=0.1)
    assert (len(task.train), len(task.validation), len(task.test)) == (105, 15, 30)
    prompts = [{e.prompt for e in split} for split in (task.train, task.validation, task.test)]
    assert (len(prompts[0]), len(prompts[1]), len(prompts[2])) == (35, 5, 10)
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    again = load_file_task(path, test_fraction=0.2, validation_fraction=0.1)
    assert (again.train, again.validation, again.test) == (task.train, task.validation, task.test)
    other = load_file_task(path, test_fraction=0.2, validation_fraction=0.1, seed=1)
    assert other.test != task.test and len(other.test) == 30


def test_split_by_prompt_sizes():
    examples = [Example(f"p{i % 7}", str(i)) for i in range(70)]
    test, validation, train = split_by_prompt(examples, [0.1, 0.1], seed=0)
    assert (len(test), len(validation), len(train)) == (10, 10, 50)  # 1 + 1 + 5 of 7 prompts
    # the same prompt with a different history is a different group
    a, b = Example("same", "x"), Example("same", "y", (("system", "s"),))
    assert {len(p) for p in split_by_prompt([a, b], [0.4], seed=0)} == {1}


def test_eval_path_drops_prompts_seen_in_training(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", pairs(40))
    eval_rows = pairs(45, 35) + [{"prompt": "q", "completion": ""}]  # 35-39 are also in train
    eval_path = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    task = load_file_task(path, eval_path=eval_path)
    assert (len(task.train), len(task.validation), len(task.test)) == (36, 4, 5)
    assert {e.prompt for e in task.test} == {f"question {i}" for i in range(40, 45)}
    assert task.notes == [
        "train.jsonl (JSONL): 40 of 40 rows usable -> 36 train / 4 validation / 5 test; "
        "validation carved by prompt (seed 0), test from eval.jsonl",
        "eval.jsonl: skipped 1 of 11 rows: 1 empty completion (row 11)",
        "eval.jsonl: dropped 5 of 10 examples whose prompt is also in the train data",
    ]
    all_seen = write_jsonl(tmp_path / "seen.jsonl", pairs(5))
    with pytest.raises(ValueError, match="every example of seen.jsonl has a prompt"):
        load_file_task(path, eval_path=all_seen)


# ------------------------------------------------------------------ metrics
def test_exact_metric():
    assert exact_match("  The  answer\nis 4 ", "The answer is 4")
    assert not exact_match("the answer is 4", "The answer is 4")
    assert not exact_match("The answer is 4.", "The answer is 4")


def test_label_metric(tmp_path):
    rows = [
        {"prompt": f"review {i}", "completion": ["positive", "negative"][i % 2]} for i in range(20)
    ]
    task = load_file_task(write_jsonl(tmp_path / "data.jsonl", rows), metric="label")
    assert task.metric == "accuracy" and task.labels == ("negative", "positive")
    assert task.score is label_score and task.max_new_tokens == 10  # 8 chars // 3 + 8
    assert label_score("Positive.", "positive") and label_score("\n positive\nbecause", "positive")
    assert label_score("positive - it praises the food", "positive")
    assert label_score('"Negative"', "negative") and label_score("not spam!", "Not spam")
    assert not label_score("positively", "positive") and not label_score("", "positive")
    assert not label_score("negative", "positive") and not label_score("-1", "1")


def test_label_set_too_large(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"label{i}"} for i in range(70)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(ValueError, match="small label set; got 56 distinct completions"):
        load_file_task(path, metric="label")  # 70 - 7 validation - 7 test


def test_number_and_loss_metrics(tmp_path):
    rows = [{"prompt": f"{i} + {i}?", "completion": str(2 * i)} for i in range(20)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    task = load_file_task(path, metric="number")
    assert task.metric == "exact_match" and task.score("It is 2.0.", "2")
    assert not task.score("It is 3", "2")
    loss = load_file_task(path, metric="loss")
    assert loss.score is None and loss.metric == "perplexity" and loss.labels is None


def test_max_new_tokens(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": "x" * (30 + i)} for i in range(20)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    task = load_file_task(path)
    assert task.max_new_tokens == max(len(e.target) for e in task.train) // 3 + 8
    assert load_file_task(path, max_new_tokens=5).max_new_tokens == 5
    long = [{"prompt": f"q{i}", "completion": "y" * 2000} for i in range(10)]
    assert load_file_task(write_jsonl(tmp_path / "l.jsonl", long)).max_new_tokens == 256
