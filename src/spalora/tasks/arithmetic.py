"""`arithmetic`: school arithmetic from DeepMind's mathematics-dataset generator; train and test
come from different seeds and any test question that also occurs in train is dropped."""

from __future__ import annotations

import importlib
import random
import sys

from ..hub import package_dir
from .base import Example, Task, number_match

ARITHMETIC_MODULES = ("add_or_sub", "add_sub_multiple", "mul", "div")
ARITHMETIC_ENTROPY = (2.0, 4.0)  # mathematics-dataset's difficulty; its own train range is 3-10


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
