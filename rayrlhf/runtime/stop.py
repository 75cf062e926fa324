"""Graceful stop: the first SIGTERM or SIGINT lets the current step finish, then the driver
writes a checkpoint and exits with EXIT_STOPPED; a second one stops at once (StopNow).

`ray job stop` and a preempted node send SIGTERM, then SIGKILL after a grace time
(RAY_JOB_STOP_WAIT_TIME_S for Ray jobs): set it above one step plus one checkpoint.

The handlers must be installed after `ray.init`: connecting the driver starts Ray's C++ core
worker, which installs absl's failure-signal handler for SIGTERM (among SIGSEGV, SIGABRT...);
that handler dumps a stack trace and aborts, so SIGTERM used to end the driver with exit 134
and nothing saved. `signal.signal` afterwards puts Python's handler back in its place. While the
driver waits in `ray.get`, Ray checks for Python signals every few hundred milliseconds, so the
flag is set at once and the step's remote work carries on.
"""

from __future__ import annotations

import os
import signal
import threading

EXIT_STOPPED = 3
"""Exit code of a run stopped by a signal after writing its checkpoint (resume with --resume)."""
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The run stopped on a signal after a complete step and its checkpoint; the message is the
    one line to print."""


class StopNow(KeyboardInterrupt):
    """A second signal: stop now, without a checkpoint (the actors are still released)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by a second {signal.Signals(signum).name}, without a checkpoint")
        self.signum = signum


class StopSignals:
    """SIGTERM/SIGINT handlers for the driver's main thread: the first sets `requested` (the
    signal's name), the second raises StopNow."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works in the main thread only (e.g. not in a test runner's)
        for sig in SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.requested is not None:
            raise StopNow(signum)
        self.requested = signal.Signals(signum).name
        # os.write, not print: a handler may interrupt a print in progress.
        os.write(
            2,
            f"rayrlhf: {self.requested} received: finishing this step, then a checkpoint "
            "(send it again to stop at once)\n".encode(),
        )
