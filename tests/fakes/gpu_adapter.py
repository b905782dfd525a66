"""A test double of a framework on an NVIDIA GPU, for the parent's GPU path without a GPU: the
NumPy reference's arithmetic (so every check has a real answer), but it sees one GPU, puts its
arrays "on" ``cuda:0`` (named ``DEVICE_NAME``), reports ``PEAK_BYTES`` of peak device memory per
timed step there, times the roofline's matmul on a 64 x 64 stand-in, and updates batch-norm
running variances with the unbiased batch variance (what cuDNN does, and what MXNet declares
for ``cuda``). Run it under another backend's name with tests/fakes/corrupting_python and
``CORRUPT_ADAPTER=tests.fakes.gpu_adapter``. Test only: nothing in the harness can select it."""

from backends.numpy.adapter import Adapter as Reference

DEVICE_NAME = "Fake GPU (tests/fakes/gpu_adapter.py)"
PEAK_BYTES = 48 * 2**20 + 12345


class Adapter(Reference):
    framework = "fake GPU framework"

    def visible_gpus(self):
        return 1, ""

    def use_device(self, kind):
        if kind == "cuda":
            return "cuda:0", DEVICE_NAME
        return super().use_device(kind)

    def reset_memory_peak(self):
        self.peak = 0

    def memory_peak(self):
        return PEAK_BYTES if self.device_kind == "cuda" else None

    def matmul(self, n):
        """The roofline's matmul, capped at 64 x 64 (the record keeps the n the parent asked
        for, which is what a test of the parent looks at; 8192 would take minutes here)."""
        return super().matmul(min(n, 64))
