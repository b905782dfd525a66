"""Keras 3 on JAX (``KERAS_BACKEND=jax``): the Keras adapter with JAX's import, devices and
asynchronous dispatch, and training as Keras's JAX guide writes it: ``stateless_call`` under
``jax.value_and_grad``, jitted for ``compiled``. Everything else (layers, names, initializers,
layouts) is Keras's own."""

from __future__ import annotations

from backends.jax_support import JaxDevices
from backends.keras.adapter import Adapter as KerasAdapter


class Adapter(JaxDevices, KerasAdapter):
    keras_backend = "jax"

    def import_backend(self):
        return self.import_jax()

    def _value_and_grad(self, net, training=True):
        """``(trainable, non_trainable, x, c) -> ((loss, (y, new non_trainable)), grads)``."""
        def loss(trainable, non_trainable, x, cotangent):
            y, non_trainable = net.stateless_call(trainable, non_trainable, x,
                                                  training=training)
            return self.jax.numpy.sum(y * cotangent), (y, non_trainable)
        return self.jax.value_and_grad(loss, has_aux=True)

    @staticmethod
    def _state(net):
        return [[v.value for v in net.trainable_variables],
                [v.value for v in net.non_trainable_variables]]

    def grads(self, model, x, cotangent, training=True):
        """The moving statistics ``stateless_call`` returns are assigned back, as one training
        step does (in inference mode they come back unchanged); ``jax.grad`` sums a shared
        variable's uses."""
        net = model.net
        (_, (y, moving)), grads = self._value_and_grad(net, training)(*self._state(net), x,
                                                                      cotangent)
        for v, value in zip(net.non_trainable_variables, moving):
            v.assign(value)
        by_id = {id(v): g for v, g in zip(net.trainable_variables, grads)}
        refs = self._trainable(model)
        return y, self._regroup(refs, [by_id[id(v)] for v in self._variables(refs)])

    def modes(self):
        v = self.jax.__version__
        return {"eager": f"Model.__call__ / stateless_call under jax.value_and_grad, "
                         f"op by op (JAX {v})",
                "compiled": f"jax.jit of the stateless call / train step (JAX {v})"}

    def step(self, model, phase, mode, x, cotangent, lr):
        """As Keras's JAX guide: the variables' values are a state threaded through the
        (jitted) step, not written back into the Keras variables on every step."""
        jax, net = self.jax, model.net
        state = self._state(net)
        if phase == "inference":
            if mode == "eager":
                return lambda: net(x, training=False)
            infer = jax.jit(lambda trainable, non_trainable, x: net.stateless_call(
                trainable, non_trainable, x, training=False)[0])
            return self.jitted_step(lambda: infer(*state, x))
        value_and_grad = self._value_and_grad(net)

        def train(trainable, non_trainable, x, cotangent):
            (loss, (_, non_trainable)), grads = value_and_grad(trainable, non_trainable, x,
                                                               cotangent)
            return loss, [v - lr * g for v, g in zip(trainable, grads)], non_trainable

        fn = train if mode == "eager" else jax.jit(train)

        def run():
            out = fn(*state, x, cotangent)  # (loss, new trainable, new non-trainable)
            state[:] = out[1:]
            return out
        return run if mode == "eager" else self.jitted_step(run)
