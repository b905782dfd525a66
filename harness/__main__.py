"""``python -m harness``: the command line (harness/cli.py). A Ctrl-C while the harness is
still importing is one line too, never a traceback."""

import sys

try:
    from .cli import main

    code = main()
except KeyboardInterrupt:  # before main() installed its own handlers
    print("interrupted by SIGINT while starting: nothing was run", file=sys.stderr)
    code = 130
sys.exit(code)
