"""A misbehaving backend for the runner's failure tests: the NumPy reference, except that a plan
named ``crash`` kills the process, ``hang`` sleeps forever, ``boom`` raises, ``slow`` sleeps
FAKE_SLOW_S seconds (default 2) before building, ``hog`` allocates memory fast (20 MiB every
50 ms, touched, up to FAKE_HOG_MAX_MIB, default 1536, then sleeps: the harness's memory watch
must end it long before), and with FAKE_BACKEND_NO_FRAMEWORK set the framework "cannot be
imported". With FAKE_BACKEND_MARK_DIR set, a plan about to hang, sleep or hog first writes the
worker's pid to ``<dir>/<plan>.pid``, so a test knows which process to watch."""

import os
import time
from pathlib import Path

from backends.numpy.adapter import Adapter as Reference


def _mark(name: str) -> None:
    folder = os.environ.get("FAKE_BACKEND_MARK_DIR")
    if folder:
        tmp = Path(folder) / f".{name}.pid.tmp"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, Path(folder) / f"{name}.pid")


class Adapter(Reference):
    def import_framework(self):
        if os.environ.get("FAKE_BACKEND_NO_FRAMEWORK"):
            raise ImportError("No module named 'fakeframework'")
        return super().import_framework()

    def build(self, plan):
        if plan.name == "crash":
            print("fake backend: crashing now", flush=True)
            os._exit(7)
        if plan.name == "hang":
            _mark(plan.name)
            time.sleep(3600)
        if plan.name == "slow":
            _mark(plan.name)
            time.sleep(float(os.environ.get("FAKE_SLOW_S", "2")))
        if plan.name == "hog":
            _mark(plan.name)
            held, limit = [], int(os.environ.get("FAKE_HOG_MAX_MIB", "1536"))
            while len(held) * 20 < limit:
                held.append(bytearray(b"\1" * (20 << 20)))  # written: resident, not just mapped
                time.sleep(0.05)
            time.sleep(3600)
        if plan.name == "boom":
            raise ValueError("fake backend: this plan cannot be built")
        return super().build(plan)
