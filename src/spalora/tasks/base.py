"""What a task is (`Example`, `Task`) and the metrics that score generated completions.

Every task module imports from here, never from each other, so the task modules stay leaves.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:/-?\d+)?")
THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
PUNCTUATION = " \t\r\n.,:;!?\"'`()[]{}*"


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


def normalize_number(text: str) -> Fraction | str:
    """The first number in `text` as an exact Fraction ("2.40" == "2.4" == "12/5"), else text."""
    match = NUMBER.search(THOUSANDS_SEPARATOR.sub("", text))
    if not match:
        return text.strip().lower()
    try:
        return Fraction(match.group(0))
    except (ValueError, ZeroDivisionError):
        return match.group(0)


def number_match(prediction: str, target: str) -> bool:
    """Exact match of the first number of the prediction with the answer, after normalizing."""
    return normalize_number(prediction) == normalize_number(target)


def exact_match(prediction: str, target: str) -> bool:
    """Equal after stripping and collapsing whitespace; case-sensitive."""
    return prediction.split() == target.split()


def _label_text(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip(PUNCTUATION).lower() if lines else ""


def label_score(prediction: str, target: str) -> bool:
    """The prediction's first line is the label, or starts with it followed by a non-word char.

    Case, surrounding whitespace and punctuation are ignored: "Positive." matches "positive",
    "positive - the review praises ..." too, but "positively" does not.
    """
    predicted, label = _label_text(prediction), _label_text(target)
    if not label:  # a label made only of punctuation
        return prediction.strip().lower() == target.strip().lower()
    return re.match(re.escape(label) + r"(?!\w)", predicted) is not None
