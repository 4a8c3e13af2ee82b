"""Local variance and weights against a plain numpy brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vbsw_cli.errors import DataError
from vbsw_cli.io import Labels
from vbsw_cli.neighbors import SearchOptions, nearest_neighbours
from vbsw_cli.weigh import (class_variance, local_variance, standardize,
                            value_variance, weigh, weights_from_variance)

EXACT = SearchOptions(method="exact")


# ---------------------------------------------------------------------------
# The reference: written for clarity, not speed, sharing no code with vbsw_cli.


def reference_neighbours(X, k, include_self=True):
    """For each point: itself (optionally) then its nearest other points."""
    X = np.asarray(X, dtype=np.float64)
    out = []
    for i in range(len(X)):
        distance = np.sqrt(((X - X[i]) ** 2).sum(axis=1))
        others = [j for j in np.argsort(distance, kind="stable") if j != i]
        chosen = ([i] + others[:k - 1]) if include_self else others[:k]
        out.append(chosen)
    return np.array(out)


def reference_variance(neighbour_sets, columns):
    """Eq. (4) by explicit loops: unbiased variance, one-hot for classes."""
    total = np.zeros(len(neighbour_sets))
    for kind, values in columns:
        if kind == "classification":
            classes = sorted(set(values.tolist()))
            onehot = np.array([[v == c for c in classes] for v in values], float)
            matrix = onehot
        else:
            matrix = np.asarray(values, float).reshape(len(values), -1)
        for i, rows in enumerate(neighbour_sets):
            total[i] += np.var(matrix[rows], axis=0, ddof=1).sum()
    return total


def reference_weights(variance, m):
    low, high = variance.min(), variance.max()
    if high == low:
        raw = np.ones_like(variance)
    else:
        raw = 1 + (m - 1) * (variance - low) / (high - low)
    return raw / raw.mean()


def regression(y):
    y = np.asarray(y, float)
    return Labels("label", "regression", y.reshape(len(y), -1))


def classes(y):
    values, codes = np.unique(np.asarray(y), return_inverse=True)
    return Labels("label", "classification", codes, values.tolist())


# ---------------------------------------------------------------------------
# Exact search and variance against the reference


@pytest.mark.parametrize("include_self", [True, False])
def test_exact_neighbours_match_reference(rng, include_self):
    X = rng.normal(size=(150, 5))
    found = nearest_neighbours(X, 7, include_self=include_self, options=EXACT)
    expected = reference_neighbours(X, 7, include_self)
    assert found.method == "exact"
    for got, want in zip(found.indices, expected):
        assert set(got) == set(want)
    if include_self:
        assert (found.indices[:, 0] == np.arange(len(X))).all()


def test_regression_variance_and_weights_match_reference(rng):
    X = rng.normal(size=(120, 3))
    y = np.sin(3 * X[:, 0]) + 0.1 * rng.normal(size=len(X))
    result = weigh(X, [regression(y)], k=10, m=40, search=EXACT)
    neighbours = reference_neighbours(X, 10)
    variance = reference_variance(neighbours, [("regression", y)])
    np.testing.assert_allclose(result.local_variance, variance, rtol=1e-9)
    np.testing.assert_allclose(result.weight, reference_weights(variance, 40),
                               rtol=1e-9)


def test_multi_output_and_mixed_columns_sum_their_variances(rng):
    X = rng.normal(size=(90, 4))
    Y = rng.normal(size=(90, 3))
    labels = rng.choice(["cat", "dog", "eel"], size=90)
    result = weigh(X, [regression(Y), classes(labels)], k=6, m=10, search=EXACT)
    neighbours = reference_neighbours(X, 6)
    variance = reference_variance(neighbours, [("regression", Y),
                                               ("classification", labels)])
    np.testing.assert_allclose(result.local_variance, variance, rtol=1e-9)


@pytest.mark.parametrize("n_classes", [2, 5, 40])
def test_class_closed_form_equals_explicit_one_hot(rng, n_classes):
    codes = rng.integers(n_classes, size=300)
    indices = rng.integers(300, size=(300, 9))
    indices[:, 0] = np.arange(300)
    onehot = np.eye(n_classes)[codes]
    explicit = np.var(onehot[indices], axis=1, ddof=1).sum(axis=1)
    np.testing.assert_allclose(class_variance(codes, indices), explicit,
                               atol=1e-12)


def test_real_data_matches_reference():
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    X, y = data.data[:200], data.target[:200]
    result = weigh(X, [classes(y)], k=35, m=50, search=EXACT)
    variance = reference_variance(reference_neighbours(X, 35),
                                  [("classification", y)])
    np.testing.assert_allclose(result.local_variance, variance, atol=1e-12)
    np.testing.assert_allclose(result.weight, reference_weights(variance, 50),
                               rtol=1e-9)


# ---------------------------------------------------------------------------
# Duplicates and degenerate labels


@pytest.mark.parametrize("include_self", [True, False])
def test_duplicates_count_the_point_once(rng, include_self):
    base = rng.normal(size=(30, 2))
    X = np.repeat(base, 6, axis=0)  # every point has 5 exact copies
    found = nearest_neighbours(X, 4, include_self=include_self, options=EXACT)
    own = (found.indices == np.arange(len(X))[:, None]).sum(axis=1)
    assert (own == (1 if include_self else 0)).all()
    for row in found.indices:
        assert len(set(row)) == len(row)
    assert (found.distances[:, 1 if include_self else 0:] == 0).all()


def test_duplicates_with_hnsw_count_the_point_once(rng):
    X = np.repeat(rng.normal(size=(400, 8)), 5, axis=0)
    options = SearchOptions(method="hnsw", seed=3, threads=1)
    found = nearest_neighbours(X, 8, options=options)
    own = (found.indices == np.arange(len(X))[:, None]).sum(axis=1)
    assert (own == 1).all()
    assert (found.indices[:, 0] == np.arange(len(X))).all()


def test_all_equal_labels_give_all_weights_one(rng):
    X = rng.normal(size=(60, 3))
    for labels in ([regression(np.full(60, 0.1))], [classes(np.full(60, "a"))]):
        result = weigh(X, labels, k=5, m=40, search=EXACT)
        assert result.all_equal
        np.testing.assert_array_equal(result.weight, np.ones(60))


def test_pure_neighbourhoods_of_float_labels_are_exactly_zero():
    # Two far clusters with different float labels: every neighbourhood is pure,
    # so rounding noise must not spread the weights.
    X = np.concatenate([np.zeros((20, 2)), np.full((20, 2), 100.0)])
    X += np.linspace(0, 1e-3, 40)[:, None]
    y = np.repeat([0.1, 0.7], 20)
    variance = value_variance(y[:, None], reference_neighbours(X, 5))
    assert (variance == 0).all()


# ---------------------------------------------------------------------------
# Approximate search


def test_hnsw_reaches_the_recall_and_the_weights(rng):
    centres = rng.normal(size=(10, 4)) * 5
    latent = centres[rng.integers(10, size=6000)] + rng.normal(size=(6000, 4))
    X = latent @ rng.normal(size=(4, 32))
    y = rng.integers(3, size=6000)
    exact = weigh(X, [classes(y)], k=20, m=40, search=EXACT)
    approx = weigh(X, [classes(y)], k=20, m=40, check_recall=300,
                   search=SearchOptions(method="hnsw", seed=1))
    assert approx.neighbours.method == "hnsw"
    assert approx.recall >= 0.95
    assert approx.neighbours.details["sample_recall"] >= 0.95
    close = np.isclose(approx.local_variance, exact.local_variance).mean()
    assert close > 0.9


def test_hard_data_falls_back_to_exact_when_recall_is_unreachable(rng):
    X = rng.normal(size=(3000, 64))
    options = SearchOptions(method="hnsw", recall=1.0, M=2, ef_construction=2,
                            seed=0)
    found = nearest_neighbours(X, 20, options=options)
    assert found.method == "exact"
    assert "recall" in found.details["reason"]


def test_sample_recall_scores_the_neighbourhood_as_used():
    from vbsw_cli.neighbors import _sample_recall, recall_bounds

    # Points on a line; row 0 is point 0, which the graph did not return: its
    # results are its three true neighbours and one far point.
    X = np.arange(10.0)[:, None]
    sample = np.array([0, 5])
    reference = np.array([[0.0, 1, 2, 3], [0.0, 1, 1, 2]])
    labels = np.array([[1, 2, 3, 9], [5, 4, 6, 3]])
    squared = ((X[labels, 0] - X[sample])**2).astype(np.float32)

    as_used, _ = _sample_recall((labels, squared), sample, reference)
    raw, _ = recall_bounds(np.sqrt(squared), reference)

    assert as_used == 1.0
    assert raw == pytest.approx(7 / 8)


def test_sample_recall_of_reached_rows_leaves_the_others_out():
    from vbsw_cli.neighbors import _sample_recall

    # Row 0 (point 0) did not come back in its results; row 1 did.
    sample = np.array([0, 5])
    reference = np.array([[0.0, 1, 2], [0.0, 1, 1]])
    labels = np.array([[7, 8, 9], [5, 4, 9]])
    squared = np.array([[49.0, 64, 81], [0, 1, 16]], np.float32)
    everyone, _ = _sample_recall((labels, squared), sample, reference)
    reached, _ = _sample_recall((labels, squared), sample, reference,
                                reached_only=True)
    assert everyone == pytest.approx(3 / 6)
    assert reached == pytest.approx(2 / 3)


@pytest.mark.parametrize("exact_again, sub_graph_fails",
                         [(2e9, False), (0, False), (0, True)])
def test_rows_a_graph_does_not_lead_back_are_searched_again(rng, monkeypatch,
                                                          exact_again,
                                                          sub_graph_fails):
    """Whole regions a graph misses get their neighbours from a second search,
    exact for a few rows, among themselves for many (exactly where their own
    graph cannot give k each); the recall reported is that of the result."""
    import vbsw_cli.neighbors as search

    centres = rng.normal(size=(8, 16)) * 10
    X = centres[rng.integers(8, size=4000)] + rng.normal(size=(4000, 16))
    exact = nearest_neighbours(X, 10, options=SearchOptions(method="exact"))
    # A graph that never enters the region nearest centre 0: its rows get
    # the neighbours of another row, and do not find themselves.
    lost = np.linalg.norm(X - centres[0], axis=1) < 6
    stand_in = np.flatnonzero(~lost)[0]
    real = search.query_index

    def missing_a_region(index, X, n_query, ef, options, progress):
        if sub_graph_fails and len(X) != 4000:
            return None
        found = real(index, X, n_query, ef, options, progress)
        if found is not None and len(X) == 4000:
            found[0][lost], found[1][lost] = found[0][stand_in], 50.0
        return found

    monkeypatch.setattr(search, "query_index", missing_a_region)
    monkeypatch.setattr(search, "EXACT_AGAIN", exact_again)
    options = SearchOptions(method="hnsw", sample_size=400, seed=0, threads=1)
    found = nearest_neighbours(X, 10, options=options)
    assert found.method == "hnsw"
    again = found.details["searched_again"]
    assert 100 < lost.sum() <= again < lost.sum() + 50  # the graph's own misses
    recall = search.recall_at_k(found.distances[lost], exact.distances[lost])
    assert recall > 0.95
    sampled = search.recall_at_k(found.distances, exact.distances)
    assert found.details["sample_recall"] == pytest.approx(sampled, abs=0.03)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 12))
def test_exact_results_are_never_provably_short(seed, k):
    """The bound is sound: the true neighbours never lie beyond it."""
    from vbsw_cli.neighbors import provably_short

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(60, 3)) * rng.uniform(0.1, 10)
    found = nearest_neighbours(X, k, options=SearchOptions(method="exact"))
    assert len(provably_short(found.indices, found.distances)) == 0


def test_a_row_led_into_the_wrong_cluster_is_searched_again(rng, monkeypatch):
    """It leads back to itself (not searched again for that), but most of its
    results lie beyond the bound its nearest results give: searched exactly."""
    import vbsw_cli.neighbors as search

    centres = rng.normal(size=(8, 16)) * 10
    X = centres[rng.integers(8, size=3000)] + rng.normal(size=(3000, 16))
    exact = nearest_neighbours(X, 10, options=SearchOptions(method="exact"))
    far = np.argsort(np.linalg.norm(X - X[7], axis=1))[-10:]  # the farthest
    real = search.query_index

    def misled(index, X, n_query, ef, options, progress):
        found = real(index, X, n_query, ef, options, progress)
        if found is not None and len(X) == 3000:
            found[0][7, 4:] = far[:n_query - 4]
            found[1][7, 4:] = np.linalg.norm(X[far[:n_query - 4]] - X[7], axis=1)
        return found

    monkeypatch.setattr(search, "query_index", misled)
    options = SearchOptions(method="hnsw", sample_size=400, seed=0, threads=1)
    found = nearest_neighbours(X, 10, options=options)
    assert found.details["proven_short"] >= 1
    np.testing.assert_allclose(found.distances[7], exact.distances[7], rtol=1e-6)
    short = search.provably_short(found.indices, found.distances)
    assert 7 not in short

def test_the_largest_variances_are_made_exact_until_they_hold(rng):
    """Clusters of one label each: every true local variance is 0. 75 rows
    led into other clusters get the largest variances; they are searched
    again exactly (the top 60, twice the 1% of the rows, at first, then the
    15 that take their place), and no row of variance 0: all weights 1."""
    from vbsw_cli.weigh import exact_largest

    centres = rng.normal(size=(6, 8)) * 30
    cluster = rng.integers(6, size=3000)
    X = centres[cluster] + rng.normal(size=(3000, 8))
    labels = [Labels("label", "classification", cluster, list(range(6)))]
    exact = nearest_neighbours(X, 10, options=EXACT)
    found = nearest_neighbours(X, 10, options=EXACT)
    misled = rng.choice(3000, size=75, replace=False)  # past the first 60
    for row in misled:
        found.indices[row, 1:] = np.flatnonzero(cluster != cluster[row])[:9]
    variance = local_variance(found.indices, labels)
    assert (variance[misled] > 0).all()

    searched = exact_largest(X, found, variance, labels, include_self=True)

    assert searched == 75
    np.testing.assert_array_equal(variance, 0.0)
    np.testing.assert_array_equal(found.indices[misled], exact.indices[misled])
    weight, _ = weights_from_variance(variance, 40, "mean")
    np.testing.assert_array_equal(weight, 1.0)


def test_later_exact_searches_share_one_prepared_search(rng, monkeypatch):
    """A recall check and every round of exact_largest use the exact search
    the first of them prepared (preparing it costs about 0.5 s at a million
    rows); another array gets its own, and weigh frees it once done."""
    import vbsw_cli.neighbors as search
    from vbsw_cli.neighbors import exact_rows, measure_recall

    X = rng.normal(size=(600, 6))
    found = nearest_neighbours(X, 5, options=EXACT)
    made = []
    real = search.ExactSearch

    def counted(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(search, "ExactSearch", counted)
    assert measure_recall(X, found, 50, include_self=True) == 1.0
    shared = found.exact
    exact_rows(X, found, np.arange(10), include_self=True)
    exact_rows(X, found, np.arange(10, 40), include_self=True)
    assert len(made) == 1 and found.exact is shared
    exact_rows(X.copy(), found, np.arange(3), include_self=True)
    assert len(made) == 2 and found.exact is not shared
    reference = nearest_neighbours(X, 5, options=EXACT)
    np.testing.assert_array_equal(found.indices, reference.indices)

    labels = [Labels("label", "regression", X[:, :1].copy())]
    result = weigh(X, labels, k=5, m=10, check_recall=20, search=EXACT)
    assert result.neighbours.exact is None


def test_without_the_point_the_sample_recall_scores_only_the_others(rng):
    """With the point left out, it is no free hit: the sample recall is that
    of the k other rows, as an independent recall check measures it."""
    from vbsw_cli.neighbors import measure_recall

    X = rng.normal(size=(4000, 24))
    options = SearchOptions(method="hnsw", recall=0.5, M=4, ef_construction=10,
                            ef=4, sample_size=1000, seed=0, threads=1)
    found = nearest_neighbours(X, 2, include_self=False, options=options)
    assert found.method == "hnsw"
    checked = measure_recall(X, found, 1000, include_self=False,
                             options=SearchOptions(seed=5))
    assert found.details["sample_recall"] == pytest.approx(checked, abs=0.03)

def test_the_nearest_of_both_answers_counts_each_row_once(rng):
    from vbsw_cli.neighbors import _nearest_of_both

    for _ in range(50):
        distance_of = rng.random(12)  # of each of 12 candidate rows
        first = rng.choice(12, size=6, replace=False)
        second = rng.choice(12, size=6, replace=False)
        both = _nearest_of_both((first[None], distance_of[first][None]),
                                (second[None], distance_of[second][None]), 4)
        unique = np.union1d(first, second)
        expected = unique[np.argsort(distance_of[unique])][:4]
        assert both[0][0].tolist() == expected.tolist()
        np.testing.assert_array_equal(both[1][0], distance_of[expected])

# ---------------------------------------------------------------------------
# Properties


def _problem(seed, n, d, kind):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    if kind == "regression":
        y = X[:, 0] ** 2 + rng.normal(size=n)
        return X, y, regression
    return X, rng.integers(3, size=n), classes


problems = st.tuples(st.integers(0, 10_000), st.integers(12, 60),
                     st.integers(1, 6), st.sampled_from(["regression", "class"]))


@settings(max_examples=30, deadline=None)
@given(problems, st.integers(2, 10), st.floats(1, 200))
def test_weights_lie_in_range_and_average_one(problem, k, m):
    X, y, make = _problem(*problem)
    result = weigh(X, [make(y)], k=min(k, len(X)), m=m, search=EXACT)
    raw = weights_from_variance(result.local_variance, m, "mean")[0]
    scale = raw.min()  # raw weights start at 1 before the mean normalisation
    before = raw / scale
    assert before.min() == pytest.approx(1.0)
    assert before.max() <= m * (1 + 1e-9)
    assert result.weight.mean() == pytest.approx(1.0)
    summed = weights_from_variance(result.local_variance, m, "sum")[0]
    assert summed.sum() == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(problems, st.randoms(use_true_random=False))
def test_permuting_rows_permutes_weights(problem, random):
    X, y, make = _problem(*problem)
    order = np.array(random.sample(range(len(X)), len(X)))
    first = weigh(X, [make(y)], k=5, m=30, search=EXACT)
    second = weigh(X[order], [make(y[order])], k=5, m=30, search=EXACT)
    np.testing.assert_allclose(second.weight, first.weight[order], rtol=1e-9)


@settings(max_examples=25, deadline=None)
@given(problems, st.floats(-1e3, 1e3), st.floats(1e-3, 1e3))
def test_translation_and_label_scale_leave_weights_unchanged(problem, shift,
                                                             scale):
    X, y, make = _problem(*problem)
    first = weigh(X, [make(y)], k=5, m=30, search=EXACT)
    moved = weigh(X + shift, [make(y)], k=5, m=30, search=EXACT)
    np.testing.assert_allclose(moved.weight, first.weight, rtol=1e-6, atol=1e-9)
    if make is regression:
        scaled = weigh(X, [make(y * scale)], k=5, m=30, search=EXACT)
        np.testing.assert_allclose(scaled.weight, first.weight, rtol=1e-6,
                                   atol=1e-9)


def test_local_variance_of_index_sets_directly(rng):
    codes = rng.integers(4, size=50)
    indices = reference_neighbours(rng.normal(size=(50, 2)), 6)
    labels = [Labels("c", "classification", codes, list(range(4)))]
    expected = reference_variance(indices, [("classification", codes)])
    np.testing.assert_allclose(local_variance(indices, labels), expected)


def test_standardize_searches_in_unit_variance_space(rng):
    X = rng.normal(size=(80, 3)) * np.array([1000.0, 1.0, 0.01])
    y = rng.normal(size=80)
    scaled = (X - X.mean(axis=0)) / X.std(axis=0)
    result = weigh(X, [regression(y)], k=6, m=5, scale_features=True,
                   search=EXACT)
    expected = reference_variance(reference_neighbours(scaled, 6),
                                  [("regression", y)])
    np.testing.assert_allclose(result.local_variance, expected, rtol=1e-9)
    raw = weigh(X, [regression(y)], k=6, m=5, search=EXACT)
    assert not np.allclose(raw.local_variance, result.local_variance)


@settings(max_examples=40, deadline=None)
@given(powers=st.lists(st.integers(-170, 200), min_size=3, max_size=3),
       seed=st.integers(0, 2**16))
def test_standardize_ignores_any_scale_of_a_column(powers, seed):
    # A column of 1e200 used to become 0 (its variance overflowed to inf).
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(40, 3))
    scaled = X * 10.0 ** np.array(powers, dtype=float)
    np.testing.assert_allclose(standardize(scaled), standardize(X), rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("scale, near", [(1e160, 1e146), (1e-200, 1e-146)])
def test_labels_whose_variance_leaves_float64_are_refused(rng, scale, near):
    X = rng.normal(size=(50, 2))
    y = rng.normal(size=50)
    with pytest.raises(DataError, match="label column 'label' spans .*: its "
                       "variance would leave float64's range"):
        weigh(X, [regression(y * scale)], k=5, search=EXACT)
    fine = weigh(X, [regression(y * near)], k=5, search=EXACT)
    plain = weigh(X, [regression(y)], k=5, search=EXACT)
    np.testing.assert_allclose(fine.weight, plain.weight, rtol=1e-9)


def test_a_weight_that_is_not_a_number_is_never_handed_on(rng, monkeypatch):
    import vbsw_cli.weigh as core

    broken = core.local_variance

    def with_nan(indices, labels):
        variance = broken(indices, labels)
        variance[[7, 9]] = np.nan
        return variance

    monkeypatch.setattr(core, "local_variance", with_nan)
    with pytest.raises(DataError, match=r"^2 rows got a local variance that is "
                       r"not finite \(first: row 7\)"):
        weigh(rng.normal(size=(30, 2)), [regression(rng.normal(size=30))], k=4,
              search=EXACT)


def test_a_huge_m_keeps_the_weights_finite(rng):
    variance = rng.uniform(0, 3, size=100)
    weight, _ = weights_from_variance(variance, 1e308)
    assert np.isfinite(weight).all()
    np.testing.assert_allclose(weight.mean(), 1.0)
    t = (variance - variance.min()) / np.ptp(variance)
    expected = (1 / 1e308 + t) / (1 / 1e308 + t).mean()  # 1 + (m - 1) t, over m
    np.testing.assert_allclose(weight, expected, rtol=1e-12)


def test_a_sparse_graph_is_retried_denser_then_kept_with_a_warning(rng,
                                                                   monkeypatch):
    import vbsw_cli.neighbors as search

    # Pretend exact search is unaffordable, so the graph path must cope alone.
    monkeypatch.setattr(search, "HARD_EXACT_SECONDS", 0.0)
    monkeypatch.setattr(search, "EXACT_PATIENCE", 0.0)
    X = rng.normal(size=(3000, 32))
    options = SearchOptions(method="hnsw", recall=0.9999, M=2, ef_construction=4,
                            seed=0, threads=1)
    found = nearest_neighbours(X, 10, options=options)
    assert found.method == "hnsw"
    assert found.details["M"] == 4 and found.details["ef_construction"] == 8
    assert "short of --recall 0.9999" in found.details["warning"]
    assert (found.indices[:, 0] == np.arange(len(X))).all()


@pytest.mark.parametrize("rate, method", [(None, "exact"), (1.0, "hnsw")])
def test_a_fixed_graph_short_of_the_recall_weighs_estimated_costs(
        rng, monkeypatch, rate, method):
    """On one thread, a graph that misses the recall gives way to the exact
    search when that is estimated under EXACT_PATIENCE times the graphs'
    estimated cost (no minute for free here); a slow exact search does not."""
    import vbsw_cli.neighbors as search

    monkeypatch.setattr(search, "_sample_recall", lambda *a, **k: (1.0, 1.0))
    monkeypatch.setattr(search, "_recall_as_used", lambda *a, **k: (0.5, 0.4))
    monkeypatch.setattr(search, "HARD_EXACT_SECONDS", 0.0)
    if rate is not None:
        monkeypatch.setattr(search, "EXACT_PAIR_SECONDS", rate)
    X = rng.normal(size=(2000, 8))
    options = SearchOptions(method="hnsw", M=6, ef_construction=20, seed=0,
                            threads=1)

    found = nearest_neighbours(X, 10, options=options)

    assert found.method == method
    assert (found.details.get("why") == search.SHORT) == (method == "exact")

@pytest.mark.parametrize("exact_affordable", [False, True])
def test_a_graph_short_of_the_recall_once_used_is_retried_denser(
        rng, monkeypatch, exact_affordable):
    import vbsw_cli.neighbors as search

    # The tuning on the rows the graph leads back to passes; the recall of
    # the neighbourhoods as used (after the query and its repair) misses.
    monkeypatch.setattr(search, "_sample_recall", lambda *a, **k: (1.0, 1.0))
    monkeypatch.setattr(search, "_recall_as_used", lambda *a, **k: (0.5, 0.4))
    if not exact_affordable:
        monkeypatch.setattr(search, "HARD_EXACT_SECONDS", 0.0)
        monkeypatch.setattr(search, "EXACT_PATIENCE", 0.0)
    X = rng.normal(size=(2000, 8))
    options = SearchOptions(method="hnsw", M=6, ef_construction=20, seed=0,
                            threads=1)

    found = nearest_neighbours(X, 10, options=options)

    if exact_affordable:  # the first graph's miss sends it to exact search
        assert found.method == "exact"
        assert "(M=6, ef_construction=20, ef=" in found.details["reason"]
        assert "reached recall 0.500 (at least 0.400)" in found.details["reason"]
    else:  # a denser graph is tried before the answer is kept with a warning
        assert found.method == "hnsw"
        assert (found.details["M"], found.details["ef_construction"]) == (12, 40)
        assert "short of --recall 0.95" in found.details["warning"]
