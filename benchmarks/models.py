"""The harness's timer against each framework's own tool on real networks: ResNet-50 and the
BERT-base encoder layer of the model zoo (specs/models/), float32, the inference step and the
training step, every mode of every backend.

    python benchmarks/models.py [--backend NAME ...] [--models resnet50,encoder]
                                [--phases inference,train] [--gpu] [--threads N] [--rounds R]
                                [--full]

Per backend, one process (benchmarks/fidelity_worker.py, as benchmarks/timing_fidelity.py does
for its MLP and CNN) builds each model and, per phase and mode, alternates the harness's timer
(backends/timer.py) on the harness's step (``step(model, phase, mode, ...)``) with the
framework's recommended tool: torch.utils.benchmark.Timer.blocked_autorange (PyTorch, Keras on
PyTorch); timeit with ``.numpy()`` on the result (Keras on TensorFlow); timeit with
``jax.block_until_ready`` on the result (Flax, Keras on JAX); timeit with ``mx.nd.waitall()``
after the call (Gluon). Prints both medians, their ratio and each one's IQR/median per row
(model, phase, backend, mode). A benchmark, not a test: nothing here asserts a duration.

Inference: the reference tool times the harness's own step. Training: it times the
framework's own training step, written as the framework's guide writes it
(benchmarks/reference_train.py), doing the harness's work on the same model, input and
cotangent: a training-mode forward (batch statistics, dropout dropping), the loss
sum(output * cotangent), the backward, and SGD p -= lr * grad (lr 1e-3, momentum and weight
decay 0) of every trainable parameter, waited on as the tool waits:

- PyTorch: ``optimizer.zero_grad()``, ``loss.backward()``, ``torch.optim.SGD(...).step()``, the
  loop of PyTorch's "Optimizing Model Parameters" tutorial; compiled: ``torch.compile(model)``
  as its torch.compile tutorial compiles a model (the harness compiles the module the same
  way; its update is ``torch._foreach_add_``, the optimizer's own kernel for it).
- Keras on TensorFlow: ``tf.GradientTape``, ``tape.gradient``, ``keras.optimizers.SGD.apply``
  ("Writing a training loop from scratch in TensorFlow"); compiled / xla: under
  ``tf.function`` / ``tf.function(jit_compile=True)`` as that guide speeds it up. ``.numpy()``
  of the loss: a tf.function returns only after its stateful ops (the updates) ran, and eager
  ops on the CPU are synchronous.
- Keras on JAX: ``stateless_call`` under ``jax.value_and_grad`` and
  ``SGD.stateless_apply``, the variables threaded as the step's state ("... in JAX");
  compiled: ``jax.jit``. ``block_until_ready`` on the loss and the new state.
- Keras on PyTorch: ``model.zero_grad()``, ``loss.backward()``, ``SGD.apply`` of each
  variable's ``.value.grad`` under ``torch.no_grad()`` ("... in PyTorch"); compiled:
  ``torch.compile`` of that step (Keras's own ``jit_compile=True`` compiles its train step so),
  with the harness's ``dynamic=False`` (see backends/keras_torch).
- Flax: ``flax.training.train_state.TrainState`` with ``optax.sgd``, ``apply_gradients`` and the
  batch statistics from ``mutable=["batch_stats"]`` replaced into the state (Flax's batch-norm
  guide); compiled: ``jax.jit`` donating the state, as the harness's step donates its
  variables. ``block_until_ready`` on the new state and the loss.
- Gluon: ``autograd.record()``, ``loss.backward()``, ``gluon.Trainer(net.collect_params(),
  "sgd").step(1)`` (Gluon's "Train the neural network" tutorial), ``mx.nd.waitall()``;
  compiled: the network hybridized with ``static_alloc=True, static_shape=True``.

The differences that remain are each framework's optimizer object (a Keras optimizer also
counts its iterations; Gluon sums the loss before ``backward`` where the harness passes the
cotangent as the head gradient; Flax's reference thread its own copy of the variables, which
the harness's donated step would delete): a ratio away from 1 on a quiet machine is the
harness's step and timer against the framework's own, not the timer alone.

Sizes: the zoo's CPU sizes by default (ResNet-50 1 x 3 x 64 x 64, the encoder layer batch 2 x
sequence 8 x 768); ``--gpu`` runs the anchors' sizes on the GPU (ResNet-50 batch 64 at
224 x 224, the encoder layer batch 32 x sequence 128) with TF32 allowed where the framework has
it and cuDNN autotuning on (torch.backends.cudnn.benchmark; TensorFlow, XLA and MXNet autotune
by default), each stated in the output. float32 only: the harness's adapters have no bf16 mode.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.protocol import Budget  # noqa: E402
from benchmarks.timing_fidelity import DEFAULT, run, table  # noqa: E402
from harness.options import default_threads  # noqa: E402
from harness.spec import load_document  # noqa: E402

#: name -> (spec file, CPU input, the GPU anchor's input)
MODELS = {
    "resnet50": ("specs/models/resnet50.yaml", [1, 3, 64, 64], [64, 3, 224, 224]),
    "encoder": ("specs/models/transformer_encoder_layer.yaml", [2, 8, 768], [32, 128, 768]),
}
#: the phases timed: the harness's names (``step(..., phase, ...)``)
PHASES = ("inference", "train")
#: short budgets for the CPU (a ResNet-50 call takes tens of ms on 2 cores): at least 10
#: blocks of at least 10 ms and 1 s per tool and round, after 3 warm-up calls
QUICK = Budget(warmup_calls=3, warmup_s=0.2, min_block_s=10e-3, min_blocks=10, min_total_s=1.0)


def documents(names: list[str], gpu: bool) -> dict[str, dict]:
    """Each model's spec document at the CPU size or, with ``gpu``, the anchor's."""
    out = {}
    for name in names:
        path, cpu, anchor = MODELS[name]
        document = load_document(ROOT / path)
        out[name] = {**document, "input": anchor if gpu else cpu}
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", action="append", choices=DEFAULT,
                   help="default: every framework backend")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, of {', '.join(MODELS)} (default: both)")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated, of {', '.join(PHASES)} (default: both)")
    p.add_argument("--gpu", action="store_true",
                   help="the anchors' sizes on the GPU, TF32 allowed, cuDNN autotuning on")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--rounds", type=int, default=2, help="alternations per mode (2)")
    p.add_argument("--full", action="store_true",
                   help="the fidelity worker's full budget (50 blocks, 2 s) instead of QUICK")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: {', '.join(unknown) or 'none given'}; choose from "
                f"{', '.join(MODELS)}")
    args.phases = [m for m in args.phases.split(",") if m]
    unknown = [m for m in args.phases if m not in PHASES]
    if unknown or not args.phases:
        p.error(f"--phases: {', '.join(unknown) or 'none given'}; choose from "
                f"{', '.join(PHASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    docs = documents(args.models, args.gpu)
    device = "cuda" if args.gpu else "cpu"
    settings = {"tf32": True, "cudnn_benchmark": True} if args.gpu else {}
    sizes = "; ".join(f"{m} {' x '.join(map(str, docs[m]['input']))}" for m in args.models)
    print(f"{sizes}; float32 {' and '.join(args.phases)}"
          f"{', TF32 allowed, cuDNN autotuning on' if args.gpu else ''}"
          f"; {args.threads} threads; {args.rounds} alternating rounds per mode; device "
          f"{device}; budget {'full' if args.full else 'quick'}", flush=True)
    runs = []
    for backend in args.backend or DEFAULT:
        start = time.perf_counter()
        result = run(backend, args.threads, args.rounds, device=device, models=args.models,
                     documents=docs, budget=None if args.full else QUICK, settings=settings,
                     phases=args.phases)
        runs.append(result)
        env = result.environment or {}
        print(f"{backend}: {time.perf_counter() - start:.0f} s; device "
              f"{env.get('device_name', '?')}; " + ", ".join(
                  f"{k} = {v}" for k, v in {**env.get("settings", {}),
                                            **env.get("autotune", {})}.items()), flush=True)
    print()
    print("\n".join(table(runs, width=max(map(len, args.models)))[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
