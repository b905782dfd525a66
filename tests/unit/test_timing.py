"""The timer (backends/timer.py) with a fake clock and a fake framework, the timing statistics
(harness/stats.py) on known samples, and forward FLOPs computed from the spec alone. Nothing
here measures real time: every duration is the fake clock's."""

from __future__ import annotations

import math

import numpy as np
import pytest
from unit_helpers import doc

from backends import timer
from backends.protocol import Budget
from harness import stats
from harness.spec import build_spec


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeFramework:
    """An asynchronous framework: a call returns at once (``dispatch_s``) and the work is done
    only when ``block`` waits for it (``compute_s`` per call, ``first_extra_s`` on the first)."""

    def __init__(self, clock, compute_s, dispatch_s=0.0, first_extra_s=0.0):
        self.clock, self.compute_s, self.dispatch_s = clock, compute_s, dispatch_s
        self.first_extra_s, self.calls, self.pending, self.blocks = first_extra_s, 0, 0, 0

    def step(self):
        self.calls += 1
        self.clock.now += self.dispatch_s
        self.pending += self.compute_s + (self.first_extra_s if self.calls == 1 else 0.0)
        return self.calls

    def block(self, value):
        self.blocks += 1
        self.clock.now += self.pending  # the queued work finishes only now
        self.pending = 0.0


BUDGET = Budget(warmup_calls=3, warmup_s=0.01, min_block_s=2e-3, min_blocks=20,
                min_total_s=0.1)


def test_time_spent_waiting_in_block_is_inside_the_measurement():
    """A step that returns at once but whose work finishes in ``block`` is timed with the
    wait: the per-call time is the compute time, not the dispatch time."""
    clock = FakeClock()
    fw = FakeFramework(clock, compute_s=1e-3, dispatch_s=1e-6)
    m = timer.measure(fw.step, fw.block, BUDGET, clock)
    per_call = np.array(m.block_times) / m.number
    assert per_call == pytest.approx(np.full(len(per_call), 1e-3 + 1e-6))


def test_first_call_is_timed_alone_with_its_compilation():
    """The first call's extra cost (compilation) is in first_call_s, never in the blocks."""
    clock = FakeClock()
    fw = FakeFramework(clock, compute_s=1e-3, first_extra_s=5.0)
    m = timer.measure(fw.step, fw.block, BUDGET, clock)
    assert m.first_call_s == pytest.approx(5.0 + 1e-3)
    assert max(m.block_times) / m.number == pytest.approx(1e-3)


def test_block_size_grows_until_a_block_lasts_min_block_s():
    """A 10 us call needs at least 200 calls per 2 ms block; a 5 ms call needs 1."""
    for compute, expect_min in ((1e-5, 200), (5e-3, 1)):
        clock = FakeClock()
        fw = FakeFramework(clock, compute_s=compute)
        m = timer.measure(fw.step, fw.block, BUDGET, clock)
        assert m.number >= expect_min
        assert all(t >= BUDGET.min_block_s for t in m.block_times)
        # and not absurdly more than needed (doubling, at most 10x per step)
        assert m.number * compute < 20 * BUDGET.min_block_s


def test_warm_up_and_sample_count_follow_the_budget():
    """At least warmup_calls and warmup_s of warm-up; at least min_blocks blocks and
    min_total_s of them; one block() per measured block."""
    clock = FakeClock()
    fw = FakeFramework(clock, compute_s=4e-3)
    m = timer.measure(fw.step, fw.block, BUDGET, clock)
    assert m.warmup_calls >= BUDGET.warmup_calls
    assert m.warmup_calls * 4e-3 >= BUDGET.warmup_s
    assert len(m.block_times) >= BUDGET.min_blocks
    assert sum(m.block_times) >= BUDGET.min_total_s
    # 4 ms blocks: 0.1 s needs 25 blocks; no more than one block past the budget
    assert len(m.block_times) == 25
    measured_calls = m.number * len(m.block_times)
    assert fw.calls == 1 + m.warmup_calls + measured_calls


def test_every_value_of_a_block_is_waited_on():
    """block() receives every value the block's calls returned (a framework may need them all)."""
    seen = []
    clock = FakeClock()

    def step():
        clock.now += 1e-3
        return object()

    m = timer.measure(step, lambda values: seen.append(values), BUDGET, clock)
    measured = seen[-len(m.block_times):]
    assert all(isinstance(v, list) and len(v) == m.number for v in measured)


# ------------------------------------------------------------------ statistics

def test_timing_stats_on_known_samples():
    """Per-call times are block times / number; median, IQR, percentiles as numpy computes."""
    blocks = [0.010, 0.012, 0.011, 0.013, 0.014, 0.010, 0.011, 0.012, 0.015, 0.010]
    s = stats.timing_stats(blocks, number=10)
    per_call = np.array(blocks) / 10
    assert s.n_blocks == 10 and s.number == 10
    assert s.median == pytest.approx(np.median(per_call))
    q1, q3 = np.percentile(per_call, [25, 75])
    assert s.iqr == pytest.approx(q3 - q1)
    assert s.p10 == pytest.approx(np.percentile(per_call, 10))
    assert s.p90 == pytest.approx(np.percentile(per_call, 90))
    assert s.ci_low <= s.median <= s.ci_high
    assert per_call.min() <= s.ci_low and s.ci_high <= per_call.max()


def test_bootstrap_interval_narrows_with_more_blocks():
    """The CI of the median of 400 blocks is narrower than that of 20 from the same law."""
    rng = np.random.default_rng(0)
    small = stats.timing_stats(rng.normal(1.0, 0.05, 20), 1)
    large = stats.timing_stats(rng.normal(1.0, 0.05, 400), 1)
    assert (large.ci_high - large.ci_low) < (small.ci_high - small.ci_low) / 2


def test_high_spread_warning():
    """IQR/median above 10 % is flagged noisy; a tight sample is not."""
    tight = stats.timing_stats([1.0, 1.01, 0.99, 1.0] * 5, 1)
    wide = stats.timing_stats([1.0, 1.5, 0.7, 1.2, 0.8] * 4, 1)
    assert not tight.noisy and tight.spread < 0.1
    assert wide.noisy and wide.spread > 0.1
    assert stats.timing_stats([], 1) is None
    assert stats.timing_stats([0.0, float("nan")], 1) is None


# ------------------------------------------------------------------ FLOPs from the spec

def test_dense_flops_by_hand():
    """A 20 -> 256 -> 10 MLP on a batch of 2: multiply-adds count 2, bias adds 1, relu 1 per
    output element."""
    spec = build_spec(doc([{"type": "dense", "units": 256}, {"type": "relu"},
                           {"type": "dense", "units": 10, "bias": False}], input=(2, 20)))
    expected = 2 * (2 * 20 * 256 + 256) + 2 * 256 + 2 * (2 * 256 * 10)
    assert spec.flops == expected
    assert spec.flops_per_sample == expected / 2


def test_conv_flops_by_hand():
    """conv 3->8, 3x3, padding 1 on 16x16, then a strided conv, pooling and flatten (none)."""
    spec = build_spec(doc([
        {"type": "conv2d", "channels": 8, "kernel": 3, "padding": 1},
        {"type": "max_pool2d", "pool": 2},
        {"type": "conv2d", "channels": 4, "kernel": [3, 1], "stride": 2, "bias": False},
        {"type": "flatten"}], input=(4, 3, 16, 16)))
    conv1 = 4 * 8 * 16 * 16 * (2 * 3 * 3 * 3 + 1)
    pool = 4 * 8 * 8 * 8
    out_h, out_w = (8 - 3) // 2 + 1, (8 - 1) // 2 + 1
    conv2 = 4 * 4 * out_h * out_w * (2 * 8 * 3 * 1)
    assert spec.flops == conv1 + pool + conv2


def test_shared_layer_counts_every_use():
    """A layer used twice computes twice."""
    once = build_spec(doc([{"type": "dense", "units": 8, "name": "a"}], input=(2, 8)))
    twice = build_spec(doc([{"type": "dense", "units": 8, "name": "a"},
                            {"type": "ref", "to": "a"}], input=(2, 8)))
    assert twice.flops == 2 * once.flops == 2 * 2 * (2 * 8 * 8 + 8)
    assert math.isclose(twice.flops_per_sample, twice.flops / 2)
