"""The machine dimension of a report: which machines a run used (their fingerprints), and for a run
over several machine kinds (``compare --executor ray --where ...`` or ``merge``), the same spec and
backend on each machine side by side. The side-by-side report is rendered from results documents
alone (each machine kind's ``results.json``), so a run made by Ray tasks and runs merged from
several machines give the same report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import report
from .analysis import NUMERICS

#: what a machine-kind directory under ``machines/`` may be called
_DIR_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def machine_dir(label: str) -> str:
    """The directory name of a machine kind's run (``machines/<name>``)."""
    name = _DIR_CHARS.sub("_", label).strip("._") or "machine"
    return name[:100]


def _memory(m: dict) -> str:
    return f"{m['memory_bytes'] / 2**30:.1f} GiB" if m.get("memory_bytes") else "–"


def _gpus(m: dict) -> str:
    return "; ".join(f"{g['name']} ({g['memory']}, driver {g['driver']})"
                     for g in m.get("gpus") or []) or "none"


def _machine_rows(machines: dict) -> list[list]:
    return [[label, m["host"], m["cpu_model"], f"{m['cores']} ({m['usable_cores']} usable)",
             _memory(m), _gpus(m), m.get("cuda") or "–", m["os"], m["python"],
             (m.get("node_id") or "–")[:16]] for label, m in machines.items()]


MACHINE_HEADER = ["machine", "host", "CPU", "cores", "memory", "GPUs (driver)", "CUDA", "OS",
                  "Python", "Ray node"]


def machines_blocks(machines: dict, environments: dict) -> list:
    """The machines a run used, and where each backend ran (with the variables its worker was
    started with, and its start and end), for the single-kind report's run page."""
    from .document import Paragraph, Section, Table
    if not machines:
        return []
    rows = []
    for name, env in environments.items():
        launch = env.launch or {}
        shown = launch.get("set", {})
        threads = shown.get("OMP_NUM_THREADS", "–")
        pids = launch.get("pids", {})
        rows.append([name, env.machine or "–", env.placement or "any",
                     threads, _visible(shown.get("CUDA_VISIBLE_DEVICES")),
                     ", ".join(f"{k}={v}" for k, v in launch.get("found_in_task", {}).items())
                     or "–",
                     f"{pids.get('worker', '–')} (parent {pids.get('worker_parent', '–')})",
                     _span(env), env.retried or "–"])
    return [Section("Machines", [
        Paragraph("Fingerprints as each machine saw itself (modelled on asv's machine.json "
                  "and MLPerf's system description); every record in results.json names its "
                  "machine."),
        Table(MACHINE_HEADER, _machine_rows(machines)),
        Table(["backend", "machine", "kind", "threads set", "CUDA_VISIBLE_DEVICES set",
               "set by Ray in the task", "worker pid", "ran", "retried"], rows)], "machines")]


def _visible(value: str | None) -> str:
    if value is None:
        return "not set"
    return value or "empty (no GPU visible)"


def _span(env) -> str:
    if env.started_at is None or env.ended_at is None:
        return "–"
    return f"{env.ended_at - env.started_at:.1f} s"


# ---- several machine kinds side by side ------------------------------------------------

def combined_document(run: dict, documents: list[dict], paths: list[str],
                      labels: list[str]) -> dict:
    """results.json of a run over several machine kinds: every kind's machines and records
    (each record names its machine and its kind), and where each kind's full run lies."""
    machines, results, specs = {}, [], {}
    for doc, label in zip(documents, labels):
        machines.update(doc["machines"])
        results += [{**r, "kind": label} for r in doc["results"]]
        for s in doc["specs"]:
            specs.setdefault(s["name"], s)
    return {"schema_version": report.RESULTS_SCHEMA_VERSION, "run": run, "machines": machines,
            "machine_runs": [{"kind": label, "path": path, "machines": sorted(doc["machines"])}
                             for doc, label, path in zip(documents, labels, paths)],
            "specs": list(specs.values()), "results": results}


def _verdict_cell(recs: list[dict]) -> str:
    if not recs:
        return "–"
    r = recs[0]
    if r["status"] != "ok":
        return f"{r['status']}"
    return "pass" if r["passed"] else "FAIL"


def _numerics(r: dict) -> str:
    c = next((c for c in r["checks"] if c["check"] == NUMERICS), None)
    return "–" if c is None or not isinstance(c["observed"], (int, float)) else \
        report._fmt(float(c["observed"]), 3)


def _timing_keys(recs: list[dict], batch: int) -> list[tuple[str, str]]:
    keys = []
    for r in recs:
        for t in r["timings"]:
            key = (t["phase"], t["mode"])
            if t["batch"] == batch and key not in keys:
                keys.append(key)
    return keys


def _median(r: dict, phase: str, mode: str, batch: int) -> str:
    t = next((t for t in r["timings"] if t["phase"] == phase and t["mode"] == mode
              and t["batch"] == batch), None)
    if t is None or not t.get("stats"):
        return "–"
    verdict = t.get("compiled_verdict")  # a compiled mode whose witness failed says so
    late = " (NOT compiled)" if isinstance(verdict, dict) and not verdict.get("compiled") else ""
    return f"{t['stats']['median_s'] * 1e3:.4g}{late}"


def render_combined(run: dict, documents: list[dict], paths: list[str],
                    labels: list[str]) -> str:
    """The report of a run over several machine kinds: the machines, a summary per backend
    and kind, each spec and backend on each kind side by side, the failures, and a link to each
    kind's full report."""
    by_kind = dict(zip(labels, documents))
    all_results = [r for d in documents for r in d["results"]]
    ok = all(r["passed"] for r in all_results)
    backends = list(dict.fromkeys(r["backend"] for r in all_results))
    specs = list(dict.fromkeys(s["name"] for d in documents for s in d["specs"]))
    esc = report.escape
    parts = [f"# Comparison report {esc(run['id'])}: {len(labels)} machine kinds side by "
             "side\n\n",
             f"{esc(run['command'])} at {esc(run['started'])}. Verdict: "
             f"**{'all checks passed' if ok else 'FAILURES'}**. Each machine kind ran every "
             "unit and is compared with its own NumPy reference; its full report is linked "
             "below.\n\n## Machines\n\n"]
    rows = []
    for label, doc in by_kind.items():
        for row in _machine_rows(doc["machines"]):
            rows.append([label, *row])
    parts.append(report._table(["kind", *MACHINE_HEADER], rows))
    parts.append("\n## Summary: each backend on each machine kind\n\n")
    rows = []
    for b in backends:
        row = [b]
        for doc in by_kind.values():
            recs = [r for r in doc["results"] if r["backend"] == b]
            n_ok = sum(r["status"] == "ok" for r in recs)
            failed = sum(not c["passed"] for r in recs for c in _all_checks(r))
            row.append(f"{n_ok}/{len(recs)} ran, {failed} checks failed, "
                       + ("pass" if recs and all(r["passed"] for r in recs) else "FAIL"))
        rows.append(row)
    parts.append(report._table(["backend", *labels], rows))
    parts.append("\n## Each spec and backend on each machine kind\n\nPer spec: the verdict, "
                 "the largest difference from the NumPy reference of the same kind (inference "
                 "mode), and each timed step's median in milliseconds at the spec's own batch "
                 "size.\n")
    for spec in specs:
        batch = next((s["input_shape"][0] for d in documents for s in d["specs"]
                      if s["name"] == spec and s.get("input_shape")), None)
        parts.append(f"\n### Spec `{spec}`\n\n")
        rows = []
        for b in backends:
            recs = {label: [r for r in doc["results"] if r["backend"] == b
                            and r["spec"] == spec] for label, doc in by_kind.items()}
            if not any(recs.values()):
                continue
            rows.append([b, "verdict", *(_verdict_cell(v) for v in recs.values())])
            if b != report.REFERENCE:
                rows.append([b, "numerics: max abs error", *(
                    _numerics(v[0]) if v else "–" for v in recs.values())])
            for phase, mode in _timing_keys([r for v in recs.values() for r in v], batch):
                rows.append([b, f"{phase} {mode}: median ms", *(
                    _median(v[0], phase, mode, batch) if v else "–" for v in recs.values())])
        parts.append(report._table(["backend", "what", *labels], rows))
    parts.append("\n## Failures\n\n")
    failures = []
    for label, doc in by_kind.items():
        for r in doc["results"]:
            if r["status"] != "ok":
                failures.append(f"- **{esc(label)} / {esc(r['backend'])} / {esc(r['spec'])}**: "
                                f"{esc(r['status'])}: {esc(r.get('error') or '')}\n")
            elif not r["passed"]:
                n = sum(not c["passed"] for c in _all_checks(r))
                failures.append(f"- **{esc(label)} / {esc(r['backend'])} / {esc(r['spec'])}**: "
                                f"{n} checks failed (see that kind's report)\n")
    parts.append("".join(failures) or "None: every backend ran every spec and passed every "
                 "check on every machine kind.\n")
    parts.append("\n## Each machine kind's full report\n\n")
    parts += [f"- {esc(label)}: [{esc(path)}/report.md]({path}/report.md)\n"
              for label, path in zip(labels, paths)]
    return "".join(parts)


def _all_checks(r: dict) -> list[dict]:
    return list(r["checks"]) + [c for p in r["params"] for c in p["checks"]]


def write_combined(run_dir: Path, run: dict, documents: list[dict], paths: list[str],
                   labels: list[str] | None = None) -> None:
    """report.md and results.json of a run over several machine kinds, written atomically."""
    labels = labels or [d["run"].get("machine") or d["run"]["id"] for d in documents]
    document = combined_document(run, documents, paths, labels)
    markdown = render_combined(run, documents, paths, labels)
    run_dir.mkdir(parents=True, exist_ok=True)
    report.write_atomic(run_dir / "results.json", json.dumps(document, indent=1, default=float))
    report.write_atomic(run_dir / "report.md", markdown)
