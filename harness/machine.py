"""What machine a record was made on: a fingerprint of the host (name, CPU model, cores, memory,
GPUs with their driver and the CUDA version the driver supports, OS, Python), modelled on asv's
``machine.json`` (machine, arch, cpu, num_cpu, os, ram) and MLPerf's system description
(host_processor_model_name, host_processor_core_count, host_memory_capacity,
accelerator_model_name, accelerator_memory_capacity, cuda_version). Standard library only: a
Ray node computes its own with the same code.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from . import devices


@dataclass(frozen=True)
class Machine:
    """One machine, as the harness on it saw itself."""
    host: str
    arch: str
    os: str
    cpu_model: str
    cores: int                     # logical CPUs of the machine
    usable_cores: int              # those this process may use (affinity)
    memory_bytes: int
    gpus: list = field(default_factory=list)   # [{name, driver, memory}]
    cuda: str | None = None        # the CUDA version the driver supports (nvidia-smi's header)
    python: str = ""
    node_id: str | None = None     # the Ray node it was, where it was one

    @property
    def label(self) -> str:
        """How the report names it: the host, with the Ray node's id where there is one (two
        nodes of a local test cluster share a host)."""
        return f"{self.host}/{self.node_id[:8]}" if self.node_id else self.host

    def describe(self) -> str:
        gpus = ", ".join(f"{g['name']} ({g['memory']}, driver {g['driver']})"
                         for g in self.gpus) or "no GPU"
        return (f"{self.host}: {self.cpu_model}, {self.cores} cores, "
                f"{self.memory_bytes / 2**30:.1f} GiB, {gpus}"
                + (f", CUDA {self.cuda}" if self.cuda else ""))

    def to_json(self) -> dict:
        return {**asdict(self), "label": self.label}


#: the fields results.json holds for a machine, with their JSON types (merge checks them)
FIELDS = {"host": str, "arch": str, "os": str, "cpu_model": str, "cores": int,
          "usable_cores": int, "memory_bytes": int, "gpus": list, "cuda": (str, type(None)),
          "python": str, "node_id": (str, type(None)), "label": str}


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; platform's word elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("model name", "Model", "cpu model"):
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cuda_version() -> str | None:
    """The CUDA version the NVIDIA driver supports, from nvidia-smi's header (None without)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             timeout=devices.SMI_TIMEOUT_S).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"CUDA Version:\s*([0-9.]+)", out)
    return match.group(1) if match else None


def this_machine(node_id: str | None = None, environ=None) -> Machine:
    """The fingerprint of the machine this runs on (GPUs as ``CUDA_VISIBLE_DEVICES`` in
    ``environ`` leaves them: the ones a worker started here would see)."""
    probe = devices.probe_gpus(environ)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return Machine(host=socket.gethostname(), arch=platform.machine(),
                   os=f"{platform.system()} {platform.release()}", cpu_model=cpu_model(),
                   cores=os.cpu_count() or 1, usable_cores=usable, memory_bytes=memory,
                   gpus=[{"name": g.name, "driver": g.driver, "memory": g.memory}
                         for g in probe.gpus],
                   cuda=cuda_version() if probe.usable else None,
                   python=sys.version.split()[0], node_id=node_id)


def from_json(data, where: str) -> Machine:
    """A machine as results.json holds it; ValueError naming ``where`` and the field when it
    does not fit."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object")
    for name, kind in FIELDS.items():
        value = data.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}.{name}: {type(value).__name__} is not what a machine "
                             "holds there")
        if kind is int and value < 0:
            raise ValueError(f"{where}.{name}: {value} is negative")
    for i, gpu in enumerate(data["gpus"]):
        if not isinstance(gpu, dict) or not all(isinstance(gpu.get(k), str)
                                                for k in ("name", "driver", "memory")):
            raise ValueError(f"{where}.gpus[{i}]: expected name, driver and memory")
    return Machine(**{k: data[k] for k in FIELDS if k != "label"})
