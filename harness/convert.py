"""``convert``: a native checkpoint of a spec's model read in one framework, written in another's
native format, and proved by running both on the spec's input."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from backends.protocol import Status

from . import analysis
from .compare import Cell, check_memory, load_specs, use_device
from .console import progress
from .envs import EnvError, UserError, discover, ensure_env, parse_python_overrides, select
from .files import input_file_problem
from .rundir import TMP_PREFIX
from .runner import run_worker


def convert(args) -> int:
    """Read a native checkpoint of the spec's model in one framework, write it in another's
    native format, and prove it: both frameworks run the spec's input and must agree."""
    spec = load_specs([args.spec], args.seed)[0]
    check_memory([spec], args)
    use_device(args)
    source, target = select([args.source])[0], select([args.target])[0]
    overrides = parse_python_overrides(args.python, discover())
    weights, out = Path(args.weights), Path(args.out)
    problem = input_file_problem(weights)
    if problem:
        raise UserError(f"--weights: {args.weights}: {problem}")
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"--out: {args.out}: must be a file path in an existing directory")
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-convert-") as tmp:
        read = _checkpoint_worker(source, overrides, spec, args, Path(tmp) / "read",
                                  task="read_checkpoint", checkpoint=str(weights.resolve()))
        canonical = {k.split("/", 1)[1]: v for k, v in read.arrays.items()
                     if k.startswith("param/")}
        for p in spec.params:  # the worker checked the file against its framework; this is
            got = canonical.get(p.name)  # the spec's own word on every canonical shape
            if got is None or tuple(got.shape) != tuple(p.shape):
                raise UserError(f"--weights: {args.weights} does not fit {spec.name}: "
                                f"{p.name} is "
                                f"{'missing' if got is None else list(got.shape)}, the spec "
                                f"says {list(p.shape)}")
        staged = out.parent / f".{out.name}.{os.getpid()}.tmp"
        try:
            written = _checkpoint_worker(target, overrides, spec, args, Path(tmp) / "write",
                                         task="write_checkpoint", checkpoint=str(staged),
                                         probes=[canonical])
            check = analysis.numerics_check(written.arrays["output"], read.arrays["output"],
                                            "the target's output against the source's")
            if check.passed:
                os.replace(staged, out)
        finally:
            staged.unlink(missing_ok=True)
    sl = written.record.save_load
    print(f"read   {args.weights} with {source.name}: {len(canonical)} tensors of {spec.name}"
          + (f" ({read.record.save_load.note})" if read.record.save_load.note else ""))
    verdict = "agree" if check.passed else "DISAGREE"
    print(f"check  {source.name} and {target.name} outputs on the spec's input {verdict}: max "
          f"|difference| {check.observed:.3g} (tolerance {check.expected:.3g})")
    if not check.passed:
        print("error: nothing written: the converted weights do not reproduce the model")
        return 1
    print(f"wrote  {out} for {target.name}: {sl.format}, {sl.size_bytes:,} bytes, "
          f"{len(sl.names)} names")
    native_suffix = "".join(Path(sl.file).suffixes)
    if native_suffix and not out.name.endswith(native_suffix):
        print(f"note   {target.name} names such files *{native_suffix}; rename it if the "
              "framework's loader insists on that suffix")
    return 0


def _checkpoint_worker(backend, overrides, spec, args, work: Path, **job) -> Cell:
    """One checkpoint task in ``backend``'s environment; its failure is reported here (a
    checkpoint that does not fit the spec is the user's error: exit 2)."""
    try:
        python = overrides.get(backend.name) or ensure_env(backend, progress)
    except EnvError as exc:
        raise ToolError(f"{backend.name}: {exc}") from None
    result = run_worker(backend.name, python, [spec], work, device=args.device,
                        timeout=args.timeout, progress=progress, max_memory=args.max_memory,
                        unsupported=backend.unsupported, **job)
    rec = result.records[0]
    if rec.status == Status.UNSUPPORTED:
        raise ToolError(f"{backend.name} cannot convert {spec.name}: {rec.error}")
    if rec.status != Status.OK:
        if (rec.error or "").startswith("CheckpointError: "):
            raise UserError(f"--weights: {args.weights} does not fit {spec.name} in "
                            f"{backend.name}: {rec.error.removeprefix('CheckpointError: ')}")
        raise ToolError(f"{backend.name} could not {job['task'].replace('_', ' ')}: "
                        f"{rec.error}")
    return Cell(spec, backend, rec, result.arrays[0])


class ToolError(Exception):
    """The harness or a framework failed (not the user's input): one line, exit status 1."""
