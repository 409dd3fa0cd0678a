import pytest

from dispatcher.events import Event
from dispatcher.filters import FilterSyntaxError, compile_filter


def event(**data):
    return Event(source="s", type="vote.cast", data=data, subject="k1", extensions={"partition": 3})


@pytest.mark.parametrize(("expression", "expected"), [
    ('type == "vote.cast" and data.amount > 10', True),
    ('type == "vote.cast" and data.amount > 100', False),
    ("data.amount >= 42 or false", True),
    ('subject in ["k1", "k2"]', True),
    ("not data.flag", True),
    ("partition == 3", True),
    ("data.missing > 10", False),
    ("data.missing == null", True),
    ('data.name != "bob"', True),
    ("data.nested.deep == 1", False),
])
def test_filters_evaluate_over_event_fields(expression, expected):
    assert compile_filter(expression)(event(amount=42, name="alice")) is expected


def test_a_comparison_that_cannot_be_made_filters_the_event_out_instead_of_crashing():
    assert compile_filter("data.amount > 10")(event(amount="lots")) is False


@pytest.mark.parametrize("expression", ["__import__('os')", "data.x +", "lambda: 1", "data.x.__class__()", "[x for x in data]"])
def test_code_is_not_a_filter(expression):
    with pytest.raises(FilterSyntaxError):
        compile_filter(expression)


def test_an_empty_filter_keeps_everything():
    assert compile_filter("  ") is None
