"""Run directories: each run is built complete under a hidden name and renamed into place, so it
appears whole or not at all and no two runs share one; ``reports/latest`` follows the newest;
what killed runs left behind is swept."""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .envs import ROOT, UserError


#: where runs go (HARNESS_REPORTS_DIR moves it, e.g. for tests)
REPORTS_DIR = Path(os.environ.get("HARNESS_REPORTS_DIR") or ROOT / "reports")


@dataclass
class RunDir:
    """Where a run's files go: built complete in ``staging`` (a hidden sibling), then renamed
    to ``final`` in one step, so a run directory appears whole or not at all and never mixes
    two runs. ``replace``: ``final`` may hold an earlier run (--out reused), replaced whole."""
    final: Path
    run_id: str
    staging: Path
    replace: bool = False

    def publish(self) -> None:
        """``staging`` -> ``final``; an earlier run in ``final`` (--out reused) is replaced
        whole. A reserved run id's ``final`` never exists: the rename refuses to replace."""
        old = None
        if self.replace and (self.final.exists() or self.final.is_symlink()):
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.rename(self.final, old)
        os.rename(self.staging, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


#: what a run writes into its directory (an --out holding anything else is not a run's)
RUN_FILES = ("report.md", "results.json")


def _stray_entry(path: Path) -> str | None:
    """The first entry of the existing directory ``path`` that no run writes (None when it is
    empty or an earlier run's)."""
    names = sorted(os.listdir(path))
    if names and not set(names) & set(RUN_FILES):
        return names[0]
    return next((n for n in names if n not in (*RUN_FILES, "logs", "machines", "specs") and
                 not n.endswith((".png", ".md", ".html"))), None)


def new_run_dir(out: str | None) -> RunDir:
    """A run directory that no other run can get, even one started in the same second: under
    reports/, ids are reserved under a lock (reports/.lock) by their staging directory."""
    if out:
        return _out_dir(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        REPORTS_DIR.mkdir(parents=True, exist_ok=True)
        with open(REPORTS_DIR / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed: one run chooses at a time
            for n in range(1, 10_000):
                run_id = stamp if n == 1 else f"{stamp}-{n}"
                final = REPORTS_DIR / run_id
                if final.exists() or final.is_symlink() or \
                        any(REPORTS_DIR.glob(f".{run_id}.partial-*")):
                    continue
                staging = REPORTS_DIR / f".{run_id}.partial-{os.getpid()}"
                staging.mkdir()
                return RunDir(final, run_id, staging)
    except OSError as exc:
        raise UserError(f"cannot write a run directory under {REPORTS_DIR} "
                        f"({exc.strerror or exc})") from None
    raise UserError(f"cannot find a free run directory under {REPORTS_DIR}")


def _out_dir(out: str) -> RunDir:
    """--out DIR: a new directory, an empty one, or an earlier run's (replaced whole at the
    end); never a symbolic link, a file, or a directory holding anything else."""
    if Path(out).is_symlink():  # dangling or not: the run would land somewhere else
        raise UserError(f"--out: {out} is a symbolic link; give a directory path")
    path = Path(os.path.abspath(out))
    if not path.name or path.name in (".", ".."):
        raise UserError(f"--out: {out} is not a directory a run can be written to")
    try:
        if path.exists():
            if not path.is_dir():
                raise UserError(f"--out: {out} exists and is not a directory")
            stray = _stray_entry(path)
            if stray is not None:
                raise UserError(f"--out: {out} holds {stray!r}, which is not a run's file; give "
                                "a new or empty directory, or an earlier run's (it is replaced "
                                "whole)")
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep(path.parent, f".{glob.escape(path.name)}.partial-*")
        staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        raise UserError(f"--out: {out}: cannot write there ({exc.strerror or exc})") from None
    return RunDir(path, path.name, staging, replace=True)


def sweep_leftovers() -> None:
    """Remove what runs killed without a chance to clean up left behind (SIGKILL): their
    staging directories and temporary work directories, named with their dead pid."""
    _sweep(REPORTS_DIR, ".*.partial-*")
    _sweep(Path(tempfile.gettempdir()), f"{TMP_PREFIX}*",
           lambda name: name[len(TMP_PREFIX):].split("-", 1)[0])


def _sweep(folder: Path, pattern: str, pid_of=lambda name: name.rsplit("-", 1)[-1]) -> None:
    """Remove the entries of ``folder`` matching ``pattern`` whose owner (the pid in the name)
    is no longer running."""
    try:
        candidates = list(folder.glob(pattern))
    except OSError:
        return
    for path in candidates:
        pid = pid_of(path.name)
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


TMP_PREFIX = "harness-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def point_latest(run_dir: Path) -> None:
    """``reports/latest`` -> the newest run, replaced atomically; where ``latest`` is not a
    symbolic link (a directory or file of the user's), it is left alone and a warning says so:
    the run itself is published either way."""
    link, tmp = REPORTS_DIR / "latest", REPORTS_DIR / f".latest.{os.getpid()}.tmp"
    if link.exists() and not link.is_symlink():
        print(f"warning: {link} is not a symbolic link, so it was left alone (not pointed at "
              f"{run_dir.name})", file=sys.stderr)
        return
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)
    except OSError as exc:  # replaced by a directory in between, a read-only folder, ...
        if tmp.is_symlink():
            tmp.unlink()
        print(f"warning: cannot point {link} at {run_dir.name} ({exc.strerror or exc})",
              file=sys.stderr)
