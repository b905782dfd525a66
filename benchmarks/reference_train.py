"""Each framework's training step written as its own guide writes it, for the training rows of
benchmarks/models.py: the work of the harness's ``step(..., phase="train", ...)`` (a
training-mode forward of the adapter's model, the loss sum(output * cotangent), the backward,
a plain SGD update p -= lr * grad of every trainable parameter), but with the framework's own
optimizer and loop instead of the adapter's hand-written update. Runs inside the backend's
environment (benchmarks/fidelity_worker.py); what each step is, and why, is in
benchmarks/models.py's docstring.

``train_step(backend, adapter, model, mode, x, cotangent, lr)`` returns a function doing one
step and returning a device-resident value that the framework's reference tool waits on
(benchmarks/fidelity_worker.reference): the loss (PyTorch, TensorFlow, MXNet, whose steps
update the model's own parameters in place) or the new state with the loss (JAX, whose steps
thread their own copy of the state, as its guides do).
"""

from __future__ import annotations


def train_step(backend: str, adapter, model, mode: str, x, cotangent, lr: float):
    """The reference training step of ``backend`` in ``mode`` (one of ``adapter.modes()``)."""
    return STEPS[backend](adapter, model, mode, x, cotangent, lr)


def torch_step(adapter, model, mode, x, cotangent, lr):
    """PyTorch's "Optimizing Model Parameters" loop: ``optimizer.zero_grad()``, the loss,
    ``loss.backward()``, ``torch.optim.SGD.step()`` (momentum 0: p -= lr * grad);
    ``compiled``: the module through ``torch.compile(model)``, as the torch.compile tutorial
    compiles a model (no ``torch.compiler.reset()``: it would drop the harness's compiled step
    that this one alternates with)."""
    import torch

    net = model.net
    net.train(True)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    forward = torch.compile(net) if mode == "compiled" else net

    def step():
        optimizer.zero_grad()
        loss = (forward(x) * cotangent).sum()
        loss.backward()
        optimizer.step()
        return loss
    return step


def keras_step(adapter, model, mode, x, cotangent, lr):
    """Keras's "Writing a training loop from scratch in TensorFlow": ``tf.GradientTape`` over
    ``model(x, training=True)``, ``tape.gradient``, ``keras.optimizers.SGD.apply``; ``compiled``
    / ``xla``: the step under ``@tf.function`` / ``tf.function(jit_compile=True)``."""
    import keras
    import tensorflow as tf

    net = model.net
    optimizer = keras.optimizers.SGD(learning_rate=lr)
    optimizer.build(net.trainable_weights)

    def step(x, cotangent):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(net(x, training=True) * cotangent)
        grads = tape.gradient(loss, net.trainable_weights)
        optimizer.apply(grads, net.trainable_weights)
        return loss
    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    return lambda: step(x, cotangent)


def keras_jax_step(adapter, model, mode, x, cotangent, lr):
    """Keras's "Writing a training loop from scratch in JAX": ``stateless_call`` under
    ``jax.value_and_grad``, ``keras.optimizers.SGD.stateless_apply``, the (trainable,
    non-trainable, optimizer) variables threaded through the step as its state; ``compiled``:
    the step under ``jax.jit``."""
    import jax
    import keras

    net = model.net
    optimizer = keras.optimizers.SGD(learning_rate=lr)
    optimizer.build(net.trainable_variables)

    def loss_and_updates(trainable, non_trainable, x, cotangent):
        y, non_trainable = net.stateless_call(trainable, non_trainable, x, training=True)
        return jax.numpy.sum(y * cotangent), non_trainable

    grad_fn = jax.value_and_grad(loss_and_updates, has_aux=True)

    def train(state, x, cotangent):
        trainable, non_trainable, optimizer_variables = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, x, cotangent)
        trainable, optimizer_variables = optimizer.stateless_apply(optimizer_variables, grads,
                                                                   trainable)
        return loss, (trainable, non_trainable, optimizer_variables)

    fn = jax.jit(train) if mode == "compiled" else train
    state = [([v.value for v in net.trainable_variables],
              [v.value for v in net.non_trainable_variables],
              [v.value for v in optimizer.variables])]

    def step():
        loss, state[0] = fn(state[0], x, cotangent)
        return loss, state[0]
    return step


def keras_torch_step(adapter, model, mode, x, cotangent, lr):
    """Keras's "Writing a training loop from scratch in PyTorch": ``model(x, training=True)``,
    ``model.zero_grad()``, ``loss.backward()``, then ``keras.optimizers.SGD.apply`` of each
    variable's ``.value.grad`` under ``torch.no_grad()``; ``compiled``: that step through
    ``torch.compile(..., dynamic=False)``, as Keras's own ``jit_compile=True`` compiles its
    train step (``torch.compile(one_step_on_data)``, keras/src/backend/torch/trainer.py) but
    with the harness's dynamic=False (the default crashes inductor: backends/keras_torch)."""
    import keras
    import torch

    net = model.net
    optimizer = keras.optimizers.SGD(learning_rate=lr)
    optimizer.build(net.trainable_weights)

    def train(x, cotangent):
        loss = (net(x, training=True) * cotangent).sum()
        net.zero_grad()
        loss.backward()
        weights = net.trainable_weights[:]
        with torch.no_grad():
            optimizer.apply([v.value.grad for v in weights], weights)
        return loss.detach()
    if mode == "compiled":
        train = torch.compile(train, dynamic=False)
    return lambda: train(x, cotangent)


def flax_step(adapter, model, mode, x, cotangent, lr):
    """Flax's ``TrainState`` with ``optax.sgd(lr)``, ``jax.value_and_grad`` of the loss of
    ``apply_fn(..., mutable=["batch_stats"])``, ``state.apply_gradients`` and the new batch
    statistics replaced into the state, as Flax's batch-norm and dropout guides write it;
    dropout draws from one key per step, as the harness's step does (the guide folds in the
    step number: one more tiny op). ``compiled``: ``jax.jit`` donating the state, as the
    harness's step donates its variables (an in-place update, not a new copy of every
    parameter per step). The state is a copy of the model's variables: the harness's donated
    step deletes the buffers it is given."""
    from typing import Any

    import jax
    import optax
    from flax.training import train_state

    class TrainState(train_state.TrainState):
        extra: Any  # the collections other than params (batch_stats)

    variables = jax.tree_util.tree_map(jax.numpy.copy, model.variables)
    state = [TrainState.create(apply_fn=model.module.apply, params=variables["params"],
                               tx=optax.sgd(lr),
                               extra={k: v for k, v in variables.items() if k != "params"})]
    dropout_key = jax.random.key(0)

    def train(state, x, cotangent):
        def loss_fn(params):
            y, updates = state.apply_fn({"params": params, **state.extra}, x, training=True,
                                        dropout=True, rngs={"dropout": dropout_key},
                                        mutable=["batch_stats"])
            return jax.numpy.sum(y * cotangent), updates
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads)
        return state.replace(extra={**state.extra, **updates}), loss

    fn = jax.jit(train, donate_argnums=0) if mode == "compiled" else train

    def step():
        state[0], loss = fn(state[0], x, cotangent)
        return state[0], loss
    return step


def gluon_step(adapter, model, mode, x, cotangent, lr):
    """Gluon's "Train the neural network" loop: the loss under ``autograd.record()``,
    ``loss.backward()``, ``gluon.Trainer(net.collect_params(), "sgd").step(1)`` (momentum and
    wd 0, rescale_grad 1: p -= lr * grad; parameters with grad_req "null", the running
    statistics, are not updated); ``compiled``: the network as the adapter left it for the
    mode, ``hybridize(static_alloc=True, static_shape=True)``, Gluon's own compiled mode.
    The loss is summed before ``backward()`` as the guide does, where the harness's step
    passes the cotangent as the head gradient: one elementwise product and sum more."""
    import mxnet as mx

    net = model.net
    trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": lr})

    def step():
        with mx.autograd.record():
            loss = (net(x) * cotangent).sum()
        loss.backward()
        trainer.step(1)
        return loss
    return step


STEPS = {"torch": torch_step, "keras": keras_step, "keras_jax": keras_jax_step,
         "keras_torch": keras_torch_step, "flax": flax_step, "gluon": gluon_step}
