"""nn/signals.py: the first signal is a request to stop; the second is not swallowed."""
import os
import signal

import pytest

from nn.signals import StopSignal


def test_a_second_ctrl_c_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.received == "SIGINT"      # the first one only asks the loop to stop
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the second Ctrl-C was swallowed")
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_then_ctrl_c():
    with pytest.raises(KeyboardInterrupt):
        with StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.received == "SIGTERM"
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the Ctrl-C after SIGTERM was swallowed")
