"""What a worker needs in memory for a spec, from the spec alone, per backend: an upper bound of
the resident memory of the worker's process group (what ``--max-memory`` watches and what
``compare``, ``convert`` and ``check`` refuse a spec by).

    need = baseline                                   the framework imported and set up
         + bytes_per_parameter  x parameter values    the model and every copy a worker holds
         + bytes_per_activation x activation values   every layer's output, the input
         + bytes_per_working    x working values      the largest temporary of one layer call
         + per_layer            x layer calls         what a compiler spends per operation

A layer's *working values* are what one call of it allocates, forward and backward, beyond the
activations: the layer registry's ``memory`` function (``backends.layers``: the NumPy
reference's float64 working arrays and saved state, an upper bound tested against the
reference's allocations), counted in float64 values. The largest single layer call counts: a
worker frees a layer's temporaries before the next. A layer type without its own ``memory``
function has the registry's default (a few arrays of its input's and output's size), so a new
layer type is estimated from the day it is registered. The NumPy reference spends 8 bytes per
working value (the registry's own bytes); a framework computing in float32 is held to one
float32 copy of each (its convolution lowered to a matrix product builds at most the reference's
windows). The coefficients are each backend's, declared in its ``backend.yaml`` (``memory:``)
with how they were measured (``benchmarks/memory_estimate.py``, which prints the estimate beside
the measured peak for a spread of specs on every backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from backends import layers

MIB = 1 << 20


def working_values(node: dict, x: tuple, y: tuple) -> int:
    """Float64 values one call of a leaf allocates (its working arrays and the state its
    backward keeps), from its registry entry (``LayerType.memory``, in bytes), for input shape
    ``x`` and output shape ``y``."""
    return math.ceil(layers.layer_type(node["type"]).memory(node["attrs"], x, y) / layers.FLOAT64)


@dataclass(frozen=True)
class Profile:
    """One backend's memory coefficients (``backend.yaml``, ``memory:``)."""
    baseline_mib: float
    bytes_per_parameter: float
    bytes_per_activation: float
    bytes_per_working: float
    per_layer_mib: float = 0.0
    retained_per_spec_mib: float = 0.0  # what a worker keeps of each spec it has run

    @classmethod
    def from_yaml(cls, data: dict) -> "Profile":
        return cls(**{k: float(v) for k, v in data.items()})


@dataclass(frozen=True)
class Sizes:
    """The spec's sizes the estimate is made of, at one batch size."""
    parameters: int     # parameter and running-statistic values, each stored once
    activations: int    # every layer call's output and the input (with its cotangent)
    working: int        # the largest working values of one layer call ...
    working_field: str  # ... the layer's field in the spec ("" without layers)
    layer_calls: int


def sizes(spec, batch: int | None = None) -> Sizes:
    """The spec's sizes at ``batch`` (default its own): activations and working memory scale
    with the batch, parameters do not."""
    scale = (batch or spec.input_shape[0]) / spec.input_shape[0]
    params = sum(math.prod(p.shape) for p in spec.params)
    working, where = max(((working_values(node, x, y), f"{where} ({node['type']})")
                          for node, x, y, where in spec.leaves), default=(0, ""))
    activations = spec.activations + 2 * math.prod(spec.input_shape)
    return Sizes(params, math.ceil(scale * activations), math.ceil(scale * working), where,
                 len(spec.leaves))


def estimate(spec, profile: Profile, batch: int | None = None) -> int:
    """Bytes a worker of this profile's backend needs for ``spec`` at ``batch``."""
    return estimate_of(sizes(spec, batch), profile)


def estimate_of(s: Sizes, profile: Profile) -> int:
    return int(profile.baseline_mib * MIB + profile.bytes_per_parameter * s.parameters
               + profile.bytes_per_activation * s.activations
               + profile.bytes_per_working * s.working + profile.per_layer_mib * MIB
               * s.layer_calls)


def held_between_specs(spec, profile: Profile) -> int:
    """Bytes a worker holds for ``spec`` while it runs the others: its inputs (example,
    cotangent, a wider one) and its probe parameters, read once for every spec, as float32,
    and what the framework keeps of a spec it has run (compiled programs and their caches:
    XLA and torch.compile keep them for the process's life)."""
    return 4 * (3 * math.prod(spec.input_shape) + sum(math.prod(p.shape) for p in spec.params)) \
        + int(profile.retained_per_spec_mib * MIB)


def run_need(specs, profile: Profile, batch: int = 0) -> list[int]:
    """Bytes one worker of this profile's backend needs while it runs each of ``specs`` (at
    ``batch`` or the spec's own, whichever is larger), holding what it keeps of the others."""
    held = [held_between_specs(s, profile) for s in specs]
    return [estimate(s, profile, max(batch, s.input_shape[0])) + sum(held) - h
            for s, h in zip(specs, held)]
