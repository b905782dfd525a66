"""``python -m harness diff RUN_A RUN_B``: what changed from one run to another (asv compare's
job): framework versions, verdicts and checks, parameters whose initial statistics moved, and
timings that changed beyond the runs' own noise. The question after an upgrade: did my
framework change its defaults, its numerics or its speed?

- A parameter's statistics **moved** when its mean, or its variance, differs between the runs by
  more than z = 4.89 standard errors of the difference (the mean's from both samples'
  variances; the variance's from their fourth moments): the same test the checks use against
  theory, here of one sample against the other. Same seed, same framework: nothing moves.
- A timing **changed** when the Mann-Whitney U test on the two runs' per-call block times
  (each block's time over its calls) gives p < ``ALPHA`` *and* the ratio of the medians is
  beyond ``FACTOR`` (asv compare's default 1.1): the first says the shift is beyond the blocks'
  own spread, the second that it is big enough to matter.

Both inputs are untrusted: each results.json is read as a regular file (never through a
symbolic link) within a size bound and checked against the schema of what diff reads; anything
else is one line naming the file and the field (exit status 2). Exit status 1 when something
got worse (a pass became a failure, a check newly fails, a timing got slower), else 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import report
from .console import one_line
from .merge import read_results
from .stats import Z, scipy_stats

ALPHA = 1e-3
FACTOR = 1.10

_STR = {"type": "string", "maxLength": 100_000}
_NUM = {"type": ["number", "null"]}
_CHECK = {"type": "object", "required": ["check", "passed"],
          "properties": {"check": _STR, "passed": {"type": "boolean"},
                         "known": {"type": ["string", "null"]},
                         "unjudged": {"type": ["string", "null"]}}}
SCHEMA = {
    "type": "object",
    "required": ["schema_version", "run", "environments", "results"],
    "properties": {
        "schema_version": {"const": report.RESULTS_SCHEMA_VERSION},
        "run": {"type": "object", "required": ["id"], "properties": {"id": _STR}},
        "environments": {"type": "object", "additionalProperties": {
            "type": "object", "properties": {"worker": {"oneOf": [{"type": "null"}, {
                "type": "object", "properties": {"versions": {
                    "type": "object", "additionalProperties": {"type": ["string", "null"]}}}}]}}}},
        "results": {"type": "array", "maxItems": 1_000_000, "items": {
            "type": "object", "required": ["spec", "backend", "status", "passed", "checks",
                                           "params", "timings"],
            "properties": {
                "spec": _STR, "backend": _STR, "status": _STR, "kind": _STR,
                "passed": {"type": "boolean"}, "checks": {"type": "array", "items": _CHECK},
                "params": {"type": "array", "items": {
                    "type": "object", "required": ["name", "checks", "stats"],
                    "properties": {"name": _STR, "checks": {"type": "array", "items": _CHECK},
                                   "stats": {"type": "object", "properties": {
                                       "n": {"type": "integer", "minimum": 0},
                                       "mean": _NUM, "std": _NUM, "kurtosis": _NUM}}}}},
                "timings": {"type": "array", "items": {
                    "type": "object", "required": ["mode", "phase", "batch", "number",
                                                   "block_times"],
                    "properties": {"mode": _STR, "phase": _STR, "batch": {"type": "integer"},
                                   "number": {"type": "integer", "minimum": 1},
                                   "block_times": {"type": "array", "maxItems": 1_000_000,
                                                   "items": {"type": "number"}}}}}}}},
    },
}


def read_run(given: str) -> tuple[Path, dict]:
    """A run directory's (or a results.json file's) document, checked against SCHEMA."""
    path = Path(given)
    path = path / "results.json" if path.is_dir() else path
    return path, read_results(path, SCHEMA, "diff",
                              f"reads version {report.RESULTS_SCHEMA_VERSION}",
                              lambda m: one_line(m, 300))


def _key(r: dict) -> tuple:
    return (r.get("kind") or "", r["spec"], r["backend"])


def _name(key: tuple) -> str:
    return one_line(" ".join(k for k in key if k != ""), 300)


def _verdict(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"]
    return "pass" if r["passed"] else "FAIL"


PASS, KNOWN, UNJUDGED, FAIL = "pass", "known", "not judged", "FAIL"


def _state(c: dict) -> str:
    """pass; known (failed as a declared known framework issue, which holds); not judged
    (failed where the comparison was measured to be meaningless); FAIL."""
    return UNJUDGED if c.get("unjudged") else PASS if c["passed"] else \
        KNOWN if c.get("known") else FAIL


def _checks(r: dict) -> dict[str, str]:
    """Each check's state."""
    out = {c["check"]: _state(c) for c in r["checks"]}
    for p in r["params"]:
        out.update({f"{p['name']} {c['check']}": _state(c) for c in p["checks"]})
    return out


def versions(doc_a: dict, doc_b: dict) -> list[str]:
    out = []
    for name in sorted(set(doc_a["environments"]) | set(doc_b["environments"])):
        got = []
        for d in (doc_a, doc_b):
            w = (d["environments"].get(name) or {}).get("worker") or {}
            got.append(", ".join(f"{k} {v}" for k, v in (w.get("versions") or {}).items() if v)
                       or "not run")
        if got[0] != got[1]:
            out.append(f"{one_line(name, 100)}: {one_line(got[0], 300)} -> "
                       f"{one_line(got[1], 300)}")
    return out


def _float(v, default: float) -> float:
    """A statistic as a float (None: ``default``); an integer of hundreds of digits is inf."""
    if v is None:
        return default
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def moved(a: dict, b: dict) -> list[str]:
    """The statistics of one parameter that moved beyond z standard errors; a statistic that
    became, or stopped being, non-finite (NaN, inf) moved too."""
    sa, sb = a["stats"], b["stats"]
    na, nb = sa.get("n") or 0, sb.get("n") or 0
    if na != nb:
        return [f"values {na:,} -> {nb:,}"[:300]]
    if na < 2 or sa.get("mean") is None or sb.get("mean") is None:
        return []
    ma, mb = _float(sa["mean"], 0.0), _float(sb["mean"], 0.0)
    stds = _float(sa.get("std"), 0.0), _float(sb.get("std"), 0.0)
    out = []
    for what, x, y in (("mean", ma, mb), ("std", *stds)):
        if not (math.isfinite(x) and math.isfinite(y)) and repr(x) != repr(y):
            out.append(f"{what} {x:.4g} -> {y:.4g} (not finite)")
    if out or not all(map(math.isfinite, (ma, mb, *stds))):
        return out
    va, vb = stds[0] * stds[0], stds[1] * stds[1]  # '*', not '**': overflow gives inf
    se = math.sqrt(va / na + vb / nb)
    if (se == 0 and ma != mb) or (se and abs(ma - mb) > Z * se):
        z = f"z = {abs(ma - mb) / se:.3g}" if se else "exact"
        out.append(f"mean {ma:.4g} -> {mb:.4g} ({z})")
    ka, kb = _float(sa.get("kurtosis"), 3.0) or 3.0, _float(sb.get("kurtosis"), 3.0) or 3.0
    se_var = math.sqrt(max(ka - 1, 0) * va * va / na + max(kb - 1, 0) * vb * vb / nb)
    if (se_var == 0 and va != vb) or (se_var and abs(va - vb) > Z * se_var):
        z = f"z = {abs(va - vb) / se_var:.3g}" if se_var else "exact"
        out.append(f"std {math.sqrt(va):.4g} -> {math.sqrt(vb):.4g} ({z})")
    return out


def per_call(t: dict) -> np.ndarray:
    times = np.asarray(t["block_times"], dtype=np.float64) / t["number"]
    return times[np.isfinite(times) & (times > 0)]


def timing_change(a: dict, b: dict) -> tuple[float, float, float, float] | None:
    """(median A, median B, ratio B/A, p) when the timing changed beyond the noise, else None."""
    ta, tb = per_call(a), per_call(b)
    if ta.size < 3 or tb.size < 3:
        return None
    ma, mb = float(np.median(ta)), float(np.median(tb))
    ratio = mb / ma
    p = float(scipy_stats().mannwhitneyu(ta, tb, alternative="two-sided").pvalue)
    if p < ALPHA and not 1 / FACTOR <= ratio <= FACTOR:
        return ma, mb, ratio, p
    return None


def diff(path_a: str, path_b: str) -> tuple[list[str], bool]:
    """The report lines, and whether anything got worse."""
    (fa, a), (fb, b) = read_run(path_a), read_run(path_b)
    ra, rb = {_key(r): r for r in a["results"]}, {_key(r): r for r in b["results"]}
    lines = [f"diff {one_line(str(fa), 300)} ({one_line(a['run']['id'], 100)}) -> "
             f"{one_line(str(fb), 300)} ({one_line(b['run']['id'], 100)})", ""]
    worse = False

    changed = versions(a, b)
    lines += ["Framework versions:"] + [f"  {c}" for c in changed] or []
    if not changed:
        lines[-1] += " the same in both runs"
    only = [f"  only in A: {_name(k)}" for k in ra if k not in rb] + \
        [f"  only in B: {_name(k)}" for k in rb if k not in ra]

    verdict_lines = []
    for key in (k for k in ra if k in rb):
        va, vb = _verdict(ra[key]), _verdict(rb[key])
        if va != vb:
            verdict_lines.append(f"  {_name(key)}: {va} -> {vb}")
            worse |= va == "pass"
        ca, cb = _checks(ra[key]), _checks(rb[key])
        newly = [c for c in cb if cb[c] == FAIL and ca.get(c, PASS) != FAIL]
        fixed = [c for c in cb if cb[c] == PASS and ca.get(c, PASS) != PASS]
        known = [c for c in cb if cb[c] == KNOWN and ca.get(c, PASS) != KNOWN]
        unjudged = [c for c in cb if cb[c] == UNJUDGED and ca.get(c, PASS) != UNJUDGED]
        worse |= bool(newly)
        for what, names in (("now fails", newly), ("now passes", fixed),
                            ("now fails as a declared known framework issue", known),
                            ("now not judged (measured ill-conditioned)", unjudged)):
            if names:
                shown = "; ".join(one_line(n, 200) for n in names[:8])
                more = f"; and {len(names) - 8} more" if len(names) > 8 else ""
                verdict_lines.append(f"    {what}: {shown}{more}")
    lines += ["", "Verdicts and checks that changed:"] + (verdict_lines + only or ["  none"])

    param_lines = []
    for key in (k for k in ra if k in rb):
        pa = {p["name"]: p for p in ra[key]["params"]}
        for p in rb[key]["params"]:
            if p["name"] in pa:
                what = moved(pa[p["name"]], p)
                if what:
                    param_lines.append(f"  {_name(key)} {one_line(p['name'], 200)}: "
                                       + "; ".join(what))
    lines += ["", f"Parameters whose initial statistics moved (beyond z = {Z:.2f} standard "
              "errors of the difference):"] + (param_lines or ["  none"])

    slower, faster, compared = [], [], 0
    for key in (k for k in ra if k in rb):
        ta = {(t["mode"], t["phase"], t["batch"]): t for t in ra[key]["timings"]}
        for t in rb[key]["timings"]:
            tk = (t["mode"], t["phase"], t["batch"])
            if tk not in ta:
                continue
            compared += 1
            change = timing_change(ta[tk], t)
            if change is None:
                continue
            ma, mb, ratio, p = change
            line = (f"    {_name(key)} {one_line(t['phase'], 50)} {one_line(t['mode'], 50)} "
                    f"batch {t['batch']}: {ma * 1e3:.4g} ms -> {mb * 1e3:.4g} ms "
                    f"({ratio:.2f}x, p = {p:.1g})")
            (slower if ratio > 1 else faster).append(line)
    worse |= bool(slower)
    lines += ["", f"Timings ({compared} compared; changed = Mann-Whitney U on the raw block "
              f"times p < {ALPHA:g} and a ratio of medians beyond {FACTOR:.2f}x):"]
    lines += (["  slower:"] + slower if slower else []) + \
        (["  faster:"] + faster if faster else []) + \
        ([] if slower or faster else ["  none changed beyond the noise"])
    lines += ["", "Worse: " + ("yes (exit status 1)" if worse else "nothing got worse")]
    return lines, worse


def diff_command(args) -> int:
    lines, worse = diff(args.run_a, args.run_b)
    print("\n".join(lines))
    return 1 if worse else 0
