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
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from backends import layers, protocol

from . import initializers as inits
from . import known
from .checkpoints import FORMATS
from .files import open_regular, tail
from .memory import Profile

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
class DeclaredSize:
    """What a backend states its environment will take, before provisioning it. pip cannot say
    without downloading (``pip install --dry-run`` fetches every wheel it resolves:
    ``prepare_linked_requirements_more`` in its resolver, pypa/pip#12603), so the number is
    declared in backend.yaml, with where it comes from."""
    source: str
    disk_gb: float | None = None       # on disk once installed (decimal GB)
    download_gb: float | None = None   # the wheels pip fetches

    @classmethod
    def read(cls, entry: dict) -> "DeclaredSize":
        size = cls(str(entry["source"]), _gb(entry.get("disk_gb")), _gb(entry.get("download_gb")))
        if size.disk_gb is None and size.download_gb is None:
            raise ValueError("environment_size: give disk_gb or download_gb (with source)")
        return size

    def __str__(self) -> str:
        parts = [f"{v:g} GB {what}" for v, what in ((self.download_gb, "to download"),
                                                    (self.disk_gb, "on disk")) if v]
        return f"about {' and '.join(parts)}"


def _gb(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"environment_size: {value!r} is not a positive number of GB")
    return float(value)


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
    #: what it declares it does not support, with the reason: {"layers": {type: why},
    #: "phases": {phase: why}} (backend.yaml ``unsupported:``; empty: everything)
    unsupported: dict = field(default_factory=dict)
    #: "cuda": the GPU build, from requirements-cuda.txt, in .envs/<name>-cuda; any other
    #: FLAVOR likewise from requirements-FLAVOR.txt (torch's "torchvision": the torch suite's
    #: own environment with torchvision pinned, which the backend's environment never holds)
    flavor: str = ""
    #: per flavor ("cpu", "cuda"): the environment's declared size, stated before provisioning
    sizes: dict = field(default_factory=dict)
    #: known framework limitations and defects (harness.known), with reasons and sources
    limitations: tuple = ()
    defects: tuple = ()
    #: its native checkpoint: ``format`` (a key of harness.checkpoints.FORMATS), ``suffix``,
    #: ``suffix_required`` (the framework's loader picks the format by the file's name)
    checkpoint: dict = field(default_factory=dict)
    #: what its worker needs in memory (harness.memory), measured as backend.yaml says
    memory: Profile | None = None
    #: layer type -> spec field -> (the framework's own default, None if it has none, and its
    #: source): fields the frameworks default differently (backend.yaml ``option_defaults:``)
    option_defaults: dict = field(default_factory=dict)

    @property
    def requirements(self) -> Path:
        return self.folder / (f"requirements-{self.flavor}.txt" if self.flavor
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
    def size(self) -> "DeclaredSize | None":
        """The declared size of this flavor's environment (backend.yaml ``environment_size``)."""
        return self.sizes.get(self.flavor or "cpu")

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


#: what backend.yaml's ``unsupported:`` may name: node types of the registry (and layer
#: settings, ``TYPE.SETTING``), worker phases
CAPABILITIES = {"layers": layers.CAPABILITIES, "phases": protocol.PHASES}


def _unsupported(meta: dict, where: Path) -> dict:
    """backend.yaml's ``unsupported: {layers: {TYPE: why}, phases: {PHASE: why}}``, checked."""
    declared = meta.get("unsupported") or {}
    out = {}
    for kind, items in declared.items():
        if kind not in CAPABILITIES or not isinstance(items, dict):
            raise UserError(f"{display_path(where)}: unsupported: expected a mapping under "
                            f"{' / '.join(CAPABILITIES)}, got {kind!r}")
        for name, why in items.items():
            if name not in CAPABILITIES[kind] or not isinstance(why, str) or not why.strip():
                raise UserError(f"{display_path(where)}: unsupported.{kind}.{name}: expected "
                                f"one of {', '.join(CAPABILITIES[kind])} with a reason")
        out[kind] = dict(items)
    return out


def _default_init(raw) -> dict:
    """A declared default, normalized; ``fans: NAME`` (the registry's ``native_fans``: the
    framework scales it by fans of its own layout) kept; ``{per_gate: [INIT, ...]}``: a
    recurrent parameter whose gate blocks the framework draws each on its own
    (``harness.initializers.PerGate``)."""
    if isinstance(raw, dict) and "per_gate" in raw:
        return {"name": "per_gate", "gates": [_default_init(g) for g in raw["per_gate"]]}
    init = inits.normalize(raw)
    if isinstance(raw, dict) and "fans" in raw:
        init["fans"] = str(raw["fans"])
    return init


def _option_defaults(meta: dict, where: Path) -> dict:
    """backend.yaml's ``option_defaults: {TYPE: {FIELD: {value: V, source: "..."}}}``, each a
    registry layer type's field, with where the value is from."""
    out = {}
    for layer, fields in (meta.get("option_defaults") or {}).items():
        lt = layers.LAYERS.get(layer)
        for name, entry in (fields or {}).items() if isinstance(fields, dict) else [(None, 0)]:
            if lt is None or name not in lt.fields or not isinstance(entry, dict) \
                    or set(entry) != {"value", "source"} or not str(entry["source"]).strip():
                raise UserError(f"{display_path(where)}: option_defaults.{layer}.{name}: expected "
                                "a registry layer type's field with {value: V, source: \"...\"}")
            out.setdefault(layer, {})[name] = (entry["value"], str(entry["source"]))
    return out


def _load_backend(folder: Path) -> Backend:
    meta = _read_meta(folder)
    try:
        limitations, defects = known.read_declarations(folder.name, meta)
    except known.DeclarationError as exc:
        raise UserError(f"{display_path(folder / 'backend.yaml')}: {exc}") from None
    try:
        defaults = {layer: {role: _default_init(init) for role, init in roles.items()}
                    for layer, roles in meta.get("defaults", {}).items()}
        sizes = {flavor: DeclaredSize.read(entry)
                 for flavor, entry in (meta.get("environment_size") or {}).items()}
        checkpoint = dict(meta.get("checkpoint") or {})
        if checkpoint.get("format") not in FORMATS:
            raise KeyError(f"checkpoint.format: {checkpoint.get('format')!r} is not one of "
                           f"{', '.join(FORMATS)}")
        return Backend(folder.name, folder, str(meta.get("framework", folder.name)), defaults,
                       tuple(meta.get("devices", ("cpu", "cuda"))),
                       tuple(meta.get("imports", ())), dict(meta.get("semantics") or {}),
                       _unsupported(meta, folder / "backend.yaml"), sizes=sizes,
                       limitations=limitations, defects=defects,
                       checkpoint=checkpoint, memory=Profile.from_yaml(meta["memory"]),
                       option_defaults=_option_defaults(meta, folder / "backend.yaml"))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
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


def parse_python_overrides(items: list[str], backends: dict[str, Backend],
                           on_nodes: bool = False) -> dict[str, Path]:
    """``--python NAME=PATH`` pairs; PATH must be an existing interpreter (``on_nodes``: a
    path on the Ray nodes, checked there)."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--python: expected NAME=PATH, got {item!r}")
        if name not in backends:
            raise UserError(f"--python: unknown backend {name!r}; known: {', '.join(backends)}")
        exe = Path(path).expanduser()
        if on_nodes:
            out[name] = exe
            continue
        if not exe.is_file() or not os.access(exe, os.X_OK):
            raise UserError(f"--python: {name}={path}: no executable interpreter at that path")
        out[name] = exe
    return out


def _run_logged(cmd: list, log, follow=None) -> None:
    """``cmd`` with its output appended to ``log``; ``follow()`` is called twice a second
    while it runs (and once after)."""
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if follow:
                    follow()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if follow:
        follow()
    if rc:
        raise subprocess.CalledProcessError(rc, cmd)




def ensure_env(backend: Backend, progress=print) -> Path:
    """The backend's interpreter, creating or refreshing its environment first if needed: the
    declared size is stated before anything is fetched, then every file pip fetches (with its
    size), and the size on disk at the end."""
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
        progress(f"[setup] {backend.env_name}: {size_statement(backend)}; "
                 f"{format_bytes(shutil.disk_usage(root).free)} free in {root}")
        started = time.monotonic()
        shutil.rmtree(backend.env_dir, ignore_errors=True)
        fetched = PipProgress(backend, log_path, progress)
        try:
            with open(log_path, "w") as log:
                _run_logged([sys.executable, "-m", "venv", backend.env_dir], log)
                _run_logged([backend.env_python, "-m", "pip", "install", "--no-input",
                             "--progress-bar", "off", "-r", backend.requirements], log,
                            fetched)
        except (OSError, subprocess.CalledProcessError) as exc:
            shutil.rmtree(backend.env_dir, ignore_errors=True)
            raise EnvError(f"creating the {backend.env_name} environment failed ({exc}); "
                           f"log {log_path}:\n{tail(log_path)}") from None
        stamp = backend.env_dir / STAMP
        stamp.write_text(json.dumps({**backend.fingerprint(), "created": time.time()}))
        progress(f"[setup] {backend.env_name}: ready in {time.monotonic() - started:.0f} s; "
                 f"fetched {fetched.files} files ({format_bytes(fetched.bytes)}); "
                 f"{format_bytes(disk_usage(backend.env_dir))} on disk")
        return backend.env_python


def size_statement(backend: Backend) -> str:
    """How large the environment will be, said before anything is fetched: the size
    backend.yaml declares for this flavor, and where that number comes from."""
    where = display_path(backend.folder / "backend.yaml")
    if backend.size is None:
        return (f"no size declared for it ({where}: environment_size.{backend.flavor or 'cpu'}); "
                "each file's size follows as pip fetches it")
    return f"{backend.size} (declared in {where}: {backend.size.source})"


def format_bytes(n: float) -> str:
    """A byte count as pip writes one (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def disk_usage(path: Path) -> int:
    """Bytes a directory tree takes on disk (allocated blocks, as ``du``; links not followed)."""
    total = 0
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                pass
    return total


class PipProgress:
    """Follows pip's log while it installs and says, as each file is fetched, its name and the
    size pip announces, with the running count and total; every ``heartbeat_s`` without news,
    that it is still working (a multi-GB wheel takes minutes)."""

    #: what pip writes as it starts fetching a file ("Downloading X (906.4 MB)"; a URL for
    #: other indexes) or takes it from its cache
    FETCH = re.compile(r"^\s*(Downloading|Using cached) (\S+) \(([\d.]+) (bytes|kB|MB|GB)\)")
    UNITS = {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
    INSTALLING = "Installing collected packages: "

    def __init__(self, backend: Backend, log_path: Path, progress, heartbeat_s: float = 30.0):
        self.name, self.log_path, self.progress = backend.env_name, log_path, progress
        self.expected = backend.size.download_gb * 1e9 if backend.size and \
            backend.size.download_gb else None
        self.heartbeat_s, self.offset, self.partial = heartbeat_s, 0, b""
        self.files, self.bytes, self.last = 0, 0.0, ""
        self.said = self.started = time.monotonic()

    def __call__(self) -> None:
        try:
            with open_regular(self.log_path) as fh:
                fh.seek(self.offset)
                data = fh.read(1 << 20) or b""
        except OSError:
            data = b""
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()[-4096:]
        for raw in lines:
            self._line(raw.decode("utf-8", "replace"))
        now = time.monotonic()
        if now - self.said >= self.heartbeat_s:
            self._say(f"still working ({now - self.started:.0f} s so far; {self.files} files, "
                      f"{format_bytes(self.bytes)} fetched" + (f"; last: {self.last}"
                                                               if self.last else "") + ")")

    def _line(self, line: str) -> None:
        match = self.FETCH.match(line)
        if match and not match.group(2).endswith(".metadata"):  # PEP 658 metadata: bytes,
            verb, where, amount, unit = match.groups()
            size = float(amount) * self.UNITS[unit]
            self.files += 1
            self.bytes += size
            self.last = where.rstrip("/").rsplit("/", 1)[-1]
            total = format_bytes(self.bytes) + (f" of about {format_bytes(self.expected)}"
                                                if self.expected else "")
            self._say(f"{'fetching' if verb == 'Downloading' else 'from pip cache'} "
                      f"{self.last} ({amount} {unit}); {self.files} files, {total} so far")
        elif line.startswith(self.INSTALLING):
            count = len(line[len(self.INSTALLING):].split(","))
            self._say(f"installing {count} packages")

    def _say(self, text: str) -> None:
        self.progress(f"[setup] {self.name}: {text}")
        self.said = time.monotonic()
