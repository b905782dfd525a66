"""What every backend running on PyTorch (torch, keras_torch) does the same way: the thread
count and TF32 settings, its devices, waiting for CUDA's queue, and peak device memory.

A mixin for ``BaseAdapter`` subclasses: put it first among the bases. Standard library only;
torch is imported by ``import_torch``, from the adapter's ``import_framework``.
"""

from __future__ import annotations

import platform


class TorchDevices:
    framework = "torch"

    def import_torch(self) -> dict:
        """Import torch; apply the thread count and TF32 setting (torch's default allows TF32
        in cuDNN convolutions: off here unless ``tf32``), and record them."""
        import torch

        self.torch = torch
        applied = self.settings["applied"]
        if self.settings.get("threads"):
            torch.set_num_threads(int(self.settings["threads"]))
        applied["torch.get_num_threads()"] = torch.get_num_threads()
        tf32 = bool(self.settings.get("tf32"))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        applied["torch allow_tf32 (matmul, cudnn)"] = tf32
        applied["torch.backends.cudnn.benchmark"] = torch.backends.cudnn.benchmark
        cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None
        return {"torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": None if cudnn is None else str(cudnn)}

    def visible_gpus(self):
        torch = self.torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0, \
            f"torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA " \
            f"{torch.version.cuda})"

    def use_device(self, kind):
        if kind == "cuda":
            device = self.torch.device("cuda:0")
            return device, self.torch.cuda.get_device_name(device)
        return self.torch.device("cpu"), platform.processor() or "cpu"

    def block(self, value):
        """CPU ops run synchronously; CUDA ops queue until the device is synchronized."""
        if self.device_kind == "cuda":
            self.torch.cuda.synchronize(self.device)

    def reset_memory_peak(self):
        if self.device_kind == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def memory_peak(self):
        if self.device_kind == "cuda":
            return int(self.torch.cuda.max_memory_allocated(self.device))
        return None
