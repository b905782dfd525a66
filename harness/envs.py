"""Backends and their environments: discovery from ``backends/<name>/``, one virtual environment
per backend created from its pinned ``requirements.txt`` and reused while that file (and the
Python that built it) are unchanged. Nothing here imports a framework.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import initializers as inits
from .files import tail

ROOT = Path(__file__).resolve().parent.parent
BACKENDS_DIR = ROOT / "backends"
STAMP = "harness-env.json"


class UserError(Exception):
    """A mistake on the command line or in a file: reported in one line, exit status 2."""


class EnvError(Exception):
    """An environment could not be created; the message carries the log's tail."""


def display_path(path) -> str:
    """A path relative to the project when it lies inside it (shorter in messages)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def env_root() -> Path:
    return Path(os.environ.get("HARNESS_ENV_DIR", ROOT / ".envs"))


@dataclass(frozen=True)
class Backend:
    """A backend folder: ``adapter.py``, ``requirements.txt`` and ``backend.yaml``."""
    name: str
    folder: Path
    framework: str  # display name, e.g. "Keras 3 (JAX)"
    defaults: dict  # layer type -> role -> normalized canonical init
    devices: tuple[str, ...] = ("cpu", "cuda")  # what --device may ask of it
    imports: tuple[str, ...] = ()  # top-level modules of its framework (never in the parent)
    semantics: dict = field(default_factory=dict)  # declared semantic facts the checks use
    flavor: str = ""  # "cuda": the GPU build, from requirements-cuda.txt, in .envs/<name>-cuda

    @property
    def requirements(self) -> Path:
        return self.folder / ("requirements-cuda.txt" if self.flavor == "cuda"
                              else "requirements.txt")

    @property
    def env_name(self) -> str:
        return f"{self.name}-{self.flavor}" if self.flavor else self.name

    @property
    def env_dir(self) -> Path:
        return env_root() / self.env_name

    def for_device(self, device: str) -> "Backend":
        """The GPU build of this backend for ``cuda`` where it has one (requirements-cuda.txt),
        else itself."""
        if device == "cuda" and (self.folder / "requirements-cuda.txt").is_file():
            return dataclasses.replace(self, flavor="cuda")
        return self

    @property
    def env_python(self) -> Path:
        return self.env_dir / "bin" / "python"

    def fingerprint(self) -> dict:
        digest = hashlib.sha256(self.requirements.read_bytes()).hexdigest()
        return {"requirements_sha256": digest, "base_python": sys.version.split()[0]}

    def env_state(self) -> str:
        """``ready``, ``missing`` or ``stale`` (requirements changed since it was built)."""
        stamp = self.env_dir / STAMP
        if not stamp.exists() or not self.env_python.exists():
            return "missing"
        try:
            have = json.loads(stamp.read_text())
        except (OSError, ValueError):
            return "stale"
        return "ready" if {k: have.get(k) for k in self.fingerprint()} == self.fingerprint() \
            else "stale"


def _read_meta(folder: Path, seen: tuple[str, ...] = ()) -> dict:
    """A backend.yaml, with ``extends: OTHER`` resolved: OTHER's keys, then this file's."""
    meta_file = folder / "backend.yaml"
    try:
        meta = yaml.safe_load(meta_file.read_text()) or {}
        if not isinstance(meta, dict):
            raise TypeError("not a mapping")
    except (OSError, yaml.YAMLError, TypeError) as exc:
        raise UserError(f"{display_path(meta_file)}: cannot read backend metadata: {exc}") \
            from None
    parent = meta.pop("extends", None)
    if parent is None:
        return meta
    if parent in seen or not (BACKENDS_DIR / str(parent) / "backend.yaml").is_file():
        raise UserError(f"{display_path(meta_file)}: extends: {parent!r} is not another "
                        "backend's folder (or extends it in a cycle)")
    return {**_read_meta(BACKENDS_DIR / parent, seen + (folder.name,)), **meta}


def _load_backend(folder: Path) -> Backend:
    meta = _read_meta(folder)
    try:
        defaults = {layer: {role: inits.normalize(init) for role, init in roles.items()}
                    for layer, roles in meta.get("defaults", {}).items()}
        return Backend(folder.name, folder, str(meta.get("framework", folder.name)), defaults,
                       tuple(meta.get("devices", ("cpu", "cuda"))),
                       tuple(meta.get("imports", ())), dict(meta.get("semantics") or {}))
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{display_path(folder / 'backend.yaml')}: cannot read backend "
                        f"metadata: {type(exc).__name__}: {exc}") from None


def discover() -> dict[str, Backend]:
    """Every folder under backends/ with an adapter.py, by name."""
    return {d.name: _load_backend(d) for d in sorted(BACKENDS_DIR.iterdir())
            if (d / "adapter.py").exists()}


def select(names: list[str] | None) -> list[Backend]:
    known = discover()
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise UserError(f"--backend: unknown backend {unknown[0]!r}; known: {', '.join(known)}")
    return [known[n] for n in (names or known)]


def parse_python_overrides(items: list[str], backends: dict[str, Backend]) -> dict[str, Path]:
    """``--python NAME=PATH`` pairs; PATH must be an existing interpreter."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--python: expected NAME=PATH, got {item!r}")
        if name not in backends:
            raise UserError(f"--python: unknown backend {name!r}; known: {', '.join(backends)}")
        exe = Path(path).expanduser()
        if not exe.is_file() or not os.access(exe, os.X_OK):
            raise UserError(f"--python: {name}={path}: no executable interpreter at that path")
        out[name] = exe
    return out


def _run_logged(cmd: list, log) -> None:
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    rc = subprocess.call([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
    if rc:
        raise subprocess.CalledProcessError(rc, cmd)


def gpu_present() -> bool:
    """An NVIDIA driver is loaded (what ``--device auto`` takes as "use the CUDA builds")."""
    return shutil.which("nvidia-smi") is not None and Path("/proc/driver/nvidia/version").exists()


def ensure_env(backend: Backend, progress=print) -> Path:
    """The backend's interpreter, creating or refreshing its environment first if needed."""
    root = env_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{backend.env_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two harness runs never build one env at once
        state = backend.env_state()
        if state == "ready":
            return backend.env_python
        log_path = root / f"{backend.env_name}-setup.log"
        progress(f"[setup] {backend.env_name}: environment {state}; creating {backend.env_dir} and "
                 f"installing {display_path(backend.requirements)} (log: {log_path})")
        started = time.monotonic()
        shutil.rmtree(backend.env_dir, ignore_errors=True)
        try:
            with open(log_path, "w") as log:
                _run_logged([sys.executable, "-m", "venv", backend.env_dir], log)
                _run_logged([backend.env_python, "-m", "pip", "install", "--no-input",
                             "-r", backend.requirements], log)
        except (OSError, subprocess.CalledProcessError) as exc:
            shutil.rmtree(backend.env_dir, ignore_errors=True)
            raise EnvError(f"creating the {backend.env_name} environment failed ({exc}); "
                           f"log {log_path}:\n{tail(log_path)}") from None
        stamp = backend.env_dir / STAMP
        stamp.write_text(json.dumps({**backend.fingerprint(), "created": time.time()}))
        progress(f"[setup] {backend.env_name}: ready in {time.monotonic() - started:.0f} s")
        return backend.env_python
