"""Is an NVIDIA GPU usable here, and why (not)? The one answer that ``compare``, ``convert``,
``setup`` and benchmarks/gpu_check.py act on before anything is provisioned or run: the GPUs the
driver's own tool lists (``nvidia-smi``; without it, the driver's ``/proc/driver/nvidia``),
narrowed to those ``CUDA_VISIBLE_DEVICES`` leaves visible. Nothing here imports a framework.

Tests replace ``nvidia_smi`` (and ``PROC_DRIVER``) in-process to stand for a machine with or
without a GPU; no option of the command line fakes one.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from .envs import UserError

#: what nvidia-smi is asked: one CSV line per GPU, in its (PCI bus) order
QUERY = ["--query-gpu=index,uuid,name,driver_version,memory.total", "--format=csv,noheader"]
#: the kernel driver's own view, read when nvidia-smi is not installed (e.g. a container given
#: only the "compute" driver capability)
PROC_DRIVER = Path("/proc/driver/nvidia")
SMI_TIMEOUT_S = 20


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU as the driver lists it."""
    index: int
    uuid: str
    name: str
    driver: str
    memory: str      # as listed, e.g. "81559 MiB" ("unknown" from /proc)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GpuProbe:
    """The GPUs a CUDA program started here would see (empty: none), and in words what was
    looked for and found."""
    gpus: tuple[Gpu, ...]
    why: str

    @property
    def usable(self) -> bool:
        return bool(self.gpus)


@dataclass(frozen=True)
class DeviceChoice:
    """What ``--device`` became for a run: ``device`` is ``cpu`` or ``cuda``; ``why`` says
    what decided it (empty for an explicit ``cpu``)."""
    requested: str
    device: str
    why: str
    gpus: tuple[Gpu, ...] = ()


def nvidia_smi() -> tuple[int, str] | None:
    """(exit status, output) of nvidia-smi's GPU query; None when nvidia-smi is not on PATH."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *QUERY], capture_output=True, text=True,
                              timeout=SMI_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 124, f"no answer within {SMI_TIMEOUT_S} s"
    except OSError as exc:
        return 126, str(exc)
    return proc.returncode, proc.stdout + proc.stderr


def probe_gpus(environ=None) -> GpuProbe:
    """The GPUs usable here, from nvidia-smi (else /proc/driver/nvidia) and
    CUDA_VISIBLE_DEVICES (``environ``, default os.environ)."""
    environ = os.environ if environ is None else environ
    mask = environ.get("CUDA_VISIBLE_DEVICES")
    if mask is not None and not mask.strip():
        return GpuProbe((), "CUDA_VISIBLE_DEVICES is set and empty: every GPU is hidden")
    answer = nvidia_smi()
    if answer is None:
        listed, source = _proc_gpus(PROC_DRIVER), f"{PROC_DRIVER}/gpus"
        if listed is None:
            return GpuProbe((), f"looked for the NVIDIA driver: no nvidia-smi on PATH and no "
                                f"{PROC_DRIVER}")
    else:
        rc, output = answer
        if rc != 0:
            first = next((line.strip() for line in output.splitlines() if line.strip()),
                         "no output")
            return GpuProbe((), f"nvidia-smi failed (exit status {rc}): {first[:300]}")
        listed, source = _parse_smi(output), "nvidia-smi"
    if not listed:
        return GpuProbe((), f"{source} lists no GPU")
    visible = listed if mask is None else _visible(listed, mask)
    if not visible:
        return GpuProbe((), f"CUDA_VISIBLE_DEVICES={mask!r} hides every GPU {source} lists "
                            f"({', '.join(f'{g.index}: {g.uuid}' for g in listed)})")
    facts = "; ".join(f"{g.index}: {g.name} (driver {g.driver}, {g.memory})" for g in visible)
    return GpuProbe(tuple(visible), f"{source} lists {len(visible)} usable GPU"
                    f"{'s' if len(visible) > 1 else ''}: {facts}"
                    + (f" (CUDA_VISIBLE_DEVICES={mask!r})" if mask is not None else ""))


def choose_device(requested: str, probe=None) -> DeviceChoice:
    """``--device`` as a run will use it. ``cuda`` without a usable GPU is a UserError that
    says what was looked for; ``auto`` takes the GPU only when one is usable."""
    if requested == "cpu":
        return DeviceChoice("cpu", "cpu", "")
    if requested not in ("auto", "cuda"):
        raise UserError(f"--device: expected auto, cpu or cuda, got {requested!r}")
    found = (probe or probe_gpus)()
    if found.usable:
        return DeviceChoice(requested, "cuda", found.why, found.gpus)
    if requested == "cuda":
        raise UserError(f"--device cuda: no usable NVIDIA GPU ({found.why}); nothing was "
                        "provisioned or run (--device cpu runs on the CPU; auto takes a GPU "
                        "only where one is usable)")
    return DeviceChoice("auto", "cpu", f"no usable NVIDIA GPU: {found.why}")


def _parse_smi(output: str) -> list[Gpu]:
    """nvidia-smi's CSV lines (index, uuid, name, driver_version, memory.total)."""
    gpus = []
    for row in csv.reader(output.splitlines(), skipinitialspace=True):
        if len(row) != 5 or not row[0].strip().isdigit():
            continue
        index, uuid, name, driver, memory = (field.strip() for field in row)
        gpus.append(Gpu(int(index), uuid, name, driver, memory))
    return gpus


def _proc_gpus(root: Path) -> list[Gpu] | None:
    """The GPUs the kernel driver lists under ``root/gpus/<PCI bus id>/information``, in bus
    order (nvidia-smi's); None when there is no driver (no ``root``)."""
    if not root.is_dir():
        return None
    try:
        version = (root / "version").read_text(errors="replace").split()
        driver = next((w for w in version if w[:1].isdigit() and "." in w), "unknown")
    except OSError:
        driver = "unknown"
    gpus = []
    try:
        folders = sorted(p for p in (root / "gpus").iterdir() if p.is_dir())
    except OSError:
        return []
    for i, folder in enumerate(folders):
        info = {}
        try:
            for line in (folder / "information").read_text(errors="replace").splitlines():
                key, sep, value = line.partition(":")
                if sep:
                    info[key.strip()] = value.strip()
        except OSError:
            continue
        gpus.append(Gpu(i, info.get("GPU UUID", "unknown"), info.get("Model", "unknown GPU"),
                        driver, "unknown"))
    return gpus


def _visible(listed: list[Gpu], mask: str) -> list[Gpu]:
    """The GPUs CUDA_VISIBLE_DEVICES leaves, as CUDA reads it: indices or UUID prefixes
    (``GPU-...``; ``MIG-...`` instances count on every listed GPU), in the given order, up to
    the first entry that names no GPU (so ``-1`` hides them all)."""
    out: list[Gpu] = []
    for token in (t.strip() for t in mask.split(",")):
        if token.startswith("MIG-"):
            return list(listed)
        if token.isdigit():
            match = [g for g in listed if g.index == int(token)]
        elif token.startswith("GPU-"):
            match = [g for g in listed if g.uuid.startswith(token)]
        else:
            match = []
        if len(match) != 1 or match[0] in out:
            break
        out.append(match[0])
    return out
