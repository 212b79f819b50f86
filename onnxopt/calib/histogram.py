"""Streamed activation statistics: running min/max and a fixed-size histogram whose range grows.

Memory is O(bins) whatever the number of samples: each batch is reduced into the histogram and
dropped (ONNX Runtime's calibrator keeps every activation; users report >200 GB).

Bin lattice. Bin width is a power of two, w = 2^e, and bin edges sit on multiples of w:
    bin j covers [(start + j)·w, (start + j + 1)·w),   j = 0 … bins-1,   start ∈ ℤ
    index(x) = ⌊x / w⌋ - start          (x / 2^e is exact in floating point: no edge rounding)
e is the smallest exponent with ⌊max/w⌋ - ⌊min/w⌋ < bins, and start = ⌊min/w⌋.

Exact re-binning. When a batch (or another TensorStats) falls outside the range, e grows by k and
    ⌊x / 2^(e+k)⌋ = ⌊⌊x / 2^e⌋ / 2^k⌋ = (start + j) >> k
so old bin j lands whole in new bin ((start + j) >> k) - start' (sums of 2^k adjacent bins).
Because e never exceeds the minimal exponent for the data seen so far, the streamed histogram
is bit-identical to one built from all the data at once; `merge` is exact for the same reason.

Zero is always a bin edge (0 = 0·w), so |x| folds exactly: bin k ≥ 0 of |x| holds the bins with
lattice index k and -k-1. Entropy and symmetric MSE work on that folded histogram.

Ranges (all clamped to [min, max], so a symmetric caller uses max(|lo|, |hi|)):
- minmax: (min, max).
- percentile p: the value where the CDF reaches p% (linear inside a bin); symmetric: of |x|.
- entropy (TensorRT / MXNet): for each candidate i ≥ num_quantized_bins of the |x| histogram,
    P = h[0:i] with the tail Σ h[i:] added to P[i-1];
    Q = h[0:i] merged into num_quantized_bins groups, each group's mass spread evenly over its
        non-empty bins;
    t = i·w minimising KL(P ‖ Q) = Σ P log(P / Q).
- mse: expected squared error of the quantizer with step s (bits b):
    symmetric: s = t / (2^(b-1) - 1);  asymmetric [a, c]: s = (c - a) / (2^b - 1)
    E(t) = N_inside · s²/12 + Σ_bins (n/w)·∫_outside (x - t)² dx     (rounding + clipping)
  with values uniform inside a bin; t runs over the bin edges, clipping sums via suffix sums of
  n, n·k, n·k² (bin k beyond edge i adds n·w²·((k-i)² + (k-i) + 1/3)).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["TensorStats"]

_CHUNK = 1 << 20  # elements binned at once: bounds the float64 temporaries of a large batch
_MSE_CANDIDATES = 256  # thresholds per side for the asymmetric grid (256² pairs)


class TensorStats:
    """Running min/max, count, and a `bins`-bin histogram over a growing power-of-two lattice."""

    def __init__(self, bins: int = 2048):
        if bins < 2:
            raise ValueError(f"TensorStats needs at least 2 bins, got {bins}")
        self.bins = bins
        self.hist = np.zeros(bins, dtype=np.int64)
        self.count = 0  # finite values seen
        self.nonfinite = 0  # NaN/Inf values seen (not binned)
        self.min = math.inf
        self.max = -math.inf
        self.exponent = 0  # bin width w = 2**exponent
        self.start = 0  # lattice index of bin 0

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent)

    def edges(self) -> np.ndarray:
        return (self.start + np.arange(self.bins + 1)) * self.width

    def update(self, array) -> None:
        """Reduce one batch of values into the statistics."""
        values = np.asarray(array).reshape(-1)
        finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        self.nonfinite += values.size - finite.size
        if finite.size == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
        self._cover(min(lo, self.min), max(hi, self.max))
        self.min, self.max = min(lo, self.min), max(hi, self.max)
        width = self.width
        for begin in range(0, finite.size, _CHUNK):
            chunk = finite[begin : begin + _CHUNK].astype(np.float64)
            index = np.floor(chunk / width).astype(np.int64) - self.start
            self.hist += np.bincount(index, minlength=self.bins)
        self.count += finite.size

    def merge(self, other: TensorStats) -> None:
        """Add another TensorStats (same bins), e.g. one a second worker filled."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge {other.bins} bins into {self.bins}")
        if other.count:
            self._cover(min(self.min, other.min), max(self.max, other.max), other.exponent)
            self.hist += _rebin(
                other.hist, other.start, other.exponent, self.start, self.exponent, self.bins
            )
            self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.count += other.count
        self.nonfinite += other.nonfinite

    def _cover(self, lo: float, hi: float, floor_exponent: int | None = None) -> None:
        """Move to the smallest lattice (never finer than now) holding [lo, hi]; re-bin exactly."""
        exponent = _lower_bound_exponent(lo, hi, self.bins)
        if self.count:
            exponent = max(exponent, self.exponent)
        if floor_exponent is not None:
            exponent = max(exponent, floor_exponent)
        while (
            math.floor(hi / math.ldexp(1.0, exponent)) - math.floor(lo / math.ldexp(1.0, exponent))
            >= self.bins
        ):
            exponent += 1
        start = math.floor(lo / math.ldexp(1.0, exponent))
        if self.count:
            self.hist = _rebin(self.hist, self.start, self.exponent, start, exponent, self.bins)
        self.exponent, self.start = exponent, start

    # Range selection ------------------------------------------------------------------------

    def range_minmax(self) -> tuple[float, float]:
        self._require_data()
        return self.min, self.max

    def range_percentile(
        self, p: float = 99.999, *, symmetric: bool = False
    ) -> tuple[float, float]:
        """Per side: the (100-p)% and p% points of x; symmetric: ±(p% point of |x|)."""
        self._require_data()
        if not 0 < p <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {p}")
        if symmetric:
            folded = self._folded()
            t = _quantile(folded, np.arange(folded.size + 1) * self.width, p / 100)
            return self._clamp(-t, t)
        edges = self.edges()
        lo = _quantile(self.hist, edges, 1 - p / 100)
        hi = _quantile(self.hist, edges, p / 100)
        return self._clamp(lo, hi)

    def range_entropy(self, num_quantized_bins: int = 128) -> tuple[float, float]:
        """±t minimising KL(P‖Q) over the |x| histogram (see the module docstring)."""
        self._require_data()
        folded = self._folded()
        used = int(np.flatnonzero(folded)[-1]) + 1
        if used <= num_quantized_bins:
            return self.range_minmax()
        best_kl, best_i = math.inf, used
        total = folded.astype(np.float64)
        tails = np.concatenate([np.cumsum(total[::-1])[::-1], [0.0]])
        for i in range(num_quantized_bins, used + 1):
            kl = _kl_divergence(total[:i], tails[i], num_quantized_bins)
            if kl < best_kl:
                best_kl, best_i = kl, i
        t = best_i * self.width
        return self._clamp(-t, t)

    def range_mse(self, bits: int = 8, *, symmetric: bool = True) -> tuple[float, float]:
        """The range minimising expected rounding + clipping error of a `bits`-bit quantizer."""
        self._require_data()
        if symmetric:
            t = _mse_symmetric(self._folded(), self.width, bits)
            return self._clamp(-t, t)
        lo, hi = _mse_asymmetric(self.hist, self.start, self.width, bits)
        return self._clamp(lo, hi)

    def set_by_sentinels(self, floor: float = 1e4) -> bool:
        """Whether a few huge values set the range: |x| reaches `floor`, and the values form
        two clusters, the huge ones and ordinary ones within 1% of the peak, with (almost)
        nothing between (an attention mask's -10000 or -3.4e38 added to scores of a few units,
        whatever the share of masked positions). uint8 over such a range leaves the ordinary
        values no level of their own."""
        if not self.count:
            return False
        peak = max(abs(self.min), abs(self.max))
        if peak < floor:
            return False
        folded = self._folded()
        small = max(1, math.floor(0.01 * peak / self.width))  # |x| bins below 1% of the peak
        large = math.floor(0.9 * peak / self.width)  # from 90% of the peak on
        ordinary, between = int(folded[:small].sum()), int(folded[small:large].sum())
        return ordinary >= 0.01 * self.count and between <= 0.01 * self.count

    def _folded(self) -> np.ndarray:
        """Histogram of |x| on the same lattice: bin k holds lattice bins k and -k-1."""
        index = self.start + np.arange(self.bins)
        magnitude = np.where(index >= 0, index, -index - 1)
        return np.bincount(magnitude, weights=self.hist, minlength=1).astype(np.int64)

    def _clamp(self, lo: float, hi: float) -> tuple[float, float]:
        return max(float(lo), self.min), min(float(hi), self.max)

    def _require_data(self) -> None:
        if not self.count:
            raise ValueError("TensorStats holds no finite values yet")

    def __repr__(self) -> str:
        return (
            f"TensorStats(count={self.count}, min={self.min:g}, max={self.max:g}, "
            f"bins={self.bins}, width=2**{self.exponent})"
        )


def _lower_bound_exponent(lo: float, hi: float, bins: int) -> int:
    """An exponent no larger than the smallest that fits [lo, hi] in `bins` bins."""
    span = hi - lo
    if span > 0:
        # ⌊hi/w⌋ - ⌊lo/w⌋ ≥ span/w - 1, so a fit needs w > span / (bins + 1).
        return math.frexp(span / (bins + 1))[1] - 1
    # One value: the finest lattice that keeps ⌊x/w⌋ inside int64 (52-bit mantissa, margin).
    magnitude = abs(lo)
    return math.frexp(magnitude)[1] - 52 if magnitude > 0 else -149


def _rebin(hist, start, exponent, new_start, new_exponent, bins) -> np.ndarray:
    """Old lattice bins summed into new ones: index (start + j) >> k - new_start, exact."""
    occupied = np.flatnonzero(hist)
    index = ((start + occupied) >> (new_exponent - exponent)) - new_start
    return np.bincount(index, weights=hist[occupied], minlength=bins).astype(np.int64)


def _quantile(hist: np.ndarray, edges: np.ndarray, q: float) -> float:
    cdf = np.cumsum(hist)
    target = q * cdf[-1]
    j = int(np.searchsorted(cdf, target, side="left"))
    j = min(j, hist.size - 1)
    before = cdf[j - 1] if j > 0 else 0
    inside = (target - before) / hist[j] if hist[j] else 1.0
    return float(edges[j] + inside * (edges[j + 1] - edges[j]))


def _kl_divergence(sliced: np.ndarray, tail: float, num_quantized_bins: int) -> float:
    i = sliced.size
    p = sliced.copy()
    p[-1] += tail
    is_nonzero = p > 0
    starts = (np.arange(num_quantized_bins) * i) // num_quantized_bins
    merged = np.add.reduceat(sliced, starts)
    nonzero_counts = np.add.reduceat(is_nonzero.astype(np.int64), starts)
    lengths = np.diff(np.append(starts, i))
    q = np.repeat(merged / np.maximum(nonzero_counts, 1), lengths) * is_nonzero
    p /= p.sum()
    q_sum = q.sum()
    if q_sum == 0:
        return math.inf
    q /= q_sum
    # Q = 0 where P > 0 (the tail landed in an empty group): a large finite penalty, not inf,
    # so thresholds still compare.
    return float(np.sum(p[is_nonzero] * np.log(p[is_nonzero] / np.maximum(q[is_nonzero], 1e-12))))


def _mse_symmetric(folded: np.ndarray, width: float, bits: int) -> float:
    """Threshold t = i·w (i = 1 … used) minimising N_in·s²/12 + clipping error."""
    n = folded.astype(np.float64)
    k = np.arange(n.size, dtype=np.float64)
    s0, s1, s2 = (_suffix(n * k**m) for m in range(3))
    i = np.arange(1, int(np.flatnonzero(n)[-1]) + 2, dtype=np.float64)
    idx = i.astype(np.int64)
    d0, d1, d2 = s0[idx], s1[idx], s2[idx]
    # Σ_{k≥i} n_k ((k-i)² + (k-i) + 1/3), expanded with the suffix sums.
    clipping = d2 - 2 * i * d1 + i * i * d0 + d1 - i * d0 + d0 / 3
    step = i / (2 ** (bits - 1) - 1)
    rounding = (s0[0] - d0) * step**2 / 12
    error = clipping + rounding  # in units of w²
    return float(i[int(np.argmin(error))] * width)


def _mse_asymmetric(hist: np.ndarray, start: int, width: float, bits: int) -> tuple[float, float]:
    """Edges (a, c) with a ≤ 0 ≤ c on a ≤256×256 grid minimising rounding + clipping error."""
    n = hist.astype(np.float64)
    occupied = np.flatnonzero(n)
    first, last = int(occupied[0]), int(occupied[-1]) + 1  # data lies in edges [first, last]
    zero = min(max(-start, first), last)  # edge index of 0, clamped into the data
    k = np.arange(n.size, dtype=np.float64)
    upper = _candidates(zero, last)
    lower = _candidates(first, zero)
    # Right clipping at edge c: Σ_{k≥c} n ((k-c)² + (k-c) + 1/3); left at edge a mirrors it with
    # distance a-k-1 for bins k < a.
    s0, s1, s2 = (_suffix(n * k**m) for m in range(3))
    c = upper.astype(np.float64)
    right = s2[upper] - 2 * c * s1[upper] + c * c * s0[upper] + s1[upper] - c * s0[upper]
    right += s0[upper] / 3
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(n * k**m)]) for m in range(3))
    a = lower.astype(np.float64)
    # d = a - k - 1 ≥ 0: Σ n (d² + d + 1/3) with k' = k + 1 → d = a - k'.
    q0, q1, q2 = p0[lower], p1[lower] + p0[lower], p2[lower] + 2 * p1[lower] + p0[lower]
    left = a * a * q0 - 2 * a * q1 + q2 + a * q0 - q1 + q0 / 3
    inside = s0[0] - s0[upper][None, :] - p0[lower][:, None]
    step = (c[None, :] - a[:, None]) / (2**bits - 1)
    error = left[:, None] + right[None, :] + inside * step**2 / 12
    best_a, best_c = np.unravel_index(int(np.argmin(error)), error.shape)
    return (start + lower[best_a]) * width, (start + upper[best_c]) * width


def _candidates(begin: int, end: int) -> np.ndarray:
    count = min(end - begin + 1, _MSE_CANDIDATES)
    return np.unique(np.linspace(begin, end, count).round().astype(np.int64))


def _suffix(values: np.ndarray) -> np.ndarray:
    """s[i] = Σ_{k ≥ i} values[k], with s[len] = 0."""
    return np.concatenate([np.cumsum(values[::-1])[::-1], [0.0]])
