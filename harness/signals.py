"""SIGINT and SIGTERM: the first one interrupts the command (the workers are ended, nothing is
left half-written); from then on further ones are ignored so that cleanup is not cut short."""

from __future__ import annotations

import signal


class Interrupted(BaseException):
    """SIGINT or SIGTERM: end the workers, keep nothing half-written, say so in one line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def hold_signals(signum=None, frame=None) -> None:
    """From the first SIGINT/SIGTERM on, further ones are ignored: the cleanup that follows
    (ending workers, removing the staging directory) is bounded and must not be cut short."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def raise_interrupted(signum, frame):
    hold_signals()
    raise Interrupted(signum)
