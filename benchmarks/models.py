"""The harness's timer against each framework's own tool on real networks: ResNet-50 and the
BERT-base encoder layer of the model zoo (specs/models/), float32 inference, every mode of every
backend.

    python benchmarks/models.py [--backend NAME ...] [--models resnet50,encoder] [--gpu]
                                [--threads N] [--rounds R] [--full]

Per backend, one process (benchmarks/fidelity_worker.py, as benchmarks/timing_fidelity.py does
for its MLP and CNN) builds each model and, per mode, alternates the harness's timer
(backends/timer.py) with the framework's recommended tool on the same step:
torch.utils.benchmark.Timer.blocked_autorange (PyTorch, Keras on PyTorch); timeit with
``.numpy()`` on the tf.function's result (Keras on TensorFlow); timeit with
``jax.block_until_ready`` on the jax.jit's result (Flax, Keras on JAX); timeit with
``mx.nd.waitall()`` after the hybridized block (Gluon). Prints both medians, their ratio and
each one's IQR/median per row. A benchmark, not a test: nothing here asserts a duration.

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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    docs = documents(args.models, args.gpu)
    device = "cuda" if args.gpu else "cpu"
    settings = {"tf32": True, "cudnn_benchmark": True} if args.gpu else {}
    sizes = "; ".join(f"{m} {' x '.join(map(str, docs[m]['input']))}" for m in args.models)
    print(f"{sizes}; float32 inference{', TF32 allowed, cuDNN autotuning on' if args.gpu else ''}"
          f"; {args.threads} threads; {args.rounds} alternating rounds per mode; device "
          f"{device}; budget {'full' if args.full else 'quick'}", flush=True)
    runs = []
    for backend in args.backend or DEFAULT:
        start = time.perf_counter()
        result = run(backend, args.threads, args.rounds, device=device, models=args.models,
                     documents=docs, budget=None if args.full else QUICK, settings=settings)
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
