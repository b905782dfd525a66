"""NumPy reference kernels for the layers real networks need (layer norm, GELU, dropout, pooling,
embedding, softmax, multi-head attention, LSTM, GRU): forward and backward in float64, with
PyTorch's semantics, canonical layouts and parameter names.

Each layer is a class with its forward and backward side by side, as ``adapter.py``'s layers:

- ``forward(p, x, **options) -> (y, saved)``: ``p`` maps the layer's roles, named as in PyTorch's
  ``state_dict`` (``weight``, ``in_proj_weight``, ``out_proj.bias``, ``weight_ih_l0``, ...), to
  arrays in PyTorch's layout (``{}`` for a layer without parameters); the options are the spec's
  fields; ``saved`` holds what the backward needs;
- ``backward(saved, dy) -> (dx, {role: gradient})``: given dL/dy, the gradient of the loss with
  respect to the input (None for embedding, whose input is integer) and to each parameter in ``p``.

NumPy only (1.23 to 2.x): the reference environment holds nothing else, so ``erf`` is written here.
Everything is vectorized over batch, positions, channels, heads and units; the only Python loops
run over kernel taps (pooling) and time steps (recurrent layers). Each docstring states the working
memory beyond the input, the output, the parameters and their gradients
(``benchmarks/numpy_kernels.py`` measures the peaks).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

# ---------------------------------------------------------------- helpers

#: The floating-point type the reference computes in: float64, the reference itself; float32
#: only inside ``computing_in(np.float32)``, the reference's float32 twin, which measures how far
#: float32 rounding alone moves each result of a spec (``harness.analysis`` widens a check's
#: tolerance to a multiple of that where the spec is ill-conditioned).
COMPUTE = np.float64
#: How ``variance`` computes: False, two passes, ``mean((x - mean(x))^2)`` (NumPy's ``var``, the
#: reference); True, one pass, ``max(mean(x^2) - mean(x)^2, 0)``, as Flax's normalizations do by
#: default (``use_fast_variance=True``) and Keras's ``ops.moments`` on PyTorch does: where a
#: normalized input's mean is large against its spread that formula cancels, and a float32 twin
#: computing it so shows how far that alone moves a result.
ONE_PASS_VARIANCE = False
#: how many variances were computed (``variance``): whether a spec computes any at all
VARIANCES = 0


@contextmanager
def computing_in(dtype, one_pass_variance: bool = False):
    """The reference's arithmetic in ``dtype`` for the duration (parameters stay float32),
    variances in one pass where ``one_pass_variance``."""
    global COMPUTE, ONE_PASS_VARIANCE
    before = COMPUTE, ONE_PASS_VARIANCE
    COMPUTE, ONE_PASS_VARIANCE = np.dtype(dtype).type, one_pass_variance
    try:
        yield
    finally:
        COMPUTE, ONE_PASS_VARIANCE = before


def variance(x: np.ndarray, axis, keepdims: bool = False) -> np.ndarray:
    """The biased variance of ``x`` over ``axis``, as ``ONE_PASS_VARIANCE`` says."""
    global VARIANCES
    VARIANCES += 1
    if not ONE_PASS_VARIANCE:
        return x.var(axis=axis, keepdims=keepdims)
    mean = x.mean(axis=axis, keepdims=keepdims)
    return np.maximum((x * x).mean(axis=axis, keepdims=keepdims) - mean * mean, 0)


def _real(a) -> np.ndarray:
    return np.asarray(a, dtype=COMPUTE)


def _rows(a: np.ndarray) -> np.ndarray:
    """An array as a matrix: one row per position, its last axis as columns."""
    return a.reshape(-1, a.shape[-1])


def _params(layer: str, p: dict, shapes: dict, optional: tuple = ()) -> dict:
    """``p`` as arrays of the compute type, checked: every role in ``shapes`` but those in
    ``optional`` present, ``optional`` all present or all absent (PyTorch's ``bias=False``
    drops them together), no other role, each of its shape."""
    roles = set(p)
    allowed = (set(shapes), set(shapes) - set(optional))
    if roles not in allowed:
        want = " or ".join(sorted({", ".join(sorted(r)) or "none" for r in allowed}))
        raise ValueError(f"{layer}: parameters {sorted(roles)}, expected {want}")
    out = {}
    for role in p:
        arr = _real(p[role])
        if arr.shape != tuple(shapes[role]):
            raise ValueError(f"{layer}: {role} has shape {list(arr.shape)}, expected "
                             f"{list(shapes[role])}")
        out[role] = arr
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function without overflow for large |z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


# ---------------------------------------------------------------- erf, erfc (no scipy)

_SQRT_PI = math.sqrt(math.pi)
#: 1 / (1 * 3 * ... * (2n + 1)) for n = 0..20: erf's series in powers of 2 a^2
_ERF_SERIES_COEFFICIENTS = tuple(1 / math.prod(range(1, 2 * n + 2, 2)) for n in range(21))
#: (upper end of |x|, terms) of the continued fraction on [1, 2) and [2, inf)
_ERFC_FRACTION_TERMS = ((2.0, 100), (math.inf, 30))
#: erfc(x) is 0 in float64 beyond this (erfc(27.3) underflows); keeps x^2 finite
_ERFC_ZERO_FROM = 27.5


def _exp_minus_square(a: np.ndarray) -> np.ndarray:
    """exp(-a^2) to about 1 ulp even where a^2 is large: a = hi + lo with hi of 24 significant
    bits, so hi^2 is exact and the rounding of a^2 never reaches the exponent."""
    hi = a.astype(np.float32).astype(COMPUTE)
    return np.exp(-hi * hi) * np.exp(-(a - hi) * (a + hi))


def _erf_series(a: np.ndarray) -> np.ndarray:
    """erf(a) for 0 <= a < 1: 2/sqrt(pi) exp(-a^2) sum_n (2a^2)^n a / (1*3*...*(2n+1)), every
    term positive (no cancellation), by Horner in place; after 20 terms the rest is < 1e-17."""
    t = 2 * a * a
    s = np.full_like(a, _ERF_SERIES_COEFFICIENTS[-1])
    for c in _ERF_SERIES_COEFFICIENTS[-2::-1]:
        s *= t
        s += c
    s *= a
    s *= _exp_minus_square(a)
    s *= 2 / _SQRT_PI
    return s


def _erfc_fraction(a: np.ndarray, terms: int) -> np.ndarray:
    """erfc(a) for a >= 1 from Laplace's continued fraction in its even (J-fraction) form,
    a exp(-a^2) / sqrt(pi) / (a^2 + 1/2 - 1(1/2) / (a^2 + 5/2 - 2(3/2) / (a^2 + 9/2 - ...))),
    evaluated from the tail in place (no overflow); truncated after 100 terms on [1, 2), 30
    beyond, it is as accurate as its rounding (1e-15)."""
    a2 = a * a
    f = a2 + (2 * terms + 0.5)
    for k in range(terms, 0, -1):
        np.divide(k * (k - 0.5), f, out=f)
        np.subtract(a2, f, out=f)
        f += 2 * k - 1.5
    f *= _SQRT_PI
    return a * _exp_minus_square(a) / f


def _erfc_from_one(a: np.ndarray) -> np.ndarray:
    """erfc(a) for a >= 1 or NaN."""
    a = np.minimum(a, _ERFC_ZERO_FROM)
    out = np.full_like(a, np.nan)
    lower = 1.0
    for upper, terms in _ERFC_FRACTION_TERMS:
        part = (a >= lower) & (a < upper)
        out[part] = _erfc_fraction(a[part], terms)
        lower = upper
    out[a >= _ERFC_ZERO_FROM] = 0.0
    return out


def erf(x) -> np.ndarray:
    """The error function, elementwise, float64, within 7e-16 relative of libm's: the series on
    |x| < 1, 1 - erfc beyond; odd, erf(+-inf) = +-1, NaN stays NaN."""
    x = _real(x)
    a = np.abs(x)
    out = np.empty_like(a)
    small = a < 1
    out[small] = _erf_series(a[small])
    out[~small] = 1 - _erfc_from_one(a[~small])
    return np.copysign(out, x)


def erfc(x) -> np.ndarray:
    """1 - erf(x), elementwise, float64, with relative accuracy in the right tail: within 1e-15
    relative of libm's for x >= 1 (continued fraction) and x < 0.5, 3.5e-15 on [0.5, 1) (1 - erf
    there, at least 0.157); erfc(-x) = 2 - erfc(x)."""
    x = _real(x)
    a = np.abs(x)
    out = np.empty_like(a)
    small = a < 1
    out[small] = 1 - _erf_series(a[small])
    out[~small] = _erfc_from_one(a[~small])
    return np.where(x < 0, 2 - out, out)


# ---------------------------------------------------------------- normalization, activations


class LayerNorm:
    """torch.nn.LayerNorm(D, eps) over the last axis: ``xhat = (x - mean) / sqrt(var + eps)``
    with the biased variance, ``y = xhat * weight + bias`` (``weight``, ``bias`` (D,), absent
    when not affine). Working memory: xhat (the input's size), saved; 1/std per row."""

    @staticmethod
    def forward(p, x, *, eps=1e-5):
        x = _real(x)
        d = x.shape[-1]
        p = _params("layer_norm", p, {"weight": (d,), "bias": (d,)}, ("weight", "bias"))
        mean = x.mean(axis=-1, keepdims=True)
        inv_std = 1 / np.sqrt(variance(x, -1, keepdims=True) + eps)
        xhat = (x - mean) * inv_std
        y = xhat * p["weight"] + p["bias"] if p else xhat
        return y, (p, xhat, inv_std)

    @staticmethod
    def backward(saved, dy):
        p, xhat, inv_std = saved
        grads = {}
        dxhat = dy
        if p:
            grads = {"weight": _rows(dy * xhat).sum(axis=0), "bias": _rows(dy).sum(axis=0)}
            dxhat = dy * p["weight"]
        dx = inv_std * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                        - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return dx, grads


class GELU:
    """torch.nn.GELU: ``x * Phi(x)``, Phi the standard normal CDF. ``approximate="none"``:
    Phi(x) = erfc(-x / sqrt 2) / 2 (torch's 0.5 (1 + erf(x / sqrt 2)), written with erfc so the
    left tail keeps its relative accuracy); ``"tanh"``: Phi(x) ~ (1 + tanh(sqrt(2/pi) (x +
    0.044715 x^3))) / 2. Derivatives: Phi(x) + x phi(x); the tanh form's own. Working memory: x
    and Phi(x) (or the tanh), saved; temporaries of up to eight arrays of the input's size."""

    _K = math.sqrt(2 / math.pi)

    @staticmethod
    def forward(p, x, *, approximate="none"):
        _params("gelu", p, {})
        x = _real(x)
        if approximate == "none":
            cdf = 0.5 * erfc(-x / math.sqrt(2))
            return x * cdf, (x, approximate, cdf)
        if approximate == "tanh":
            t = np.tanh(GELU._K * (x + 0.044715 * x * x * x))
            return 0.5 * x * (1 + t), (x, approximate, t)
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")

    @staticmethod
    def backward(saved, dy):
        x, approximate, v = saved
        if approximate == "none":
            pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
            return dy * (v + x * pdf), {}
        dinner = GELU._K * (1 + 3 * 0.044715 * x * x)
        return dy * (0.5 * (1 + v) + 0.5 * x * (1 - v * v) * dinner), {}


class Dropout:
    """torch.nn.Dropout(rate): the identity unless ``training`` and ``active``; then each element
    survives with probability 1 - rate (a mask from the given numpy Generator), survivors scaled
    by 1 / (1 - rate) (rate 1: all zeros), and the backward goes through the same mask.
    ``active=False`` is the training-mode pass of the numerics and gradient checks, where the
    frameworks' random masks could never agree. Working memory: the boolean mask."""

    @staticmethod
    def forward(p, x, *, rate, training=False, active=True, rng=None):
        _params("dropout", p, {})
        x = _real(x)
        if not 0 <= rate <= 1:
            raise ValueError(f"dropout: rate must be in [0, 1], got {rate}")
        if not (training and active):
            return x, None
        if not isinstance(rng, np.random.Generator):
            raise ValueError("dropout: an active training-mode dropout needs rng, a "
                             "numpy.random.Generator")
        keep = rng.random(x.shape) >= rate
        scale = 1 / (1 - rate) if rate < 1 else 0.0
        return x * keep * scale, (keep, scale)

    @staticmethod
    def backward(saved, dy):
        if saved is None:
            return dy, {}
        keep, scale = saved
        return dy * keep * scale, {}


class Softmax:
    """torch.softmax over the last axis: ``exp(x - max) / sum(exp(x - max))`` (no overflow);
    backward ``y * (dy - sum(dy * y))``. Working memory: the output, saved."""

    @staticmethod
    def forward(p, x):
        _params("softmax", p, {})
        y = _softmax(_real(x))
        return y, y

    @staticmethod
    def backward(saved, dy):
        return _softmax_backward(saved, dy), {}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_backward(y: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------- pooling (NCHW, floor mode)


def _pair(value, what: str, layer: str, least: int) -> tuple:
    """An int or a pair of ints (rows, columns), each at least ``least``."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                 and v >= least for v in pair):
        raise ValueError(f"{layer}: {what} must be an int or a pair of ints >= {least}, "
                         f"got {value!r}")
    return tuple(int(v) for v in pair)


def _pool_geometry(layer, x, pool, stride, padding):
    """(kernel, stride, padding, output size) of a floor-mode 2-D pooling, with torch's checks:
    a 4-D input, padding at most half the kernel, at least one output position."""
    if x.ndim != 4:
        raise ValueError(f"{layer}: expects an NCHW input, got shape {list(x.shape)}")
    k = _pair(pool, "pool", layer, 1)
    s = k if stride is None else _pair(stride, "stride", layer, 1)
    pad = _pair(padding, "padding", layer, 0)
    if pad[0] > k[0] // 2 or pad[1] > k[1] // 2:
        raise ValueError(f"{layer}: padding {list(pad)} exceeds half the pool {list(k)}")
    out = tuple((x.shape[2 + a] + 2 * pad[a] - k[a]) // s[a] + 1 for a in (0, 1))
    if min(out) < 1:
        raise ValueError(f"{layer}: pool {list(k)} is larger than the padded input "
                         f"{[x.shape[2] + 2 * pad[0], x.shape[3] + 2 * pad[1]]}")
    return k, s, pad, out


def _tap(xpad, i, j, s, out):
    """The (N, C, OH, OW) values that kernel tap (i, j) reads in every window."""
    return xpad[:, :, i:i + s[0] * (out[0] - 1) + 1:s[0], j:j + s[1] * (out[1] - 1) + 1:s[1]]


def _in_bounds_counts(size, k, s, pad, out):
    """Per output position along one axis: how many of its window's k taps are not padding."""
    start = np.arange(out) * s - pad
    return np.minimum(start + k, size) - np.maximum(start, 0)


class AvgPool2d:
    """torch.nn.AvgPool2d(pool, stride=pool, padding, count_include_pad), floor mode, NCHW:
    the mean of each window of the zero-padded input (a sum of one strided view per kernel
    tap), dividing by the whole window (``count_include_pad=True``) or by its taps inside the
    input. Working memory: the padded input (forward) and the padded input gradient
    (backward); nothing saved but the divisor."""

    @staticmethod
    def forward(p, x, *, pool, stride=None, padding=0, count_include_pad=True):
        _params("avg_pool2d", p, {})
        x = _real(x)
        k, s, pad, out = _pool_geometry("avg_pool2d", x, pool, stride, padding)
        xpad = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
        total = sum(_tap(xpad, i, j, s, out) for i in range(k[0]) for j in range(k[1]))
        if count_include_pad:
            divisor = COMPUTE(k[0] * k[1])
        else:
            divisor = np.outer(_in_bounds_counts(x.shape[2], k[0], s[0], pad[0], out[0]),
                               _in_bounds_counts(x.shape[3], k[1], s[1], pad[1], out[1]))
        return total / divisor, (x.shape, k, s, pad, out, divisor)

    @staticmethod
    def backward(saved, dy):
        (n, c, h, w), k, s, pad, out, divisor = saved
        share = dy / divisor
        dxpad = np.zeros((n, c, h + 2 * pad[0], w + 2 * pad[1]), dtype=COMPUTE)
        for i in range(k[0]):  # each tap of every window hands its share back
            for j in range(k[1]):
                _tap(dxpad, i, j, s, out)[...] += share
        return dxpad[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + w], {}


class MaxPool2d:
    """torch.nn.MaxPool2d(pool, stride=pool, padding), floor mode, NCHW: the max of each window,
    padding acting as -inf. The gradient of each output goes to the one input torch's kernels
    pick: they scan the window's in-bounds taps in row-major order from the first, with -inf as
    the running max, and move on only to a strictly greater value or a NaN; so ties go to the
    first maximum, NaN to the last NaN, a window of -inf to its first in-bounds tap. Where
    windows overlap, gradients add (one bincount). Working memory: the padded input; the
    chosen tap per output, saved; the backward, one index per output."""

    @staticmethod
    def forward(p, x, *, pool, stride=None, padding=0):
        _params("max_pool2d", p, {})
        x = _real(x)
        k, s, pad, out = _pool_geometry("max_pool2d", x, pool, stride, padding)
        xpad = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])),
                      constant_values=-np.inf)
        first_row = np.maximum(pad[0] - np.arange(out[0]) * s[0], 0)  # first in-bounds tap
        first_col = np.maximum(pad[1] - np.arange(out[1]) * s[1], 0)
        best = np.full(x.shape[:2] + out, -np.inf, dtype=COMPUTE)
        arg = np.broadcast_to(first_row[:, None] * k[1] + first_col, best.shape).copy()
        take, nan = np.empty(best.shape, dtype=bool), np.isnan(x).any()
        for i in range(k[0]):
            for j in range(k[1]):
                v = _tap(xpad, i, j, s, out)
                np.greater(v, best, out=take)
                if nan:
                    take |= np.isnan(v)
                np.copyto(best, v, where=take)
                np.copyto(arg, i * k[1] + j, where=take)
        return best, (x.shape, k, s, pad, out, arg)

    @staticmethod
    def backward(saved, dy):
        (n, c, h, w), k, s, pad, out, arg = saved
        rows = np.arange(out[0])[:, None] * s[0] - pad[0] + arg // k[1]  # in-bounds, always
        cols = np.arange(out[1]) * s[1] - pad[1] + arg % k[1]
        planes = np.arange(n * c).reshape(n, c, 1, 1)
        flat = (planes * h + rows) * w + cols
        dx = np.bincount(flat.ravel(), weights=dy.ravel(), minlength=n * c * h * w)
        return dx.reshape(n, c, h, w), {}


class GlobalAvgPool:
    """(N, C, H, W) -> (N, C), the mean over H and W (torch: ``x.mean((2, 3))``, or
    AdaptiveAvgPool2d(1) and flatten). Working memory: none beyond the output."""

    @staticmethod
    def forward(p, x):
        _params("global_avg_pool", p, {})
        x = _real(x)
        if x.ndim != 4:
            raise ValueError(f"global_avg_pool: expects an NCHW input, got shape "
                             f"{list(x.shape)}")
        return x.mean(axis=(2, 3)), x.shape

    @staticmethod
    def backward(saved, dy):
        n, c, h, w = saved
        return np.broadcast_to((dy / (h * w))[:, :, None, None], saved).copy(), {}


# ---------------------------------------------------------------- embedding


class Embedding:
    """torch.nn.Embedding(vocab, dim): ``y[..., :] = weight[x[...], :]`` for integer x of any
    shape, output (*x.shape, dim). x may be an integer array or a float array of whole numbers
    (the harness carries inputs as floats); an index outside [0, vocab) is refused. Backward:
    the rows of dy summed into the rows they were read from (a sort and one reduceat, no
    scatter loop) into a dense (vocab, dim) gradient, as torch's default; no input gradient.
    Working memory: the indices, saved; the backward, their sort and dy's rows in that order."""

    @staticmethod
    def forward(p, x):
        weight = p.get("weight")
        if weight is None or np.ndim(weight) != 2:
            raise ValueError("embedding: needs weight of shape (vocab, dim)")
        vocab, dim = np.shape(weight)
        p = _params("embedding", p, {"weight": (vocab, dim)})
        x = np.asarray(x)
        if x.dtype.kind == "f":
            if not np.all(np.isfinite(x) & (x == np.round(x))):
                raise ValueError("embedding: indices must be whole numbers, got non-integer "
                                 "values")
        elif x.dtype.kind not in "iu":
            raise ValueError(f"embedding: indices must be integers, got dtype {x.dtype}")
        if x.size and (x.min() < 0 or x.max() >= vocab):
            raise ValueError(f"embedding: index out of range: indices span [{x.min():g}, "
                             f"{x.max():g}], the vocabulary [0, {vocab})")
        idx = x.astype(np.intp)
        return p["weight"][idx], (idx, (vocab, dim))

    @staticmethod
    def backward(saved, dy):
        idx, shape = saved
        dweight = np.zeros(shape, dtype=COMPUTE)
        flat = idx.ravel()
        if flat.size:
            order = np.argsort(flat, kind="stable")
            ids = flat[order]
            starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
            dweight[ids[starts]] = np.add.reduceat(dy.reshape(-1, shape[1])[order], starts,
                                                   axis=0)
        return None, {"weight": dweight}


# ---------------------------------------------------------------- multi-head attention


class MultiHeadAttention:
    """Self-attention as torch.nn.MultiheadAttention(E, num_heads, batch_first=True)(x, x, x,
    need_weights=False), with ``attn_mask`` the causal mask when ``causal``; x (N, L, E):

        [q | k | v] = x in_proj_weight^T + in_proj_bias   (in_proj_weight (3E, E): q, k, v rows)
        per head h (d = E / num_heads columns each): A_h = softmax(q_h k_h^T / sqrt(d) + M),
        M = -inf where key j > query i when causal, else 0
        y = [A_1 v_1 | ... | A_H v_H] out_proj.weight^T + out_proj.bias

    Biases: all of ``in_proj_bias``, ``out_proj.bias`` or neither (``bias=False``); no dropout.
    Working memory: the projections q, k, v (N, L, 3E), the heads' context (N, L, E) and the
    attention weights (N, num_heads, L, L), saved; the scores (N, num_heads, L, L) in the
    forward, about four more of that size and a few (N, L, 3E) in the backward."""

    @staticmethod
    def forward(p, x, *, num_heads, causal=False):
        x = _real(x)
        if x.ndim != 3:
            raise ValueError(f"multi_head_attention: expects (batch, seq, embed), got shape "
                             f"{list(x.shape)}")
        n, length, e = x.shape
        if not (isinstance(num_heads, (int, np.integer)) and not isinstance(num_heads, bool)
                and num_heads >= 1 and e % num_heads == 0):
            raise ValueError(f"multi_head_attention: num_heads {num_heads!r} must divide the "
                             f"embedding size {e}")
        p = _params("multi_head_attention", p,
                    {"in_proj_weight": (3 * e, e), "in_proj_bias": (3 * e,),
                     "out_proj.weight": (e, e), "out_proj.bias": (e,)},
                    ("in_proj_bias", "out_proj.bias"))
        d = e // num_heads
        qkv = x @ p["in_proj_weight"].T
        if "in_proj_bias" in p:
            qkv += p["in_proj_bias"]
        # (N, L, 3E) -> 3 x (N, heads, L, d)
        q, k, v = qkv.reshape(n, length, 3, num_heads, d).transpose(2, 0, 3, 1, 4)
        scale = 1 / math.sqrt(d)
        scores = (q @ k.swapaxes(-1, -2)) * scale
        if causal:
            scores[..., np.triu(np.ones((length, length), dtype=bool), k=1)] = -np.inf
        weights = _softmax(scores)
        context = (weights @ v).transpose(0, 2, 1, 3).reshape(n, length, e)
        y = context @ p["out_proj.weight"].T
        if "out_proj.bias" in p:
            y += p["out_proj.bias"]
        return y, (p, x, q, k, v, weights, context, scale)

    @staticmethod
    def backward(saved, dy):
        p, x, q, k, v, weights, context, scale = saved
        n, length, e = x.shape
        heads, d = q.shape[1], q.shape[3]
        grads = {"out_proj.weight": _rows(dy).T @ _rows(context)}
        dcontext = (dy @ p["out_proj.weight"]).reshape(n, length, heads, d).transpose(0, 2, 1, 3)
        dweights = dcontext @ v.swapaxes(-1, -2)
        dv = weights.swapaxes(-1, -2) @ dcontext
        dscores = _softmax_backward(weights, dweights) * scale  # masked entries: weight 0
        dq = dscores @ k
        dk = dscores.swapaxes(-1, -2) @ q
        dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(n, length, 3 * e)
        grads["in_proj_weight"] = _rows(dqkv).T @ _rows(x)
        if "in_proj_bias" in p:
            grads["in_proj_bias"] = _rows(dqkv).sum(axis=0)
            grads["out_proj.bias"] = _rows(dy).sum(axis=0)
        return dqkv @ p["in_proj_weight"], grads


# ---------------------------------------------------------------- recurrent layers


def _recurrent_params(layer, p, x, gates):
    """A recurrent layer's input (N, L, in) and parameters checked: ``weight_ih_l0`` (gates*H,
    in), ``weight_hh_l0`` (gates*H, H), both biases (gates*H,) or neither; returns (x, p, H)."""
    x = _real(x)
    if x.ndim != 3 or x.shape[1] < 1:
        raise ValueError(f"{layer}: expects (batch, seq >= 1, features), got shape "
                         f"{list(x.shape)}")
    whh = p.get("weight_hh_l0")
    if whh is None or np.ndim(whh) != 2 or np.shape(whh)[0] % gates:
        raise ValueError(f"{layer}: needs weight_hh_l0 of shape ({gates}H, H)")
    h = np.shape(whh)[1]
    p = _params(layer, p, {"weight_ih_l0": (gates * h, x.shape[2]),
                           "weight_hh_l0": (gates * h, h), "bias_ih_l0": (gates * h,),
                           "bias_hh_l0": (gates * h,)}, ("bias_ih_l0", "bias_hh_l0"))
    return x, p, h


def _recurrent_grads(p, x, h_prev, dx_side, dh_side):
    """The parameter gradients and dx of a recurrent layer from the per-step gradients of its
    input-side and hidden-side pre-activations (N, L, gates*H) and the states it read."""
    grads = {"weight_ih_l0": _rows(dx_side).T @ _rows(x),
             "weight_hh_l0": _rows(dh_side).T @ _rows(h_prev)}
    if "bias_ih_l0" in p:
        grads["bias_ih_l0"] = _rows(dx_side).sum(axis=0)
        grads["bias_hh_l0"] = _rows(dh_side).sum(axis=0)
    return dx_side @ p["weight_ih_l0"], grads


def _sequence_cotangent(dy, shape, return_sequences):
    """dL/dh_t for every step: dy itself, or dy at the last step only."""
    if return_sequences:
        return dy
    full = np.zeros(shape, dtype=COMPUTE)
    full[:, -1] = dy
    return full


class LSTM:
    """One layer of torch.nn.LSTM(in, H, batch_first=True), zero initial state; x (N, L, in).
    Gates stacked in PyTorch's row order i, f, g, o; at each step t:

        a = x_t weight_ih_l0^T + bias_ih_l0 + h_{t-1} weight_hh_l0^T + bias_hh_l0   (N, 4H)
        i, f, o = sigmoid(a_i, a_f, a_o);  g = tanh(a_g)
        c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)

    Output every h_t (N, L, H) when ``return_sequences``, else h_L (N, H). Backward through time.
    Working memory: the gates (N, L, 4H), the states h and c (N, L + 1, H) and tanh(c) (N, L, H),
    saved; the backward adds the pre-activation gradients (N, L, 4H)."""

    @staticmethod
    def forward(p, x, *, return_sequences=True):
        x, p, hid = _recurrent_params("lstm", p, x, 4)
        n, length, _ = x.shape
        pre = x @ p["weight_ih_l0"].T
        if "bias_ih_l0" in p:
            pre += p["bias_ih_l0"] + p["bias_hh_l0"]
        gates = np.empty_like(pre)
        h = np.zeros((n, length + 1, hid), dtype=COMPUTE)
        c = np.zeros((n, length + 1, hid), dtype=COMPUTE)
        tanh_c = np.empty((n, length, hid), dtype=COMPUTE)
        whh_t = np.ascontiguousarray(p["weight_hh_l0"].T)  # BLAS is 2x faster on it here
        for t in range(length):
            a = pre[:, t] + h[:, t] @ whh_t
            gates[:, t, :2 * hid] = _sigmoid(a[:, :2 * hid])
            gates[:, t, 2 * hid:3 * hid] = np.tanh(a[:, 2 * hid:3 * hid])
            gates[:, t, 3 * hid:] = _sigmoid(a[:, 3 * hid:])
            i, f, g, o = np.split(gates[:, t], 4, axis=-1)
            c[:, t + 1] = f * c[:, t] + i * g
            tanh_c[:, t] = np.tanh(c[:, t + 1])
            h[:, t + 1] = o * tanh_c[:, t]
        y = h[:, 1:] if return_sequences else h[:, -1]
        return y.copy(), (p, x, gates, h, c, tanh_c, return_sequences)

    @staticmethod
    def backward(saved, dy):
        p, x, gates, h, c, tanh_c, return_sequences = saved
        dy = _sequence_cotangent(dy, h[:, 1:].shape, return_sequences)
        da = np.empty_like(gates)
        dh = np.zeros_like(h[:, 0])
        dc = np.zeros_like(h[:, 0])
        for t in reversed(range(x.shape[1])):
            i, f, g, o = np.split(gates[:, t], 4, axis=-1)
            di, df, dg, do = np.split(da[:, t], 4, axis=-1)  # views into da
            dh = dh + dy[:, t]
            dc = dc + dh * o * (1 - tanh_c[:, t] ** 2)
            di[...] = dc * g * i * (1 - i)
            df[...] = dc * c[:, t] * f * (1 - f)
            dg[...] = dc * i * (1 - g * g)
            do[...] = dh * tanh_c[:, t] * o * (1 - o)
            dc = dc * f
            dh = da[:, t] @ p["weight_hh_l0"]
        return _recurrent_grads(p, x, h[:, :-1], da, da)


class GRU:
    """One layer of torch.nn.GRU(in, H, batch_first=True), zero initial state; x (N, L, in).
    Gates stacked in PyTorch's row order r, z, n, the reset gate applied after the recurrent
    matmul (Keras' ``reset_after=True``); at each step t:

        r = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
        z = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
        n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn))
        h_t = (1 - z) * n + z * h_{t-1}

    Output every h_t (N, L, H) when ``return_sequences``, else h_L (N, H). Backward through time.
    Working memory: the gates (N, L, 3H), W_hn h + b_hn (N, L, H) and the states (N, L + 1, H),
    saved; the backward adds the input- and hidden-side pre-activation gradients (N, L, 3H)
    each."""

    @staticmethod
    def forward(p, x, *, return_sequences=True):
        x, p, hid = _recurrent_params("gru", p, x, 3)
        n, length, _ = x.shape
        pre_x = x @ p["weight_ih_l0"].T
        if "bias_ih_l0" in p:
            pre_x += p["bias_ih_l0"]
        gates = np.empty_like(pre_x)
        hidden_n = np.empty((n, length, hid), dtype=COMPUTE)
        h = np.zeros((n, length + 1, hid), dtype=COMPUTE)
        whh_t = np.ascontiguousarray(p["weight_hh_l0"].T)  # BLAS is 2x faster on it here
        for t in range(length):
            pre_h = h[:, t] @ whh_t
            if "bias_hh_l0" in p:
                pre_h += p["bias_hh_l0"]
            gates[:, t, :2 * hid] = _sigmoid(pre_x[:, t, :2 * hid] + pre_h[:, :2 * hid])
            hidden_n[:, t] = pre_h[:, 2 * hid:]
            r, z = gates[:, t, :hid], gates[:, t, hid:2 * hid]
            gates[:, t, 2 * hid:] = np.tanh(pre_x[:, t, 2 * hid:] + r * hidden_n[:, t])
            h[:, t + 1] = (1 - z) * gates[:, t, 2 * hid:] + z * h[:, t]
        y = h[:, 1:] if return_sequences else h[:, -1]
        return y.copy(), (p, x, gates, hidden_n, h, return_sequences)

    @staticmethod
    def backward(saved, dy):
        p, x, gates, hidden_n, h, return_sequences = saved
        dy = _sequence_cotangent(dy, h[:, 1:].shape, return_sequences)
        hid = h.shape[2]
        dx_side = np.empty_like(gates)
        dh_side = np.empty_like(gates)
        dh = np.zeros_like(h[:, 0])
        for t in reversed(range(x.shape[1])):
            r, z, n_ = np.split(gates[:, t], 3, axis=-1)
            dh = dh + dy[:, t]
            dan = dh * (1 - z) * (1 - n_ * n_)
            dx_side[:, t, :hid] = dan * hidden_n[:, t] * r * (1 - r)
            dx_side[:, t, hid:2 * hid] = dh * (h[:, t] - n_) * z * (1 - z)
            dx_side[:, t, 2 * hid:] = dan
            dh_side[:, t, :2 * hid] = dx_side[:, t, :2 * hid]
            dh_side[:, t, 2 * hid:] = dan * r
            dh = dh * z + dh_side[:, t] @ p["weight_hh_l0"]
        return _recurrent_grads(p, x, h[:, :-1], dx_side, dh_side)


#: spec layer type -> kernel
KERNELS = {
    "layer_norm": LayerNorm,
    "gelu": GELU,
    "dropout": Dropout,
    "softmax": Softmax,
    "avg_pool2d": AvgPool2d,
    "max_pool2d": MaxPool2d,
    "global_avg_pool": GlobalAvgPool,
    "embedding": Embedding,
    "multi_head_attention": MultiHeadAttention,
    "lstm": LSTM,
    "gru": GRU,
}
