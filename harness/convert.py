"""``convert``: a native checkpoint of a spec's model read in one framework, written in another's
native format, and proved by running both on the spec's input."""

from __future__ import annotations

import glob
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np

from backends.protocol import Status

from . import analysis, checkpoints
from .compare import Cell, check_memory, use_device
from .console import progress
from .envs import (Backend, EnvError, UserError, discover, ensure_env, parse_python_overrides,
                   select)
from .files import input_file_problem, kind_of, open_regular, pseudo_filesystem
from .initializers import FLOAT32_MAX
from .rundir import TMP_PREFIX, _sweep
from .spec import load_spec
from .runner import run_worker
from .spec import Spec


def convert(args) -> int:
    """Read a native checkpoint of the spec's model in one framework, write it in another's
    native format, and prove it: both frameworks run the spec's input and must agree."""
    spec = load_spec(args.spec, args.seed)  # one spec file: a directory is refused
    source, target = select([args.source])[0], select([args.target])[0]
    check_memory([spec], args, [source, target])
    use_device(args)
    overrides = parse_python_overrides(args.python, discover())
    weights = _convert_weights(args, spec, source)
    out = _convert_out(args, target, weights)
    existed = out.exists()
    _sweep(out.parent, f".{glob.escape(out.name)}.partial-*")
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        stage.mkdir()
    except OSError as exc:
        raise UserError(f"--out: {args.out}: cannot write in {out.parent} "
                        f"({exc.strerror or exc})") from None
    try:
        with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-convert-") as tmp:
            read = _checkpoint_worker(source, overrides, spec, args, Path(tmp) / "read",
                                      task="read_checkpoint", checkpoint=str(weights))
            canonical = _canonical_values(args, spec, source, read)
            staged = stage / out.name  # next to the target: the rename stays on its filesystem
            written = _checkpoint_worker(target, overrides, spec, args, Path(tmp) / "write",
                                         task="write_checkpoint", checkpoint=str(staged),
                                         probes=[canonical])
            _finite_output(args, spec, target, written.arrays["output"], canonical)
            check = analysis.numerics_check(written.arrays["output"], read.arrays["output"],
                                            "the target's output against the source's")
            if check.passed:
                _convert_out(args, target, weights)  # still a new or regular file
                os.replace(staged, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
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
          f"{len(sl.names)} names" + (" (replaced the regular file that was there)"
                                      if existed else ""))
    for backend, cell, what in ((source, read, "read as 0, their sums in the hosts"),
                                (target, written, "written summed into the hosts")):
        note = analysis.folded_note(cell.record.params, backend.name)
        if note:  # the outputs agree all the same: only the sum enters the pre-activation
            print(f"folded {note.split(' (a framework fact')[0]}: {what}")
    native_suffix = target.checkpoint.get("suffix", "")
    if native_suffix and not out.name.endswith(native_suffix):
        print(f"note   {target.name} names such files *{native_suffix}; its loader reads this "
              "one under any name")
    return 0


def _convert_weights(args, spec: Spec, source: Backend) -> Path:
    """--weights, examined before any worker reads it: a regular file of data, in the format
    ``source`` reads, under the name its loader needs, declaring no more than the spec's
    model can hold (harness.checkpoints). Its absolute path; UserError saying what it is."""
    path = Path(args.weights)
    problem = input_file_problem(path)
    if problem == "no such file" and path.is_symlink():
        problem = f"a symbolic link to {os.readlink(path)!r}, which does not exist"
    if problem:
        raise UserError(f"--weights: {args.weights}: {problem}")
    try:
        with open_regular(path, follow=True) as fh:
            # its size first: no index of a file larger than the model's checkpoint is parsed
            problem = checkpoints.file_size_problem(os.fstat(fh.fileno()).st_size, spec)
            if problem is None:
                ckpt = checkpoints.identify(fh)
                _weights_format(args, ckpt, source, path)
                problem = checkpoints.fit_problem(ckpt, spec, fh)
    except (OSError, checkpoints.CheckpointRefused) as exc:
        raise UserError(f"--weights: {args.weights}: {exc}") from None
    if problem:
        raise UserError(f"--weights: {args.weights}: cannot be a checkpoint of {spec.name}: "
                        f"{problem}")
    return path.resolve()


def _weights_format(args, ckpt, source: Backend, path: Path) -> None:
    """--weights in the format ``source`` reads, under a name its loader accepts."""
    want = source.checkpoint["format"]
    if ckpt.format != want:
        readers = [b.name for b in discover().values()
                   if b.checkpoint["format"] == ckpt.format]
        hint = (f"; --from {_alternatives(readers)} reads it" if readers else "")
        raise UserError(f"--weights: {args.weights}: {ckpt.what}, but {source.name} reads "
                        f"{checkpoints.FORMATS[want]}{hint}")
    suffix = source.checkpoint.get("suffix", "")
    if source.checkpoint.get("suffix_required") and not path.name.endswith(suffix):
        raise UserError(f"--weights: {args.weights}: {ckpt.what}, but {source.name} reads "
                        f"weights only from a file whose name ends in {suffix} (its loader "
                        "picks the format by the name); rename or link it so")


def _convert_out(args, target: Backend, weights: Path) -> Path:
    """--out: a new file, or a regular file (replaced), in an existing directory, named as
    ``target``'s loader needs. Never a directory, device, FIFO or socket, and never a symbolic
    link: replacing the link would cut whatever else reaches a file through it, and writing
    through it would put the file somewhere the user did not name."""
    out = Path(os.path.abspath(args.out))
    if args.out.endswith(os.sep) or out.name in ("", ".", ".."):
        raise UserError(f"--out: {args.out}: a directory; give the path of a file to write")
    try:
        info = os.lstat(out)
    except FileNotFoundError:
        info = None
    except OSError as exc:  # e.g. a component of the path is a file
        raise UserError(f"--out: {args.out}: cannot be written ({exc.strerror or exc})") \
            from None
    if info is not None and stat.S_ISLNK(info.st_mode):
        raise UserError(f"--out: {args.out}: a symbolic link (to {os.readlink(out)!r}); convert "
                        "never writes through or replaces a link: give the file's own path")
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise UserError(f"--out: {args.out}: {kind_of(info.st_mode)}; convert writes only a new "
                        "file or replaces a regular one")
    if info is not None and os.path.samefile(out, weights):
        raise UserError(f"--out: {args.out}: the --weights file itself; write the conversion "
                        "to another file")
    try:
        parent = os.stat(out.parent)
    except FileNotFoundError:
        raise UserError(f"--out: {args.out}: its directory {out.parent} does not exist") \
            from None
    except OSError as exc:
        raise UserError(f"--out: {args.out}: its directory {out.parent} cannot be used "
                        f"({exc.strerror or exc})") from None
    pseudo = pseudo_filesystem(out.parent)
    if pseudo:
        raise UserError(f"--out: {args.out}: {out.parent} is on {pseudo}, a pseudo-filesystem "
                        "of kernel interfaces, not a place for files")
    if not stat.S_ISDIR(parent.st_mode):
        raise UserError(f"--out: {args.out}: {out.parent} is {kind_of(parent.st_mode)}, not a "
                        "directory")
    suffix = target.checkpoint.get("suffix", "")
    if target.checkpoint.get("suffix_required") and not out.name.endswith(suffix):
        raise UserError(f"--out: {args.out}: {target.name} reads weights only from a file whose "
                        f"name ends in {suffix} (its loader picks the format by the name); name "
                        "the output so")
    return out


def _finite_output(args, spec: Spec, backend: Backend, output, canonical: dict) -> None:
    """A UserError when ``backend``'s output on the spec's input with the checkpoint's values
    is not finite: values that overflow float32 in the forward are the checkpoint's problem,
    not the conversion's."""
    if output is None or np.isfinite(output).all():
        return
    largest = max(spec.params, key=lambda p: float(np.max(np.abs(canonical[p.name]),
                                                          initial=0.0)), default=None)
    where = "" if largest is None else (
        f"; the largest |value| is {float(np.max(np.abs(canonical[largest.name]))):.3g}, in "
        f"{largest.name}")
    raise UserError(f"--weights: {args.weights}: with these values the model's output on the "
                    f"spec's input is not finite in {backend.name} (float32 overflows beyond "
                    f"{FLOAT32_MAX:.7g}){where}")


def _alternatives(names: list[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def _canonical_values(args, spec: Spec, source: Backend, read: Cell) -> dict:
    """The source's parameters in canonical names, held to the spec: every canonical shape,
    and every value a finite float32 (a NaN, an infinity, or a float64 beyond float32's range
    that became one when the framework loaded it), and the output on the spec's input finite."""
    canonical = {k.split("/", 1)[1]: v for k, v in read.arrays.items() if k.startswith("param/")}
    native = {q.name: q.native_name for q in read.record.params}
    for p in spec.params:  # the worker checked the file against its framework; this is
        got = canonical.get(p.name)  # the spec's own word on every canonical shape
        if got is None or tuple(got.shape) != tuple(p.shape):
            raise UserError(f"--weights: {args.weights} does not fit {spec.name}: {p.name} is "
                            f"{'missing' if got is None else list(got.shape)}, the spec says "
                            f"{list(p.shape)}")
        bad, nan = int((~np.isfinite(got)).sum()), int(np.isnan(got).sum())
        if bad:
            also = native.get(p.name)
            raise UserError(
                f"--weights: {args.weights}: tensor {p.name}"
                + (f" ({also} in {source.name})" if also and also != p.name else "")
                + f" holds {bad:,} value{'s' * (bad > 1)} that {'are' if bad > 1 else 'is'} "
                f"not finite float32 ({nan:,} NaN, {bad - nan:,} infinite or beyond float32's "
                f"largest {FLOAT32_MAX:.7g}); a model's parameters must be finite")
    _finite_output(args, spec, source, read.arrays.get("output"), canonical)
    return canonical


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
