"""Protocol 2's selection: validation NLL at unreported seeds, close calls decided on two seeds,
unstable and diverged settings excluded, the grid extended past an edge."""

import random
from dataclasses import replace

from benchmarks import select
from benchmarks.accuracy import PROFILES
from benchmarks.methods import METHODS

P = PROFILES["v2"]
LRS = METHODS["lora"].lr_grid  # 1e-3, 3e-3, 1e-2


def fake(table: dict[tuple[float, int], float | None], noise: float = 0.01):
    """ensure(spec) from {(lr, seed): mean NLL (None: diverged)}; records what was asked."""
    asked = []

    def ensure(spec):
        asked.append((spec.lr, spec.seed))
        mean = table.get((spec.lr, spec.seed), 5.0)
        if mean is None:
            return {"diverged": "nan", "validation_nll": [float("nan")]}
        rng = random.Random(f"{spec.lr}-{spec.seed}")  # examples differ per run: SE > 0
        wiggle = [rng.gauss(0, noise) for _ in range(70)]
        nll = [mean + w - sum(wiggle) / len(wiggle) for w in wiggle]
        return {"validation_nll": nll, "validation_nll_mean": sum(nll) / len(nll)}

    return ensure, asked


def test_a_clear_winner_inside_the_grid_needs_no_second_seed():
    ensure, asked = fake({(1e-3, 0): 1.30, (3e-3, 0): 1.10, (1e-2, 0): 1.40})
    c = select.choose("lora", "arithmetic", 2, P, ensure)
    assert c.spec.lr == 3e-3 and c.spec.seed == 0
    assert all(seed == 0 for _, seed in asked) and len(asked) == 3
    assert 0 not in P.seeds  # the selection seed is never reported


def test_an_edge_choice_extends_the_grid():
    ensure, asked = fake({(1e-3, 0): 1.30, (3e-3, 0): 1.20, (1e-2, 0): 1.10, (3e-2, 0): 1.50})
    c = select.choose("lora", "arithmetic", 2, P, ensure)
    assert (3e-2, 0) in asked and c.spec.lr == 1e-2


def test_a_close_call_is_decided_on_both_selection_seeds():
    table = {(1e-3, 0): 1.300, (3e-3, 0): 1.100, (1e-2, 0): 1.101}
    table |= {(3e-3, 100): 1.120, (1e-2, 100): 1.105}
    ensure, asked = fake(table, noise=0.05)
    c = select.choose("lora", "arithmetic", 2, P, ensure)
    assert (3e-3, 100) in asked and (1e-2, 100) in asked
    assert c.spec.lr == 1e-2  # mean 1.103 beats 1.110


def test_unstable_and_diverged_settings_are_excluded_not_chosen():
    table = {(1e-3, 0): 1.300, (3e-3, 0): 1.100, (1e-2, 0): 1.101}
    table |= {(3e-3, 100): 1.50, (1e-2, 100): None}  # one swings, one diverges
    ensure, _ = fake(table, noise=0.05)
    c = select.choose("lora", "arithmetic", 2, P, ensure)
    reasons = {s.lr: why for s, why in c.excluded}
    assert "unstable" in reasons[3e-3] and "unstable" in reasons[1e-2]
    assert c.spec.lr == 1e-3


def test_report_only_says_pending_instead_of_choosing():
    c = select.choose("lora", "arithmetic", 2, P, lambda spec: None)
    assert c.pending and c.spec is None


def test_diverged_at_the_first_seed_is_excluded():
    ensure, _ = fake({(1e-3, 0): 1.30, (3e-3, 0): 1.20, (1e-2, 0): None, (3e-4, 0): 1.6})
    c = select.choose("lora", "arithmetic", 2, replace(P), ensure)
    assert c.spec.lr == 3e-3 and [s.lr for s, _ in c.excluded] == [1e-2]
