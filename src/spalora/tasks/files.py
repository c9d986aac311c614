"""The `file` task: fine-tune on the user's own prompt/completion data.

Real files are messy, so a bad row never silently changes the data: it is skipped and counted by
reason in `Task.notes` (or, with `strict`, stops the load at that row). Held-out examples are
carved by prompt, so the same prompt never sits on both sides of a split and the score measures
generalization rather than recall.

Formats: `.jsonl`, `.json` (a list of objects), `.csv` (header row) and a Hugging Face `datasets`
`save_to_disk` folder. Rows hold `prompt`/`completion` fields or a chat `messages` list.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .base import Example, Task, exact_match, label_score, number_match

METRICS = ("exact", "label", "number", "loss")
MAX_LABELS = 50
MIN_EXAMPLES = 10  # usable examples needed before validation or test is carved from a file
ROLES = ("system", "user", "assistant")
_MAX_ROWS_LISTED = 5

Rows = list[tuple[int, Any]]  # (row number, parsed row or a _BadRow)
# Files are decoded with errors="surrogateescape": a byte that is not UTF-8 becomes a lone
# surrogate, which valid UTF-8 text never decodes to, so such a row is found and skipped alone.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
NOT_UTF8 = "not UTF-8 text"


class _BadRow(ValueError):
    """A row that cannot become an Example; `str(err)` is the reason, e.g. "empty prompt"."""


# ------------------------------------------------------------------ reading files
def _read_jsonl(path: Path) -> Rows:
    rows: Rows = []
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if _UNDECODABLE.search(line):
                rows.append((number, _BadRow(NOT_UTF8)))
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError:
                rows.append((number, _BadRow("invalid JSON")))
    return rows


def _read_json(path: Path) -> Rows:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:  # one document: no row to skip
        raise ValueError(f"{path.name} is {NOT_UTF8} (byte {err.start}: {err.reason})") from None
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path.name} is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise ValueError(
            f"{path.name} must hold a JSON list of objects (got {type(data).__name__}); "
            "for one object per line use .jsonl"
        )
    return list(enumerate(data, 1))


def _read_csv(path: Path) -> Rows:
    """Rows numbered by the file line they start on; the header is line 1."""
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        rows: Rows = []
        start = reader.line_num + 1
        for cells in reader:
            if any(cell.strip() for cell in cells):
                if any(_UNDECODABLE.search(cell) for cell in cells):
                    rows.append((start, _BadRow(NOT_UTF8)))
                elif len(cells) != len(header):
                    bad = _BadRow(f"wrong number of fields (header has {len(header)})")
                    rows.append((start, bad))
                else:
                    rows.append((start, dict(zip(header, cells, strict=True))))
            start = reader.line_num + 1
    return rows


def _read_datasets_folder(path: Path) -> dict[str, Rows]:
    """Rows of each split of a `save_to_disk` folder ("train" for a plain Dataset), 1-based."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{path} is a folder: reading a saved datasets folder needs the `datasets` "
            "package: pip install datasets"
        ) from err
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ValueError(
            f"{path} is a folder but not one written by datasets' save_to_disk ({err})"
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        return {name: list(enumerate(split, 1)) for name, split in loaded.items()}
    return {"train": list(enumerate(loaded, 1))}


def _read_source(path: str | Path) -> tuple[str, dict[str, Rows]]:
    """(format name, rows per split) of `path`; a flat file is one "train" split."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        splits = _read_datasets_folder(path)
        kind = "datasets Dataset" if list(splits) == ["train"] else "datasets DatasetDict"
        return kind, splits
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise ValueError(
            f"unsupported data file {path.name!r}: expected .jsonl, .json (a list of objects), "
            ".csv (with a header row) or a folder written by datasets' save_to_disk"
        )
    return suffix[1:].upper(), {"train": readers[suffix](path)}


# ------------------------------------------------------------------ rows -> examples
def _blank(value: Any) -> bool:
    return value is None or value == ""


def _text(row: dict, field: str, role: str) -> str:
    """The text in `row[field]`; `role` ("prompt" / "completion") names it when it is empty."""
    if field not in row:
        raise _BadRow(f"missing {field!r}")
    value = row[field]
    if not isinstance(value, str):
        raise _BadRow(f"non-text {field!r}")
    if not value.strip():
        raise _BadRow(f"empty {role}")
    return value


def _chat_example(messages: Any) -> Example:
    """user -> assistant as prompt -> target; every earlier turn becomes history."""
    if isinstance(messages, str):  # a JSON string, as a CSV cell holds it
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise _BadRow("'messages' is not a list") from None
    if not isinstance(messages, list):
        raise _BadRow("'messages' is not a list")
    turns = []
    for message in messages:
        if not (
            isinstance(message, dict)
            and message.get("role") in ROLES
            and isinstance(message.get("content"), str)
        ):
            raise _BadRow("malformed message (need role system/user/assistant and text content)")
        turns.append((message["role"], message["content"]))
    if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise _BadRow("messages do not end with a user then an assistant message")
    if not turns[-2][1].strip():
        raise _BadRow("empty prompt")
    if not turns[-1][1].strip():
        raise _BadRow("empty completion")
    return Example(turns[-2][1], turns[-1][1], tuple(turns[:-2]))


def _row_example(row: Any, prompt_field: str, completion_field: str) -> Example:
    if isinstance(row, _BadRow):
        raise row
    if not isinstance(row, dict):
        raise _BadRow("not an object")
    if _blank(row.get(prompt_field)) and not _blank(row.get("messages")):
        return _chat_example(row["messages"])
    prompt = _text(row, prompt_field, "prompt")
    return Example(prompt, _text(row, completion_field, "completion"))


def _skip_note(source: str, n_rows: int, skipped: dict[str, list[int]]) -> str:
    """'data.jsonl: skipped 3 of 120 rows: 2 missing 'completion' (rows 4, 9), 1 ...'."""
    parts = []
    for reason, numbers in skipped.items():
        listed = ", ".join(map(str, numbers[:_MAX_ROWS_LISTED]))
        more = ", ..." if len(numbers) > _MAX_ROWS_LISTED else ""
        word = "row" if len(numbers) == 1 else "rows"
        parts.append(f"{len(numbers)} {reason} ({word} {listed}{more})")
    total = sum(map(len, skipped.values()))
    return f"{source}: skipped {total} of {n_rows} rows: " + ", ".join(parts)


def _examples(
    rows: Rows, source: str, prompt_field: str, completion_field: str, strict: bool
) -> tuple[list[Example], str | None]:
    """The usable examples of `rows` and a note counting the skipped ones (None if none were)."""
    examples, skipped = [], {}
    for number, row in rows:
        try:
            examples.append(_row_example(row, prompt_field, completion_field))
        except _BadRow as err:
            if strict:
                raise ValueError(f"{source} row {number}: {err}") from None
            skipped.setdefault(str(err), []).append(number)
    note = _skip_note(source, len(rows), skipped) if skipped else None
    if not examples:
        detail = f": {note}" if note else " (it is empty)"
        raise ValueError(f"{source} has no usable rows{detail}")
    return examples, note


# ------------------------------------------------------------------ splitting
def _key(example: Example) -> tuple:
    return example.history, example.prompt


def split_by_prompt(
    examples: list[Example], fractions: Iterable[float], seed: int
) -> list[list[Example]]:
    """One held-out part per fraction, then the rest, with each prompt in exactly one part.

    Examples sharing (history, prompt) form a group; groups are shuffled with `seed` and each
    part takes max(1, round(n_groups * fraction)) groups in turn.
    """
    groups: dict[tuple, list[Example]] = {}
    for example in examples:
        groups.setdefault(_key(example), []).append(example)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for fraction in fractions:
        take = max(1, round(len(order) * fraction))
        parts.append([e for group in order[start : start + take] for e in group])
        start += take
    parts.append([e for group in order[start:] for e in group])
    return parts


def _carve(
    examples: list[Example], fractions: list[float], source: str, seed: int
) -> list[list[Example]]:
    """split_by_prompt with the size checks: enough examples, and some prompts left to train on."""
    if len(examples) < MIN_EXAMPLES:
        raise ValueError(
            f"{source} has {len(examples)} usable examples; at least {MIN_EXAMPLES} are needed "
            "to carve validation/test examples from it (or pass a separate eval file)"
        )
    parts = split_by_prompt(examples, fractions, seed)
    if not parts[-1]:
        n_prompts = len({_key(e) for e in examples})
        raise ValueError(
            f"{source} has only {n_prompts} distinct prompts: too few to hold some out "
            "and still train on the rest"
        )
    return parts


def _drop_seen(examples: list[Example], seen: set[tuple], source: str) -> tuple[list, str | None]:
    """`examples` without those whose prompt occurs in the training data, and a note saying so."""
    kept = [e for e in examples if _key(e) not in seen]
    dropped = len(examples) - len(kept)
    if dropped and not kept:
        raise ValueError(f"every example of {source} has a prompt that is also in the train data")
    note = (
        f"{source}: dropped {dropped} of {len(examples)} examples whose prompt is also in the "
        "train data"
    )
    return kept, note if dropped else None


# ------------------------------------------------------------------ scoring
def _new_tokens(longest_chars: int) -> int:
    return min(256, max(8, longest_chars // 3 + 8))


def _scoring(
    metric: str, train: list[Example]
) -> tuple[Callable[[str, str], bool] | None, str, tuple[str, ...] | None, int]:
    """(score, metric name, labels, default max_new_tokens) for `metric`."""
    longest = max(len(e.target) for e in train)
    if metric == "exact":
        return exact_match, "exact_match", None, _new_tokens(longest)
    if metric == "number":
        return number_match, "exact_match", None, _new_tokens(longest)
    if metric == "loss":
        return None, "perplexity", None, _new_tokens(longest)
    labels = tuple(sorted({e.target.strip() for e in train}))
    if len(labels) > MAX_LABELS:
        raise ValueError(
            f"label metric expects a small label set; got {len(labels)} distinct completions "
            f"(at most {MAX_LABELS}); use --metric exact for free-form answers"
        )
    return label_score, "accuracy", labels, _new_tokens(max(map(len, labels)))


# ------------------------------------------------------------------ the task
def _eval_rows(path: Path) -> tuple[Rows, str]:
    """(rows, source name) of an eval file; of a DatasetDict, its test split."""
    _, splits = _read_source(path)
    if len(splits) == 1:
        return next(iter(splits.values())), path.name
    if "test" not in splits:
        raise ValueError(f"{path} has no 'test' split (splits: {', '.join(splits)})")
    return splits["test"], f"{path.name}[test]"


def _check_options(
    metric: str, test_fraction: float, validation_fraction: float, max_new_tokens: int | None
) -> None:
    """Refuse a load_file_task option out of range, before any file is read."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    for split, fraction in (("test", test_fraction), ("validation", validation_fraction)):
        if not 0 < fraction < 0.5:
            raise ValueError(f"{split}_fraction must be in (0, 0.5); got {fraction}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive; got {max_new_tokens}")


def _given_held_out(
    path: Path,
    splits: dict[str, Rows],
    eval_path: str | Path | None,
    read: Callable[[Rows, str], list[Example]],
    notes: list[str],
    train: list[Example],
) -> tuple[dict[str, list[Example]], dict[str, str]]:
    """The held-out examples the user gave, by split, and where each split came from: test from
    `eval_path` when given (the source's own test split then unused, with a note), else the
    source's test and validation splits where it has them. Examples whose prompt also occurs in
    `train` are dropped, with a note."""
    held: dict[str, list[Example]] = {}
    origin: dict[str, str] = {}  # split -> where its examples came from
    if eval_path is not None:
        rows, origin["test"] = _eval_rows(Path(eval_path))
        held["test"] = read(rows, origin["test"])
        if "test" in splits:
            notes.append(f"{path.name}[test] not used: the test examples come from eval_path")
    for split in ("test", "validation"):
        if split in splits and split not in held:
            origin[split] = f"{path.name}[{split}]"
            held[split] = read(splits[split], origin[split])
    seen = {_key(e) for e in train}
    for split in list(held):
        held[split], note = _drop_seen(held[split], seen, origin[split])
        notes.extend([note] if note else [])
    return held, origin


def _summary(
    train_source: str,
    kind: str,
    n_rows: int,
    n_usable: int,
    held: dict[str, list[Example]],
    n_train: int,
    origin: dict[str, str],
    seed: int,
) -> str:
    """The task's first note: rows usable, split sizes, and where each held-out split came from."""
    how = {
        s: f"from {origin[s]}" if s in origin else f"carved by prompt (seed {seed})" for s in held
    }
    return (
        f"{train_source} ({kind}): {n_usable} of {n_rows} rows usable -> "
        f"{n_train} train / {len(held['validation'])} validation / {len(held['test'])} test; "
        f"validation {how['validation']}, test {how['test']}"
    )


def load_file_task(
    path: str | Path,
    *,
    eval_path: str | Path | None = None,
    metric: str = "exact",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    strict: bool = False,
    seed: int = 0,
    test_fraction: float = 0.1,
    validation_fraction: float = 0.1,
    max_new_tokens: int | None = None,
) -> Task:
    """The user's data at `path` as the `file` task.

    `path` is a .jsonl, .json (list of objects) or .csv file, or a datasets `save_to_disk`
    folder (a DatasetDict's `validation` and `test` splits are used when present). Each row has
    `prompt_field`/`completion_field` text, or a chat `messages` list ending with a user then an
    assistant message (earlier turns become `Example.history`).

    Test comes from `eval_path` when given, else from a DatasetDict's test split, else it is
    carved from `path` by prompt group; validation likewise (never from `eval_path`). Given
    held-out examples whose prompt also occurs in the train data are dropped.

    Bad rows are skipped and counted in `notes`, or raise ValueError with `strict`. Row numbers:
    the line number in JSONL, the file line in CSV (header = line 1, first data row = 2), the
    1-based position in a JSON list or a datasets split.

    `metric`: "exact" (whitespace-normalized exact match), "label" (classification accuracy over
    the train completions), "number" (first number equal) or "loss" (perplexity only).
    """
    _check_options(metric, test_fraction, validation_fraction, max_new_tokens)
    path = Path(path)
    kind, splits = _read_source(path)
    if "train" not in splits:
        raise ValueError(f"{path} has no 'train' split (splits: {', '.join(splits)})")
    notes: list[str] = []

    def read(rows: Rows, source: str) -> list[Example]:
        examples, note = _examples(rows, source, prompt_field, completion_field, strict)
        notes.extend([note] if note else [])
        return examples

    train_source = f"{path.name}[train]" if len(splits) > 1 else path.name
    train = read(splits["train"], train_source)
    n_usable = len(train)
    held, origin = _given_held_out(path, splits, eval_path, read, notes, train)
    to_carve = [split for split in ("test", "validation") if split not in held]
    if to_carve:
        fractions = {"test": test_fraction, "validation": validation_fraction}
        *parts, train = _carve(train, [fractions[s] for s in to_carve], train_source, seed)
        held.update(zip(to_carve, parts, strict=True))
    score, metric_name, labels, default_tokens = _scoring(metric, train)
    n_rows = len(splits["train"])
    summary = _summary(train_source, kind, n_rows, n_usable, held, len(train), origin, seed)
    return Task(
        "file",
        train,
        held["validation"],
        held["test"],
        labels,
        max_new_tokens=max_new_tokens or default_tokens,
        score=score,
        metric=metric_name,
        notes=[summary, *notes],
    )
