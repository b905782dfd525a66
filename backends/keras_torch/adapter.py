"""Keras 3 on PyTorch (``KERAS_BACKEND=torch``): the Keras adapter with torch's import and the
torch backend's device handling, and training as Keras's PyTorch guide writes it: autograd on
the Keras variables' torch Parameters. Everything else (layers, names, initializers, layouts)
is Keras's own."""

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

    def grads(self, model, x, cotangent, training=True):
        """``torch.autograd.grad`` with respect to each variable's ``.value`` (its
        ``nn.Parameter``); no ``.grad`` is touched."""
        refs = self._trainable(model)
        with self.device_scope():
            y = model.net(x, training=training)
        grads = self.torch.autograd.grad((y * cotangent).sum(),
                                         [v.value for v in self._variables(refs)])
        return y.detach(), self._regroup(refs, grads)

    def modes(self):
        v = self.torch.__version__
        return {"eager": f"Model.__call__, and loss.backward() when training (torch {v} eager)",
                "compiled": f"torch.compile(the whole step, dynamic=False), torch {v}, as "
                            "Keras's jit_compile=True"}

    def step(self, model, phase, mode, x, cotangent, lr):
        """Keras's PyTorch training loop: the call, ``loss.backward()``, an in-place SGD update
        of every variable's Parameter under ``no_grad``, ``zero_grad()``. ``compiled`` wraps
        that function in ``torch.compile`` with dynamic=False: dynamo 2.13 cannot trace all of
        Keras (BatchNormalization's axes are a Keras TrackedList, graph-broken inside a context
        manager, so every enclosing frame falls back; after ``ops.pad`` each layer's
        ``inspect.Signature.bind`` breaks), and with the default dynamic=None those frames,
        shared by layers of different shapes, are re-traced shape-generic within one step:
        inductor 2.13 then crashes on the backward of a Conv2D(strides=2, padding="same")
        ("LoweringException: ValueRangeError: Invalid ranges [0:-1]"; Keras's own
        model.fit with jit_compile=True crashes the same way)."""
        torch, net = self.torch, model.net
        if phase == "inference":
            def fn(x):
                with torch.no_grad():
                    return net(x, training=False)
            args = (x,)
        else:
            params = [v.value for v in self._variables(self._trainable(model))]

            def fn(x, cotangent):
                loss = (net(x, training=True) * cotangent).sum()
                loss.backward()
                with torch.no_grad():
                    torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)
                net.zero_grad()
                return loss.detach()
            args = (x, cotangent)
        if mode == "eager":
            return lambda: fn(*args)
        compiled = self.torch_compile(fn, dynamic=False)
        return self.compiled_step(lambda: compiled(*args))
