"""Compiled modes prove they compiled: fifteen small specs of different shapes and layer types
(a residual among them; causal attention; a Transformer-like MLP with an embedding, layer
norm, GELU and dropout) through ONE worker process, each timed (with a tiny budget) in every
mode the backend offers. Every compiled mode's witness (the framework's own counts of what its
compiler did) must say it compiled at the first call and compiled nothing after it, for every
spec, however many specs the process compiled before (torch.compile's recompile_limit of 8 per
code object once made the ninth silently eager). The NumPy reference has no compiled mode: there
the test checks that it offers only ``eager`` and reports no witness.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from backends.protocol import Budget, Status, TimingRequest
from harness import analysis
from harness.envs import ensure_env, select
from harness.runner import run_worker
from harness.spec import build_spec

BACKEND = os.environ["HARNESS_BACKEND"]  # conftest.py refuses to run without it
DEVICE = os.environ.get("HARNESS_DEVICE", "auto")  # conftest.py checks it

#: small specs, each of another shape or mix of layer types (NCHW inputs for convolutions)
DOCS = [
    {"name": "w01_dense", "input": [2, 3], "layers": [{"type": "dense", "units": 4}]},
    {"name": "w02_mlp_relu", "input": [3, 5],
     "layers": [{"type": "dense", "units": 6}, {"type": "relu"}, {"type": "dense", "units": 2}]},
    {"name": "w03_eager_sigmoid", "input": [2, 4],
     "layers": [{"type": "dense", "units": 3, "in_units": 4}, {"type": "sigmoid"},
                {"type": "dense", "units": 1, "in_units": 3}]},
    {"name": "w04_center", "input": [2, 7],
     "layers": [{"type": "center"}, {"type": "dense", "units": 3}]},
    {"name": "w05_my_dense", "input": [2, 5],
     "layers": [{"type": "my_dense", "units": 4}, {"type": "dense", "units": 2}]},
    {"name": "w06_batch_norm", "input": [4, 6],
     "layers": [{"type": "dense", "units": 5}, {"type": "batch_norm"}, {"type": "relu"}]},
    {"name": "w07_conv", "input": [2, 1, 6, 6],
     "layers": [{"type": "conv2d", "channels": 2, "kernel": 3}, {"type": "relu"},
                {"type": "flatten"}, {"type": "dense", "units": 3}]},
    {"name": "w08_conv_pool", "input": [2, 2, 8, 8],
     "layers": [{"type": "conv2d", "channels": 3, "kernel": 3, "padding": 1},
                {"type": "max_pool2d", "pool": 2}, {"type": "flatten"},
                {"type": "dense", "units": 2}]},
    {"name": "w09_conv_bn", "input": [2, 3, 5, 5],
     "layers": [{"type": "conv2d", "channels": 4, "kernel": 3}, {"type": "batch_norm"},
                {"type": "relu"}, {"type": "flatten"}]},
    {"name": "w10_shared_nested", "input": [2, 4],
     "layers": [{"type": "dense", "units": 4, "in_units": 4, "name": "shared"},
                {"type": "ref", "to": "shared"},
                {"type": "sequential", "name": "head",
                 "layers": [{"type": "tanh"}, {"type": "dense", "units": 2}]}]},
    {"name": "w11_deep", "input": [5, 3],
     "layers": [{"type": "dense", "units": 8}, {"type": "relu"}, {"type": "dense", "units": 8},
                {"type": "relu"}, {"type": "dense", "units": 8}, {"type": "relu"},
                {"type": "dense", "units": 1}]},
    {"name": "w12_strided_conv", "input": [1, 1, 7, 7],
     "layers": [{"type": "conv2d", "channels": 2, "kernel": 3, "stride": 2}, {"type": "tanh"},
                {"type": "flatten"}, {"type": "dense", "units": 1, "bias": False}]},
    {"name": "w13_residual", "input": [2, 2, 5, 5],
     "layers": [{"type": "residual", "activation": "relu", "layers": [
                    {"type": "conv2d", "name": "conv", "channels": 3, "kernel": 3, "padding": 1},
                    {"type": "batch_norm", "name": "bn"}],
                 "shortcut": {"type": "conv2d", "name": "skip", "channels": 3, "kernel": 1}},
                {"type": "flatten"}, {"type": "dense", "units": 2}]},
    {"name": "w14_causal_attention", "input": [2, 4, 8],
     "layers": [{"type": "multi_head_attention", "num_heads": 2, "causal": True},
                {"type": "dense", "units": 3}]},
    {"name": "w15_transformer", "input": [2, 5],
     "layers": [{"type": "embedding", "vocab": 9, "dim": 4},
                {"type": "residual", "layers": [
                    {"type": "layer_norm", "name": "norm"},
                    {"type": "dense", "name": "linear1", "units": 8},
                    {"type": "gelu", "approximate": "tanh"}, {"type": "dropout", "rate": 0.2},
                    {"type": "dense", "name": "linear2", "units": 4}]},
                {"type": "gelu"}, {"type": "dense", "units": 3}]},
]
SPECS = [build_spec(doc, f"<{doc['name']}>") for doc in DOCS]
NAMES = [s.name for s in SPECS]
#: one call to compile, one more to warm up, three short blocks: the witness, not the speed
TINY = Budget(warmup_calls=1, warmup_s=0.0, min_block_s=1e-4, min_blocks=3, min_total_s=0.0)


@pytest.fixture(scope="module")
def witnessed(tmp_path_factory):
    """Every spec timed in every mode and phase by one worker: (records by spec, seconds)."""
    backend = select([BACKEND])[0]
    override = os.environ.get("HARNESS_PYTHON")
    python = Path(override) if override else ensure_env(backend)
    started = time.perf_counter()
    device = DEVICE if DEVICE == "auto" or DEVICE in backend.devices else "cpu"
    run = run_worker(backend.name, python, SPECS, tmp_path_factory.mktemp("witness"),
                     device=device, timeout=600, timing=TimingRequest(budget=TINY),
                     checks=False)
    seconds = time.perf_counter() - started
    assert not run.errors, run.errors
    print(f"\n{BACKEND}: {len(SPECS)} specs timed in one worker in {seconds:.1f} s")
    for rec in run.records:  # shown with -s, or beside a failure
        for t in rec.timings:
            if t.witness:
                print(f"  {rec.spec} {t.mode} {t.phase}, first call {t.first_call_s:.3g} s: "
                      f"{_counts(t.witness.first_call)}; after it: "
                      f"{_counts(t.witness.later_calls)}")
    return dict(zip(NAMES, run.records)), seconds


def _counts(counts) -> str:
    return ", ".join(f"{k} {v}" for k, v in vars(counts).items()
                     if isinstance(v, int) and not isinstance(v, bool))


def test_the_specs_differ_in_shape_and_layer_types():
    """At least fifteen specs, no two of the same input shape and layer types."""
    kinds = {(tuple(s.input_shape), tuple(_types(d["layers"]))) for s, d in zip(SPECS, DOCS)}
    assert len(SPECS) >= 15 and len(kinds) == len(SPECS)


def _types(layers):
    for layer in layers:
        yield layer["type"]
        yield from _types(layer.get("layers", []))


@pytest.mark.parametrize("name", NAMES)
def test_every_compiled_mode_says_it_compiled(witnessed, name):
    """Each compiled mode x phase of this spec: its witness holds (compiled at the first call,
    without falling back to eager, nothing compiled after it, the framework's conditions
    true), judged by the rule the report uses (``analysis.witness_failures``)."""
    rec = witnessed[0][name]
    assert rec.status == Status.OK, rec.error
    assert {(t.mode, t.phase) for t in rec.timings} == \
        {(m, p) for m in rec.modes for p in ("inference", "train")}
    compiled = [t for t in rec.timings if t.mode != analysis.EAGER]
    if BACKEND == "numpy":  # the reference has no compiled mode, and claims none
        assert list(rec.modes) == [analysis.EAGER] and compiled == []
        assert all(t.witness is None for t in rec.timings)
        return
    assert compiled, f"{BACKEND} offers no compiled mode"
    failures = [f"{t.mode} {t.phase}: {reason}" for t in compiled
                for reason in analysis.witness_failures(t.witness, t.error)]
    assert failures == [], "\n".join(failures)
    for t in compiled:
        assert t.witness.first_call.compiled >= 1 and t.witness.api
