"""The suite's own rules, as conftest.py sets them for every test."""

from __future__ import annotations

import signal
import subprocess

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import interruptible


def test_hypothesis_has_no_deadline_and_no_too_slow_check() -> None:
    """No timing assertions: hypothesis neither fails an example for taking long nor a test
    for generating slowly, whatever load the machine is under."""
    current = settings()  # the loaded profile's
    assert current.deadline is None
    assert HealthCheck.too_slow in current.suppress_health_check


@settings(max_examples=5)
@given(st.integers())
def test_a_test_of_its_own_settings_keeps_the_profile(value: int) -> None:
    """A test that sets some settings of its own inherits the rest from the profile."""
    assert settings().deadline is None


def test_a_ctrl_c_reaches_a_child_even_where_the_test_process_ignores_it() -> None:
    """The CLI tests' children (`interruptible`) get a test's Ctrl-C as a terminal's
    program would, even when the test process has SIGINT ignored (a child inherits that)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = subprocess.Popen(
            interruptible("import time; print('up', flush=True); time.sleep(60)"),
            stdout=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) != 0  # KeyboardInterrupt, not the minute's sleep
    finally:
        child.kill()
        child.wait()
