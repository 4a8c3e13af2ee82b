"""Variance based sample weighting: local variance and weights (eq. 4, Alg. 2).

For each point, the local variance is the unbiased variance (divided by k - 1)
of the labels of its k nearest neighbours in feature space, summed over output
columns. Class labels count as one-hot vectors, whose summed variance has a
closed form in the class counts of the neighbourhood:

    sum_c  (n_c - n_c**2 / k) / (k - 1)  =  (k**2 - sum_c n_c**2) / (k (k - 1))

so no (n_samples, k, n_classes) array is ever built. Weights rescale the local
variances linearly onto [1, m], then are normalised to mean 1 (or sum 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from vbsw_cli.errors import DataError, UsageError
from vbsw_cli.io import Labels, counted
from vbsw_cli.neighbors import (EXACT_AGAIN, Neighbours, SearchOptions,
                                exact_rows, measure_recall, nearest_neighbours)
from vbsw_cli.progress import NullProgress, Progress, chunks

NORMALIZATIONS = ("mean", "sum")

# Rows per block when gathering neighbour labels, to bound memory.
BLOCK = 65_536

# Real labels must span less than this, and more than its inverse (unless
# constant): their squared differences then stay inside float64's range.
LABEL_SPAN = 1e150

# Local variances closer than this, relative to the largest, are taken as equal
# (floating-point noise must not spread the weights over [1, m]).
EQUAL_TOLERANCE = 1e-12

# After a graph search, the rows of largest local variance are searched again
# exactly until this share of the rows (at most LARGEST_ROWS) holds still,
# within a quarter of EXACT_AGAIN's distances: 200 rows among 1,000,000 x 64
# take about 0.3 s on 2 cores.
LARGEST_SHARE = 0.01
LARGEST_ROWS = 200


@dataclass
class WeighResult:
    """local_variance and weight : ndarrays of shape (n_samples,)."""

    local_variance: np.ndarray
    weight: np.ndarray
    neighbours: Neighbours
    timings: dict = field(default_factory=dict)
    all_equal: bool = False
    recall: float | None = None


def check_m(m: float) -> None:
    if not np.isfinite(m) or m < 1:
        raise UsageError(f"--m {m}: the largest weight ratio must be a finite "
                         "number, at least 1")


def check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise UsageError(f"--normalize {normalization}: choose "
                         + " or ".join(NORMALIZATIONS))


def standardize(X: np.ndarray) -> np.ndarray:
    """Features centred and scaled to unit variance (constant ones left at 0)."""
    X = near_one(np.asarray(X, dtype=np.float64))
    scale = X.std(axis=0)
    scale[scale == 0] = 1.0
    return (X - X.mean(axis=0)) / scale


def near_one(X: np.ndarray) -> np.ndarray:
    """Each column multiplied by the power of two that brings its largest
    magnitude into [0.5, 1): exact, and its squares can neither overflow
    (a column of 1e200) nor vanish (1e-170)."""
    _, exponent = np.frexp(np.abs(X).max(axis=0, initial=0.0))
    return np.ldexp(X, -exponent)


def check_label_span(labels: list[Labels]) -> None:
    """Refuse real labels whose variance would leave float64's range."""
    for column in labels:
        if column.kind != "regression" or not len(column.values):
            continue
        values = np.asarray(column.values, np.float64)
        span = float(np.max(np.ptp(values.reshape(len(values), -1), axis=0)))
        if span > LABEL_SPAN or 0 < span < 1 / LABEL_SPAN:
            raise DataError(f"label column '{column.column}' spans {span:.3g}: "
                            "its variance would leave float64's range; rescale "
                            "the labels")


def weigh(X: np.ndarray, labels: list[Labels], *, k: int = 20, m: float = 40,
          include_self: bool = True, normalization: str = "mean",
          scale_features: bool = False, search: SearchOptions | None = None,
          check_recall: int | None = None, progress: Progress | None = None
          ) -> WeighResult:
    """VBSW weights of the rows of X.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features).
    labels : label columns, from :func:`vbsw_cli.io.read_labels`.
    k : neighbourhood size (the point itself counted when ``include_self``).
    m : ratio of the largest weight to the smallest, before normalisation.
    normalization : ``"mean"`` (weights average 1) or ``"sum"`` (sum to 1).
    scale_features : standardise features before the search.
    check_recall : measure recall@k against exact search on this many rows.

    Returns
    -------
    WeighResult with arrays in the row order of X.
    """
    check_m(m)
    check_normalization(normalization)
    check_label_span(labels)
    progress = progress or NullProgress()
    timings = {}

    started = time.perf_counter()
    space = standardize(X) if scale_features else X
    neighbours = nearest_neighbours(space, k, include_self=include_self,
                                    options=search, progress=progress)
    recall = None
    if check_recall is not None:
        recall = measure_recall(space, neighbours, check_recall,
                                include_self=include_self, options=search)
    timings["search_s"] = time.perf_counter() - started

    started = time.perf_counter()
    variance = local_variance(neighbours.indices, labels)
    if neighbours.method == "hnsw":
        neighbours.details["largest_exact"] = exact_largest(
            space, neighbours, variance, labels, include_self=include_self,
            options=search)
    neighbours.exact = None  # the rows' float32 copy: not needed past here
    weight, all_equal = weights_from_variance(variance, m, normalization)
    require_finite(variance, weight)
    timings["variance_s"] = time.perf_counter() - started
    return WeighResult(variance, weight, neighbours, timings, all_equal, recall)


def exact_largest(X, neighbours: Neighbours, variance: np.ndarray,
                  labels: list[Labels], *, include_self: bool,
                  options: SearchOptions | None = None) -> int:
    """Search again exactly, in place, the rows of largest local variance
    until the LARGEST_SHARE largest (at most LARGEST_ROWS) all come from exact
    neighbourhoods, or a quarter of EXACT_AGAIN distances are spent; their
    variances are updated. Returns how many rows were searched.

    The largest variance sets the weights' scale: one neighbourhood a graph
    got wrong (a row led into another cluster) would otherwise set it where
    every other variance is 0 (a trial: weight 40 for that row, 0.9997 for
    the 149,999 others). A row whose variance falls is replaced in the top by
    the next, so the search goes on until the top holds still.
    """
    n = len(variance)
    top = max(1, min(LARGEST_ROWS, int(n * LARGEST_SHARE)))
    budget = max(int(EXACT_AGAIN / 4 // n), top)
    exact = np.zeros(n, bool)
    reach = min(2 * top, n)  # twice the top at first: it seldom moves after
    while budget > 0:
        largest = np.argpartition(-variance, reach - 1)[:reach]
        rows = largest[(variance[largest] > 0) & ~exact[largest]]
        rows = np.sort(rows[np.argsort(-variance[rows], kind="stable")][:budget])
        reach = top
        if not len(rows):
            break
        exact_rows(X, neighbours, rows, include_self=include_self,
                   options=options)
        variance[rows] = local_variance(neighbours.indices[rows], labels)
        exact[rows] = True
        budget -= len(rows)
    return int(exact.sum())


def require_finite(variance: np.ndarray, weight: np.ndarray) -> None:
    """Refuse to hand on a local variance or weight that is not a number."""
    for name, values in (("local variance", variance), ("weight", weight)):
        bad = ~np.isfinite(values)
        if bad.any():
            raise DataError(f"{counted(int(bad.sum()), 'row')} got a {name} that "
                            f"is not finite (first: row {int(np.argmax(bad))}); "
                            "nothing was written")


def local_variance(indices: np.ndarray, labels: list[Labels]) -> np.ndarray:
    """Equation (4): summed unbiased label variance over each neighbourhood.

    indices : ndarray of shape (n_samples, k) of neighbour rows.
    Returns an ndarray of shape (n_samples,).
    """
    total = np.zeros(len(indices))
    for column in labels:
        if column.kind == "classification":
            total += class_variance(column.values, indices)
        else:
            total += value_variance(column.values, indices)
    return total


def value_variance(Y: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Unbiased variance of real labels over neighbourhoods, summed over outputs.

    Y : ndarray of shape (n_samples, n_outputs).
    """
    Y = np.asarray(Y, dtype=np.float64).reshape(len(Y), -1)
    varying = np.ptp(Y, axis=0) > 0
    Y = Y[:, varying]
    out = np.zeros(len(indices))
    if Y.shape[1] == 0:
        return out
    for start, stop in chunks(len(indices), BLOCK):
        block = Y[indices[start:stop]]
        # Shift by the first value so identical labels give exactly zero.
        block -= block[:, :1, :]
        out[start:stop] = block.var(axis=1, ddof=1).sum(axis=1)
    return out


def class_variance(codes: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Summed one-hot variance of class labels, from class counts alone.

    codes : ndarray of shape (n_samples,) of integer class codes.
    """
    k = indices.shape[1]
    out = np.empty(len(indices))
    positions = np.arange(k)
    for start, stop in chunks(len(indices), BLOCK):
        block = np.sort(codes[indices[start:stop]], axis=1)
        run_starts = np.ones_like(block, dtype=bool)
        run_starts[:, 1:] = block[:, 1:] != block[:, :-1]
        first = np.maximum.accumulate(np.where(run_starts, positions, 0), axis=1)
        # A run of length n contributes 1 + 3 + ... + (2n - 1) = n**2.
        squares = (2 * (positions - first) + 1).sum(axis=1)
        out[start:stop] = (k * k - squares) / (k * (k - 1))
    return out


def weights_from_variance(variance: np.ndarray, m: float,
                          normalization: str = "mean"
                          ) -> tuple[np.ndarray, bool]:
    """Rescale variances linearly onto [1, m], then normalise.

    Returns the weights and whether every variance was equal (all weights 1
    before normalisation).
    """
    low, high = float(variance.min()), float(variance.max())
    spread = high - low
    if spread <= EQUAL_TOLERANCE * max(abs(high), abs(low)) or spread == 0:
        raw = np.ones_like(variance, dtype=np.float64)
        all_equal = True
    else:
        raw = 1.0 + (m - 1.0) * ((variance - low) / spread)  # m up to 1e308
        all_equal = False
    return normalise(raw, normalization), all_equal


def normalise(raw: np.ndarray, normalization: str) -> np.ndarray:
    """Weights averaging 1 (``"mean"``) or summing to 1 (``"sum"``)."""
    # Scaled to at most 1 first, so that a huge m cannot overflow the sum.
    raw = raw / raw.max()
    if normalization == "sum":
        return raw / raw.sum()
    return raw / raw.mean()


def histogram(weight: np.ndarray, bins: int = 8, width: int = 30) -> list[str]:
    """A few text lines showing how the weights are spread."""
    counts, edges = np.histogram(weight, bins=bins)
    peak = max(int(counts.max()), 1)
    lines = []
    for count, low, high in zip(counts, edges[:-1], edges[1:]):
        bar = "#" * int(round(width * count / peak))
        lines.append(f"  [{low:8.3g}, {high:8.3g}) {count:>9d} {bar}")
    return lines
