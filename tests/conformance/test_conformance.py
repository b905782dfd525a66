"""One conformance suite for every backend (HARNESS_BACKEND picks it): the backend's real worker,
in its real environment, runs every built-in spec plus the suite's own, and what it reports must
match what the spec alone says: names, shapes, lazy inference, initial-value distributions,
sharing, trainable state, numerics against the NumPy reference, determinism and device records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backends.base import unsupported_reason
from backends.protocol import Budget, Status, TimingRequest
from harness import analysis
from harness.envs import ROOT, ensure_env, select
from harness.runner import run_worker
from harness.spec import load_spec

BACKEND = os.environ["HARNESS_BACKEND"]  # conftest.py refuses to run without it
#: HARNESS_DEVICE (conftest.py checks it): what the worker is asked for; a CPU-only backend
#: (``devices: [cpu]``) is asked for the CPU, as ``compare`` does
DEVICE = os.environ.get("HARNESS_DEVICE", "auto")

SPEC_FILES = sorted((ROOT / "specs").glob("*.yaml")) + \
    sorted((Path(__file__).parent / "specs").glob("*.yaml"))
SPECS = [load_spec(f) for f in SPEC_FILES]
#: what the backend declares it lacks (backend.yaml `unsupported:`): those specs are not run
DECLARED = select([BACKEND])[0].unsupported
LACKING = {s.name: why for s in SPECS
           if (why := unsupported_reason(s.plan, DECLARED.get("layers", {})))}
SPEC_NAMES = [s.name for s in SPECS if s.name not in LACKING]
TIMEOUT = 600


def _interpreter(backend) -> Path:
    override = os.environ.get("HARNESS_PYTHON")
    return Path(override) if override else ensure_env(backend)


@pytest.fixture(scope="session")
def backend():
    return select([BACKEND])[0]


@pytest.fixture(scope="session")
def python(backend):
    return _interpreter(backend)


@pytest.fixture(scope="session")
def device(backend) -> str:
    return DEVICE if DEVICE == "auto" or DEVICE in backend.devices else "cpu"


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Probe outputs of the NumPy reference (pure NumPy: it runs in this interpreter)."""
    result = run_worker("numpy", Path(sys.executable), SPECS, tmp_path_factory.mktemp("ref"),
                        device="cpu", timeout=TIMEOUT, reference_variants=True)
    assert all(r.status == Status.OK for r in result.records), result.records
    return {r.spec: a for r, a in zip(result.records, result.arrays)}


@pytest.fixture(scope="session")
def run(backend, python, device, tmp_path_factory):
    return run_worker(backend.name, python, SPECS, tmp_path_factory.mktemp("run"),
                      device=device, timeout=TIMEOUT, unsupported=backend.unsupported)


@pytest.fixture(scope="session")
def analyzed(run, backend, reference):
    out = {}
    for spec, rec, arrays in zip(SPECS, run.records, run.arrays):
        ref = reference[spec.name] if backend.name != "numpy" else None
        out[spec.name] = analysis.analyze(spec, backend.defaults, backend.name, rec, arrays, ref,
                                          backend.semantics)
    return out


def _spec(name):
    return next(s for s in SPECS if s.name == name)


def _arrays(run, name):
    return run.arrays[[s.name for s in SPECS].index(name)]


def _declared_unsupported(rec, phase) -> bool:
    """True (after checking the record says why) where backend.yaml declares the phase
    unsupported: the test of that phase has nothing to check."""
    why = DECLARED.get("phases", {}).get(phase)
    if why is not None:
        assert rec is None or rec.unsupported.get(phase) == why, (phase, rec)
    return why is not None


@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_what_the_backend_declares_unsupported_is_not_run(analyzed, name):
    """A spec needing a layer type the backend.yaml declares unsupported is reported so, with
    the reason, and not run; every other spec runs (the rest of the suite checks it)."""
    rec = analyzed[name].record
    if name in LACKING:
        assert rec.status == Status.UNSUPPORTED and rec.error == LACKING[name], rec
    else:
        assert rec.status != Status.UNSUPPORTED, rec
    for phase, why in rec.unsupported.items():
        assert DECLARED.get("phases", {}).get(phase) == why, (phase, why)


def test_worker_reports_its_environment(run, backend):
    """The worker starts, names its framework's version, its interpreter and the device used."""
    assert not run.errors, run.errors
    env = run.environment
    assert env is not None and env.backend == backend.name
    assert env.versions and all(isinstance(v, (str, type(None))) for v in env.versions.values())
    assert env.device == "cpu" or env.device.startswith("cuda")
    assert Path(env.executable).exists()


def test_runs_on_the_requested_device(run, device):
    """Every spec ran where the worker set up: on the GPU for HARNESS_DEVICE=cuda (a framework
    that cannot use one fails here, with its reason), on the CPU for cpu, on either for auto."""
    assert run.environment is not None, run.records[0].error
    where = run.environment.device
    if device != "auto":
        assert where.startswith(device), where
    ran = [r for r in run.records if r.spec not in LACKING]
    assert all(r.device == where for r in ran), [(r.spec, r.device, r.error) for r in ran]


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_spec_runs(analyzed, name):
    """Every spec builds, infers, initializes and runs without error."""
    rec = analyzed[name].record
    assert rec.status == Status.OK, f"{rec.error}\n{rec.traceback or ''}"


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_canonical_names_and_shapes(analyzed, name):
    """Exactly the spec's canonical parameters, each once, in canonical layout."""
    rec = analyzed[name].record
    reported = {p.name: p.shape for p in rec.params}
    expected = {p.name: list(p.shape) for p in _spec(name).params}
    assert reported == expected
    assert len(rec.params) == len(expected)
    assert rec.output_shape == list(_spec(name).output_shape)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_native_names_and_shapes(analyzed, name):
    """Each parameter also carries the framework's own name and shape (same number of values,
    but for a parameter the framework holds only summed into another: its folded rows'
    fewer, none at all where every row is folded)."""
    for p in analyzed[name].record.params:
        assert isinstance(p.native_name, str) and p.native_name, p
        held = 0 if p.native_shape is None else math.prod(p.native_shape)
        assert p.native_shape is not None or p.folded_into is not None, p
        assert held == math.prod(p.shape) - analysis.folded_values(p), p
        assert p.dtype == "float32", p


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_lazy_shapes_before_and_after_first_forward(analyzed, name):
    """Before the first forward no open size is known (and none contradicts the spec); after it,
    every parameter exists with its full canonical shape."""
    rec, spec = analyzed[name].record, _spec(name)
    for p in rec.lazy.before:
        lazy = spec.param(p.name).lazy_shape
        assert len(p.shape) == len(lazy), p
        for got, want in zip(p.shape, lazy):
            assert got == want or (got is None), (p.name, p.shape, lazy)
        if None in lazy:
            assert not p.initialized, p
    after = {p.name: p.shape for p in rec.lazy.after}
    assert after == {p.name: list(p.shape) for p in spec.params}


def test_eager_sizes_are_known_before_forward(analyzed):
    """Sizes given in the spec (in_units) are not left for inference."""
    before = {p.name: p for p in analyzed["mlp_4_3_1"].record.lazy.before}
    for p in _spec("mlp_4_3_1").params:
        if p.name in before:
            assert before[p.name].shape == list(p.shape)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_initial_values_match_their_analytic_distribution(analyzed, name):
    """Every parameter passes every check against its initializer's distribution."""
    failures = [f"{p.name} [{p.init}] {c.label}: observed {c.observed}, expected "
                f"{c.expected} ({c.detail})"
                for p in analyzed[name].params for c in p.checks if not c.passed]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_initializer_realization_is_reported(analyzed, name):
    """Each parameter says whether its initializer was the framework's own or a custom one
    (or, held only summed into another, that it is not held: the framework draws none)."""
    for p in analyzed[name].record.params:
        kind = p.init_impl and p.init_impl.split(":")[0]
        assert kind in ("native", "custom") or (
            kind == "not held" and analysis.not_held(p) is not None), p


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_module_walk_and_init_by_type(analyzed, name):
    """The framework's own walk is reported (every direct child among every module), and each
    ``init_by_type`` reached exactly the parameters of the spec's layers of that type."""
    failed = [f"{c.subject} {c.name}: {c.observed} ({c.detail})" for c in analyzed[name].checks
              if c.name in (analysis.MODULE_WALK, analysis.INIT_BY_TYPE) and not c.passed]
    assert not failed and analyzed[name].check(analysis.MODULE_WALK), failed
    assert len(analyzed[name].checks_named(analysis.INIT_BY_TYPE)) == \
        len(_spec(name).plan.init_by_type)


def test_lesson_002_children_against_modules(analyzed):
    """Lesson 002: the net's direct children are its three blocks (no dense layer among
    them); the recursive walk reaches the three dense layers inside them, which its
    init_by_type initialized (their values pass their distribution checks above)."""
    walk = analyzed["lesson_002"].record.walk
    dense = {"Linear", "Dense"}  # torch's class, the others'
    assert len(walk.children) == 3 and not any(e.type in dense for e in walk.children)
    assert sum(e.type in dense for e in walk.modules) == 3, walk.modules
    (by_type,) = analyzed["lesson_002"].record.init_by_type
    assert by_type.layer_type == "dense" and len(by_type.reached) == 6


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_sharing_and_parameter_count(analyzed, name):
    """Shared parameters appear once, with their aliases; the count counts them once."""
    result, spec = analyzed[name], _spec(name)
    for p in result.record.params:
        assert p.shared_with == spec.param(p.name).shared_with, p.name
    folded = sum(analysis.folded_values(p) for p in result.record.params if p.trainable)
    assert result.param_count == spec.param_count - folded
    assert result.check(analysis.PARAM_COUNT).passed


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_trainable_state(analyzed, name):
    """Weights and biases are trainable; batch-norm running statistics are not."""
    for p in analyzed[name].record.params:
        assert p.trainable == _spec(name).param(p.name).trainable, p.name


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_numerics_match_the_reference(analyzed, run, reference, name):
    """With the same probe parameters, the output equals the NumPy reference's."""
    arrays = _arrays(run, name)
    out, ref = arrays["probe_output"], reference[name]["probe_output"]
    assert out.shape == ref.shape
    tol = analysis.NUMERICS_ATOL + analysis.NUMERICS_RTOL * float(np.max(np.abs(ref)))
    assert float(np.max(np.abs(out - ref))) <= tol


#: (backend, spec, array) whose float32 values are equal again only to a relative tolerance, not
#: bitwise: on keras_torch, TorchTruncatedNormal's torch.erfinv over init_catalogue's
#: trunc_normal.weight (131,072 values) came out up to 7.5e-5 apart (relative 6.6e-5) in the
#: half of the tensor a second intra-op thread computes, when the worker had run the other
#: conformance specs first, and bitwise equal when run alone or twice in a row (CI on
#: 2026-12-06); the cause is not found: kept visible here, not hidden by an xfail
NOT_BITWISE = {("keras_torch", "init_catalogue", "param/trunc_normal.weight"): 1e-4}


def test_same_seed_same_values_other_seed_other_values(backend, python, device, run, tmp_path):
    """Initialization is deterministic in the seed: identical values again with the same seed,
    different random values with another."""
    names = ["tied", "init_catalogue"]
    specs = [_spec(n) for n in names]
    again = run_worker(backend.name, python, specs, tmp_path / "same", device=device,
                       timeout=TIMEOUT)
    other = run_worker(backend.name, python, [load_spec(s.file, seed=s.seed + 1) for s in specs],
                       tmp_path / "other", device=device, timeout=TIMEOUT)
    for i, name in enumerate(names):
        first = _arrays(run, name)
        for p in _spec(name).params:
            key = f"param/{p.name}"
            rtol = NOT_BITWISE.get((backend.name, name, key))
            if rtol is None:
                np.testing.assert_array_equal(again.arrays[i][key], first[key], err_msg=key)
            else:
                np.testing.assert_allclose(again.arrays[i][key], first[key], rtol=rtol, atol=0,
                                           err_msg=key)
        random = [p for p in _spec(name).params
                  if p.expected(backend.defaults).kind not in ("constant", "eye", "dirac")]
        assert random
        for p in random:
            key = f"param/{p.name}"
            assert not np.array_equal(other.arrays[i][key], first[key]), key


def test_device_request_is_honoured_or_refused_clearly(backend, python, tmp_path):
    """``--device cuda`` runs on a GPU when one is visible, else fails with a clear cause."""
    result = run_worker(backend.name, python, [_spec("lazy_mlp")], tmp_path, device="cuda",
                        timeout=TIMEOUT)
    rec = result.records[0]
    if result.environment is not None:
        assert result.environment.device.startswith("cuda")
        assert rec.status == Status.OK and rec.device.startswith("cuda")
    else:
        assert rec.status == Status.FAILED
        # the one wording every backend uses (backends.base.CUDA_UNAVAILABLE)
        assert rec.error.startswith("DeviceUnavailable: CUDA requested, but "), rec.error
        assert "sees no usable GPU: " in rec.error, rec.error


# ------------------------------------------------------------------ training semantics

def _trainable(name):
    return {p.name for p in _spec(name).params if p.trainable}


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_no_phase_failed(analyzed, name):
    """Gradients, save/load and the wider-input phase all ran (a phase that fails shows its
    error here)."""
    errors = [f"{e.phase}: {e.error}" for e in analyzed[name].record.phase_errors]
    assert errors == [], "\n".join(errors)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_gradients_match_the_reference(analyzed, backend, name):
    """Every trainable parameter's gradient of sum(output * C), in canonical layout, and the
    training-mode output, match the NumPy reference's (a shared parameter once)."""
    result = analyzed[name]
    if _declared_unsupported(result.record, "gradients"):
        return
    grads = result.record.gradients
    assert grads is not None, result.record.phase_errors
    assert set(grads.names) == _trainable(name)
    if backend.name == "numpy":
        return  # the reference itself: tests/unit/test_numpy_backward.py checks it
    checks = result.checks_named(analysis.GRADIENT)
    assert {c.subject for c in checks} == _trainable(name)
    failed = [f"{c.subject}: error {c.observed} > {c.expected}" for c in checks if not c.passed]
    assert failed == []
    assert result.check(analysis.TRAIN_OUTPUT).passed, result.check(analysis.TRAIN_OUTPUT)
    inference = result.checks_named(analysis.INFERENCE_GRADIENT)
    if _spec(name).plan.inference_gradients:  # batch norm from its running statistics
        assert {c.subject for c in inference} == _trainable(name)
        assert [f"{c.subject}: {c.observed} > {c.expected}" for c in inference
                if not c.passed] == []
    else:
        assert inference == []


def test_shared_gradient_lesson_gives_9_and_6(run):
    """Two uses of one 1 -> 1 weight of 3 on the input 1: output 9, weight gradient 3 + 3."""
    arrays = _arrays(run, "shared_gradient")
    assert arrays["train_output"].tolist() == [[9.0]]
    assert arrays["grad/w.weight"].tolist() == [[6.0]]
    assert arrays["probe_output"].tolist() == [[9.0]]


BN_SPECS = [n for n in SPEC_NAMES if any(p.role.startswith("running_")
                                         for p in _spec(n).params)]


@pytest.mark.parametrize("name", BN_SPECS)
def test_batch_norm_training_statistics(analyzed, backend, name):
    """After one training step the running mean and variance are the reference's, updated with
    the framework's own rule (the biased-variance rule where backend.yaml declares it)."""
    result = analyzed[name]
    running = {p.name for p in _spec(name).params if p.role.startswith("running_")}
    if backend.name == "numpy" or _declared_unsupported(result.record, "gradients"):
        return
    checks = result.checks_named(analysis.RUNNING_STAT)
    assert {c.subject for c in checks} == running
    assert [c.subject for c in checks if not c.passed] == [], checks


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_save_load_round_trip_is_bit_identical(analyzed, name):
    """Saved in the framework's native format, loaded by a freshly built model of the same spec
    (lazy where the spec is): the very same output."""
    if _declared_unsupported(analyzed[name].record, "save_load"):
        return
    sl = analyzed[name].record.save_load
    assert sl is not None, analyzed[name].record.phase_errors
    assert sl.size_bytes > 0 and sl.names and sl.format
    assert sl.identical, f"max |difference| {sl.max_abs_diff}"


def test_wider_input_after_inference_is_refused(analyzed):
    """After the first forward fixed lazy_mlp's sizes, one more input feature is an error."""
    if _declared_unsupported(analyzed["lazy_mlp"].record, "mismatch"):
        return
    mismatch = analyzed["lazy_mlp"].record.mismatch
    assert mismatch is not None and mismatch.input_shape == [2, 21]
    assert mismatch.error, "the framework accepted an input of another width"


@pytest.mark.parametrize("name", [n for n in ("conformance_convert", "conformance_residual",
                                               "conformance_recurrent", "conformance_attention")
             if n in SPEC_NAMES])
def test_convert_round_trips_through_this_backend(backend, analyzed, tmp_path, name):
    """torch -> this backend -> torch on a conv -> flatten -> dense model (where a channels-last
    framework must flatten in canonical order), on the residual spec (torchvision's names), on
    the recurrent spec (nn.LSTM / nn.GRU state_dicts) and on the attention spec (PyTorch's packed
    in_proj_weight against per-head kernels): both conversions prove themselves by equal
    outputs, and the weights come back bit-identical; a bias this backend holds only summed
    into another (Keras's LSTM, Flax's cells) comes back as that sum in its host and 0 itself,
    and convert says so."""
    if _declared_unsupported(None, "save_load"):
        return  # a backend without a native format converts nothing
    spec = _spec(name)
    folded = [p for p in analyzed[name].record.params if p.folded_into is not None]
    torch_python = None if backend.name == "torch" else \
        Path(os.environ["HARNESS_TORCH_PYTHON"]) if os.environ.get("HARNESS_TORCH_PYTHON") \
        else ensure_env(select(["torch"])[0])
    probe = run_worker("torch", torch_python or _interpreter(backend), [spec], tmp_path / "w",
                       device="cpu", timeout=TIMEOUT, task="write_checkpoint",
                       checkpoint=str(tmp_path / "start.pt"))
    assert probe.records[0].status == Status.OK, probe.records[0].error
    suffix = analyzed["lazy_mlp"].record.save_load.file.removeprefix("model")
    middle, back = tmp_path / f"middle{suffix}", tmp_path / "back.pt"
    pythons = [f"--python={b}={p}" for b, p in (("torch", torch_python),
                                                 (backend.name, os.environ.get("HARNESS_PYTHON")))
               if p]
    for src, weights, dst, out in (("torch", tmp_path / "start.pt", backend.name, middle),
                                   (backend.name, middle, "torch", back)):
        proc = subprocess.run([sys.executable, "-m", "harness", "convert", spec.file, "--from",
                               src, "--weights", str(weights), "--to", dst, "--out", str(out),
                               *pythons], cwd=ROOT, capture_output=True, text=True,
                              timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "agree" in proc.stdout and out.is_file()
        assert ("folded" in proc.stdout) == bool(folded), proc.stdout
    read = [run_worker("torch", torch_python or _interpreter(backend), [spec], tmp_path / f"r{i}",
                       device="cpu", timeout=TIMEOUT, task="read_checkpoint",
                       checkpoint=str(path)) for i, path in enumerate((tmp_path / "start.pt",
                                                                       back))]
    first, last = (r.arrays[0] for r in read)
    want = {p.name: first[f"param/{p.name}"].copy() for p in spec.params}
    for p in folded:  # the sum in the host's folded rows, 0 in the folded parameter's
        rows = slice(*p.folded_rows)
        want[p.folded_into][rows] += want[p.name][rows]
        want[p.name][rows] = 0
    for p in spec.params:
        np.testing.assert_array_equal(last[f"param/{p.name}"], want[p.name], err_msg=p.name)


# ------------------------------------------------------------------ timing

TINY = Budget(warmup_calls=1, warmup_s=0.0, min_block_s=1e-4, min_blocks=3, min_total_s=0.0)


@pytest.fixture(scope="session")
def timed(backend, python, device, tmp_path_factory):
    spec = _spec("small_cnn")
    return run_worker(backend.name, python, [spec], tmp_path_factory.mktemp("timed"),
                      device=device, timeout=TIMEOUT,
                      timing=TimingRequest(budget=TINY, roofline=64),
                      unsupported=backend.unsupported)


def test_timings_for_every_mode_and_phase(timed, backend):
    """Every mode the adapter offers (eager always) x inference and train: timed, with finite
    positive block times, a first call, and the API that realized it; the roofline too."""
    rec = timed.records[0]
    assert rec.status == Status.OK, rec.error
    if _declared_unsupported(rec, "timing"):
        return
    assert "eager" in rec.modes and all(rec.modes.values())
    assert {(t.mode, t.phase) for t in rec.timings} == \
        {(m, p) for m in rec.modes for p in ("inference", "train")}
    for t in rec.timings:
        assert t.error is None, f"{t.mode} {t.phase}: {t.error}"
        assert t.number >= 1 and len(t.block_times) >= TINY.min_blocks
        assert all(math.isfinite(x) and x > 0 for x in t.block_times)
        assert t.first_call_s is not None and t.first_call_s > 0
    roof = timed.done.roofline
    assert roof is not None and roof.error is None and roof.block_times


def test_compiled_modes_match_the_reference(timed, backend, reference):
    """A compiled mode's output (probe parameters, inference) is the NumPy reference's."""
    arrays = timed.arrays[0]
    compiled = [m for m in timed.records[0].modes if m != "eager"]
    for mode in compiled:
        out, ref = arrays[f"mode_output/{mode}"], reference["small_cnn"]["probe_output"]
        tol = analysis.NUMERICS_ATOL + analysis.NUMERICS_RTOL * float(np.max(np.abs(ref)))
        assert float(np.max(np.abs(out - ref))) <= tol, mode


def test_timing_off_times_nothing(run):
    """Without a timing request (``--timing off``) no record holds a timing or a mode."""
    assert all(r.timings == [] and r.modes == {} for r in run.records)


#: torch's own modules for conformance_attention: nn.MultiheadAttention itself, called with the
#: boolean causal mask torch documents (True: not attended); the state_dict torch.save writes
REAL_ATTENTION = """
import sys
import numpy as np
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mix = nn.Linear(8, 8)
        self.causal_attn = nn.MultiheadAttention(8, 4, batch_first=True)
        self.plain = nn.MultiheadAttention(8, 1, bias=False, batch_first=True)
        self.attn_again = self.attn  # used twice: state_dict names it twice (as the spec's ref)

    def forward(self, x):
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        x = self.attn(x, x, x, need_weights=False)[0]
        x = torch.tanh(self.mix(x))
        x = self.causal_attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        x = self.plain(x, x, x, need_weights=False, attn_mask=mask)[0]
        return self.attn(x, x, x, need_weights=False)[0]

torch.manual_seed(1)
net = Net().eval()
torch.save(net.state_dict(), sys.argv[2])
with torch.no_grad():
    np.save(sys.argv[3], net(torch.from_numpy(np.load(sys.argv[1]))).numpy())
"""


def _torch_module_runs_as_torch_runs_it(backend, tmp_path, spec_name, program):
    """Runs ``program`` (torch's own modules: argv input .npy, checkpoint, output .npy) in the
    torch environment on the spec's input, loads the checkpoint it saved into the harness's
    torch model of the spec and requires the module's output."""
    from harness.runner import make_input

    spec = _spec(spec_name)
    np.save(tmp_path / "x.npy", make_input(spec))
    proc = subprocess.run([str(_interpreter(backend)), "-c", program,
                           str(tmp_path / "x.npy"), str(tmp_path / "real.pt"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    read = run_worker("torch", _interpreter(backend), [spec], tmp_path / "w", device="cpu",
                      timeout=TIMEOUT, task="read_checkpoint",
                      checkpoint=str(tmp_path / "real.pt"))
    assert read.records[0].status == Status.OK, read.records[0].error
    np.testing.assert_allclose(read.arrays[0]["output"], np.load(tmp_path / "y.npy"),
                               rtol=0, atol=1e-6)


def test_torch_multihead_attention_checkpoint_runs_as_torch_runs_it(backend, tmp_path):
    """A state_dict that torch.save wrote of a module built from nn.MultiheadAttention itself
    (not the harness's) loads into the harness's torch model of conformance_attention, whose
    output on the spec's input is torch's own module's, causal masks included."""
    _torch_module_runs_as_torch_runs_it(backend, tmp_path, "conformance_attention",
                                        REAL_ATTENTION)


if BACKEND != "torch":  # torch's own modules run in the torch environment: only its suite has it
    del test_torch_multihead_attention_checkpoint_runs_as_torch_runs_it


#: torch's own nn.LSTM / nn.GRU (batch_first, torch's own initialization, seeded) chained as
#: conformance_recurrent chains them, under its layer names; writes the state_dict torch.save
#: writes and the modules' output on the spec's input
REAL_RECURRENT = """
import sys
import numpy as np
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.LSTM(3, 4, batch_first=True)
        self.mix = nn.GRU(4, 3, batch_first=True)
        self.plain = nn.GRU(3, 3, batch_first=True)
        self.last = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        x = self.plain(self.mix(self.enc(x)[0])[0])[0]
        return self.head(self.last(x)[0][:, -1])

torch.manual_seed(3)
net = Net().eval()
torch.save(net.state_dict(), sys.argv[2])
with torch.no_grad():
    np.save(sys.argv[3], net(torch.from_numpy(np.load(sys.argv[1]))).numpy())
"""


def test_torch_lstm_gru_checkpoint_runs_as_torch_runs_it(backend, tmp_path):
    """A state_dict that torch.save wrote of nn.LSTM and nn.GRU modules themselves (not the
    harness's) loads into the harness's torch model of conformance_recurrent, whose output on
    the spec's input is theirs (gate order i, f, g, o and r, z, n, both biases, the reset gate
    after the recurrent matmul, the last step of a return_sequences: false LSTM)."""
    _torch_module_runs_as_torch_runs_it(backend, tmp_path, "conformance_recurrent",
                                        REAL_RECURRENT)


if BACKEND != "torch":  # torch's own modules run in the torch environment: only its suite has it
    del test_torch_lstm_gru_checkpoint_runs_as_torch_runs_it


#: specs/models/transformer_encoder_layer.yaml (BERT-base sizes): the zoo's spec of
#: nn.TransformerEncoderLayer, whose checkpoints the tests below take as torch.save wrote them
ENCODER_LAYER = load_spec(ROOT / "specs" / "models" / "transformer_encoder_layer.yaml")

#: torch's own nn.TransformerEncoderLayer (post-norm, GELU, batch_first) in eval mode, seeded;
#: writes the state_dict torch.save writes and, given an input file, its output on it
REAL_ENCODER_LAYER = """
import sys
import numpy as np
import torch
from torch import nn

torch.manual_seed(2)
layer = nn.TransformerEncoderLayer(768, 12, dim_feedforward=3072, dropout=0.1,
                                   activation="gelu", batch_first=True).eval()
torch.save(layer.state_dict(), sys.argv[1])
if len(sys.argv) > 2:
    with torch.no_grad():
        np.save(sys.argv[3], layer(torch.from_numpy(np.load(sys.argv[2]))).numpy())
"""


def _real_encoder_layer(python, tmp_path, x=None):
    """Runs REAL_ENCODER_LAYER in ``python``: the checkpoint's path and, with ``x``, the
    module's output on it."""
    args = [str(tmp_path / "encoder.pt")]
    if x is not None:
        np.save(tmp_path / "x.npy", x)
        args += [str(tmp_path / "x.npy"), str(tmp_path / "y.npy")]
    proc = subprocess.run([str(python), "-c", REAL_ENCODER_LAYER, *args], capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "encoder.pt", (np.load(tmp_path / "y.npy") if x is not None else None)


def test_real_torch_transformer_encoder_layer_checkpoint_runs_as_torch_runs_it(backend, tmp_path):
    """The state_dict torch.save wrote of a real nn.TransformerEncoderLayer(768, 12, 3072,
    gelu, batch_first=True) loads (strict) into the harness's torch model of the zoo's
    transformer_encoder_layer.yaml, whose output on the spec's input is the module's own (eval
    mode: dropout off; torch may take its fused encoder fast path there)."""
    from harness.runner import make_input

    x = make_input(ENCODER_LAYER)
    real, want = _real_encoder_layer(_interpreter(backend), tmp_path, x)
    read = run_worker("torch", _interpreter(backend), [ENCODER_LAYER], tmp_path / "w",
                      device="cpu", timeout=TIMEOUT, task="read_checkpoint",
                      checkpoint=str(real))
    assert read.records[0].status == Status.OK, read.records[0].error
    np.testing.assert_allclose(read.arrays[0]["output"], want, rtol=0, atol=1e-5)


if BACKEND != "torch":  # torch's own module runs in the torch environment: only its suite has it
    del test_real_torch_transformer_encoder_layer_checkpoint_runs_as_torch_runs_it


def _convert_there_and_back(backend, spec, real, suffix, torch_python, tmp_path) -> Path:
    """``python -m harness convert`` of the torch checkpoint ``real`` to this backend (a file
    of ``suffix``) and back to torch: each call must exit 0 and say its outputs agree; returns
    the torch file that came back."""
    middle, back = tmp_path / f"middle{suffix}", tmp_path / "back.pt"
    pythons = [f"--python={b}={p}" for b, p in (("torch", torch_python),
                                                 (backend.name, os.environ.get("HARNESS_PYTHON")))
               if p]
    for src, weights, dst, out in (("torch", real, backend.name, middle),
                                   (backend.name, middle, "torch", back)):
        proc = subprocess.run([sys.executable, "-m", "harness", "convert", spec.file,
                               "--from", src, "--weights", str(weights), "--to", dst, "--out",
                               str(out), *pythons], cwd=ROOT, capture_output=True, text=True,
                              timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "agree" in proc.stdout and out.is_file()
    return back


def test_convert_real_transformer_encoder_layer_checkpoint_through_this_backend(
        backend, analyzed, tmp_path):
    """A real nn.TransformerEncoderLayer checkpoint (torch.save of its state_dict) converts
    torch -> this backend -> torch with the zoo's spec: each conversion proves itself by equal
    outputs, and the weights come back bit-identical to the module's own."""
    if _declared_unsupported(None, "save_load"):
        return  # a backend without a native format converts nothing
    torch_python = _interpreter(backend) if backend.name == "torch" else \
        Path(os.environ["HARNESS_TORCH_PYTHON"]) if os.environ.get("HARNESS_TORCH_PYTHON") \
        else ensure_env(select(["torch"])[0])
    real, _ = _real_encoder_layer(torch_python, tmp_path)
    suffix = analyzed["lazy_mlp"].record.save_load.file.removeprefix("model")
    back = _convert_there_and_back(backend, ENCODER_LAYER, real, suffix, torch_python, tmp_path)
    read = [run_worker("torch", torch_python, [ENCODER_LAYER], tmp_path / f"r{i}", device="cpu",
                       timeout=TIMEOUT, task="read_checkpoint", checkpoint=str(path))
            for i, path in enumerate((real, back))]
    first, last = (r.arrays[0] for r in read)
    for p in ENCODER_LAYER.params:
        np.testing.assert_array_equal(last[f"param/{p.name}"], first[f"param/{p.name}"])


#: prints a state_dict file's keys and shapes as JSON, in its order
STATE_DICT_KEYS = """
import json, sys
import torch
state = torch.load(sys.argv[1], weights_only=True)
print(json.dumps([[k, list(v.shape)] for k, v in state.items()]))
"""


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_real_torchvision_checkpoint_keys_are_the_torch_models(backend, tmp_path, model):
    """The harness's torch model of a zoo ResNet saves torchvision's state_dict key for key, in
    order: the spec's canonical names (tests/unit/test_model_zoo.py holds them to torchvision's)
    with each BatchNorm2d's num_batches_tracked (a 0-dimensional counter) after its
    running_var, so a torchvision checkpoint loads into it with strict=True."""
    spec = load_spec(ROOT / "specs" / "models" / f"{model}.yaml")
    written = run_worker("torch", _interpreter(backend), [spec], tmp_path / "w", device="cpu",
                         timeout=TIMEOUT, task="write_checkpoint",
                         checkpoint=str(tmp_path / "m.pt"))
    assert written.records[0].status == Status.OK, written.records[0].error
    proc = subprocess.run([str(_interpreter(backend)), "-c", STATE_DICT_KEYS,
                           str(tmp_path / "m.pt")], capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    expected = []
    for p in spec.params:
        expected.append([p.name, list(p.shape)])
        if p.name.endswith(".running_var"):
            expected.append([p.name.removesuffix("running_var") + "num_batches_tracked", []])
    assert json.loads(proc.stdout) == expected


if BACKEND != "torch":  # the torch model's state_dict: only the torch suite has it
    del test_real_torchvision_checkpoint_keys_are_the_torch_models



#: torchvision's own ResNet (torchvision.models.<name>(), its own code, seeded; batch norms given
#: running statistics, affine values and a num_batches_tracked of 7, so that eval mode uses them)
#: in eval mode: writes the state_dict as torch.save writes it and, given an input file, its
#: output on it. Run in the torch suite's torchvision environment (_torchvision_python).
TORCHVISION_RESNET = """
import sys, types
# PyPI's torchvision 0.28.0 (the release for torch 2.13) is the CUDA build: its compiled ops
# (torchvision/_C.so) link libtorch_cuda and libc10_cuda and do not load against the CPU torch;
# torchvision/extension.py swallows that, then torchvision/_meta_registrations.py registers meta
# kernels for ops never defined and fails the import ("operator torchvision::nms does not
# exist"). Those ops are the detection ones (nms, roi_align, ...); the classification models
# use none, so an empty module in its place lets torchvision import and build them.
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
import numpy as np
import torch
import torchvision

torch.manual_seed(3)
model = getattr(torchvision.models, sys.argv[1])()
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
            m.num_batches_tracked.fill_(7)
model.eval()
torch.save(model.state_dict(), sys.argv[2])
if len(sys.argv) > 3:
    with torch.no_grad():
        np.save(sys.argv[4], model(torch.from_numpy(np.load(sys.argv[3]))).numpy())
"""


def _torchvision_python() -> Path:
    """The torch suite's torchvision environment: backends/torch/requirements-torchvision.txt
    (torch's pins plus torchvision), built as a backend's is, in .envs/torch-torchvision;
    HARNESS_TORCHVISION_PYTHON names an existing interpreter instead."""
    override = os.environ.get("HARNESS_TORCHVISION_PYTHON")
    return Path(override) if override else \
        ensure_env(dataclasses.replace(select(["torch"])[0], flavor="torchvision"))


def _torchvision_resnet(model, tmp_path, x=None):
    """Runs TORCHVISION_RESNET for ``model``: the checkpoint's path and, with ``x``, the
    module's output on it."""
    args = [model, str(tmp_path / f"{model}.pt")]
    if x is not None:
        np.save(tmp_path / "x.npy", x)
        args += [str(tmp_path / "x.npy"), str(tmp_path / "y.npy")]
    proc = subprocess.run([str(_torchvision_python()), "-c", TORCHVISION_RESNET, *args],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / f"{model}.pt", (np.load(tmp_path / "y.npy") if x is not None else None)


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_real_torchvision_checkpoint_runs_as_torchvision_runs_it(backend, tmp_path, model):
    """The state_dict torch.save wrote of torchvision.models.resnet18/50 as torchvision builds
    it (num_batches_tracked included) loads strict into the harness's torch model of the zoo's
    spec, whose output on the spec's input (eval mode: the batch norms' running statistics) is
    torchvision's own."""
    from harness.runner import make_input

    spec = load_spec(ROOT / "specs" / "models" / f"{model}.yaml")
    real, want = _torchvision_resnet(model, tmp_path, make_input(spec))
    read = run_worker("torch", _interpreter(backend), [spec], tmp_path / "w", device="cpu",
                      timeout=TIMEOUT, task="read_checkpoint", checkpoint=str(real))
    assert read.records[0].status == Status.OK, read.records[0].error
    assert read.arrays[0]["output"].shape == want.shape == tuple(spec.output_shape)
    np.testing.assert_allclose(read.arrays[0]["output"], want, rtol=0, atol=1e-4)


if BACKEND != "torch":  # torchvision runs in the torch suite's own environment
    del test_real_torchvision_checkpoint_runs_as_torchvision_runs_it


RESNET18 = load_spec(ROOT / "specs" / "models" / "resnet18.yaml")

#: compares two state_dict files: the keys whose tensors are not bit-identical, as JSON
STATE_DICTS_DIFFER = """
import json, sys
import torch
a, b = (torch.load(f, weights_only=True) for f in sys.argv[1:3])
print(json.dumps({"keys": [list(a), list(b)], "differ": [k for k in a if k in b and not (
    a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]}))
"""


def test_convert_real_torchvision_resnet18_checkpoint_through_this_backend(backend, tmp_path):
    """The state_dict torch.save wrote of torchvision's own resnet18 converts torch -> this
    backend -> torch with the zoo's spec: each conversion proves itself by equal outputs, and
    the file that comes back has torchvision's keys in order, every weight and batch-norm
    statistic bit-identical to torchvision's; only the num_batches_tracked counters, which the
    spec does not model, are not carried (written as a fresh module's 0)."""
    if _declared_unsupported(None, "save_load"):
        return  # a backend without a native format converts nothing
    torch_python = Path(os.environ["HARNESS_TORCH_PYTHON"]) \
        if os.environ.get("HARNESS_TORCH_PYTHON") else ensure_env(select(["torch"])[0])
    real, _ = _torchvision_resnet("resnet18", tmp_path)
    back = _convert_there_and_back(backend, RESNET18, real, backend.checkpoint.get("suffix", ""),
                                   torch_python, tmp_path)
    proc = subprocess.run([str(torch_python), "-c", STATE_DICTS_DIFFER, str(real), str(back)],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["keys"][1] == got["keys"][0] and len(got["keys"][0]) == len(RESNET18.params) + 20
    assert got["differ"] == [k for k in got["keys"][0] if k.endswith(".num_batches_tracked")]


if BACKEND == "torch":  # torch -> torch is no conversion; the test above reads it in torch
    del test_convert_real_torchvision_resnet18_checkpoint_through_this_backend


# ------------------------------------------------------------------ dropout

#: run in the backend's own interpreter: the checks' gradient pass twice, then one eager
#: training step; prints the facts as JSON
DROPOUT_PROGRAM = r"""
import importlib, json, sys
import numpy as np
from backends import protocol
req = json.load(sys.stdin)
a = importlib.import_module(f"backends.{req['backend']}.adapter").Adapter()
a.setup(req["device"], {})
a.seed(0)
model = a.build(protocol.decode(protocol.Plan, req["plan"], "plan"))
x, c = (np.asarray(req[k], np.float32) for k in ("x", "c"))
a.forward(model, x)
a.load(model, {k: np.asarray(v, np.float32) for k, v in req["probe"].items()})
grads = [a.gradients(model, x, c)[1]["dense.weight"] for _ in range(2)]
before = a.values(model)["dense.weight"]
out = a.step(model, "train", "eager", a.to_device(x), a.to_device(c), 0.5)()
a.block(out)
if req["backend"] == "keras_jax":  # Keras's JAX guide threads the variables as the step's state
    for v, value in zip(model.net.trainable_variables, out[1]):
        v.assign(value)
after = a.values(model)["dense.weight"]
print(json.dumps({"same_grads": bool(np.array_equal(grads[0], grads[1])),
                  "zero_grad_columns": int(np.sum(np.all(grads[0] == 0, axis=0))),
                  "unchanged_columns": int(np.sum(np.all(after == before, axis=0)))}))
"""


def test_dropout_is_the_identity_in_the_checks_and_drops_in_the_training_step(
        backend, python, device):
    """``dropout(0.5)`` on 64 inputs before a dense: the checks' training-mode gradient pass
    is deterministic and leaves every input (so every column of the dense weight's gradient)
    in; the timed training step drops about half of them, and the SGD update leaves exactly
    the dropped columns of the weight unchanged (none dropped has probability 2^-64)."""
    from backends import protocol
    from harness.runner import make_cotangent, make_input, make_probe
    from harness.spec import build_spec

    spec = build_spec({"name": "dropout", "input": [1, 64], "seed": 5, "layers": [
        {"type": "dropout", "rate": 0.5}, {"type": "dense", "name": "dense", "units": 3}]})
    request = {"backend": backend.name, "device": device, "plan": protocol.encode(spec.plan),
               "x": make_input(spec).tolist(), "c": make_cotangent(spec).tolist(),
               "probe": {k: v.tolist() for k, v in make_probe(spec).items()}}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(python), "-c", DROPOUT_PROGRAM], input=json.dumps(request),
                          capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["same_grads"] and facts["zero_grad_columns"] == 0, facts
    assert 12 <= facts["unchanged_columns"] <= 52, facts


def test_benchmark_models_training_rows(backend, python, device):
    """benchmarks/models.py's training rows through the real fidelity worker, on a tiny conv +
    batch norm + dropout model: one row per mode, the harness's timer and the framework's own
    tool each timed their step (Gluon's gluon.Trainer loop). Only the gluon suite has it: the
    plumbing is the same for every backend, Gluon's compile is the cheapest (about 4 s)."""
    if str(ROOT) not in sys.path:  # benchmarks/ is scripts, not the installed package
        sys.path.insert(0, str(ROOT))
    from benchmarks.timing_fidelity import run

    doc = {"name": "tiny", "input": [4, 3, 8, 8], "layers": [
        {"type": "conv2d", "channels": 4, "kernel": 3, "padding": 1}, {"type": "batch_norm"},
        {"type": "relu"}, {"type": "flatten"}, {"type": "dropout", "rate": 0.1},
        {"type": "dense", "units": 5}]}
    budget = Budget(warmup_calls=1, warmup_s=0.0, min_block_s=1e-3, min_blocks=3,
                    min_total_s=0.05)
    result = run(backend.name, 1, 1, device=device, python=python, models=["tiny"],
                 documents={"tiny": doc}, budget=budget, phases=["train"], timeout=TIMEOUT)
    assert result.error is None and result.environment is not None, result.error
    assert [(r["phase"], r["mode"]) for r in result.rows] == [("train", "eager"),
                                                              ("train", "compiled")]
    for row in result.rows:
        assert "error" not in row, row["error"]
        assert len(row["harness"]) >= 3 and len(row["reference"]) >= 3
        assert min(row["harness"] + row["reference"]) > 0
        assert "mx.nd.waitall()" in row["tool"]


if BACKEND != "gluon":  # one backend's environment shows the plumbing; see the docstring
    del test_benchmark_models_training_rows
