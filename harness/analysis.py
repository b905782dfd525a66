"""Checks of what a backend produced against what the spec says it must produce: shapes, lazy
inference, sharing, parameter counts, initial values against the analytic distribution of their
initializer (``harness.initializers``), and numerics against the NumPy reference.

``analyze`` reads a worker's ``SpecRecord`` and arrays and returns a ``Result``; it never edits
the record. Check names are the constants below, shared with the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from backends.protocol import CompileWitness, ParamRecord, SpecRecord, Status, TimingRecord, encode

from .initializers import Expectation
from .spec import ParamSpec, Spec
from .stats import Check, TimingStats, outside_support, summarize, timing_stats

NUMERICS_RTOL, NUMERICS_ATOL = 1e-4, 1e-5
#: gradients: the same relative tolerance, on the largest reference magnitude of each gradient
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
GRAD_FLOOR = 1e-2   # a gradient's scale is at least this fraction of the spec's largest
#: Where float32 rounding alone moves a result by more than the fixed tolerance allows (an
#: ill-conditioned spec: say, training-mode batch norms over a few values each, fifty layers
#: deep), the check's tolerance is this many times the distance between the NumPy reference's
#: float32 twin and the reference: another float32 implementation, summing in its own order, is
#: that far off too, give or take this factor (a rule of thumb: on resnet50's training-mode
#: output and running statistics every framework stayed within it).
FLOAT32_FACTOR = 8.0
#: A spec whose training-mode backward is chaotic in float32: the reference's float32 twin moves
#: some gradient by more than this fraction of its scale (ResNet-50 at initialization: 10% to
#: 38%, any batch and size). No tolerance then tells a right gradient from a wrong one; where
#: the spec's gradients are judged in inference mode too, its training-mode gradient
#: comparisons are reported, not judged (a wrong gradient fails its inference-mode check).
CHAOTIC = 1e-2
#: gradient values are kept in results.json for parameters this small (the lessons' examples)
SMALL = 16

# record-level checks
NAMES = "parameter names"
OUTPUT_SHAPE = "output shape"
PARAM_COUNT = "parameter count"
LAZY_BEFORE = "lazy shapes before forward"
LAZY_AFTER = "shapes after forward"
NUMERICS = "numerics vs reference"
GRADIENT = "gradient vs reference"          # subject: the parameter
INFERENCE_GRADIENT = "inference-mode gradient vs reference"  # subject: the parameter
TRAIN_OUTPUT = "training-mode output vs reference"
RUNNING_STAT = "running statistic after one training step"  # subject: the buffer
SAVE_LOAD = "save/load round trip"
PHASE = "phase ran"                         # subject: the phase
COMPILED = "compiled mode compiled"         # subject: "<mode> <phase> batch <b>"
INIT_BY_TYPE = "init_by_type reached its layers"  # subject: the layer type
MODULE_WALK = "module walk"
EAGER = "eager"                             # the mode every other mode is judged against
# per-parameter checks (the value checks are named in harness.stats and harness.initializers)
SHAPE, SHARED_WITH, TRAINABLE, VALUES = "shape", "shared_with", "trainable", "values"


@dataclass
class ParamResult:
    """One canonical parameter of the spec, as one backend realized it."""
    spec: ParamSpec
    record: ParamRecord | None     # what the backend reported (None: it reported nothing)
    init: dict                     # the spec's INIT; ``default`` carries its ``resolved`` one
    expected: Expectation
    stats: dict
    checks: list[Check]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def passed(self) -> bool:
        """Every check holds (a known framework defect's failure is a finding, not a fail)."""
        return all(c.holds for c in self.checks)

    @property
    def not_held(self) -> str | None:
        """Where the framework holds none of this parameter's values (``folded``), what the
        report says instead of a verdict on its initial values; else None."""
        return not_held(self.record) if self.record else None

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_json(self) -> dict:
        reported = encode(self.record) if self.record else {
            "name": self.name, "native_name": None, "native_shape": None, "shape": None}
        return {**reported, "not_held": self.not_held, "init": self.init,
                "expected": self.expected.to_json(), "expected_shape": list(self.spec.shape),
                "expected_shared_with": self.spec.shared_with, "stats": self.stats,
                "checks": [c.to_json() for c in self.checks], "passed": self.passed}


@dataclass
class CompiledVerdict:
    """A compiled mode's timing of one phase and batch, judged by its witness, and, only where
    the witness holds, what it buys against the eager mode at the same phase and batch.

    ``compile_s`` is the compiled first call minus the eager first call (what compiling adds
    to the first call); ``saving_s`` the eager median minus the compiled median (per call);
    ``break_even_calls`` is compile_s / saving_s, where both are positive: after about that
    many calls the compiled mode has paid for its compilation."""
    mode: str
    phase: str
    batch: int
    compiler: str | None              # the framework's compiler API (None: no witness)
    compiled: bool                    # the witness holds
    reasons: list[str] = field(default_factory=list)   # why not, in plain words
    graph_breaks: int | None = None   # at the first call
    median_s: float | None = None     # this mode's median per call
    eager_median_s: float | None = None
    speedup: float | None = None      # eager median / compiled median
    compile_s: float | None = None
    saving_s: float | None = None
    break_even_calls: float | None = None

    def to_json(self) -> dict:
        return encode(self)


@dataclass
class TimingResult:
    """One timed step with its statistics and what they mean for this spec."""
    record: TimingRecord
    stats: TimingStats | None
    flops: float                      # per call (train: 3 x forward, the usual convention)
    processes: list[float] = field(default_factory=list)  # medians of every process (repeats)
    verdict: CompiledVerdict | None = None  # a compiled mode: did it compile, what it buys

    @property
    def not_compiled(self) -> bool:
        """A compiled mode whose witness does not hold: its figures are not a compiled step's."""
        return self.verdict is not None and not self.verdict.compiled

    @property
    def mode_label(self) -> str:
        """The mode as a row may name it: never a compiled mode that did not compile."""
        return f"{self.record.mode} (not compiled)" if self.not_compiled else self.record.mode

    @property
    def throughput(self) -> float | None:
        """Samples per second."""
        return self.record.batch / self.stats.median if self.stats else None

    @property
    def gflops(self) -> float | None:
        return self.flops / self.stats.median / 1e9 if self.stats else None

    def to_json(self) -> dict:
        return {**encode(self.record), "stats": self.stats.to_json() if self.stats else None,
                "flops_per_call": self.flops, "samples_per_s": self.throughput,
                "gflops_per_s": self.gflops, "process_medians_s": self.processes,
                "compiled_verdict": self.verdict.to_json() if self.verdict else None}


@dataclass
class Result:
    """One (spec, backend): the worker's record and every check made of it."""
    backend: str
    record: SpecRecord
    checks: list[Check] = field(default_factory=list)
    params: list[ParamResult] = field(default_factory=list)
    param_count: int | None = None
    #: gradient and output values small enough to show (the lessons' examples)
    small_values: dict[str, list[float]] = field(default_factory=dict)
    timings: list[TimingResult] = field(default_factory=list)
    #: documented semantic differences that a check took into account, in plain words
    notes: list[str] = field(default_factory=list)
    machine: str | None = None         # the label of the machine it ran on

    @property
    def spec(self) -> str:
        return self.record.spec

    @property
    def ok(self) -> bool:
        """The backend ran the spec to the end (its checks may still fail)."""
        return self.record.status == Status.OK

    @property
    def supported(self) -> bool:
        """False: the backend declares it lacks what the spec needs (not run, not failed)."""
        return self.record.status != Status.UNSUPPORTED

    @property
    def passed(self) -> bool:
        """Ran, and every check passed or failed as a declared known limitation says; a spec
        the backend declares unsupported fails nothing."""
        if not self.supported:
            return True
        return self.ok and all(c.holds for c in self.checks) and \
            all(p.passed for p in self.params)

    def all_checks(self) -> list[tuple[str, Check]]:
        """Every check with what it is of: ``""`` for the record, else the parameter."""
        return [("", c) for c in self.checks] + [(p.name, c) for p in self.params
                                                  for c in p.checks]

    def known_failures(self) -> list[tuple[str, Check]]:
        """Failed checks that a known limitation or defect of the framework explains."""
        return [(where, c) for where, c in self.all_checks() if not c.passed and c.known]

    def check(self, name: str, subject: str = "") -> Check | None:
        return next((c for c in self.checks if c.name == name and c.subject == subject), None)

    def checks_named(self, name: str) -> list[Check]:
        return [c for c in self.checks if c.name == name]

    def param(self, name: str) -> ParamResult | None:
        return next((p for p in self.params if p.name == name), None)

    def failures(self) -> list[str]:
        """One line per failed check (a known limitation's or defect's is not a failure)."""
        out = [f"{c.subject + ': ' if c.subject else ''}{c.name}: observed "
               f"{_brief(c.observed)}, expected {_brief(c.expected)}"
               for c in self.checks if not c.holds]
        for p in self.params:
            out += [f"{p.name} {c.label}: observed {_brief(c.observed)}, expected "
                    f"{_brief(c.expected)} ({c.detail})" for c in p.checks if not c.holds]
        return out

    @property
    def compiled_verdicts(self) -> list[CompiledVerdict]:
        return [t.verdict for t in self.timings if t.verdict is not None]

    @property
    def n_checks(self) -> int:
        return len(self.checks) + sum(len(p.checks) for p in self.params)

    def to_json(self) -> dict:
        rec = encode(self.record)
        rec.pop("timings")
        rec.update(backend=self.backend, checks=[c.to_json() for c in self.checks],
                   params=[p.to_json() for p in self.params], param_count=self.param_count,
                   small_values=self.small_values, notes=self.notes,
                   timings=[t.to_json() for t in self.timings], passed=self.passed,
                   machine=self.machine)
        return rec


# ----------------------------------------------------------------------------- folded parameters
# A framework may hold a canonical parameter only summed into another (backends.base.Fold:
# Keras's one LSTM bias is PyTorch's bias_ih_l0 + bias_hh_l0). The worker records it
# (``ParamRecord.folded_into``, ``folded_rows``); these are the one place the harness reads it.

def folded_values(rec: ParamRecord) -> int:
    """How many of a parameter's canonical values the framework does not hold (its folded rows
    times the values per row); 0 for one held whole."""
    if rec.folded_rows is None or not rec.shape or None in rec.shape:
        return 0
    start, stop = rec.folded_rows
    return (stop - start) * math.prod(rec.shape[1:])


def not_held(rec: ParamRecord, backend: str = "") -> str | None:
    """``not held[ by BACKEND]: summed into HOST`` for a parameter the framework holds no row
    of; ``rows a:b not held...`` for one it holds partly; None for one it holds whole."""
    if rec.folded_into is None or rec.folded_rows is None:
        return None
    by = f" by {backend}" if backend else ""
    start, stop = rec.folded_rows
    whole = rec.shape is not None and rec.shape[0] == stop - start
    return (f"not held{by}" if whole else f"rows {start}:{stop} not held{by}") + \
        f": summed into {rec.folded_into}"


def folded_note(records: list[ParamRecord], backend: str) -> str | None:
    """One sentence on every folded parameter of a record, for the report and ``convert``."""
    folded = [(r, folded_values(r)) for r in records if r.folded_into is not None]
    if not folded:
        return None
    return (f"{backend} holds {sum(n for _, n in folded):,} fewer values than the spec: "
            + "; ".join(f"{r.name} {not_held(r)}" for r, _ in folded)
            + " (a framework fact: loading sums them into their host, reading gives the host "
              "the sum and these 0, their gradient is the host's)")


def _brief(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _shape_fits(reported, lazy_shape) -> bool:
    """A before-forward shape may leave dims unknown (None) but never contradict the spec."""
    return reported is not None and len(reported) == len(lazy_shape) and all(
        r is None or (r == e) for r, e in zip(reported, lazy_shape)) and all(
        r is None for r, e in zip(reported, lazy_shape) if e is None)


def numerics_check(output: np.ndarray, reference: np.ndarray, detail: str,
                   float32: np.ndarray | None = None) -> Check:
    """max |output - reference| within atol + rtol * max |reference| (or, ill-conditioned, a
    multiple of the reference's float32 twin's distance, ``float32``)."""
    return _close(NUMERICS, "", output, reference, NUMERICS_RTOL, NUMERICS_ATOL, detail,
                  float32)


def reference_failed_check() -> Check:
    """Where the NumPy reference ran but failed on a spec, every other backend's outputs and
    gradients go uncompared: a failed check saying so, never a pass without its witness."""
    return Check(NUMERICS, False, "not compared (the NumPy reference failed on this spec)",
                 "the NumPy reference's outputs and gradients",
                 "nothing to compare outputs and gradients with: see the numpy row")


def analyze(spec: Spec, defaults: dict, backend: str, record: SpecRecord, arrays: dict,
            reference: dict | None, semantics: dict | None = None) -> Result:
    """Every check of one backend's record of one spec. ``reference`` is the NumPy
    reference's arrays for the same spec (None: not compared; empty: the reference ran but
    failed on it, a failed check says so); ``semantics`` what the backend's backend.yaml
    declares (e.g. ``batch_norm_running_var: biased``)."""
    result = Result(backend, record)
    if record.status != Status.OK:
        return result
    if reference is not None and not reference:
        result.checks.append(reference_failed_check())
    _structure_checks(result, spec, record)
    reported = {q.name: q for q in record.params}
    result.params = [_param_result(p, reported.get(p.name), arrays.get(f"param/{p.name}"),
                                   defaults) for p in spec.params]
    ref = reference or {}
    if "probe_output" in arrays and "probe_output" in ref:
        result.checks.append(numerics_check(
            arrays["probe_output"], ref["probe_output"],
            "max |output - numpy reference| with the same probe parameters",
            ref.get("float32/probe_output")))
    for key in sorted(k for k in arrays if k.startswith("mode_output/")):
        if "probe_output" in ref:
            mode = key.split("/", 1)[1]
            check = numerics_check(arrays[key], ref["probe_output"],
                                   f"the {mode} mode's output, same probe parameters",
                                   ref.get("float32/probe_output"))
            check.subject = mode
            result.checks.append(check)
    if record.gradients is not None:
        _gradient_checks(result, spec, arrays, ref, semantics or {})
    if record.save_load is not None:
        sl = record.save_load
        result.checks.append(Check(SAVE_LOAD, sl.identical, sl.max_abs_diff, 0.0,
                                   f"{sl.format}: a fresh model loads {sl.file} and gives a "
                                   "bit-identical output"))
    for err in record.phase_errors:
        result.checks.append(Check(PHASE, False, err.error, "no error", "", err.phase))
    result.checks += init_by_type_checks(spec, record) + [module_walk_check(record)]
    return result


def init_by_type_checks(spec: Spec, record: SpecRecord) -> list[Check]:
    """Per layer type of the spec's ``init_by_type``: the framework's walk reached exactly the
    parameters of the spec's layers of that type (the roles given), no more, no fewer."""
    done = {r.layer_type: r for r in record.init_by_type}
    checks = []
    for t, roles in spec.plan.init_by_type.items():
        want = {p.name for p in spec.params if p.layer_type == t and p.role in roles}
        got = done.pop(t, None)
        reached = set(got.reached) if got else set()
        checks.append(Check(INIT_BY_TYPE, got is not None and reached == want,
                            sorted(reached ^ want) if got else "no record", [],
                            got.idiom if got else "the worker reported no init_by_type walk",
                            t))
    checks += [Check(INIT_BY_TYPE, False, sorted(r.reached), [], f"{r.idiom}: a layer type the "
                     "spec's init_by_type does not name", t) for t, r in done.items()]
    return checks


def module_walk_check(record: SpecRecord) -> Check:
    """The walk is reported, and every direct child is among every module (as each
    framework's recursive walk includes the first level): the same object, maybe under
    another name (PyTorch's named_modules names a shared module by its first path)."""
    w = record.walk
    if w is None:
        return Check(MODULE_WALK, False, "no walk", "children and modules", "")
    every = {e.obj for e in w.modules}
    missing = [f"{e.name} ({e.type})" for e in w.children if e.obj not in every]
    return Check(MODULE_WALK, bool(w.modules) and not missing, missing, [],
                 f"{w.children_api}: {len(w.children)}; {w.modules_api}: {len(w.modules)}; "
                 "every child among the modules")


def _structure_checks(result: Result, spec: Spec, record: SpecRecord) -> None:
    reported = {p.name: p for p in record.params}
    expected_names = [p.name for p in spec.params]
    # what the framework holds, by its own shapes (a parameter it holds only summed into
    # another has none, or fewer values); expected: the spec's less what it declares folded
    count = sum(math.prod(p.native_shape) if p.native_shape is not None else
                0 if p.folded_into is not None else math.prod(p.shape)
                for p in record.params if p.trainable and p.shape and None not in p.shape)
    folded = sum(folded_values(p) for p in record.params if p.trainable)
    result.param_count = count
    if folded:
        result.notes.append(folded_note(record.params, result.backend))
    before = {p.name: p for p in record.lazy.before}
    bad_before = [n for n, p in before.items() if n in expected_names and
                  not _shape_fits(p.shape, spec.param(n).lazy_shape)]
    after = {p.name: p.shape for p in record.lazy.after}
    bad_after = [n for n in expected_names if after.get(n) != list(spec.param(n).shape)]
    result.checks += [
        Check(NAMES, set(reported) == set(expected_names),
              sorted(set(reported) ^ set(expected_names)), [],
              "the spec's canonical names, each once (names differing shown)"),
        Check(OUTPUT_SHAPE, record.output_shape == list(spec.output_shape), record.output_shape,
              list(spec.output_shape), "first forward's output"),
        Check(PARAM_COUNT, count == spec.param_count - folded, count,
              spec.param_count - folded, "trainable scalars, shared ones once" + (
                  f"; the spec's {spec.param_count:,} less {folded:,} the framework holds only "
                  "summed into another parameter" if folded else "")),
        Check(LAZY_BEFORE, not bad_before, bad_before, [],
              "known dims match the spec, open dims unknown"),
        Check(LAZY_AFTER, not bad_after, bad_after, [],
              "every parameter materialized with its canonical shape"),
    ]


def tolerance(reference: np.ndarray, rtol: float, atol: float) -> float:
    """atol + rtol * max |reference|: float32 arithmetic in a framework against a float64
    reference, relative to the largest value (sums of many float32 terms stay well inside
    1e-4 of it; a transposed, wrongly summed or missing term does not)."""
    return atol + rtol * (float(np.max(np.abs(reference))) if reference.size else 0.0)


def _close(name: str, subject: str, got, want, rtol: float, atol: float, detail: str,
           float32=None) -> Check:
    """max |got - want| within ``tolerance``, or within ``FLOAT32_FACTOR`` times how far the
    reference's float32 twin (``float32``, None: not run) is from ``want`` where that is more."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return Check(name, False, f"shape {list(got.shape)}", f"shape {list(want.shape)}",
                     detail, subject)
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    tol = tolerance(want, rtol, atol)
    moved = float32_moved(float32, want)
    if moved is not None and FLOAT32_FACTOR * moved > tol:
        tol = FLOAT32_FACTOR * moved
        detail += (f"; {ILL_CONDITIONED}: the reference's own float32 run is {moved:.3g} off, "
                   f"so within {FLOAT32_FACTOR:g}x that")
    return Check(name, err <= tol, err, tol, detail, subject)


#: the words a check's detail carries when its tolerance came from the float32 twin
ILL_CONDITIONED = "ill-conditioned in float32"


def float32_moved(float32, want) -> float | None:
    """max |float32 twin - reference| (None: no twin, or not a numeric array of its shape)."""
    if float32 is None:
        return None
    twin = np.asarray(float32)
    if twin.shape != np.shape(want) or not np.issubdtype(twin.dtype, np.floating):
        return None
    moved = float(np.max(np.abs(twin.astype(np.float64) - want))) if twin.size else 0.0
    return moved if math.isfinite(moved) else None


def _gradient_checks(result: Result, spec: Spec, arrays: dict, ref: dict,
                     semantics: dict) -> None:
    """Gradients, the training-mode output and the running statistics after one training
    step, against the NumPy reference; small values kept for the report."""
    trainable = [p for p in spec.params if p.trainable]
    for p in trainable:
        got = arrays.get(f"grad/{p.name}")
        if got is not None and got.size <= SMALL:
            result.small_values[f"grad/{p.name}"] = [float(v) for v in got.ravel()]
    if "train_output" in arrays and arrays["train_output"].size <= SMALL:
        result.small_values["train_output"] = [float(v) for v in arrays["train_output"].ravel()]
    if "train_output" not in ref:
        return
    training = _compare_gradients(result, trainable, arrays, ref, "grad/", GRADIENT,
                                  "max |grad - reference grad|, canonical layout")
    inference = _compare_gradients(result, trainable, arrays, ref, "inference_grad/",
                                   INFERENCE_GRADIENT, "max |grad - reference grad|, canonical "
                                   "layout, batch norm from its running statistics")
    chaos = float32_chaos(trainable, ref)
    if chaos is not None and chaos > CHAOTIC and inference:  # judged there (and failed there)
        for c in training:  # passed or not, a comparison that could not tell: no verdict
            if isinstance(c.observed, float) and math.isfinite(c.observed):
                c.unjudged = (f"{ILL_CONDITIONED}: the reference's own float32 run moves this "
                              f"spec's training-mode gradients by up to {chaos:.0%} of their "
                              f"scale; judged in inference mode instead")
    result.checks.append(_close(TRAIN_OUTPUT, "", arrays["train_output"], ref["train_output"],
                                NUMERICS_RTOL, NUMERICS_ATOL,
                                "training-mode forward (batch statistics) with the probe",
                                ref.get("float32/train_output")))
    declared = semantics.get("batch_norm_running_var")
    per_device = ""
    if isinstance(declared, dict):  # per device, e.g. MXNet: CPU biased, cuDNN unbiased
        device = "cuda" if (result.record.device or "").startswith("cuda") else "cpu"
        declared, per_device = declared.get(device), f" (the rule declared for {device})"
    biased = declared == "biased"
    for p in spec.params:
        if not p.role.startswith("running_"):
            continue
        variant = "reference_biased" if biased and p.role == "running_var" else "trained"
        want, got = ref.get(f"{variant}/{p.name}"), arrays.get(f"trained/{p.name}")
        if want is None or got is None:
            result.checks.append(Check(RUNNING_STAT, False, "missing", "present",
                                       "running statistic after the training pass", p.name))
            continue
        how = "the biased batch variance (this framework's rule)" if variant != "trained" \
            else "PyTorch's rule"
        result.checks.append(_close(RUNNING_STAT, p.name, got, want, NUMERICS_RTOL,
                                    NUMERICS_ATOL, f"after one training step, updated with "
                                    f"{how}{per_device}",
                                    None if variant != "trained" else
                                    ref.get(f"float32/trained/{p.name}")))
        if variant != "trained":
            result.notes.append(
                f"{p.name}: {result.backend} updates the running variance with the biased "
                "batch variance (PyTorch uses the unbiased one, n/(n-1) times larger); "
                "checked against that exact expectation, a documented semantic difference")


def _gradient_scale(ref: dict, prefix: str) -> float:
    """The spec's largest reference gradient (of the pass ``prefix`` names)."""
    return max((float(np.max(np.abs(v))) for k, v in ref.items()
                if k.startswith(prefix) and v.size), default=0.0)


def _compare_gradients(result: Result, trainable: list, arrays: dict, ref: dict, prefix: str,
                       name: str, detail: str) -> list[Check]:
    """One check per trainable parameter the reference has a ``prefix`` gradient of. A
    gradient that is zero in exact arithmetic (a bias before batch norm) is float32 rounding
    of terms as large as the model's other gradients: its scale is at least ``GRAD_FLOOR`` of
    the largest gradient of the spec."""
    floor = GRAD_FLOOR * _gradient_scale(ref, prefix)
    checks = []
    for p in trainable:
        got, want = arrays.get(f"{prefix}{p.name}"), ref.get(f"{prefix}{p.name}")
        if want is None:
            continue
        if got is None:
            checks.append(Check(name, False, "missing", list(want.shape),
                                "the backend returned no gradient", p.name))
            continue
        checks.append(_close(name, p.name, got, want, GRAD_RTOL, GRAD_ATOL + GRAD_RTOL * floor,
                             detail, ref.get(f"float32/{prefix}{p.name}")))
    result.checks += checks
    return checks


def float32_chaos(trainable: list, ref: dict) -> float | None:
    """How far the reference's float32 twin moves the training-mode gradients, at most, as a
    fraction of each one's scale (its largest value, at least ``GRAD_FLOOR`` of the spec's
    largest gradient); None: no twin."""
    floor = GRAD_FLOOR * _gradient_scale(ref, "grad/")
    worst = None
    for p in trainable:
        want = ref.get(f"grad/{p.name}")
        moved = None if want is None else float32_moved(ref.get(f"float32/grad/{p.name}"), want)
        if moved is not None:
            size = max(float(np.max(np.abs(want))) if want.size else 0.0, floor)
            worst = max(worst or 0.0, moved / size if size else 0.0)
    return worst


def analyze_timings(results: list[Result], specs: list[Spec]) -> None:
    """Statistics of every timed step, grouped with the same step timed in repeat processes
    (``Result.timings``; the first process's blocks give the row's statistics); each compiled
    mode judged by its witness (a ``COMPILED`` check) and, where that holds, against eager."""
    by_spec = {s.name: s for s in specs}
    for r in results:
        spec = by_spec[r.spec]
        for t in r.record.timings:
            stats = timing_stats(t.block_times, t.number) if not t.error else None
            forward = spec.flops_per_sample * t.batch
            r.timings.append(TimingResult(t, stats, forward * (3 if t.phase == "train" else 1),
                                          [stats.median] if stats else []))
        eager = {(t.record.phase, t.record.batch): t for t in r.timings
                 if t.record.mode == EAGER}
        for t in r.timings:
            if t.record.mode != EAGER:
                t.verdict = compiled_verdict(t, eager.get((t.record.phase, t.record.batch)))
                r.checks.append(_compiled_check(t.record, t.verdict.reasons))


def witness_failures(witness: CompileWitness | None, error: str | None = None) -> list[str]:
    """Why a compiled mode's timing is not the timing of a compiled step, in plain words
    (empty: its witness holds). It holds when the framework says its compiler made at least
    one program at the first call without falling back to eager, made nothing after it (in
    the warm-up and the timed blocks), and every condition it states is true."""
    if error:
        return [f"the step failed, so nothing shows it compiled: {error}"]
    if witness is None:
        return ["no witness: the adapter reports no compile counts for this mode, so nothing "
                "shows that it compiled"]
    name, first, later = witness.compiler, witness.first_call, witness.later_calls
    out = []
    if first.fallbacks:
        out.append(f"{name} fell back to eager at the first call: "
                   f"{_reasons(first.fallback_reasons)}")
    if first.compiled <= 0:
        out.append(f"{name} compiled nothing at the first call"
                   + (f" ({first.traced} traced)" if first.traced is not None else ""))
    again = [f"{n} {what}" for n, what in ((later.compiled, "programs compiled"),
                                           (later.recompiles, "recompilations"),
                                           (later.fallbacks, "fallbacks to eager")) if n]
    if again or later.traced:
        out.append(f"{name} compiled again after the first call, in the warm-up or the timed "
                   f"blocks: {', '.join(again) or f'{later.traced} traced'}"
                   + (f" ({_reasons(later.fallback_reasons)})" if later.fallback_reasons
                      else ""))
    out += [f"{name}: {condition}: no" for condition, held in witness.conditions.items()
            if not held]
    return out


def _reasons(reasons: dict[str, int]) -> str:
    return "; ".join(f"{reason} (x{n})" if n > 1 else reason
                     for reason, n in reasons.items()) or "no reason given"


def compiled_verdict(t: TimingResult, eager: TimingResult | None) -> CompiledVerdict:
    """``t`` (a compiled mode's row) judged by its witness and, where that holds and both rows
    have statistics, compared with ``eager`` (the same phase and batch)."""
    rec, witness = t.record, t.record.witness
    reasons = witness_failures(witness, rec.error)
    verdict = CompiledVerdict(rec.mode, rec.phase, rec.batch,
                              witness.compiler if witness else None, not reasons, reasons,
                              witness.first_call.graph_breaks if witness else None)
    if reasons or eager is None or eager.stats is None or t.stats is None:
        return verdict
    verdict.median_s, verdict.eager_median_s = t.stats.median, eager.stats.median
    verdict.speedup = eager.stats.median / t.stats.median
    verdict.saving_s = eager.stats.median - t.stats.median
    if rec.first_call_s is not None and eager.record.first_call_s is not None:
        verdict.compile_s = rec.first_call_s - eager.record.first_call_s
        if verdict.compile_s > 0 and verdict.saving_s > 0:
            verdict.break_even_calls = verdict.compile_s / verdict.saving_s
    return verdict


def _compiled_check(rec: TimingRecord, reasons: list[str]) -> Check:
    return Check(COMPILED, not reasons, "; ".join(reasons) or "compiled at the first call, "
                 "nothing compiled after it", "compiled at the first call, nothing compiled "
                 "after it", "the framework's own compile counts for this step",
                 f"{rec.mode} {rec.phase} batch {rec.batch}")


def add_repeat(result: Result, record: SpecRecord) -> None:
    """Fold a repeat process's timings of the same spec into ``result``'s rows; a compiled
    mode whose witness fails in the repeat fails its check there too."""
    for t in record.timings:
        row = next((x for x in result.timings if (x.record.mode, x.record.phase,
                                                  x.record.batch) == (t.mode, t.phase, t.batch)),
                   None)
        stats = timing_stats(t.block_times, t.number) if not t.error else None
        if t.mode != EAGER:
            reasons = witness_failures(t.witness, t.error)
            if reasons:
                check = _compiled_check(t, reasons)
                check.subject += " (a repeat process)"
                result.checks.append(check)
                continue  # its median is not a compiled one
        if row is not None and stats is not None:
            row.processes.append(stats.median)


def _param_result(p: ParamSpec, rec: ParamRecord | None, values, defaults) -> ParamResult:
    init = p.init if p.init["name"] != "default" else \
        {"name": "default", "resolved": p.resolved_init(defaults)}
    expected = p.expected(defaults)
    checks = [Check(SHAPE, rec is not None and rec.shape == list(p.shape),
                    rec.shape if rec else None, list(p.shape), "canonical layout")]
    if rec is not None:
        checks.append(Check(SHARED_WITH, rec.shared_with == p.shared_with, rec.shared_with,
                            p.shared_with, "aliases of this parameter"))
        checks.append(Check(TRAINABLE, rec.trainable == p.trainable, rec.trainable, p.trainable,
                            "running statistics are not trainable"))
    held = None if rec is None or rec.folded_rows is None else \
        np.ones(p.shape[0], bool)  # rows the framework holds: only those were drawn
    if held is not None:
        held[slice(*rec.folded_rows)] = False
    if values is not None and values.shape == tuple(p.shape) and held is not None:
        stats = summarize(values[held]) if held.any() else {"n": 0}
        if held.any():  # only elementwise expectations reach a partly held one (a bias)
            checks += expected.checks(np.asarray(values[held], dtype=np.float64))
    elif values is not None and values.shape == tuple(p.shape):
        stats = summarize(values)
        checks += expected.checks(np.asarray(values, dtype=np.float64))
        support = getattr(expected, "support", None)
        if support and support[0] is not None and values.size:
            stats["outside_support"] = outside_support(values, *support)
    else:
        stats = summarize(values) if values is not None else {"n": 0}
        checks.append(Check(VALUES, False, None, list(p.shape),
                            "values missing or in the wrong shape"))
    return ParamResult(p, rec, init, expected, stats, checks)
