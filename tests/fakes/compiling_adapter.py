"""A backend with a fake compiled mode, for the witness tests: the NumPy reference plus a
``compiled`` step that counts its own "compilations" as a framework's compiler would, behaving
by the plan's name: ``falls_back`` gives up at the first call and runs eagerly (as torch.compile
at its recompile limit), ``recompiles`` compiles again on every fifth call, ``condition`` says
a condition of its own does not hold, ``no_witness`` returns a bare function; any other plan
compiles once, at the first call."""

import copy

from backends.base import CompiledStep
from backends.numpy.adapter import Adapter as Reference
from backends.protocol import CompileCounts


class Adapter(Reference):
    def modes(self):
        return {**super().modes(), "compiled": "fake.compile (a counter in the fake adapter)"}

    def step(self, model, phase, mode, x, cotangent, lr):
        eager = super().step(model, phase, "eager", x, cotangent, lr)
        if mode == "eager":
            return eager
        name = model.plan.name
        if name == "no_witness":
            return eager
        counts = CompileCounts(compiled=0, traced=0, fallbacks=0)
        calls = [0]

        def call():
            calls[0] += 1
            if name == "falls_back":
                if calls[0] == 1:
                    counts.traced += 1
                    counts.fallbacks += 1
                    counts.fallback_reasons["fake limit (8) reached for 'forward'"] = 1
                return eager()
            if calls[0] == 1 or (name == "recompiles" and calls[0] % 5 == 0):
                counts.compiled += 1
                counts.traced += 1
            return eager()

        return CompiledStep(call, lambda: copy.deepcopy(counts), "fake.compile",
                            "a counter in the fake adapter",
                            lambda: {"the fake condition": name != "condition"})
