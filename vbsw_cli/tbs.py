"""Taylor based sampling (paper section 2.2, Algorithm 1, and section 6.1).

New points are drawn where the function to learn is steep. The steps:

1. points x_1..x_N in a box S: given, or an initial design (uniform, grid,
   Latin hypercube, Sobol);
2. a density at each point, one of
   * Df_eps^n of equation (2) from derivatives, n = 1 or 2:
     Df = sum over multi-indices 1 <= |k| <= n of eps^k (d^k f)^2 / k!,
     i.e. sum_i eps_i f_i^2 + sum_i eps_i^2 f_ii^2 / 2 + sum_{i<j} eps_i eps_j
     f_ij^2, summed over outputs; derivatives by central finite differences
     of a callable, or given by the user;
   * the local label variance of equation (4), the section 6.1 variant for
     codes without derivatives;
3. a Gaussian mixture fitted to the points weighted by the density
   (:mod:`vbsw_cli.mixture`), in the coordinates of the unit box, so one
   regularisation fits every scale;
4. N' draws from the mixture, those outside S rejected and redrawn (a truncated
   mixture, Alg. 1 line 8).
"""

from __future__ import annotations

import itertools
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from vbsw_cli.errors import DataError, UsageError
from vbsw_cli.functions import Function, evaluate
from vbsw_cli.io import Labels
from vbsw_cli.mixture import (Mixture, distinct_count, fit_weighted_mixture,
                              log_pdf, sample)
from vbsw_cli.neighbors import SearchOptions, nearest_neighbours
from vbsw_cli.weigh import exact_largest, local_variance

DESIGNS = ("uniform", "grid", "lhs", "sobol")
ORDERS = (1, 2)

# Rejection sampling gives up when, after at least MIN_DRAWS draws, fewer than
# one draw in 1,000 falls inside the box: the mixture then sits almost wholly
# outside it, and the truncated density would rest on a handful of points.
ACCEPTANCE_FLOOR = 1e-3
MIN_DRAWS = 10_000


# ---------------------------------------------------------------------------
# The box


@dataclass
class Box:
    """An axis-aligned box; low and high : ndarrays of shape (n_inputs,)."""

    low: np.ndarray
    high: np.ndarray
    names: list[str]

    @property
    def width(self) -> np.ndarray:
        return self.high - self.low

    def to_unit(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.low) / self.width

    def from_unit(self, U: np.ndarray) -> np.ndarray:
        # The clip removes rounding only: U is already in [0, 1].
        return np.clip(self.low + U * self.width, self.low, self.high)

    def contains(self, X: np.ndarray) -> np.ndarray:
        return ((X >= self.low) & (X <= self.high)).all(axis=1)


def make_box(low, high, names: list[str]) -> Box:
    """A checked box: finite bounds, low < high, one name per dimension."""
    low = np.asarray(low, dtype=np.float64).reshape(-1)
    high = np.asarray(high, dtype=np.float64).reshape(-1)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise UsageError("--bounds: every bound must be a finite number")
    with np.errstate(over="ignore"):
        wide = np.flatnonzero(~np.isfinite(high - low))
    if len(wide):
        i = int(wide[0])
        raise UsageError(f"--bounds: dimension {i + 1} spans more than the "
                         f"largest float ({low[i]:g}:{high[i]:g}); rescale it")
    with np.errstate(over="ignore", under="ignore", divide="ignore"):
        if np.all(high > low) and not np.isfinite(1 / np.prod(high - low)):
            raise UsageError("--bounds: the box's volume is below float64's "
                             f"range ({np.prod(high - low):g}): its densities "
                             "would overflow; rescale the inputs")
    bad = np.flatnonzero(low >= high)
    if len(bad):
        i = int(bad[0])
        raise UsageError(f"--bounds: dimension {i + 1} has low {low[i]:g} >= "
                         f"high {high[i]:g}; write low:high with low < high")
    if len(names) != len(low):
        raise UsageError(f"--names: {len(names)} names for {len(low)} "
                         "dimensions in --bounds")
    if len(set(names)) != len(names):
        raise UsageError("--names: the names must be distinct")
    return Box(low, high, list(names))


def parse_bounds(text: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Bounds from ``low:high,low:high,...`` or from a file.

    A file (``.csv`` or ``.parquet``) has one row per dimension and the columns
    ``low`` and ``high``, and optionally ``name``. Returns low, high and the
    names (None when the text gives none).
    """
    if text.lower().endswith((".csv", ".parquet")) or os.path.isfile(text):
        return _bounds_file(text)
    low, high = [], []
    for part in text.split(","):
        pieces = part.strip().split(":")
        try:
            lo, hi = (float(p) for p in pieces)
        except ValueError:
            raise UsageError(f"--bounds {text}: '{part.strip()}' is not low:high "
                             "(e.g. --bounds -1:1,0:10)")
        low.append(lo)
        high.append(hi)
    return np.array(low), np.array(high), None


def _bounds_file(path: str):
    import pyarrow.csv as pcsv

    from vbsw_cli import io

    if not os.path.isfile(path):
        raise UsageError(f"--bounds {path}: no such file")
    try:
        table = (pcsv.read_csv(path) if path.lower().endswith(".csv")
                 else io.read_table(path))
    except Exception as error:
        raise DataError(f"{path}: not a readable bounds file ({error})")
    missing = [c for c in ("low", "high") if c not in table.column_names]
    if missing or table.num_rows == 0:
        raise DataError(f"{path}: a bounds file needs rows with columns low and "
                        f"high (and optionally name); found "
                        f"{', '.join(table.column_names)}")
    names = (None if "name" not in table.column_names
             else [str(n) for n in table.column("name").to_pylist()])
    try:
        low = np.asarray(table.column("low").to_pylist(), dtype=np.float64)
        high = np.asarray(table.column("high").to_pylist(), dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: the low and high columns must hold numbers")
    return low, high, names


# ---------------------------------------------------------------------------
# Initial design (Alg. 1 line 2)


def initial_design(box: Box, n_samples: int, design: str,
                   rng: np.random.Generator) -> np.ndarray:
    """N points in the box, shape (n_samples, n_inputs).

    ``grid`` needs n_samples = m ** n_inputs and puts m points, ends included,
    on each axis; ``sobol`` is scrambled, and balanced only for powers of 2.
    """
    if design not in DESIGNS:
        raise UsageError(f"--design {design}: choose one of " + ", ".join(DESIGNS))
    if n_samples < 1:
        raise UsageError(f"--initial {n_samples}: must be at least 1")
    d = len(box.low)
    if design == "uniform":
        U = rng.random((n_samples, d))
    elif design == "grid":
        U = _grid(n_samples, d)
    else:
        U = _quasi_random(design, n_samples, d, rng)
    return box.from_unit(U)


def _grid(n_samples: int, d: int) -> np.ndarray:
    side = int(round(n_samples ** (1.0 / d)))
    if side**d != n_samples:
        options = sorted({max(side - 1, 1)**d, side**d, (side + 1)**d})
        raise UsageError(f"--initial {n_samples}: a grid in {d} dimensions needs "
                         f"m**{d} points, e.g. " + ", ".join(map(str, options)))
    axis = np.linspace(0.0, 1.0, side) if side > 1 else np.array([0.5])
    mesh = np.meshgrid(*[axis] * d, indexing="ij")
    return np.column_stack([m.reshape(-1) for m in mesh])


def _quasi_random(design: str, n_samples: int, d: int, rng) -> np.ndarray:
    from scipy.stats import qmc

    kind = qmc.LatinHypercube if design == "lhs" else qmc.Sobol
    try:
        engine = kind(d, rng=rng)
    except TypeError:  # scipy < 1.15 calls the generator ``seed``
        engine = kind(d, seed=rng)
    with warnings.catch_warnings():
        # Sobol points are unbalanced unless n is a power of 2: said in --help.
        warnings.simplefilter("ignore", UserWarning)
        return engine.random(n_samples)


# ---------------------------------------------------------------------------
# Densities (Alg. 1 lines 3-6, eq. (2); eq. (4) for section 6.1)


def check_order(order: int) -> None:
    if order not in ORDERS:
        raise UsageError(f"--order {order}: Df_eps^n is implemented for n = 1 "
                         "or 2")


def per_dimension(values, d: int, option: str) -> np.ndarray:
    """One positive number per dimension, from one number or d numbers."""
    values = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if len(values) == 1:
        values = np.repeat(values, d)
    if len(values) != d:
        raise UsageError(f"{option}: give one value or {d} (one per dimension), "
                         f"not {len(values)}")
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise UsageError(f"{option}: every value must be a positive number")
    return values


def finite_differences(function: Function, X: np.ndarray, step: np.ndarray,
                       order: int = 2) -> tuple[np.ndarray, np.ndarray | None]:
    """Central finite-difference derivatives of a function at the rows of X.

    X : ndarray of shape (n_samples, d); step : ndarray of shape (d,).
    The function is called once, on every stencil point stacked, which reach
    up to ``step`` outside the box.

    Returns
    -------
    gradient : ndarray of shape (n_samples, d, n_outputs).
    hessian : ndarray of shape (n_samples, d, d, n_outputs), or None for
        order 1. Diagonal: (f(x+h) - 2 f(x) + f(x-h)) / h^2; mixed:
        (f(++) - f(+-) - f(-+) + f(--)) / (4 h_i h_j).
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    offsets = _stencil(d, order) * step
    points = (X[:, None, :] + offsets[None, :, :]).reshape(-1, d)
    values = evaluate(function, points, stencil=True).reshape(n, len(offsets),
                                                            -1)

    plus, minus = values[:, 1:1 + d], values[:, 1 + d:1 + 2 * d]
    gradient = (plus - minus) / (2 * step[None, :, None])
    if order == 1:
        return gradient, None
    hessian = np.empty((n, d, d, values.shape[2]))
    centre = values[:, :1]
    diagonal = (plus - 2 * centre + minus) / step[None, :, None] ** 2
    hessian[:, np.arange(d), np.arange(d)] = diagonal
    for index, (i, j) in enumerate(itertools.combinations(range(d), 2)):
        base = 1 + 2 * d + 4 * index
        pp, pm, mp, mm = (values[:, base + s] for s in range(4))
        hessian[:, i, j] = hessian[:, j, i] = (pp - pm - mp + mm) / (
            4 * step[i] * step[j])
    return gradient, hessian


def _stencil(d: int, order: int) -> np.ndarray:
    """Offsets in units of the step: centre, +e_i, -e_i, then (+-e_i +-e_j)."""
    eye = np.eye(d)
    rows = [np.zeros((1, d)), eye, -eye]
    if order == 2:
        for i, j in itertools.combinations(range(d), 2):
            for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                rows.append((si * eye[i] + sj * eye[j])[None])
    return np.concatenate(rows)


def taylor_density(gradient: np.ndarray, hessian: np.ndarray | None,
                   eps: np.ndarray, order: int = 2) -> np.ndarray:
    """Df_eps^n of equation (2), summed over outputs.

    gradient : ndarray of shape (n_samples, d, n_outputs).
    hessian : ndarray of shape (n_samples, d, d, n_outputs), needed for order 2.
    eps : ndarray of shape (d,).
    Returns an ndarray of shape (n_samples,).
    """
    check_order(order)
    gradient = np.asarray(gradient, dtype=np.float64)
    density = np.einsum("i,nio->n", eps, gradient**2)
    if order == 1:
        return density
    if hessian is None:
        raise UsageError("--order 2 needs second derivatives (--hessian)")
    # Multi-index k = e_i + e_j: eps^k = eps_i eps_j, k! = 2 when i = j else 1;
    # the full (symmetric) sum counts each i < j twice, hence the factor 1/2.
    scale = np.outer(eps, eps) / 2.0
    return density + np.einsum("ij,nijo->n", scale, np.asarray(hessian)**2)


def function_density(function: Function, X: np.ndarray, eps: np.ndarray, *,
                     order: int = 2, step: np.ndarray | None = None
                     ) -> np.ndarray:
    """Df_eps^n of a callable at the rows of X (shape (n_samples,)).

    The finite-difference step is ``eps`` unless ``step`` is given.
    """
    check_order(order)
    step = eps if step is None else step
    gradient, hessian = finite_differences(function, X, step, order)
    return taylor_density(gradient, hessian, eps, order)


def hessian_from_upper(columns: list[np.ndarray], d: int) -> np.ndarray:
    """A symmetric Hessian from its upper triangle, row by row.

    columns : d (d + 1) / 2 arrays of shape (n_samples, n_outputs), in the
        order (1,1), (1,2), ..., (1,d), (2,2), ..., (d,d).
    Returns an ndarray of shape (n_samples, d, d, n_outputs).
    """
    expected = d * (d + 1) // 2
    if len(columns) != expected:
        raise UsageError(f"--hessian: {d} inputs need {expected} columns (the "
                         f"upper triangle row by row), not {len(columns)}")
    n, n_outputs = columns[0].shape
    hessian = np.empty((n, d, d, n_outputs))
    pairs = [(i, j) for i in range(d) for j in range(i, d)]
    for (i, j), values in zip(pairs, columns):
        hessian[:, i, j] = hessian[:, j, i] = values
    return hessian


def variance_density(U: np.ndarray, labels: list[Labels], k: int, *,
                     options: SearchOptions | None = None) -> np.ndarray:
    """Local label variance of equation (4) at each point (shape (n_samples,)).

    U : ndarray of shape (n_samples, d), the points in unit-box coordinates,
    so that no input dominates the distances by its units. The point counts
    in its own neighbourhood, as in ``vbsw weigh``.
    """
    neighbours = nearest_neighbours(U, k, include_self=True, options=options)
    variance = local_variance(neighbours.indices, labels)
    if neighbours.method == "hnsw":  # as in vbsw weigh: the largest exact
        exact_largest(U, neighbours, variance, labels, include_self=True,
                      options=options)
    return variance


# ---------------------------------------------------------------------------
# Mixture and sampling (Alg. 1 lines 7-8)


@dataclass
class Sampling:
    """New points and how they were drawn.

    points : ndarray of shape (n_new, d), inside the box.
    mixture : the fitted mixture in unit-box coordinates (None for the uniform
        fallback).
    notes : warnings for the user (fallbacks, non-convergence).
    """

    points: np.ndarray
    mixture: Mixture | None
    box: Box
    n_components: int
    reg_covar: float
    acceptance: float
    fallback: str | None = None
    notes: list[str] = field(default_factory=list)

    def mixture_density(self, X: np.ndarray) -> np.ndarray:
        """Density of the (untruncated) mixture at the rows of X, in the
        original coordinates; the uniform density for the fallback."""
        volume = float(np.prod(self.box.width))
        if self.mixture is None:
            return np.full(len(X), 1.0 / volume)
        return np.exp(log_pdf(self.mixture, self.box.to_unit(X))) / volume


def auto_reg_covar(n_points: int, d: int) -> float:
    """h^2 / 12 with h = n_points^(-1/d): the variance of a uniform cell.

    In unit-box coordinates, each of n points stands for a cell of side about
    h; a component fitted to one point then spreads over its cell instead of
    collapsing onto it (which would only redraw the point itself).
    """
    h = max(n_points, 1) ** (-1.0 / d)
    return h * h / 12.0


def tbs_sample(X: np.ndarray, density: np.ndarray, box: Box, *, n_new: int,
               n_components: int, rng: np.random.Generator,
               reg_covar: float | None = None) -> Sampling:
    """Draw n_new points in the box from a mixture fitted to weighted X.

    X : ndarray of shape (n_samples, d), inside the box.
    density : ndarray of shape (n_samples,), >= 0: Df_eps^n or local variance.
    reg_covar : in unit-box coordinates; None for :func:`auto_reg_covar`.

    Returns
    -------
    Sampling. All densities zero (a flat function) fall back to uniform
    sampling in the box; fewer distinct points of positive density than
    ``n_components`` reduce the number of components. Both add a note.
    """
    density = _check_density(density, len(X))
    if n_new < 1:
        raise UsageError(f"--new {n_new}: must be at least 1")
    if n_components < 1:
        raise UsageError(f"--components {n_components}: must be at least 1")
    U = box.to_unit(X)
    reg = auto_reg_covar(len(X), U.shape[1]) if reg_covar is None else reg_covar

    if density.sum() <= 0:
        note = ("every density is zero (a flat function?): the new points are "
                "drawn uniformly in the box")
        points = box.from_unit(rng.random((n_new, U.shape[1])))
        return Sampling(points, None, box, 0, reg, 1.0, "uniform", [note])

    notes = []
    distinct = distinct_count(U[density > 0])
    if distinct < n_components:
        notes.append(f"only {distinct} distinct points have a positive density: "
                     f"fitting {distinct} components instead of {n_components}")
        n_components = distinct
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixture = fit_weighted_mixture(U, density / density.sum(), n_components,
                                       rng=rng, reg_covar=reg)
    notes.extend(str(w.message) for w in caught)
    U_new, acceptance = sample_in_unit_box(mixture, n_new, rng)
    return Sampling(box.from_unit(U_new), mixture, box, n_components, reg,
                    acceptance, None, notes)


def _check_density(density, n_samples: int) -> np.ndarray:
    density = np.asarray(density, dtype=np.float64).reshape(-1)
    if len(density) != n_samples:
        raise DataError(f"{len(density)} densities for {n_samples} points")
    if not np.isfinite(density).all():
        raise DataError("the density has NaN or infinite values; check the "
                        "derivatives or labels (values or steps of an extreme "
                        "scale overflow or underflow float64: rescale them)")
    if (density < 0).any():
        raise DataError("the density has negative values")
    return density


def sample_in_unit_box(mixture: Mixture, n_new: int, rng: np.random.Generator
                       ) -> tuple[np.ndarray, float]:
    """n_new draws inside [0, 1]^d, by rejection, and the acceptance rate.

    Draws come in batches; the first n_new accepted, in draw order, are kept,
    so the result depends only on the generator's state.
    """
    batch = max(4 * n_new, 1_000)
    kept, n_kept, n_drawn = [], 0, 0
    while n_kept < n_new:
        U = sample(mixture, batch, rng)
        inside = U[((U >= 0) & (U <= 1)).all(axis=1)]
        kept.append(inside)
        n_kept += len(inside)
        n_drawn += batch
        if n_kept < n_new and n_drawn >= MIN_DRAWS \
                and n_kept / n_drawn < ACCEPTANCE_FLOOR:
            raise DataError(f"only {n_kept} of {n_drawn} draws of the mixture "
                            f"fell inside the box (acceptance below "
                            f"{ACCEPTANCE_FLOOR:g}); check --bounds against "
                            "the points, or raise --reg-covar")
    return np.concatenate(kept)[:n_new], n_kept / n_drawn
