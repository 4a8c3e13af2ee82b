"""The weighted Gaussian mixture against duplicated points and scikit-learn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.mixture import GaussianMixture

from vbsw_cli.errors import DataError
from vbsw_cli.mixture import (ConvergenceWarning, Mixture, fit_weighted_mixture,
                              log_pdf, sample)

SEED = 0


def _start(X, n_components, rng):
    """A common starting point: means on random rows, unit covariances."""
    d = X.shape[1]
    means = X[rng.choice(len(X), n_components, replace=False)]
    return Mixture(np.full(n_components, 1.0 / n_components), means.copy(),
                   np.stack([np.eye(d) * 0.5] * n_components))


def _copy(mixture):
    return Mixture(mixture.weights.copy(), mixture.means.copy(),
                   mixture.covariances.copy())


def test_integer_weights_fit_like_duplicated_points():
    rng = np.random.default_rng(SEED)
    X = rng.normal(size=(40, 2)) + np.repeat([[0, 0], [4, 1]], 20, axis=0)
    counts = rng.integers(1, 5, size=len(X))
    start = _start(X, 2, rng)

    weighted = fit_weighted_mixture(X, counts, 2, rng=rng, init=_copy(start),
                                    reg_covar=1e-6, tol=1e-12)
    repeated = fit_weighted_mixture(np.repeat(X, counts, axis=0),
                                    np.ones(counts.sum()), 2, rng=rng,
                                    init=_copy(start), reg_covar=1e-6, tol=1e-12)

    np.testing.assert_allclose(weighted.weights, repeated.weights, atol=1e-9)
    np.testing.assert_allclose(weighted.means, repeated.means, atol=1e-8)
    np.testing.assert_allclose(weighted.covariances, repeated.covariances,
                               atol=1e-8)


def test_matches_scikit_learn_on_duplicated_points():
    rng = np.random.default_rng(1)
    X = np.concatenate([rng.normal(-2, 0.5, size=(30, 2)),
                        rng.normal(2, 1.0, size=(30, 2))])
    counts = rng.integers(1, 4, size=len(X))
    start = _start(X, 2, rng)

    ours = fit_weighted_mixture(X, counts, 2, rng=rng, init=_copy(start),
                                reg_covar=1e-6, tol=1e-10, max_iter=1000)
    reference = GaussianMixture(
        2, covariance_type="full", reg_covar=1e-6, tol=1e-10, max_iter=1000,
        weights_init=start.weights, means_init=start.means,
        precisions_init=np.linalg.inv(start.covariances)).fit(
            np.repeat(X, counts, axis=0))

    order = np.argsort(reference.means_[:, 0])
    mine = np.argsort(ours.means[:, 0])
    np.testing.assert_allclose(ours.weights[mine], reference.weights_[order],
                               atol=1e-6)
    np.testing.assert_allclose(ours.means[mine], reference.means_[order],
                               atol=1e-6)
    np.testing.assert_allclose(ours.covariances[mine],
                               reference.covariances_[order], atol=1e-6)


def test_reproduces_a_known_weighted_density():
    # Points on a fine grid weighted by a two-Gaussian density: the fit must
    # find that density's parameters.
    x = np.linspace(-6, 6, 4001)[:, None]
    truth = (0.3 * np.exp(-0.5 * ((x[:, 0] + 2) / 0.5) ** 2) / 0.5
             + 0.7 * np.exp(-0.5 * ((x[:, 0] - 1.5) / 0.8) ** 2) / 0.8)
    fit = fit_weighted_mixture(x, truth, 2, rng=np.random.default_rng(SEED),
                               reg_covar=0.0, tol=1e-10, max_iter=2000)

    order = np.argsort(fit.means[:, 0])
    np.testing.assert_allclose(fit.weights[order], [0.3, 0.7], atol=5e-3)
    np.testing.assert_allclose(fit.means[order, 0], [-2, 1.5], atol=1e-2)
    np.testing.assert_allclose(np.sqrt(fit.covariances[order, 0, 0]),
                               [0.5, 0.8], atol=1e-2)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(6, 40), d=st.integers(1, 3),
       n_components=st.integers(1, 3))
def test_overall_moments_equal_the_weighted_moments(seed, n, d, n_components):
    # Each weighted M-step keeps the mixture's mean at the weighted mean of
    # the points and its covariance at their weighted covariance + reg_covar.
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, size=d)
    w = rng.uniform(0, 1, size=n) ** 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = fit_weighted_mixture(X, w, n_components, rng=rng, reg_covar=1e-3,
                                   max_iter=50)

    p = w / w.sum()
    mean = p @ X
    covariance = (p[:, None] * (X - mean)).T @ (X - mean) + 1e-3 * np.eye(d)
    mixture_mean = fit.weights @ fit.means
    centred = fit.means - mixture_mean
    mixture_covariance = (np.einsum("k,kij->ij", fit.weights, fit.covariances)
                          + (fit.weights[:, None] * centred).T @ centred)
    np.testing.assert_allclose(mixture_mean, mean, atol=1e-8)
    np.testing.assert_allclose(mixture_covariance, covariance, atol=1e-7)


def test_samples_follow_the_mixture():
    mixture = Mixture(np.array([0.25, 0.75]), np.array([[0.0, 0.0], [5.0, 1.0]]),
                      np.array([np.eye(2) * 0.25, [[1.0, 0.6], [0.6, 1.0]]]))
    X = sample(mixture, 40_000, np.random.default_rng(SEED))

    second = X[:, 0] > 2.5
    assert abs(second.mean() - 0.75) < 0.01
    np.testing.assert_allclose(X[second].mean(axis=0), [5, 1], atol=0.03)
    np.testing.assert_allclose(np.cov(X[second].T), mixture.covariances[1],
                               atol=0.04)


def test_log_pdf_integrates_to_one():
    mixture = Mixture(np.array([0.4, 0.6]), np.array([[-1.0], [2.0]]),
                      np.array([[[0.3]], [[1.5]]]))
    x = np.linspace(-12, 14, 20001)[:, None]
    total = np.trapezoid(np.exp(log_pdf(mixture, x)), x[:, 0])
    assert total == pytest.approx(1.0, abs=1e-6)


def test_warns_when_em_stops_early():
    rng = np.random.default_rng(SEED)
    X = rng.normal(size=(50, 2))
    with pytest.warns(ConvergenceWarning, match="did not converge in 1 EM"):
        fit = fit_weighted_mixture(X, np.ones(50), 3, rng=rng, max_iter=1)
    assert not fit.converged


def test_refuses_more_components_than_distinct_points():
    X = np.array([[0.0], [0.0], [1.0], [1.0]])
    with pytest.raises(DataError, match="between 1 and the 2 distinct points"):
        fit_weighted_mixture(X, np.ones(4), 3, rng=np.random.default_rng(0))


def test_refuses_zero_or_negative_weights():
    X = np.arange(4.0)[:, None]
    with pytest.raises(DataError, match="not all zero"):
        fit_weighted_mixture(X, np.zeros(4), 1, rng=np.random.default_rng(0))
    with pytest.raises(DataError, match="non-negative"):
        fit_weighted_mixture(X, [1, -1, 1, 1], 1, rng=np.random.default_rng(0))
