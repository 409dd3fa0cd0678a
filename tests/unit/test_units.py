import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.units import parse_duration, parse_size


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("1.5s", 1.5), (3, 3.0)])
def test_durations_parse_with_their_unit(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("512KiB", 512 * 1024), ("1MiB", 1024**2), ("10MB", 10**7), ("100", 100), ("2GiB", 2 * 1024**3)])
def test_sizes_parse_with_their_unit(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "5", "5 parsecs", "-1s", "s", "1e3s", True])
def test_malformed_durations_are_rejected_with_an_example(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_any_whole_duration_round_trips(n, unit):
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    assert parse_duration(f"{n}{unit}") == pytest.approx(n * factor)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["B", "KiB", "MiB", "KB", "MB"]))
def test_any_whole_size_round_trips(n, unit):
    factor = {"B": 1, "KiB": 1024, "MiB": 1024**2, "KB": 1000, "MB": 1000**2}[unit]
    assert parse_size(f"{n}{unit}") == n * factor
