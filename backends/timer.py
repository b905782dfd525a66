"""The one timer every backend's steps are measured with. Framework-free (standard library and
numpy): what a framework must do to be timed correctly is the adapter's ``block``.

The method is ``torch.utils.benchmark.Timer.blocked_autorange``'s, with three differences that a
cross-framework comparison needs:

1. The first call is timed alone and kept apart (``first_call_s``): it pays for tracing,
   compilation and autotuning, which a steady-state figure must not include but users pay.
2. A warm-up of at least ``warmup_calls`` calls and ``warmup_s`` seconds follows, each call
   blocked on, so caches, allocators and lazy kernels settle before anything is measured.
3. A block is ``number`` calls followed by one ``block`` on every value they returned, so
   asynchronous frameworks (JAX and MXNet even on the CPU, everything on a GPU) are timed until
   their work is done, not until it is queued. ``number`` doubles until one block lasts at
   least ``min_block_s`` (timer resolution and Python overhead stay negligible); then blocks
   are measured until there are at least ``min_blocks`` of them and ``min_total_s`` seconds.

Raw block times are returned: statistics (median, IQR, confidence interval) are the harness's
(harness/stats.py), as ``torch.utils.benchmark.Measurement`` derives them from raw times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Measurement:
    """Raw block times (seconds, ``number`` calls each), the first call, the warm-up count."""
    number: int
    block_times: list[float] = field(default_factory=list)
    first_call_s: float = 0.0
    warmup_calls: int = 0


def measure(fn: Callable[[], Any], block: Callable[[Any], None], budget,
            clock: Callable[[], float] = time.perf_counter,
            after_first_call: Callable[[], None] | None = None) -> Measurement:
    """Time ``fn`` (one step, returning a value ``block`` waits on) within ``budget`` (a
    ``protocol.Budget``). ``after_first_call`` runs once between the first call and the
    warm-up, outside every timed interval (the worker reads a compiled step's counts there)."""
    t0 = clock()
    block(fn())
    first = clock() - t0
    if after_first_call is not None:
        after_first_call()

    calls, start = 0, clock()
    while calls < budget.warmup_calls or clock() - start < budget.warmup_s:
        block(fn())
        calls += 1

    number = 1
    while True:
        elapsed = _block(fn, block, number, clock)
        calls += number
        if elapsed >= budget.min_block_s or number >= 1 << 20:
            break
        # double, or jump straight to about the size needed (never more than 10x at once)
        number = max(2 * number, min(10 * number,
                                     int(number * budget.min_block_s / max(elapsed, 1e-9)) + 1))

    times: list[float] = []
    total = 0.0
    while len(times) < budget.min_blocks or total < budget.min_total_s:
        elapsed = _block(fn, block, number, clock)
        times.append(elapsed)
        total += elapsed
    return Measurement(number, times, first, calls)


def _block(fn, block, number: int, clock) -> float:
    """Seconds for ``number`` calls and one wait on every value they returned."""
    t0 = clock()
    values = [fn() for _ in range(number)]
    block(values)
    return clock() - t0
