"""Tasks: prompt/target examples from real data, with a fixed-seed held-out split and a metric.

A registry by name. The built-in tasks (`bbc-topic`, `arithmetic`, `gsm-symbolic`) and the
`file` task (the user's own data, `tasks.files`) each live in a module of their own; they share
only `tasks.base`, so no task module imports another or this registry.
"""

from __future__ import annotations

from collections.abc import Callable

from .arithmetic import ARITHMETIC_ENTROPY, ARITHMETIC_MODULES, arithmetic_task, generate_arithmetic
from .base import (
    Example,
    Task,
    exact_match,
    first_word,
    label_match,
    label_score,
    normalize_number,
    number_match,
)
from .bbc import (
    BBC_TOPICS,
    bbc_prompt,
    bbc_task,
    bbc_topic,
    load_bbc_headlines,
    stratified_split,
)
from .files import load_file_task, split_by_prompt
from .gsm import (
    GSM_INSTRUCTION,
    GSM_PACKAGE,
    GSM_SLOW_TEMPLATES,
    GSM_SPLIT,
    GSM_VARIANTS,
    gsm_answer,
    gsm_match,
    gsm_symbolic,
    gsm_template_split,
)

TASKS: dict[str, Callable[..., Task]] = {
    "bbc-topic": bbc_topic,
    "arithmetic": arithmetic_task,
    "gsm-symbolic": gsm_symbolic,
}
FILE_TASK = "file"  # not in TASKS: it needs a `path` and takes the options of `load_file_task`

__all__ = [
    "bbc_task",
    "ARITHMETIC_ENTROPY",
    "ARITHMETIC_MODULES",
    "BBC_TOPICS",
    "FILE_TASK",
    "GSM_INSTRUCTION",
    "GSM_PACKAGE",
    "GSM_SLOW_TEMPLATES",
    "GSM_SPLIT",
    "GSM_VARIANTS",
    "TASKS",
    "Example",
    "Task",
    "arithmetic_task",
    "bbc_prompt",
    "bbc_topic",
    "exact_match",
    "first_word",
    "generate_arithmetic",
    "get_task",
    "gsm_answer",
    "gsm_match",
    "gsm_symbolic",
    "gsm_template_split",
    "label_match",
    "label_score",
    "load_bbc_headlines",
    "load_file_task",
    "normalize_number",
    "number_match",
    "split_by_prompt",
    "stratified_split",
]


def get_task(name: str, seed: int = 0, **options) -> Task:
    """A registered task by name; `file` takes `path` and the options of `load_file_task`."""
    if name == FILE_TASK:
        options = {k: v for k, v in options.items() if v is not None}
        if not options.get("path"):
            raise ValueError("the file task needs a data file: --data PATH")
        return load_file_task(options.pop("path"), seed=seed, **options)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS) + [FILE_TASK]}")
    if any(v is not None for v in options.values()):
        raise ValueError(f"{sorted(options)} apply to the file task only, not {name!r}")
    return TASKS[name](seed=seed)
