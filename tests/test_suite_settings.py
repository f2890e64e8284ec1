"""The suite's own rules, as conftest.py sets them for every test."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def test_hypothesis_has_no_deadline_and_no_too_slow_check() -> None:
    """No timing assertions: hypothesis neither fails an example for taking long nor a test
    for generating slowly, whatever load the machine is under."""
    assert settings.default.deadline is None
    assert HealthCheck.too_slow in settings.default.suppress_health_check


@settings(max_examples=5)
@given(st.integers())
def test_a_test_of_its_own_settings_keeps_the_profile(value: int) -> None:
    """A test that sets some settings of its own inherits the rest from the profile."""
    assert settings().deadline is None
