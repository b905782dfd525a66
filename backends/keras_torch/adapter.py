"""Keras 3 on PyTorch (``KERAS_BACKEND=torch``): the Keras adapter with torch's import and the
torch backend's device handling. Everything else (layers, names, initializers, layouts) is
Keras's own."""

from __future__ import annotations

import os

from backends.keras.adapter import Adapter as KerasAdapter
from backends.torch_support import TorchDevices


class Adapter(TorchDevices, KerasAdapter):
    keras_backend = "torch"

    def configure(self, device, settings):
        if device == "cpu":  # Keras's default torch device, read once at import ("cuda" if any)
            os.environ["KERAS_TORCH_DEVICE"] = "cpu"

    def import_backend(self):
        return self.import_torch()

    def device_scope(self):
        return self.keras.device(str(self.device))  # Keras's torch backend takes device names

    def run(self, model, x, *, training=False):
        """Without autograd, as the torch backend (Keras's torch variables require grad)."""
        with self.torch.no_grad():
            return super().run(model, x, training=training)
