"""``python -m harness merge RUN ...``: run directories made on different machines (without Ray)
merged into one run with the machine dimension, as a Ray run over several machine kinds writes
it. Every input is untrusted: its files are read only if they are regular files (never through a
symbolic link) within a size bound, and each results.json must be this harness's schema, checked
field by field; anything else is one line naming the file and the field (exit status 2).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import jsonschema

from . import machine as machine_mod
from . import report
from .envs import UserError
from .files import open_regular, read_regular
from .machine_report import machine_dir, write_combined
from .rundir import new_run_dir, point_latest, sweep_leftovers
from .signals import hold_signals

#: the most bytes of one input file that merge reads
RESULTS_LIMIT = 256 << 20
REPORT_LIMIT = 64 << 20
FIGURE_LIMIT = 32 << 20
LOG_LIMIT = 8 << 20
#: the files of a run that are carried into the merged run (beside results.json)
CARRIED = re.compile(r"([A-Za-z0-9_-]{1,120}\.(md|html|png)|logs/[A-Za-z0-9_.-]{1,120}\.log|"
                     r"specs/[A-Za-z0-9_][A-Za-z0-9_.-]{0,119}\.(md|html))\Z")

_STR = {"type": "string", "maxLength": 100_000}
_CHECK = {"type": "object", "required": ["check", "passed"],
          "properties": {"check": _STR, "passed": {"type": "boolean"}}}
_TIMING = {"type": "object", "required": ["mode", "phase", "batch", "stats"],
           "properties": {"mode": _STR, "phase": _STR, "batch": {"type": "integer"},
                          "stats": {"oneOf": [{"type": "null"}, {
                              "type": "object", "required": ["median_s"],
                              "properties": {"median_s": {"type": "number"}}}]}}}
#: the part of results.json that merging and the side-by-side report read
SCHEMA = {
    "type": "object",
    "required": ["schema_version", "run", "machines", "specs", "results"],
    "properties": {
        "schema_version": {"const": report.RESULTS_SCHEMA_VERSION},
        "run": {"type": "object", "required": ["id", "command", "started"],
                "properties": {"id": _STR, "command": _STR, "started": _STR,
                               "machine": _STR}},
        "machines": {"type": "object", "maxProperties": 10_000,
                     "additionalProperties": {"type": "object"}},
        "specs": {"type": "array", "items": {
            "type": "object", "required": ["name", "input_shape"],
            "properties": {"name": _STR, "input_shape": {
                "type": "array", "minItems": 1, "items": {"type": "integer"}}}}},
        "results": {"type": "array", "items": {
            "type": "object",
            "required": ["spec", "backend", "status", "passed", "checks", "params", "timings",
                         "machine"],
            "properties": {
                "spec": _STR, "backend": _STR, "status": _STR,
                "error": {"type": ["string", "null"]}, "passed": {"type": "boolean"},
                "machine": _STR, "checks": {"type": "array", "items": _CHECK},
                "params": {"type": "array", "items": {
                    "type": "object", "required": ["checks"],
                    "properties": {"checks": {"type": "array", "items": _CHECK}}}},
                "timings": {"type": "array", "items": _TIMING}}}},
        "machine_runs": {"type": "array", "items": {
            "type": "object", "required": ["kind", "path"],
            "properties": {"kind": _STR, "path": _STR}}},
    },
}


def _read(path: Path, limit: int, command: str = "merge") -> bytes:
    """A file of an input run: a regular file (not a symbolic link), at most ``limit`` bytes."""
    if path.is_symlink():
        raise UserError(f"{command}: {path}: a symbolic link; a run's files are read only as "
                        "regular files")
    try:
        with open_regular(path) as fh:
            return read_regular(fh, limit)
    except FileNotFoundError:
        raise UserError(f"{command}: {path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{command}: {path}: {exc.strerror or exc}") from None


def _where(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(the document)"


class _HugeInteger(Exception):
    pass


#: the most digits of an integer in a results.json (bytes of memory, counts: never near 20);
#: more would only overflow where it meets a float
MAX_INT_DIGITS = 20


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _HugeInteger(f"an integer of {len(text.lstrip('-')):,} digits ({text[:12]}...), "
                           f"more than the {MAX_INT_DIGITS} a results.json holds")
    return int(text)


def read_results(path: Path, schema: dict, command: str, reads: str,
                 message: Callable[[str], str]) -> dict:
    """An input run's results.json: a bounded regular file, JSON, of this harness's results
    schema version (``reads``: what the command does with that version, in its refusal), and
    valid against ``schema`` (``message`` shortens the validator's words)."""
    data = _read(path, RESULTS_LIMIT, command)
    try:
        document = json.loads(data.decode("utf-8"), parse_int=_bounded_int)
    except _HugeInteger as exc:
        raise UserError(f"{command}: {path}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(f"{command}: {path}: not JSON ({type(exc).__name__}: {exc})") from None
    if isinstance(document, dict) and document.get("schema_version") != \
            report.RESULTS_SCHEMA_VERSION:
        raise UserError(f"{command}: {path}: schema_version "
                        f"{repr(document.get('schema_version'))[:40]}, "
                        f"but this harness {reads}")
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(document))
    if error is not None:
        raise UserError(f"{command}: {path}: {_where(error)}: {message(error.message)}")
    return document


def read_document(path: Path) -> dict:
    """A run's results.json, checked against the schema this harness writes."""
    document = read_results(
        path, SCHEMA, "merge",
        f"merges version {report.RESULTS_SCHEMA_VERSION} (rerun compare with this harness on "
        "that machine)", lambda m: m[:300])
    for label, fingerprint in document["machines"].items():
        try:
            machine_mod.from_json(fingerprint, f"machines.{label}")
        except ValueError as exc:
            raise UserError(f"merge: {path}: {exc}") from None
    for i, r in enumerate(document["results"]):
        for j, t in enumerate(r["timings"]):
            median = (t["stats"] or {}).get("median_s", 1.0)
            if not (math.isfinite(median) and median > 0):  # jsonschema takes NaN as a number
                raise UserError(f"merge: {path}: results[{i}].timings[{j}].stats.median_s: "
                                f"{median!r} is no time (finite and positive)")
        if r["machine"] not in document["machines"]:
            raise UserError(f"merge: {path}: results[{i}].machine: {r['machine'][:100]!r} is "
                            "not one of its machines")
    return document


def machine_runs(run: Path) -> list[tuple[Path, dict]]:
    """The single-machine runs in a run directory: itself, or for a run over several machine
    kinds, each of its ``machines/<kind>`` runs."""
    document = read_document(run / "results.json")
    if "machine_runs" not in document:
        return [(run, document)]
    out = []
    for i, entry in enumerate(document["machine_runs"]):
        sub = entry["path"]
        if not re.fullmatch(r"machines/[A-Za-z0-9_.-]{1,100}", sub) or ".." in sub:
            raise UserError(f"merge: {run / 'results.json'}: machine_runs[{i}].path: "
                            f"{sub[:100]!r} is not a machines/<kind> directory")
        folder = run / sub
        if folder.is_symlink() or not folder.is_dir():
            raise UserError(f"merge: {folder}: not a directory (a symbolic link is refused)")
        out += machine_runs(folder)
    return out


def _label(run: Path, document: dict) -> str:
    """How the merged report names an input: its kind, else its one machine, else its id."""
    if document["run"].get("machine"):
        return document["run"]["machine"]
    if len(document["machines"]) == 1:
        return next(iter(document["machines"]))
    return document["run"]["id"]


def merge(runs: list[str], out_dir: Path, run: dict) -> list[str]:
    """Merge the runs into ``out_dir`` (a staging directory); returns the machine kinds."""
    inputs: list[tuple[Path, dict]] = []
    for given in runs:
        path = Path(given)
        if not path.is_dir():
            raise UserError(f"merge: {given}: not a run directory")
        inputs += machine_runs(path.resolve())
    if len(inputs) < 2:
        raise UserError("merge: give at least two runs (made on different machines) to merge")
    labels, paths, documents = [], [], []
    for folder, document in inputs:
        label = _label(folder, document)
        base, n = label, 2
        while label in labels:
            label, n = f"{base} #{n}", n + 1
        labels.append(label)
        sub = f"machines/{machine_dir(label)}"
        m = 2
        while sub in paths:
            sub, m = f"machines/{machine_dir(label)}-{m}", m + 1
        paths.append(sub)
        _carry(folder, out_dir / sub)
        documents.append(document)
    write_combined(out_dir, run, documents, paths, labels)
    return labels


def _carry(source: Path, target: Path) -> None:
    """Copy an input run's results.json, report, figures and logs (regular files only, each
    within its bound); nothing else of it."""
    target.mkdir(parents=True)
    (target / "results.json").write_bytes(_read(source / "results.json", RESULTS_LIMIT))
    names = [n for n in sorted(os.listdir(source)) if CARRIED.match(n)]
    for sub in ("logs", "specs"):
        if (source / sub).is_dir() and not (source / sub).is_symlink():
            names += [f"{sub}/{n}" for n in sorted(os.listdir(source / sub))
                      if CARRIED.match(f"{sub}/{n}")]
    limits = {"md": REPORT_LIMIT, "html": REPORT_LIMIT, "png": FIGURE_LIMIT, "log": LOG_LIMIT}
    for name in names:
        data = _read(source / name, limits[name.rsplit(".", 1)[1]])
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)


def merge_command(args) -> int:
    """Merge run directories made on different machines into one run with the machine
    dimension: exit 0 when every merged record passed, 1 when any failed, 2 for a bad input."""
    sweep_leftovers()
    place = new_run_dir(args.out)
    try:
        run = {"id": place.run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "command": "python -m harness " + " ".join(sys.argv[1:]), "executor": "merge",
               "merged": list(args.run)}
        labels = merge(args.run, place.staging, run)
        passed = all(r["passed"] for r in json.loads(
            (place.staging / "results.json").read_text())["results"])
    except BaseException:
        place.discard()
        raise
    hold_signals()
    place.publish()
    if not args.out:
        point_latest(place.final)
    print(f"merged {len(labels)} machine runs: {', '.join(labels)}")
    print(f"report: {place.final / 'report.md'}")
    return 0 if passed else 1
