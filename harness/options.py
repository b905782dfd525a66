"""Argument types of the command line: each turns one option's text into its value, or says in
one line what it expected (argparse prints it and exits 2)."""

from __future__ import annotations

import argparse
import math
import os

from .spec import MAX_SEED, MAX_SIZE


def seed_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_SEED} (what every "
                                         f"framework accepts), got {value}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 7 * 86400):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, at most a "
                                         f"week, got {text!r}")
    return value


def total_memory() -> int:
    """This machine's physical memory in bytes (Linux sysconf; 8 GiB where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def gib(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GiB, e.g. 8 or 0.5, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1 << 20):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, got {text!r}")
    return int(value * 2**30)


def default_threads() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def positive_int(text: str, limit: int = MAX_SIZE) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= value <= limit:
        raise argparse.ArgumentTypeError(f"must be from 1 to {limit}, got {value}")
    return value


def thread_count(text: str) -> int:
    return positive_int(text, 4096)


def repeat_count(text: str) -> int:
    return positive_int(text, 100)


def batch_sizes(text: str) -> list[int]:
    values = [positive_int(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,8,64, got {text!r}")
    return sorted(set(values))
