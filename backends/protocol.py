"""The typed protocol between the harness (parent) and a backend's worker: every record that
crosses the process boundary, one schema version, one constructor for a failed record, and a
strict decoder.

Standard library only: the worker imports it in every backend environment (numpy 1.23 to 2.x,
Python 3.10 to 3.12) and the parent imports it without any framework.

Wire format: JSON. A record is written as ``{"schema_version": N, ...fields}`` by ``dump`` and
read back by ``load(cls, data)``, which checks the version first and then every field's type
against the dataclass annotations. Anything a worker wrote is untrusted: a wrong version, a
missing or unexpected field or a value of the wrong type raises ``ProtocolError`` (never a
KeyError or a silently misread field), which the parent turns into a failed record.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from dataclasses import dataclass, field
from typing import Any

#: bump when any record below changes shape; the parent refuses other versions
SCHEMA_VERSION = 6

#: the environment variable that gives a worker its harness's pid (backends.worker.die_with_parent)
PARENT_VARIABLE = "HARNESS_PARENT_PID"


class Status(str, enum.Enum):
    """What became of one (spec, backend) pair."""
    OK = "ok"            # ran to the end; its checks decide whether it passed
    FAILED = "failed"    # could not run (error says why)
    SKIPPED = "skipped"  # not asked for (e.g. a phase turned off)
    UNSUPPORTED = "unsupported"  # needs what the backend declares it does not support


#: the worker's phases after the numerics, each of which may fail (or be unsupported) alone
PHASES = ("gradients", "save_load", "timing", "mismatch")


class ProtocolError(ValueError):
    """Worker output that does not fit the protocol (wrong version, field or type)."""


# ------------------------------------------------------------------------ plan (parent -> worker)

@dataclass
class PlanNode:
    """One node of a plan: a layer, or structure (``sequential``, ``ref``, ``residual``).
    ``name`` is its segment (the spec's name or its index), ``path`` the dotted canonical prefix
    of its parameters, ``in_rank`` the rank of its input (4 = NCHW), ``attrs`` its layer type's
    fields as ``backends.layers`` defines them (every one filled in; read as ``node.units``),
    ``init`` role -> INIT: {"name": NAME, ARG: VALUE, ...} with every argument filled in. A
    ``sequential`` has ``layers``; a ``residual`` its body in ``layers``, an optional
    ``shortcut`` node and an optional ``activation`` leaf; a ``ref`` the path ``to`` of the
    layer it uses again. See backends/base.py for the meaning of each."""
    type: str
    name: str
    path: str
    in_rank: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    layers: list[PlanNode] = field(default_factory=list)
    shortcut: PlanNode | None = None
    activation: PlanNode | None = None
    to: str | None = None
    init: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        from backends import layers  # noqa: PLC0415 (the registry imports this module)

        layers.check_node(self)

    def __getattr__(self, name: str) -> Any:
        """A layer field (``node.units``, ``node.kernel``) from ``attrs``."""
        attrs = self.__dict__.get("attrs")
        if attrs is not None and name in attrs:
            return attrs[name]
        raise AttributeError(f"{type(self).__name__} of type "
                             f"{self.__dict__.get('type')!r} has no attribute {name!r}")


@dataclass
class Plan:
    """A validated spec, as a worker builds it."""
    name: str
    seed: int
    input_shape: list[int]
    layers: list[PlanNode]
    timed: bool = True               # False: the spec opts out of timing (``timing: false``)
    #: the spec's ``init_by_type``: layer type -> role -> INIT (every argument filled in), for
    #: the adapter to realize by the framework's own walk over its layers after the build
    init_by_type: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: the spec's ``inference_gradients``: the gradient pass also in inference mode (batch norm
    #: from its running statistics), beside the training-mode one
    inference_gradients: bool = False


@dataclass
class Budget:
    """How long the timer measures one step (see backends/timer.py)."""
    warmup_calls: int = 3        # at least this many calls before measuring ...
    warmup_s: float = 0.1        # ... and at least this long
    min_block_s: float = 2e-3    # calls per block: grown until one block lasts this long
    min_blocks: int = 20         # at least this many measured blocks ...
    min_total_s: float = 0.2     # ... totalling at least this long


@dataclass
class TimingRequest:
    """What to time, per plan: every mode the adapter offers (or those named) x phases x
    batch sizes; ``roofline`` > 0 also times an n x n float32 matmul once per worker."""
    budget: Budget = field(default_factory=Budget)
    modes: list[str] | None = None
    phases: list[str] = field(default_factory=lambda: ["inference", "train"])
    batches: list[int] = field(default_factory=list)  # empty: the spec's own batch size
    lr: float = 1e-3
    roofline: int = 0


@dataclass
class Request:
    """What the parent asks of one worker process (``request.json``). Arrays travel in ``.npz``
    files: ``inputs`` holds per plan index ``i`` the input ``"i"``, the training cotangent
    ``"i/cotangent"`` and an input of another width ``"i/mismatch"``; ``probe`` the probe
    parameters as ``"<i>/<canonical name>"``.

    ``task`` is ``compare`` (everything below, per plan), ``read_checkpoint`` (load the native
    file ``checkpoint`` into the first plan's model and write its canonical parameters) or
    ``write_checkpoint`` (load the canonical ``probe`` parameters and save a native file at
    ``checkpoint``). ``checks`` False (a timing repeat) skips everything but the timing."""
    backend: str
    adapter: str                     # the adapter's module, importable from the project root
    device: str                      # "auto", "cpu" or "cuda"
    plans: list[Plan]
    inputs: str
    probe: str | None
    out_dir: str
    settings: dict[str, Any] = field(default_factory=dict)
    task: str = "compare"
    checks: bool = True
    timing: TimingRequest | None = None
    checkpoint: str | None = None
    reference_variants: bool = False  # the NumPy reference: also the biased-variance update
    #: what the backend declares it does not support, with the reason: ``{"layers": {TYPE:
    #: why}, "phases": {PHASE: why}}``; a plan needing such a layer type is not run (its record
    #: says ``unsupported``), such a phase (PHASES) is skipped
    unsupported: dict[str, dict[str, str]] = field(default_factory=dict)


# --------------------------------------------------------------------- records (worker -> parent)

@dataclass
class ParamRecord:
    """One parameter or buffer as an adapter reports it.

    ``shape`` is canonical (PyTorch layout) with None for a size not known yet; ``native_shape``
    is what the framework itself reports, in its own terms (Gluon writes an unknown size as 0;
    None when it cannot say); ``trainable`` is the framework's own flag (None while the framework
    has no variable to ask); ``touch`` is what the framework does when the value is read before
    it exists (the exception, as text)."""
    name: str
    role: str
    native_name: str | None
    shape: list[int | None] | None
    native_shape: list[int | None] | None
    dtype: str | None
    trainable: bool | None
    shared_with: list[str] = field(default_factory=list)
    initialized: bool = True
    touch: str | None = None
    init_impl: str | None = None
    #: a parameter the framework holds only summed into another (``backends.base.Fold``): that
    #: one's canonical name, and the (start, stop) rows folded (the rest, if any, held apart)
    folded_into: str | None = None
    folded_rows: list[int] | None = None

    @property
    def kind(self) -> str:
        return "buffer" if self.role.startswith("running_") else "parameter"


@dataclass
class LazyRecord:
    """Parameters before and after the first forward, and what reading them too early does
    when the framework has no per-parameter object to say it on."""
    before: list[ParamRecord] = field(default_factory=list)
    after: list[ParamRecord] = field(default_factory=list)
    early_access: str | None = None


@dataclass
class PhaseError:
    """Why one phase of a spec failed while the others went on."""
    phase: str
    error: str


@dataclass
class GradientRecord:
    """The training-mode pass: arrays ``grad/<name>`` (canonical layout), ``train_output`` and
    ``trained/<name>`` (every parameter and buffer after it: batch-norm running statistics
    updated once)."""
    names: list[str]                 # the gradients the framework returned
    loss_value: float


@dataclass
class SaveLoadRecord:
    """Native save, load into a freshly built model, and the outputs of both."""
    format: str
    file: str
    size_bytes: int
    names: list[str]                 # as stored in the file (native names)
    identical: bool                  # the reloaded model's output equals the original's
    max_abs_diff: float
    note: str | None = None          # what loading needed (e.g. a forward to build first)


@dataclass
class MismatchRecord:
    """A forward with an input of another width after the sizes were inferred."""
    input_shape: list[int]
    error: str | None                # the framework's own error (None: it raised none)
    output_shape: list[int] | None = None


@dataclass
class CompileCounts:
    """What a framework's compiler did during some calls of one compiled step, in the
    framework's own counts (cumulative when an adapter reads them, differences in a
    ``CompileWitness``). None: the framework has no such count. What each count is, per
    framework, is in the README ("Compiled modes and their witness")."""
    compiled: int = 0                  # programs made: graphs, traces, executables, CachedOps
    traced: int | None = None          # frames or functions the compiler traced
    recompiles: int | None = None      # a program made again for code it had compiled before
    graph_breaks: int | None = None    # where the compiler split the code, running the rest eagerly
    fallbacks: int | None = None       # code the compiler gave up on, run eagerly instead
    cache_hits: int | None = None      # programs loaded from an on-disk cache instead of compiled
    #: the framework's own words (first line) for each graph break, and for each fallback
    graph_break_reasons: dict[str, int] = field(default_factory=dict)
    fallback_reasons: dict[str, int] = field(default_factory=dict)

    def since(self, earlier: CompileCounts) -> CompileCounts:
        """What happened between ``earlier`` and these (cumulative) counts."""
        def minus(now, then):
            return None if now is None or then is None else now - then

        def new(now: dict, then: dict) -> dict:
            return {k: n - then.get(k, 0) for k, n in now.items() if n > then.get(k, 0)}
        return CompileCounts(self.compiled - earlier.compiled,
                             minus(self.traced, earlier.traced),
                             minus(self.recompiles, earlier.recompiles),
                             minus(self.graph_breaks, earlier.graph_breaks),
                             minus(self.fallbacks, earlier.fallbacks),
                             minus(self.cache_hits, earlier.cache_hits),
                             new(self.graph_break_reasons, earlier.graph_break_reasons),
                             new(self.fallback_reasons, earlier.fallback_reasons))


@dataclass
class CompileWitness:
    """A compiled step's own account of itself, read from the framework (``api``): what its
    compiler (``compiler``, e.g. ``torch.compile``) did at the first call and over every later
    call (warm-up and timed blocks), and conditions the framework states about the step, each
    True or False (e.g. ``XLA must-compile set on the traced function``)."""
    compiler: str
    api: str
    first_call: CompileCounts
    later_calls: CompileCounts
    conditions: dict[str, bool] = field(default_factory=dict)


@dataclass
class TimingRecord:
    """One timed step: raw block times (seconds) of ``number`` calls each. ``first_call_s``
    is the first call alone (tracing and compilation included for compiled modes)."""
    mode: str
    phase: str                       # "inference" or "train" (or "matmul": the roofline)
    batch: int
    number: int = 0
    block_times: list[float] = field(default_factory=list)
    first_call_s: float | None = None
    warmup_calls: int = 0
    memory_peak: int | None = None   # bytes of device memory at the peak (GPU only)
    #: bytes: the worker's resident memory when the step began, and its peak while the step ran
    #: (first call, warm-up, timed blocks; the kernel's VmHWM, reset before the step)
    host_rss_start: int | None = None
    host_rss_peak: int | None = None
    error: str | None = None
    witness: CompileWitness | None = None  # compiled modes: what the framework says it did


@dataclass
class ModuleEntry:
    """One module as a framework's own walk yields it: its native name (path), its class, and
    ``obj``, its object's number in this walk (equal numbers: one object, e.g. a shared module
    listed under two names)."""
    name: str
    type: str
    obj: int


@dataclass
class ModuleWalk:
    """The built model's module tree through the framework's own public API: its direct
    children and every module (recursively), each with the API that listed them."""
    children_api: str
    children: list[ModuleEntry]
    modules_api: str
    modules: list[ModuleEntry]


@dataclass
class InitByTypeRecord:
    """How the spec's ``init_by_type`` for one layer type was realized: the framework's idiom
    (``net.apply(fn)`` with ``isinstance``, ...) and the canonical parameters it reached."""
    layer_type: str
    idiom: str
    reached: list[str]


@dataclass
class SpecRecord:
    """Everything one worker learned about one plan. Arrays travel beside it in ``<i>.npz``:
    ``param/<name>`` (initial values, canonical layout), ``output`` (first forward),
    ``probe_output`` (forward with the probe parameters), ``mode_output/<mode>`` (the same in a
    compiled mode), ``grad/<name>``, ``train_output``, ``trained/<name>`` (the gradient pass),
    ``inference_grad/<name>`` (the spec's ``inference_gradients``), ``reference_biased/<name>``
    and ``float32/<probe_output, train_output, grad/<name>, inference_grad/<name>,
    trained/<name>>`` (the NumPy reference only: its other running-variance rule, its float32
    twin)."""
    spec: str
    status: Status
    error: str | None = None
    traceback: str | None = None
    log_tail: str | None = None
    device: str | None = None
    lazy: LazyRecord = field(default_factory=LazyRecord)
    params: list[ParamRecord] = field(default_factory=list)
    output_shape: list[int] | None = None
    #: one-off phases in seconds, e.g. {"build": 0.01, "first_forward": 0.2}
    phases: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None
    phase_errors: list[PhaseError] = field(default_factory=list)
    gradients: GradientRecord | None = None
    save_load: SaveLoadRecord | None = None
    mismatch: MismatchRecord | None = None
    modes: dict[str, str] = field(default_factory=dict)   # timed mode -> the API realizing it
    timings: list[TimingRecord] = field(default_factory=list)
    #: phases skipped because the backend declares it does not support them, with the reason
    unsupported: dict[str, str] = field(default_factory=dict)
    walk: ModuleWalk | None = None   # the module tree, after initialization
    init_by_type: list[InitByTypeRecord] = field(default_factory=list)


@dataclass
class EnvironmentRecord:
    """What a worker set up: written once, as ``worker.json``."""
    backend: str
    device: str                      # "cpu" or "cuda:0"
    device_name: str
    versions: dict[str, str | None]  # package -> version (the frameworks, and their backends)
    python: str
    executable: str
    platform: str
    numpy: str
    settings: dict[str, Any] = field(default_factory=dict)
    semantics: dict[str, str] = field(default_factory=dict)
    import_s: float | None = None    # importing the framework
    setup_s: float | None = None     # the rest of set-up (device selection, ...)


@dataclass
class DoneRecord:
    """Written last (``done.json``): what the worker measured once, after every plan.
    ``peak_rss_bytes``: the worker's own peak resident memory (``VmHWM``), and
    ``children_peak_rss_bytes`` that of the largest process it started and waited for."""
    wall_s: float
    roofline: TimingRecord | None = None
    peak_rss_bytes: int | None = None
    children_peak_rss_bytes: int | None = None


@dataclass
class FatalRecord:
    """Why a worker could not start at all (``fatal.json``)."""
    error: str
    traceback: str = ""


def unsupported_record(spec: str, reason: str) -> SpecRecord:
    """A spec the backend was not asked to run: it needs what the backend declares it lacks."""
    return SpecRecord(spec=spec, status=Status.UNSUPPORTED, error=reason)


def failed_record(spec: str, error: str, *, log_tail: str | None = None,
                  traceback: str | None = None, device: str | None = None) -> SpecRecord:
    """The one way to say that a spec could not run on a backend, wherever that is found out."""
    return SpecRecord(spec=spec, status=Status.FAILED, error=error, traceback=traceback,
                      log_tail=log_tail, device=device)


# ----------------------------------------------------------------------------- encoding

def encode(obj: Any) -> Any:
    """A record (or anything inside one) as plain JSON data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    return obj


def dump(record: Any) -> dict:
    """``{"schema_version": SCHEMA_VERSION, ...}``: what goes into a worker's JSON file."""
    return {"schema_version": SCHEMA_VERSION, **encode(record)}


def load(cls: type, data: Any, where: str = "") -> Any:
    """The record of type ``cls`` in ``data`` (as ``dump`` wrote it), version and types checked."""
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ProtocolError(f"{label}: expected a JSON object, got {_kind(data)}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ProtocolError(
            f"{label}: written with protocol schema version {version!r}, but this harness "
            f"reads version {SCHEMA_VERSION}: the worker ran other harness code than the parent "
            "(an interpreter or PYTHONPATH pointing at another checkout?); run the worker from "
            "the same checkout as `python -m harness`")
    return decode(cls, {k: v for k, v in data.items() if k != "schema_version"}, label)


def decode(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as type ``tp``, or ProtocolError naming the field."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, _UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return decode(arm, value, where)
            except ProtocolError as exc:
                errors.append(str(exc))
        raise ProtocolError(errors[0] if len(errors) == 1 else
                            f"{where}: {_kind(value)} fits none of {_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {_kind(value)}")
        return [decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected an object, got {_kind(value)}")
        return {k: decode(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ProtocolError(f"{where}: {value!r} is not one of "
                                f"{[m.value for m in tp]}") from None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer of hundreds of digits
                raise ProtocolError(f"{where}: an integer too large for a float") from None
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if type(value) is tp:
            return value
    else:
        raise TypeError(f"protocol: no decoder for {tp!r}")
    raise ProtocolError(f"{where}: expected {tp.__name__}, got {_kind(value)}")


_UnionType = type(int | None)


def _decode_dataclass(cls, value, where):
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected an object ({cls.__name__}), got {_kind(value)}")
    hints = _hints(cls)
    unknown = sorted(set(value) - set(hints))
    if unknown:
        raise ProtocolError(f"{where}: unexpected field {unknown[0]!r} in {cls.__name__}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in value:
            kwargs[f.name] = decode(hints[f.name], value[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{where}: missing field {f.name!r} of {cls.__name__}")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a record's own check (a plan node's attributes)
        raise ProtocolError(f"{where}: {exc}") from None


_HINTS: dict[type, dict] = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _kind(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return type(value).__name__ if value is not None else "null"


def _name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
