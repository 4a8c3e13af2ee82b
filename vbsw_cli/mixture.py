"""A Gaussian mixture fitted by EM to weighted points (Alg. 1, line 7).

Taylor based sampling needs a mixture that follows a density known only at a
few points: each point carries a weight proportional to the density there.
scikit-learn's ``GaussianMixture`` takes no sample weights, so this module
runs the expectation-maximisation steps itself with the weights in every sum:

* E-step: responsibilities r_ik = pi_k N(x_i | mu_k, S_k) / sum_j (...);
* M-step, with w_i the sample weights and N_k = sum_i w_i r_ik:
  pi_k = N_k / sum_i w_i, mu_k = sum_i w_i r_ik x_i / N_k,
  S_k = sum_i w_i r_ik (x_i - mu_k)(x_i - mu_k)^T / N_k + reg_covar * I.

Integer weights therefore give the same fit as the points repeated that many
times. The start is a weighted k-means (scikit-learn's ``KMeans`` accepts
``sample_weight``), seeded from the generator passed in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from vbsw_cli.errors import DataError, UsageError

# Same role as scikit-learn's defaults: stop when the weighted mean
# log-likelihood gains less than TOL in one step, after at most MAX_ITER steps.
TOL = 1e-6
MAX_ITER = 500

# Added to N_k so that an emptied component divides by a small number, not 0
# (scikit-learn does the same).
TINY = 10 * np.finfo(np.float64).eps


class ConvergenceWarning(UserWarning):
    """EM stopped at its step limit before the log-likelihood settled.

    Our own class, not scikit-learn's, so that importing this module (and
    starting the command line) does not import scikit-learn.
    """


@dataclass
class Mixture:
    """A fitted Gaussian mixture.

    weights : ndarray of shape (n_components,), summing to 1.
    means : ndarray of shape (n_components, n_features).
    covariances : ndarray of shape (n_components, n_features, n_features).
    converged, n_iter, log_likelihood : how the fit ended (weighted mean
        log-likelihood of the points).
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    converged: bool = True
    n_iter: int = 0
    log_likelihood: float = float("nan")


def fit_weighted_mixture(X: np.ndarray, sample_weight: np.ndarray,
                         n_components: int, *, rng: np.random.Generator,
                         reg_covar: float = 1e-6, tol: float = TOL,
                         max_iter: int = MAX_ITER,
                         init: Mixture | None = None) -> Mixture:
    """Fit a full-covariance Gaussian mixture to weighted points by EM.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features).
    sample_weight : ndarray of shape (n_samples,), non-negative, not all zero.
    n_components : number of Gaussians; at most the number of distinct points
        with a positive weight.
    rng : seeds the weighted k-means start.
    reg_covar : added to the diagonal of every covariance (>= 0).
    init : start from these parameters instead of k-means.

    Returns
    -------
    Mixture. Emits a ``ConvergenceWarning`` when EM stops at ``max_iter``.
    """
    X, w = _check_inputs(X, sample_weight, n_components, reg_covar)
    mixture = init if init is not None else _kmeans_start(
        X, w, n_components, rng, reg_covar)

    previous = -np.inf
    for step in range(1, max_iter + 1):
        log_resp, log_likelihood = _expectation(X, w, mixture)
        mixture = _maximisation(X, w, np.exp(log_resp), reg_covar)
        if abs(log_likelihood - previous) < tol:
            mixture.converged, mixture.n_iter = True, step
            break
        previous = log_likelihood
    else:
        mixture.converged, mixture.n_iter = False, max_iter
        warnings.warn(f"the weighted Gaussian mixture did not converge in "
                      f"{max_iter} EM steps (last gain "
                      f"{abs(log_likelihood - previous):.3g} >= tol {tol})",
                      ConvergenceWarning, stacklevel=2)
    mixture.log_likelihood = float(_expectation(X, w, mixture)[1])
    return mixture


def _check_inputs(X, sample_weight, n_components, reg_covar):
    X = np.asarray(X, dtype=np.float64)
    w = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if X.ndim != 2 or len(X) != len(w):
        raise DataError(f"the mixture needs X of shape (n, d) and n weights; "
                        f"got {X.shape} and {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise DataError("the mixture weights must be finite, non-negative and "
                        "not all zero")
    if reg_covar < 0 or not np.isfinite(reg_covar):
        raise UsageError(f"--reg-covar {reg_covar}: must be a number >= 0")
    distinct = distinct_count(X[w > 0])
    if not 1 <= n_components <= distinct:
        raise DataError(f"--components {n_components}: must lie between 1 and "
                        f"the {distinct} distinct points of positive weight")
    return X, w


def distinct_count(X: np.ndarray) -> int:
    """The number of distinct rows of X."""
    return len(np.unique(X, axis=0)) if len(X) else 0


def _kmeans_start(X, w, n_components, rng, reg_covar) -> Mixture:
    """Parameters of the mixture whose components are weighted k-means clusters."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning as KMeansWarning

    seed = int(rng.integers(2**31 - 1))
    keep = w > 0
    kmeans = KMeans(n_clusters=n_components, n_init=1, random_state=seed)
    with warnings.catch_warnings():
        # Ties between duplicated points are fine: the count was checked.
        warnings.simplefilter("ignore", KMeansWarning)
        kmeans.fit(X[keep], sample_weight=w[keep])
    resp = np.zeros((len(X), n_components))
    resp[np.flatnonzero(keep), kmeans.labels_] = 1.0
    return _maximisation(X, w, resp, reg_covar)


def _maximisation(X, w, resp, reg_covar) -> Mixture:
    """Weighted M-step: mixture weights, means and covariances."""
    weighted = resp * w[:, None]
    totals = weighted.sum(axis=0) + TINY
    means = weighted.T @ X / totals[:, None]
    n_features = X.shape[1]
    covariances = np.empty((len(totals), n_features, n_features))
    for k, mean in enumerate(means):
        centred = X - mean
        covariances[k] = (weighted[:, k, None] * centred).T @ centred / totals[k]
        covariances[k].flat[::n_features + 1] += reg_covar
    return Mixture(totals / totals.sum(), means, covariances)


def _expectation(X, w, mixture: Mixture):
    """Log responsibilities and the weighted mean log-likelihood."""
    joint = component_log_pdf(mixture, X) + np.log(mixture.weights + TINY)
    log_norm = _logsumexp(joint)
    log_likelihood = float(w @ log_norm / w.sum())
    return joint - log_norm[:, None], log_likelihood


def component_log_pdf(mixture: Mixture, X: np.ndarray) -> np.ndarray:
    """log N(x_i | mu_k, S_k) as an ndarray of shape (n_samples, n_components)."""
    X = np.asarray(X, dtype=np.float64)
    n_features = X.shape[1]
    out = np.empty((len(X), len(mixture.weights)))
    for k, (mean, covariance) in enumerate(zip(mixture.means,
                                               mixture.covariances)):
        lower = _cholesky(covariance)
        solved = np.linalg.solve(lower, (X - mean).T)
        log_det = 2.0 * np.log(np.diag(lower)).sum()
        out[:, k] = -0.5 * ((solved**2).sum(axis=0) + log_det
                            + n_features * np.log(2 * np.pi))
    return out


def _cholesky(covariance: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError:
        raise DataError("a mixture covariance is singular (points on a line or "
                        "a single point with --reg-covar 0); raise --reg-covar")


def log_pdf(mixture: Mixture, X: np.ndarray) -> np.ndarray:
    """Log density of the mixture at the rows of X, shape (n_samples,)."""
    joint = component_log_pdf(mixture, X) + np.log(mixture.weights + TINY)
    return _logsumexp(joint)


def sample(mixture: Mixture, n_samples: int, rng: np.random.Generator
           ) -> np.ndarray:
    """Draw n_samples points, shape (n_samples, n_features)."""
    counts = rng.multinomial(n_samples, mixture.weights / mixture.weights.sum())
    component = np.repeat(np.arange(len(counts)), counts)
    noise = rng.standard_normal((n_samples, mixture.means.shape[1]))
    lowers = np.stack([_cholesky(c) for c in mixture.covariances])
    X = mixture.means[component] + np.einsum("nij,nj->ni", lowers[component],
                                             noise)
    # Shuffle so the order of the draws does not follow the components.
    return X[rng.permutation(n_samples)]


def _logsumexp(joint: np.ndarray) -> np.ndarray:
    """log(sum(exp(joint), axis=1)) without overflow, row by row."""
    top = joint.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.log(np.exp(joint - top).sum(axis=1)) + top[:, 0]
