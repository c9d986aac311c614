"""Protocol 2's scoring: held-out completion NLL per example on validation and test (the primary
signal, paired by example across methods), greedy accuracy on the first `accuracy_limit` test
examples, and the evaluation's own time, apart from training's."""

from __future__ import annotations

import time

from spalora.tasks import Task

NLL_DIGITS = 4  # per-example NLL as stored: 1e-4 nats is far below any gap the protocol resolves


FOLDS = 5  # cross-fitting of fixed corpora: each reported run is tested on one held-out fold
CROSS_FITTED = ("bbc-topic",)
VALIDATION_FRACTION = 0.2  # of the non-test headlines: large enough to rank settings by NLL


def load_task(name: str, profile) -> Task:
    """The task at protocol 2's sizes: arithmetic generated large; bbc-topic cross-fitted, named
    `bbc-topic/foldK` (test = fold K of FOLDS, validation carved from the rest). One line, and
    nothing trained, for a task it cannot size."""
    from spalora.tasks import arithmetic_task

    if name == "arithmetic":
        return arithmetic_task(seed=0, n_validation=profile.n_validation, n_test=profile.n_test)
    base, _, fold = name.partition("/fold")
    if base == "bbc-topic" and fold.isdigit() and int(fold) < FOLDS:
        return bbc_fold(int(fold))
    if base == "bbc-topic":
        raise ValueError(
            f"bbc-topic under protocol 2 is cross-fitted: name a fold, bbc-topic/fold0 .. "
            f"bbc-topic/fold{FOLDS - 1} (got {name!r})"
        )
    raise ValueError(
        f"task {name!r} has no protocol-2 split (arithmetic, bbc-topic/foldK; docs/benchmarks.md)"
    )


def fold_of(name: str, seed: int) -> str:
    """The task a run at `seed` trains and tests on: a cross-fitted task rotates its test fold
    with the seed (seed s tests fold s mod FOLDS); a generated task is the same at every seed."""
    return f"{name}/fold{seed % FOLDS}" if name in CROSS_FITTED else name


def bbc_fold(fold: int) -> Task:
    """Stratified FOLDS-fold split of the distinct headlines (a fixed shuffle per topic, dealt
    round robin), so the folds partition the corpus and every headline is tested exactly once."""
    import random

    from spalora.tasks import bbc_task, load_bbc_headlines, stratified_split

    folds: list[list[tuple[str, str]]] = [[] for _ in range(FOLDS)]
    rng = random.Random(0)
    by_topic: dict[str, list] = {}
    for row in load_bbc_headlines():
        by_topic.setdefault(row[1], []).append(row)
    dealt = 0
    for topic in sorted(by_topic):
        rows = by_topic[topic][:]
        rng.shuffle(rows)
        for row in rows:
            folds[dealt % FOLDS].append(row)
            dealt += 1
    rest = [row for k, f in enumerate(folds) if k != fold for row in f]
    train, validation = stratified_split(rest, VALIDATION_FRACTION, seed=1)

    return bbc_task(train, validation, folds[fold])


def score(model, tokenizer, task: Task, profile, progress: bool, test: bool = True) -> dict:
    """Every validation and test example's NLL (and whether the greedy continuation is the
    target token for token), generation-scored accuracy on the first test examples. With
    test=False (a selection seed's run: only its validation NLL is ever read) the test set is
    not scored at all, which saves over half of a run's evaluation."""
    from spalora.evaluate import completion_nll, evaluate_task

    started = time.perf_counter()
    val = completion_nll(model, tokenizer, task.validation, progress=progress, desc="val nll")
    out = {
        "validation_nll": [round(x, NLL_DIGITS) for x in val["nll"]],
        "validation_greedy_match": _bits(val["greedy_match"]),
        "validation": -_mean(val["nll"]),  # higher is better, as protocol 1's `validation`
        "validation_nll_mean": _mean(val["nll"]),
        "n_validation": len(val["nll"]),
    }
    if not test:
        seconds = time.perf_counter() - started
        return out | {"n_test": 0, "nll_seconds": seconds, "eval_seconds": seconds}
    test_nll = completion_nll(model, tokenizer, task.test, progress=progress, desc="test nll")
    nll_seconds = time.perf_counter() - started
    scored = task.test[: profile.accuracy_limit]
    acc = evaluate_task(model, tokenizer, task, scored, progress=progress, desc="test accuracy")
    bits = "".join("1" if r["correct"] else "0" for r in acc["predictions"])
    return out | {
        "test_nll": [round(x, NLL_DIGITS) for x in test_nll["nll"]],
        "test_greedy_match": _bits(test_nll["greedy_match"]),
        "test_nll_mean": _mean(test_nll["nll"]),
        "test": acc["value"],
        "test_correct": bits,
        "metric": acc["metric"],
        "n_test": len(test_nll["nll"]),
        "n_test_accuracy": len(bits),
        "nll_seconds": nll_seconds,
        "eval_seconds": time.perf_counter() - started,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _bits(flags: list[bool]) -> str:
    return "".join("1" if f else "0" for f in flags)
