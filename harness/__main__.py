"""``python -m harness``: the command line (harness/cli.py). A Ctrl-C (or SIGTERM) while the
harness is still importing is held until the imports are done (a KeyboardInterrupt inside a
C extension's import becomes some other error with a traceback), then reported in one line."""

import signal
import sys

_held: list[int] = []
for _sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_sig, lambda signum, frame: _held.append(signum))

from .cli import main  # noqa: E402 (after the handlers above)

if _held:
    print(f"interrupted by {signal.Signals(_held[0]).name} while starting: nothing was run",
          file=sys.stderr)
    sys.exit(128 + _held[0])
sys.exit(main())
