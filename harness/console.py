"""What the harness says to the user: progress on stderr, and messages as one safe line."""

from __future__ import annotations

import sys


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


MESSAGE_LIMIT = 2000


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message as one line: whitespace runs (newlines, tabs) become one space, other control
    characters are escaped, and it is cut at ``limit`` characters."""
    text = " ".join(text.split())
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more)"
