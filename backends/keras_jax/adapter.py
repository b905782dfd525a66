"""Keras 3 on JAX (``KERAS_BACKEND=jax``): the Keras adapter with JAX's import, devices and
asynchronous dispatch. Everything else (layers, names, initializers, layouts) is Keras's own."""

from __future__ import annotations

from backends.jax_support import JaxDevices
from backends.keras.adapter import Adapter as KerasAdapter


class Adapter(JaxDevices, KerasAdapter):
    keras_backend = "jax"

    def import_backend(self):
        return self.import_jax()
