"""What every backend running on JAX (flax, keras_jax) does the same way: the environment JAX
reads at import, its devices, its precision, waiting for its asynchronous dispatch, and
``jax.jit`` steps with JAX's own compile events as the witness that they compiled.

A mixin for ``BaseAdapter`` subclasses: put it first among the bases. Standard library only;
JAX is imported by ``import_jax``, from the adapter's ``import_framework``.
"""

from __future__ import annotations

import collections
import os
import platform
import sys
from importlib.metadata import version
from pathlib import Path

from backends.base import CompiledStep
from backends.protocol import CompileCounts

#: jax.monitoring events (jax/_src/dispatch.py, compiler.py): a jaxpr traced, an XLA executable
#: made (compiled, or loaded from the persistent compilation cache), a persistent-cache hit
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
JAX_COUNTS = f"jax.monitoring events {TRACE_EVENT}, {COMPILE_EVENT}, {CACHE_HIT_EVENT}"


class JaxDevices:
    framework = "JAX"

    def configure(self, device, settings):
        """Read by JAX once, at import: no 75 % GPU memory grab, no GPU probing for cpu, and the
        intra-op thread count of XLA's CPU backend: ``PJRT_NPROC`` sizes its Eigen pool (xla/pjrt/
        utils.cc ``DefaultThreadPoolSize``; XLA_FLAGS has no thread-count flag, and an
        ``intra_op_parallelism_threads=N`` token there is silently ignored)."""
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if device == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
        if settings.get("threads"):
            flag = "--xla_cpu_multi_thread_eigen=true"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
            os.environ["PJRT_NPROC"] = str(int(settings["threads"]))
            settings["applied"]["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
            settings["applied"]["PJRT_NPROC"] = os.environ["PJRT_NPROC"]
        settings["applied"]["XLA_PYTHON_CLIENT_PREALLOCATE"] = \
            os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]

    def import_jax(self) -> dict:
        """Import jax with its persistent compilation cache on (every compilation, however
        small, so that a second run compiles nothing it compiled before)."""
        import jax

        self.jax = jax
        self._jax_events = collections.Counter()
        jax.monitoring.register_event_listener(self._count_jax_event)
        jax.monitoring.register_event_duration_secs_listener(self._count_jax_event)
        jax.config.update("jax_compilation_cache_dir", str(_cache_dir()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        self.settings["applied"]["jax_compilation_cache_dir"] = \
            jax.config.jax_compilation_cache_dir
        return {"jax": jax.__version__, "jaxlib": version("jaxlib")}

    def _count_jax_event(self, event, *_, **__):
        self._jax_events[event] += 1

    def jitted_step(self, call) -> CompiledStep:
        """``call`` (a step that runs a ``jax.jit`` function made for it) with JAX's own
        compile events as its witness."""
        return CompiledStep(call, self.jax_counts, "jax.jit", JAX_COUNTS, self._jit_conditions)

    def jax_counts(self) -> CompileCounts:
        """JAX's compile events so far (read around one step's calls, while nothing else
        compiles): XLA executables made, jaxprs traced, persistent-cache hits."""
        events = self._jax_events
        return CompileCounts(compiled=events[COMPILE_EVENT], traced=events[TRACE_EVENT],
                             cache_hits=events[CACHE_HIT_EVENT])

    def _jit_conditions(self) -> dict[str, bool]:
        """``jax.disable_jit`` makes every jit run op by op (its primitives still compile)."""
        return {"jax.config.jax_disable_jit is False (jit not turned off)":
                not self.jax.config.jax_disable_jit}

    def visible_gpus(self):
        try:
            return len(self.jax.devices("gpu")), "no GPU device listed"
        except RuntimeError as exc:  # a CPU-only jaxlib: "Unknown backend: 'gpu' requested ..."
            return 0, f"jax.devices('gpu'): {str(exc).splitlines()[0]}"

    def use_device(self, kind):
        """The ``jax.Device``, made JAX's default device. On a GPU, full float32 matmuls and
        convolutions unless ``tf32`` is asked for (JAX's DEFAULT precision is TF32-like on
        Ampere and newer, beyond the numerics check's tolerance)."""
        jax = self.jax
        device = jax.devices("gpu" if kind == "cuda" else "cpu")[0]
        jax.config.update("jax_default_device", device)
        if kind == "cuda" and not self.settings.get("tf32"):
            jax.config.update("jax_default_matmul_precision", "highest")
        self.settings["applied"]["jax_default_matmul_precision"] = \
            jax.config.jax_default_matmul_precision
        if kind == "cpu" and os.path.isdir("/proc/self/task"):  # Linux: count the pool's threads
            self.settings["applied"]["XLA CPU intra-op threads (XLAEigen, counted)"] = \
                _threads_named("XLAEigen")
        return device, device.device_kind if kind == "cuda" else platform.processor() or "cpu"

    def block(self, value):
        """JAX dispatches asynchronously, on the CPU too: wait for every array in ``value``."""
        self.jax.block_until_ready(value)

    def reset_memory_peak(self):
        self._peak_base = self._memory_stats().get("peak_bytes_in_use")

    def memory_peak(self):
        """Peak bytes in use on the device (JAX's allocator statistics; GPU only)."""
        return self._memory_stats().get("peak_bytes_in_use")

    def _memory_stats(self) -> dict:
        if self.device_kind != "cuda":
            return {}
        return self.device.memory_stats() or {}


def _cache_dir() -> Path:
    """The persistent compilation cache: in the environment (``sys.prefix``) when writable, else
    in the user's cache directory."""
    if os.access(sys.prefix, os.W_OK):
        return Path(sys.prefix) / "jax-cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dl-compare-harness" \
        / "jax-cache"


def _threads_named(part: str) -> int:
    """How many of this process's threads have ``part`` in their name (Linux /proc)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            count += part in Path(f"/proc/self/task/{task}/comm").read_text()
        except OSError:  # the thread ended meanwhile
            pass
    return count
