"""What every backend running on JAX (flax, keras_jax) does the same way: the environment JAX
reads at import, its devices, its precision, and waiting for its asynchronous dispatch.

A mixin for ``BaseAdapter`` subclasses: put it first among the bases. Standard library only;
JAX is imported by ``import_jax``, from the adapter's ``import_framework``.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import version


class JaxDevices:
    framework = "JAX"

    def configure(self, device, settings):
        """Read by JAX once, at import: no 75 % GPU memory grab, no GPU probing for cpu, and the
        intra-op thread count of XLA's CPU backend."""
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if device == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
        if settings.get("threads"):
            flag = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=" \
                   f"{int(settings['threads'])}"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
            settings["applied"]["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
        settings["applied"]["XLA_PYTHON_CLIENT_PREALLOCATE"] = \
            os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]

    def import_jax(self) -> dict:
        import jax

        self.jax = jax
        return {"jax": jax.__version__, "jaxlib": version("jaxlib")}

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
