"""The NumPy reference kernels at the sizes real networks run: time and peak memory.

    python benchmarks/numpy_kernels.py [--min-time SECONDS] [--only NAME ...]

Per kernel (backends/numpy/kernels.py) at a BERT-base / ResNet / LSTM-LM size: the median and
IQR of forward followed by backward (float64, random input, random cotangent), and the peak of
the memory NumPy allocates during one forward + backward (tracemalloc), next to the size of the
input. A benchmark, not a test: nothing here asserts a duration. BLAS threads are what the
environment gives (OPENBLAS_NUM_THREADS and kin); the line above the table says how many cores.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.numpy import kernels as K  # noqa: E402


def _attention(rng, n, length, e, heads, causal):
    p = {"in_proj_weight": rng.standard_normal((3 * e, e)) / math.sqrt(e),
         "in_proj_bias": np.zeros(3 * e),
         "out_proj.weight": rng.standard_normal((e, e)) / math.sqrt(e),
         "out_proj.bias": np.zeros(e)}
    return (K.MultiHeadAttention, p, rng.standard_normal((n, length, e)),
            {"num_heads": heads, "causal": causal})


def _recurrent(kernel, gates, rng, n, length, inp, hid):
    bound = 1 / math.sqrt(hid)
    p = {"weight_ih_l0": rng.uniform(-bound, bound, (gates * hid, inp)),
         "weight_hh_l0": rng.uniform(-bound, bound, (gates * hid, hid)),
         "bias_ih_l0": rng.uniform(-bound, bound, gates * hid),
         "bias_hh_l0": rng.uniform(-bound, bound, gates * hid)}
    return kernel, p, rng.standard_normal((n, length, inp)), {}


CASES = {  # name: (what, builder(rng) -> (kernel, p, x, options))
    "layer_norm": ("(2, 128, 768)", lambda r: (K.LayerNorm, {"weight": np.ones(768),
                   "bias": np.zeros(768)}, r.standard_normal((2, 128, 768)), {})),
    "gelu": ("(2, 128, 3072), exact", lambda r: (K.GELU, {}, r.standard_normal((2, 128, 3072)),
             {})),
    "gelu_tanh": ("(2, 128, 3072), tanh", lambda r: (K.GELU, {}, r.standard_normal(
                  (2, 128, 3072)), {"approximate": "tanh"})),
    "dropout": ("(2, 128, 3072), rate 0.1, training", lambda r: (
        K.Dropout, {}, r.standard_normal((2, 128, 3072)),
        {"rate": 0.1, "training": True, "rng": np.random.default_rng(0)})),
    "softmax": ("(2, 12, 128, 128)", lambda r: (K.Softmax, {}, r.standard_normal(
                (2, 12, 128, 128)), {})),
    "max_pool2d": ("(2, 64, 112, 112), 3x3 s2 p1 (ResNet stem)", lambda r: (
        K.MaxPool2d, {}, r.standard_normal((2, 64, 112, 112)),
        {"pool": 3, "stride": 2, "padding": 1})),
    "avg_pool2d": ("(2, 64, 112, 112), 3x3 s2 p1", lambda r: (
        K.AvgPool2d, {}, r.standard_normal((2, 64, 112, 112)),
        {"pool": 3, "stride": 2, "padding": 1})),
    "global_avg_pool": ("(2, 2048, 7, 7) (ResNet-50 head)", lambda r: (
        K.GlobalAvgPool, {}, r.standard_normal((2, 2048, 7, 7)), {})),
    "embedding": ("vocab 30522 x 768, indices (2, 128)", lambda r: (
        K.Embedding, {"weight": r.standard_normal((30522, 768))},
        r.integers(0, 30522, (2, 128)), {})),
    "attention": ("N 2, L 128, E 768, 12 heads", lambda r: _attention(r, 2, 128, 768, 12, False)),
    "attention_causal": ("as above, causal", lambda r: _attention(r, 2, 128, 768, 12, True)),
    "lstm": ("N 2, L 64, in 256, H 256", lambda r: _recurrent(K.LSTM, 4, r, 2, 64, 256, 256)),
    "gru": ("N 2, L 64, in 256, H 256", lambda r: _recurrent(K.GRU, 3, r, 2, 64, 256, 256)),
}


def measure(kernel, p, x, options, min_time):
    """(sorted seconds per forward + backward, peak bytes NumPy allocated in one of them)."""
    y, _ = kernel.forward(p, x, **options)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    del y

    def step():
        _, saved = kernel.forward(p, x, **options)
        kernel.backward(saved, dy)

    step()  # warm-up
    tracemalloc.start()
    step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    times, start = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sorted(times), peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per kernel")
    ap.add_argument("--only", nargs="+", choices=sorted(CASES), help="these kernels only")
    args = ap.parse_args(argv)
    threads = {k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")}
    print(f"numpy {np.__version__}, {os.cpu_count()} cores, threads {threads or 'default'}")
    print(f"{'kernel':18s} {'size':42s} {'fwd+bwd ms':>10s} {'IQR %':>6s} {'peak MiB':>9s} "
          f"{'input MiB':>9s}")
    rng = np.random.default_rng(0)
    for name in args.only or CASES:
        what, build = CASES[name]
        kernel, p, x, options = build(rng)
        times, peak = measure(kernel, p, x, options, args.min_time)
        q1, med, q3 = np.percentile(times, [25, 50, 75])
        print(f"{name:18s} {what:42s} {med * 1e3:10.2f} {100 * (q3 - q1) / med:6.1f} "
              f"{peak / 2**20:9.1f} {np.asarray(x).nbytes / 2**20:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
