"""Identical rows grouped, and the exact search that uses the groups."""

from __future__ import annotations

import numpy as np
import pytest

import vbsw_cli.neighbors as neighbors
from conftest import run_vbsw, write_features
from tests.test_neighbors import assert_exact, brute_force
from vbsw_cli.copies import identical_rows, row_hashes
from vbsw_cli.exact import ExactSearch, exact_neighbours
from vbsw_cli.neighbors import SearchOptions, nearest_neighbours, recall_at_k


def with_copies(rng, dtype=np.float32):
    """300 copies of one row, 40 rows in threes, 200 rows alone, shuffled."""
    distinct = rng.normal(size=(241, 6))
    X = np.concatenate([np.repeat(distinct[:1], 300, axis=0),
                        np.repeat(distinct[1:41], 3, axis=0), distinct[41:]])
    return X[rng.permutation(len(X))].astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8])
def test_groups_are_the_identical_rows(rng, dtype):
    X = with_copies(rng)
    X = (X * 10).astype(dtype) if dtype == np.int8 else X.astype(dtype)
    copies = identical_rows(X)
    unique, first = np.unique(X, axis=0, return_index=True)
    assert np.array_equal(copies.first, np.sort(first))
    assert np.array_equal(X[copies.first[copies.group]], X)
    assert sorted(copies.sizes.tolist()) == sorted(
        np.unique(X, axis=0, return_counts=True)[1].tolist())
    for g in range(len(copies.first)):
        rows = copies.members[copies.start[g]:copies.start[g + 1]]
        assert np.array_equal(rows, np.flatnonzero(copies.group == g))


def test_a_hash_collision_leaves_every_row_alone(rng, monkeypatch):
    X = rng.normal(size=(50, 3))
    monkeypatch.setattr("vbsw_cli.copies.row_hashes",
                        lambda X: np.zeros(len(X), np.uint64))
    copies = identical_rows(X)
    assert np.array_equal(copies.first, np.arange(50))
    assert copies.sizes.max() == 1


def test_hashes_tell_rows_apart_bit_for_bit(rng):
    X = rng.normal(size=(1000, 5))
    X[10] = X[20]
    X[30] = -0.0
    X[31] = 0.0
    hashes = row_hashes(X)
    assert hashes[10] == hashes[20]
    assert hashes[30] != hashes[31]  # -0.0 is not 0.0 bit for bit
    assert len(np.unique(hashes)) == 999


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("exclude", [False, True])
def test_a_mass_of_copies_is_searched_once_and_exactly(rng, threads, exclude):
    X = with_copies(rng)
    k = 21 if exclude else 20
    search = ExactSearch(X)
    indices, distances = search.neighbours(k, threads=threads)
    assert search._distinct is not None  # the groups were used
    assert_exact(X, k, indices, distances)
    rows = np.array([0, 5, 5, 400, len(X) - 1])
    indices, distances = search.neighbours(k, rows=rows, threads=threads)
    assert_exact(X, k, indices, distances, rows)


def test_copies_come_in_row_order_within_a_group(rng):
    X = np.repeat(rng.normal(size=(3, 4)), 200, axis=0)
    indices, distances = exact_neighbours(X, 20, threads=1)
    assert (distances == 0).all()
    assert (np.diff(indices, axis=1) > 0).all()
    assert set(indices[0]) == set(range(20))


def test_progress_counts_the_rows_asked_for(rng):
    X = with_copies(rng)
    steps = []
    exact_neighbours(X, 10, threads=2, advance=steps.append)
    assert sum(steps) == len(X) and min(steps) >= 0


def test_small_groups_keep_the_plain_search(rng, monkeypatch):
    X = np.repeat(rng.normal(size=(100, 4)), 3, axis=0)
    search = ExactSearch(X)
    indices, distances = search.neighbours(20, threads=2)
    assert search._distinct is None
    assert_exact(X, 20, indices, distances)
    monkeypatch.setattr("vbsw_cli.copies.COPIES", 0)
    again = ExactSearch(X)
    grouped = again.neighbours(20, threads=2)
    assert again._distinct is not None
    np.testing.assert_allclose(grouped[1], distances, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["exact", "hnsw"])
@pytest.mark.parametrize("include_self", [True, False])
def test_each_distinct_row_is_searched_once_by_any_method(rng, monkeypatch,
                                                          method, include_self):
    X = np.concatenate([np.repeat(rng.normal(size=(1, 5)), 900, axis=0),
                        rng.normal(size=(600, 5))])[rng.permutation(1500)]
    built = []
    build = neighbors.build_index
    monkeypatch.setattr(neighbors, "build_index", lambda X, *a:
                        built.append(len(X)) or build(X, *a))
    options = SearchOptions(method=method, threads=2, seed=1)
    found = nearest_neighbours(X, 10, include_self=include_self, options=options)
    assert found.details["distinct_rows"] == 601
    assert found.indices.dtype == np.int32
    assert built == ([] if method == "exact" else [601] * len(built)) and \
        (method == "exact" or built)
    own = (found.indices == np.arange(len(X))[:, None]).sum(axis=1)
    assert (own == int(include_self)).all()
    assert all(len(set(row)) == 10 for row in found.indices.tolist())
    n_query = 10 if include_self else 11
    _, expected = brute_force(X, n_query)
    expected = expected if include_self else expected[:, 1:]
    if method == "exact":
        np.testing.assert_allclose(found.distances, expected, atol=1e-12)
    else:
        assert recall_at_k(found.distances, expected) >= 0.95


def test_weigh_says_the_distinct_rows_were_searched_once(tmp_path, rng):
    X = np.repeat(rng.normal(size=(4, 3)), 100, axis=0)
    path = write_features(tmp_path / "f.parquet", X, rng.integers(3, size=400))
    run = run_vbsw("weigh", path, "--k", "5", "-o", "-")
    assert run.code == 0, run.stderr
    assert "400 rows have a duplicate feature vector among their neighbours " \
        "(each point is counted once; the distinct feature vectors (4) were " \
        "searched once each)" in run.stderr
    # 100 copies of each vector, 5 to a neighbourhood: which 5 is arbitrary.
    assert "400 rows have more identical copies than a neighbourhood holds: " \
        "which copies are its neighbours goes by row number" in run.stderr


@pytest.mark.parametrize("method", ["exact", "hnsw", "auto"])
def test_rows_are_hashed_once_per_search(rng, monkeypatch, method):
    import vbsw_cli.copies as copies

    calls = []
    hashes = copies.row_hashes
    monkeypatch.setattr(copies, "row_hashes",
                        lambda X: calls.append(len(X)) or hashes(X))
    X = rng.normal(size=(12_000, 6)).astype(np.float32)
    nearest_neighbours(X, 10, options=SearchOptions(method=method, threads=2))
    assert calls == [12_000]
