"""Task loaders: split sizes, no train/test overlap, determinism, metrics on known cases."""

from fractions import Fraction

import pytest

from spalora.tasks import get_task, label_match, normalize_number, number_match


@pytest.fixture(scope="module")
def arithmetic():
    pytest.importorskip("mathematics_dataset")
    return get_task("arithmetic")


def test_arithmetic_split(arithmetic):
    assert len(arithmetic.train) == 4000 and len(arithmetic.test) == 400
    train_q = {e.prompt for e in arithmetic.train}
    assert len(train_q) == 4000
    assert not train_q & {e.prompt for e in arithmetic.test}
    assert all(e.target and normalize_number(e.target) != e.target for e in arithmetic.test[:50])


def test_arithmetic_is_deterministic(arithmetic):
    again = get_task("arithmetic")
    assert again.test == arithmetic.test and again.train[:20] == arithmetic.train[:20]
    assert get_task("arithmetic", seed=1).test != arithmetic.test


def test_number_metric():
    assert normalize_number("2.40") == Fraction(12, 5)
    assert number_match("The answer is 2.40.", "2.4")
    assert number_match("12/5", "2.4")
    assert number_match("-7", "-7") and not number_match("7", "-7")
    assert number_match("1,024", "1024")
    assert not number_match("no idea", "3")
    assert number_match("2, 3", "2") and number_match("-.5", "-1/2")


def test_label_metric():
    assert label_match("Sport.", "sport") and label_match(" tech news", "tech")
    assert not label_match("Sports", "sport") and not label_match("", "sport")


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("glue")
