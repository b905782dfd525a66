"""Known framework limitations and defects, declared per backend in its backend.yaml (with the
reason and a source, like ``semantics:``) and matched against a run's checks.

A **limitation** is something the framework cannot do that the harness asks of it (Keras on
PyTorch cannot ``torch.compile`` a convolution followed by batch normalization). It names the
spec and the check exactly; every check it matches must fail, as a strict xfail: its failure is
a finding, not a failure of the run, and a matched check that passes fails the run as
``known limitation still happens`` (the declaration is stale: remove it).

A **defect** is a framework bug that shows by chance (Keras on PyTorch's truncated normal keeps
an out-of-range draw with probability 0.0455^4 per value). It names the check, how the
parameter was realized (a regular expression on the adapter's description) and the rate per
value; a failed check it matches is a finding only when the number of values outside the
support is one the declared rate explains (a Poisson tail above ``stats.ALPHA``), so a real
harness or adapter bug that puts many values outside still fails.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .stats import ALPHA, BOUNDS, Check

#: the check a stale limitation fails (subject: the declaration's check and spec)
STILL_HAPPENS = "known limitation still happens"
REPEAT = " (a repeat process)"


@dataclass(frozen=True)
class Limitation:
    """A check the framework fails on a spec because it cannot do what is asked."""
    backend: str
    spec: str
    check: str
    subjects: tuple[str, ...] | None   # None: every subject of the check on that spec
    what: str
    reason: str
    source: str

    @property
    def declared_in(self) -> str:
        return f"backends/{self.backend}/backend.yaml known_limitations"

    def matches(self, spec: str, check: Check) -> bool:
        return spec == self.spec and check.name == self.check and (
            self.subjects is None or check.subject.removesuffix(REPEAT) in self.subjects)

    def note(self) -> str:
        return f"known limitation of {self.backend}: {self.what} ({self.declared_in})"


@dataclass(frozen=True)
class Defect:
    """A framework bug that a check catches by chance, at a known rate per value."""
    backend: str
    check: str
    realized_as: str    # a regular expression on the parameter's ``init_impl``
    rate_per_value: float
    what: str
    source: str

    @property
    def declared_in(self) -> str:
        return f"backends/{self.backend}/backend.yaml known_defects"

    def explains(self, param, check: Check) -> tuple[bool, str]:
        """(True, why) when ``check`` of ``param`` failed as this defect makes it fail, at a
        count of out-of-support values that the declared rate explains."""
        impl = param.record.init_impl if param.record else None
        if check.passed or check.name != self.check or not impl or \
                not re.search(self.realized_as, impl):
            return False, ""
        n, outside = param.stats.get("n", 0), param.stats.get("outside_support")
        if outside is None or not n:
            return False, ""
        expected = n * self.rate_per_value
        p = poisson_tail(outside, expected)
        if p < ALPHA:
            return False, (f"{outside:,} of {n:,} values outside: more than {self.what!r} "
                           f"explains (about {expected:.2g} expected, P = {p:.1g})")
        return True, (f"known defect of {self.backend}: {self.what}; {outside:,} of {n:,} "
                      f"values outside the support, about {expected:.2g} expected at "
                      f"{self.rate_per_value:.3g} per value ({self.declared_in})")


def poisson_tail(k: int, mean: float) -> float:
    """P(X >= k) for X ~ Poisson(mean)."""
    if k <= 0:
        return 1.0
    if mean <= 0:
        return 0.0
    term = total = math.exp(-mean)
    for i in range(1, k):
        term *= mean / i
        total += term
    return max(0.0, 1.0 - total)


class DeclarationError(ValueError):
    """A malformed known_limitations / known_defects entry: ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")


def _text(entry: dict, key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DeclarationError(f"{where}.{key}", "a non-empty string is required")
    return " ".join(value.split())


def _entries(meta: dict, key: str, allowed: set[str]) -> list[tuple[str, dict]]:
    items = meta.get(key) or []
    if not isinstance(items, list):
        raise DeclarationError(key, "a list of entries is required")
    out = []
    for i, entry in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise DeclarationError(where, "a mapping is required")
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise DeclarationError(f"{where}.{unknown[0]}", "unknown field (known: "
                                   f"{', '.join(sorted(allowed))})")
        out.append((where, entry))
    return out


def read_declarations(backend: str, meta: dict) -> tuple[tuple[Limitation, ...],
                                                         tuple[Defect, ...]]:
    """The known_limitations and known_defects of one backend.yaml (already merged with what
    it extends); a malformed entry raises DeclarationError naming the field."""
    limitations = []
    for where, e in _entries(meta, "known_limitations",
                             {"spec", "check", "subjects", "what", "reason", "source"}):
        subjects = e.get("subjects")
        if subjects is not None and (not isinstance(subjects, list) or not subjects or
                                     not all(isinstance(s, str) and s for s in subjects)):
            raise DeclarationError(f"{where}.subjects", "a non-empty list of check subjects")
        limitations.append(Limitation(backend, _text(e, "spec", where), _text(e, "check", where),
                                      tuple(subjects) if subjects else None,
                                      _text(e, "what", where), _text(e, "reason", where),
                                      _text(e, "source", where)))
    defects = []
    for where, e in _entries(meta, "known_defects",
                             {"check", "realized_as", "rate_per_value", "what", "source"}):
        rate = e.get("rate_per_value")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1:
            raise DeclarationError(f"{where}.rate_per_value", "a probability in (0, 1)")
        pattern = _text(e, "realized_as", where)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise DeclarationError(f"{where}.realized_as", f"not a regular expression: {exc}") \
                from None
        check = _text(e, "check", where)
        if check != BOUNDS:
            raise DeclarationError(f"{where}.check", f"only {BOUNDS!r} (a count of values "
                                   "outside the support is what a rate can explain)")
        defects.append(Defect(backend, check, pattern, float(rate), _text(e, "what", where),
                              _text(e, "source", where)))
    return tuple(limitations), tuple(defects)


def apply(results: list, limitations: dict[str, tuple], defects: dict[str, tuple]) -> None:
    """Mark each failed check that a declaration explains (``Check.known``); add a failing
    ``STILL_HAPPENS`` check for each limitation-matched check that passed. ``limitations``
    and ``defects``: backend name -> its declarations."""
    for r in results:
        if not r.ok:
            continue
        for lim in limitations.get(r.backend, ()):
            for c in [c for c in r.checks if lim.matches(r.spec, c)]:
                if c.passed:
                    r.checks.append(Check(
                        STILL_HAPPENS, False, "passed", "failed",
                        f"{lim.declared_in} says {lim.what}, but this check passed: the "
                        "limitation no longer happens; remove the declaration",
                        f"{c.label} on {r.spec}"))
                else:
                    c.known = lim.note()
        for defect in defects.get(r.backend, ()):
            for p in r.params:
                for c in p.checks:
                    ok, why = defect.explains(p, c)
                    if ok:
                        c.known = why
                    elif why:
                        c.detail = f"{c.detail}; {why}"


def exercised(results: list, lim: Limitation) -> bool:
    """Whether a run had any check the limitation names (timing off has no compiled check)."""
    return any(r.backend == lim.backend and r.ok and any(lim.matches(r.spec, c)
                                                         for c in r.checks) for r in results)
