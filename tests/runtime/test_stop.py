"""Graceful stop: the first signal only asks, the second stops at once, handlers go back."""

from __future__ import annotations

import os
import signal

import pytest

from rayrlhf.runtime.stop import StopNow, StopSignals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_asks_second_stops_now(sig):
    before = signal.getsignal(sig)
    stop = StopSignals()
    stop.install()
    try:
        os.kill(os.getpid(), sig)  # Python runs the handler before the next bytecode
        assert stop.requested == sig.name
        with pytest.raises(StopNow) as err:
            os.kill(os.getpid(), sig)
        assert err.value.signum == sig
    finally:
        stop.restore()
    assert signal.getsignal(sig) is before
