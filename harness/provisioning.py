"""``setup`` and ``list``: the backends' environments created ahead, and what is there."""

from __future__ import annotations

from .compare import default_spec_files, use_device
from .console import progress
from .envs import ROOT, EnvError, discover, ensure_env, select
from .spec import SpecError, load_spec


def setup(args) -> int:
    """Create (or refresh) the environments; ``--device cuda`` the GPU builds, only where a
    GPU is usable."""
    backends = select(args.backend)
    choice = use_device(args)
    if choice.device == "cuda":
        progress(f"--device cuda: {choice.why}")
    status = 0
    for b in backends:
        b = b.for_device(args.device)
        try:
            python = ensure_env(b, progress)
            print(f"{b.env_name}: ready ({python})")
        except EnvError as exc:
            print(f"{b.env_name}: FAILED: {exc}")
            status = 1
    return status


def list_all(args) -> int:
    print("backends:")
    backends = list(discover().values())
    wn = max(len(b.name) for b in backends)
    wf = max(len(b.framework) for b in backends)
    for b in backends:
        print(f"  {b.name:<{wn}}  {b.framework:<{wf}}  env {b.env_state():<8} {b.env_dir}")
    print("built-in specs:")
    for f in default_spec_files():
        try:
            s = load_spec(f)
            kind = "lazy" if s.lazy else "eager"
            print(f"  {s.name:<16} {kind:<6} {len(s.params):>3} tensors {s.param_count:>9} "
                  f"trainable scalars  {f.relative_to(ROOT)}")
        except SpecError as exc:
            print(f"  INVALID {exc}")
    return 0
