"""A misbehaving backend for the runner's failure tests: the NumPy reference, except that a plan
named ``crash`` kills the process, ``hang`` sleeps forever, ``boom`` raises, and with
FAKE_BACKEND_NO_FRAMEWORK set the framework "cannot be imported"."""

import os
import time

from backends.numpy.adapter import Adapter as Reference


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
            time.sleep(3600)
        if plan.name == "boom":
            raise ValueError("fake backend: this plan cannot be built")
        return super().build(plan)
