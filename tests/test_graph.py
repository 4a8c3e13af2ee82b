"""hnswlib graphs in shards: reproducible builds, answers merged right."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vbsw_cli import graph
from vbsw_cli.graph import Shards, build_graph, shard_count
from vbsw_cli.progress import NullProgress


def brute_force(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers and squared distances of each row's k nearest, float64."""
    X = X.astype(np.float64)
    squared = ((X[:, None, :] - X[None, :, :]) ** 2).sum(axis=-1)
    order = np.argsort(squared, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(squared, order, axis=1)


def built(X, threads, reproducible=True, M=8, ef_construction=64, seed=0,
          progress=None):
    return build_graph(X, M=M, ef_construction=ef_construction, seed=seed,
                       threads=threads, reproducible=reproducible,
                       progress=progress or NullProgress())


@pytest.mark.parametrize(("threads", "shards"),
                         [(1, 1), (2, 2), (3, 2), (4, 3), (8, 4), (16, 6)])
def test_shard_count_follows_the_threads(threads, shards):
    assert shard_count(threads) == shards


def test_shards_with_a_wide_search_find_the_exact_neighbours(rng):
    X = rng.normal(size=(600, 5)).astype(np.float32)
    index = built(X, threads=4)
    assert isinstance(index, Shards) and len(index.indexes) == 3
    index.set_ef(600)  # wider than any shard: every row is compared

    labels, squared = index.knn_query(X, k=12, num_threads=2)

    expected, distances = brute_force(X, 12)
    np.testing.assert_array_equal(np.sort(labels, axis=1), np.sort(expected, axis=1))
    np.testing.assert_allclose(squared, distances, rtol=1e-4, atol=1e-5)
    assert (np.diff(squared, axis=1) >= 0).all()


def test_shards_smaller_than_k_give_all_their_rows(rng):
    X = rng.normal(size=(30, 3)).astype(np.float32)
    index = built(X, threads=2)
    assert index.sizes == [15, 15]
    index.set_ef(50)

    labels, squared = index.knn_query(X, k=20)

    expected, distances = brute_force(X, 20)
    np.testing.assert_array_equal(np.sort(labels, axis=1), np.sort(expected, axis=1))
    np.testing.assert_allclose(squared, distances, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError):
        index.knn_query(X, k=31)


def clustered(rng, n=20_000, d=16) -> np.ndarray:
    centres = rng.normal(size=(40, d)) * 3
    return (centres[rng.integers(40, size=n)]
            + rng.normal(size=(n, d))).astype(np.float32)


def test_reproducible_graphs_answer_the_same_every_time(rng):
    # The sparse graph of a shared multi-threaded build differs between runs
    # on such sets; shards built on one thread each must not.
    X = clustered(rng)
    answers = []
    for _ in range(3):
        index = built(X, threads=2, M=4, ef_construction=8)
        index.set_ef(10)
        answers.append(index.knn_query(X, k=10, num_threads=2))
    for labels, squared in answers[1:]:
        np.testing.assert_array_equal(labels, answers[0][0])
        np.testing.assert_array_equal(squared, answers[0][1])


def test_one_thread_is_one_graph_either_way(rng):
    X = clustered(rng, n=3000)
    shards = built(X, threads=1, reproducible=True)
    shared = built(X, threads=1, reproducible=False)
    assert not isinstance(shards, Shards)
    for index in (shards, shared):
        index.set_ef(20)
    np.testing.assert_array_equal(shards.knn_query(X, k=5)[0],
                                  shared.knn_query(X, k=5)[0])


def test_progress_counts_every_row_once(rng):
    X = rng.normal(size=(2500, 4)).astype(np.float32)
    advanced = []

    class Recorder:
        def task(self, description, total):
            assert total == len(X)
            return self

        def advance(self, amount=1):
            advanced.append(amount)

        def close(self):
            advanced.append("closed")

    built(X, threads=2, progress=Recorder())
    assert advanced[-1] == "closed"
    assert sum(advanced[:-1]) == len(X)


def test_a_failing_shard_stops_the_build_with_its_error(rng, monkeypatch):
    X = rng.normal(size=(50_000, 2)).astype(np.float32)
    monkeypatch.setattr(graph, "ADD_CHUNK", 1000)
    empty, failed, added = graph._empty_index, threading.Event(), []

    class Failing:
        def __init__(self, index):
            self.index = index

        def add_items(self, block, labels, num_threads):
            if labels[0] % 2:  # the second shard's rows are the odd ones
                failed.set()
                raise MemoryError("no room for the graph")
            if failed.wait(timeout=30):
                time.sleep(0.05)  # slow from now on: time to be told to stop
            self.index.add_items(block, labels, num_threads=num_threads)
            added.append(len(block))

    monkeypatch.setattr(graph, "_empty_index", lambda *a: Failing(empty(*a)))
    with pytest.raises(MemoryError, match="no room"):
        built(X, threads=2)
    assert failed.is_set()
    assert sum(added) < 10_000  # the other shard stopped: 25,000 rows were due
