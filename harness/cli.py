"""``python -m harness compare | merge | diff | convert | check | setup | list``: the command line. It
parses and dispatches; the work is done in modules named for it (``compare``, ``merge``,
``convert``, ``rundir``, ``executors``, ...).

Exit status: 0 when every record is ok and every check passed, 1 when a check or a backend
failed, 2 for user errors (bad spec, unknown backend, bad --python), which print one line and
no traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys

from . import compare, convert, diff, merge, provisioning
from .console import one_line
from .convert import ToolError
from .envs import UserError
from .options import (batch_sizes, default_threads, gib, positive_int, repeat_count, seconds,
                      seed_value, thread_count, total_memory)
from .signals import SIGNALS, Interrupted, hold_signals, raise_interrupted
from .spec import SpecError


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other user error."""

    def error(self, message):
        self.exit(2, f"error: {one_line(f'{self.prog}: {message}')} (see {self.prog} --help)\n")


def _worker_options(p: argparse.ArgumentParser, device: str) -> None:
    """The options of every command that runs workers."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=device)
    p.add_argument("--seed", type=seed_value, help="override every spec's seed")
    p.add_argument("--python", action="append", metavar="NAME=PATH",
                   help="use this interpreter for backend NAME instead of its managed environment")
    p.add_argument("--timeout", type=seconds, default=600.0,
                   help="seconds a worker may go without progress before it is killed (600)")
    p.add_argument("--max-memory", type=gib, default=total_memory() // 2, metavar="GIB",
                   help="refuse a spec estimated to need more, and end a worker whose processes "
                        "use more (default: half of this machine's memory, "
                        f"{total_memory() / 2**31:.1f})")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m harness", description=(
        "Compare one model spec across deep learning frameworks: parameter shapes, lazy "
        "inference, initializers against their analytic distributions, sharing, numerics."))
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="run specs on backends and write a markdown report")
    c.add_argument("spec", nargs="*",
                   help="spec files (YAML or JSON) or directories of them (their files, in name "
                        "order); default: every file in specs/")
    c.add_argument("--backend", action="append", help="backend to run (repeatable; default: all)")
    c.add_argument("--out", help="write the run's files straight into this directory")
    _worker_options(c, device="auto")
    c.add_argument("--jobs", type=positive_int, default=min(2, default_threads()),
                   help="workers at once when nothing is timed (--timing off; timing always "
                        f"runs one at a time; default {min(2, default_threads())})")
    c.add_argument("--timing", choices=["off", "quick", "full"], default="quick",
                   help="how deeply to time every mode and phase (default: quick)")
    c.add_argument("--threads", type=thread_count,
                   help="intra-op threads for every framework (default: this machine's cores, "
                        f"{default_threads()}, divided among the workers running at once "
                        "(--jobs, untimed); on Ray, the CPUs the unit holds on its node)")
    c.add_argument("--tf32", action="store_true",
                   help="allow TF32 matmuls/convolutions on GPUs that have it (default: off)")
    c.add_argument("--repeats", type=repeat_count, default=1,
                   help="time in R fresh worker processes per backend, alternating the "
                        "backend order, and report the spread across them (default 1)")
    c.add_argument("--batch", type=batch_sizes, metavar="B1,B2,...",
                   help="time at these batch sizes too (e.g. 1,8,64,256)")
    c.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where units run: worker processes here (default), or Ray tasks on a "
                        "cluster (pip install -e '.[ray]')")
    c.add_argument("--ray-address", metavar="ADDR",
                   help="the Ray cluster to use (default: start a Ray instance here)")
    c.add_argument("--where", action="append", metavar="RESOURCE",
                   help="with --executor ray: run every unit once on the nodes that have this "
                        "Ray resource (repeatable, e.g. accelerator_type:H100)")
    c.add_argument("--roofline", action="store_true",
                   help="also time each framework's own large float32 matmul and give every "
                        "row's fraction of that measured peak")
    c.set_defaults(func=compare.compare)
    v = sub.add_parser("convert", help="convert a native checkpoint of a spec's model from one "
                       "framework to another, and prove it by running both")
    v.add_argument("spec", help="the spec the checkpoint is a model of")
    v.add_argument("--from", dest="source", required=True, metavar="BACKEND",
                   help="the framework the weights come from")
    v.add_argument("--weights", required=True, help="the source's native weights file")
    v.add_argument("--to", dest="target", required=True, metavar="BACKEND",
                   help="the framework to write for")
    v.add_argument("--out", required=True, help="the file to write (the target's format)")
    _worker_options(v, device="cpu")
    v.set_defaults(func=convert.convert)
    m = sub.add_parser("merge", help="merge run directories made on different machines into "
                       "one run and report, each spec and backend on each machine side by side")
    m.add_argument("run", nargs="+", help="run directories (each one machine's, or a run over "
                   "several machine kinds)")
    m.add_argument("--out", help="write the merged run straight into this directory")
    m.set_defaults(func=merge.merge_command)
    d = sub.add_parser("diff", help="what changed from run A to run B: framework versions, "
                       "verdicts, parameters whose statistics moved, timings beyond the noise "
                       "(exit 1 when something got worse)")
    d.add_argument("run_a", metavar="RUN_A", help="the earlier run (its directory or results.json)")
    d.add_argument("run_b", metavar="RUN_B", help="the later run")
    d.set_defaults(func=diff.diff_command)
    k = sub.add_parser("check", help="validate specs and their memory estimate without running "
                       "anything (exit 0: all valid, 2: any invalid, one line each)")
    k.add_argument("spec", nargs="*",
                   help="spec files (YAML or JSON) or directories of them (their files, in name "
                        "order); default: every file in specs/")
    k.add_argument("--seed", type=seed_value, help="override every spec's seed")
    k.add_argument("--max-memory", type=gib, default=total_memory() // 2, metavar="GIB",
                   help="refuse a spec estimated to need more (default: half of this "
                        f"machine's memory, {total_memory() / 2**31:.1f})")
    k.set_defaults(func=compare.check_specs)
    s = sub.add_parser("setup", help="create (or refresh) the backends' environments")
    s.add_argument("--backend", action="append", help="backend (repeatable; default: all)")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the GPU builds (requirements-cuda.txt, .envs/<name>-cuda)")
    s.set_defaults(func=provisioning.setup)
    ls = sub.add_parser("list", help="backends, their environment state, the built-in specs")
    ls.set_defaults(func=provisioning.list_all)
    return p


#: the command being run, for the interruption message
_COMMAND = {"name": None}


def main(argv: list[str] | None = None) -> int:
    """The command line. Run as the program (``argv`` None), a signal arriving after the work
    is done is ignored; called with ``argv`` (in-process), the caller's handlers come back."""
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        for sig in SIGNALS:
            signal.signal(sig, raise_interrupted)
        for stream in (sys.stdout, sys.stderr):  # file names and worker text may be any bytes
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        return _main(argv)
    except (Interrupted, KeyboardInterrupt) as exc:
        hold_signals()
        signum = getattr(exc, "signum", signal.SIGINT)
        what = ("workers stopped; no run directory was written and reports/latest is unchanged"
                if _COMMAND["name"] in ("compare", None) else
                f"{_COMMAND['name']} stopped; nothing was written")
        print(f"interrupted by {signal.Signals(signum).name}: {what}", file=sys.stderr)
        return 128 + signum
    finally:
        for sig, handler in previous.items():  # exiting: a late signal gives no traceback
            signal.signal(sig, signal.SIG_IGN if argv is None or handler is None else handler)


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    _COMMAND["name"] = args.command
    try:
        return args.func(args)
    except (SpecError, UserError) as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except ToolError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory in the harness itself (lower --max-memory or the spec's "
              "sizes)", file=sys.stderr)
        return 1
