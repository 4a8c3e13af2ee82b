"""The blocked exact search against a plain numpy brute force."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import vbsw_cli.copies as copies_module
import vbsw_cli.exact as blocked
from vbsw_cli.exact import exact_neighbours
from vbsw_cli.errors import UsageError
from vbsw_cli.neighbors import SearchOptions, check_search_options, exact_search
from vbsw_cli.progress import NullProgress, chunks


def brute_force(X, k, rows=None):
    """Every distance in float64 by differences, fully sorted (stable)."""
    X = np.asarray(X, dtype=np.float64)
    rows = np.arange(len(X)) if rows is None else rows
    distance = np.sqrt(((X[rows, None, :] - X[None, :, :]) ** 2).sum(axis=-1))
    order = np.argsort(distance, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(distance, order, axis=1)


def assert_exact(X, k, indices, distances, rows=None):
    """Right distances (ties: any row as near as the k-th will do), right rows."""
    _, expected = brute_force(X, k, rows)
    np.testing.assert_allclose(distances, expected, rtol=1e-12, atol=1e-12)
    X = np.asarray(X, dtype=np.float64)
    queries = X if rows is None else X[rows]
    again = np.sqrt(((X[indices] - queries[:, None, :]) ** 2).sum(axis=-1))
    np.testing.assert_allclose(distances, again, rtol=1e-12, atol=1e-12)
    assert all(len(set(row)) == k for row in indices.tolist())


def peak_allocation(function, *args, **kwargs) -> int:
    """The most bytes ``function`` held allocated at once (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        function(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 rows, so that small inputs take many tiles and merges
    (whatever k: the search by whole rows has tests of its own)."""
    monkeypatch.setattr(blocked, "BLOCK", 64)
    monkeypatch.setattr(blocked, "MERGE_EVERY", 2)
    monkeypatch.setattr(blocked, "DENSE_FROM", np.inf)


@pytest.fixture
def whole_rows(monkeypatch):
    """The search by whole rows at any k, in chunks of 24 rows."""
    monkeypatch.setattr(blocked, "DENSE_FROM", 0.0)
    monkeypatch.setattr(blocked, "LEAST_BLOCK", 24)
    monkeypatch.setattr(blocked, "DENSE_BYTES", 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n, d, k", [(500, 8, 10), (333, 40, 20), (70, 3, 70),
                                     (130, 2, 1)])
def test_blocked_search_matches_brute_force(rng, small_tiles, n, d, k, dtype,
                                            threads):
    X = rng.normal(size=(n, d)).astype(dtype)
    indices, distances = exact_neighbours(X, k, threads=threads)
    assert_exact(X, k, indices, distances)
    assert indices.dtype == np.int64 and distances.dtype == np.float64
    assert (np.diff(distances, axis=1) >= 0).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_are_searched_among_all_rows(rng, small_tiles, threads):
    X = rng.normal(size=(400, 12))
    rows = np.sort(rng.choice(400, size=90, replace=False))
    indices, distances = exact_neighbours(X, 15, rows=rows, threads=threads)
    assert_exact(X, 15, indices, distances, rows)


def chunks_of_whole_rows(monkeypatch) -> list:
    """The sizes of the chunks of each search by whole rows, in order."""
    sizes, start = [], blocked._Dense.__init__

    def init(self, *args):
        start(self, *args)
        sizes.append([hi - lo for lo, hi in self.blocks])
    monkeypatch.setattr(blocked._Dense, "__init__", init)
    return sizes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n, d, k", [(300, 4, 250), (100, 3, 100), (130, 8, 1),
                                     (200, 40, 20)])
def test_whole_rows_match_brute_force(rng, whole_rows, monkeypatch, n, d, k,
                                      dtype, threads):
    X = rng.normal(size=(n, d)).astype(dtype)
    sizes = chunks_of_whole_rows(monkeypatch)
    indices, distances = exact_neighbours(X, k, threads=threads)
    assert_exact(X, k, indices, distances)
    assert (np.diff(distances, axis=1) >= 0).all()
    assert [hi - lo for lo, hi in chunks(n, 24)] in sizes  # after the probe
    rows = np.array([0, 7, 7, n - 1])
    indices, distances = exact_neighbours(X, k, rows=rows, threads=threads)
    assert_exact(X, k, indices, distances, rows)


def test_whole_rows_in_chunks_of_bounded_bytes(monkeypatch):
    monkeypatch.setattr(blocked, "DENSE_BYTES", 32 * 1000 * 100)
    assert blocked.dense_rows(1000) == 100  # 100 rows of 1000 entries
    assert blocked.dense_rows(100_000) == blocked.LEAST_BLOCK  # never fewer


def test_whole_rows_with_ties_and_crowds(rng, whole_rows, monkeypatch):
    grid = np.stack(np.meshgrid(*[np.arange(6)] * 3), axis=-1).reshape(-1, 3)
    indices, distances = exact_neighbours(grid.astype(float), 40, threads=2)
    assert_exact(grid, 40, indices, distances)
    # Masses of near-duplicates: more than 2 k candidates under a threshold.
    X = np.repeat(rng.normal(size=(6, 5)), 50, axis=0)
    X += 1e-9 * rng.normal(size=X.shape)
    calls = calls_of_unsure(monkeypatch)
    indices, distances = exact_neighbours(X, 20, threads=2)
    assert len(calls[0]) == len(X)  # crowded in float32, then float64
    assert_exact(X, 20, indices, distances)


@pytest.mark.parametrize("outlier", [1e6, 1e18])  # float32, float64 products
def test_whole_rows_with_far_outliers(rng, whole_rows, outlier):
    X = rng.normal(size=(400, 6)).astype(np.float32)
    X[[5, 300, 399]] *= outlier
    indices, distances = exact_neighbours(X, 30, threads=2)
    assert_exact(X, 30, indices, distances)


@pytest.mark.parametrize("k, dense", [(10, False), (256, False), (257, True)])
def test_whole_rows_where_k_passes_a_quarter_of_a_block(rng, monkeypatch, k,
                                                        dense):
    X = rng.normal(size=(300, 4))
    sizes = chunks_of_whole_rows(monkeypatch)
    indices, distances = exact_neighbours(X, k, threads=2)
    assert bool(sizes) == dense  # 1024 rows a block
    assert_exact(X, k, indices, distances)


@pytest.mark.parametrize("dense_from", [np.inf, 0.0])  # tiles, whole rows
def test_ties_go_the_same_way_on_any_threads(small_tiles, monkeypatch,
                                             dense_from):
    monkeypatch.setattr(blocked, "DENSE_FROM", dense_from)
    grid = np.stack(np.meshgrid(*[np.arange(7)] * 3), axis=-1).reshape(-1, 3)
    grid = grid.astype(np.float32)
    one = exact_neighbours(grid, 30, threads=1)
    for _ in range(3):  # merges come in another order on two threads
        two = exact_neighbours(grid, 30, threads=2)
        np.testing.assert_array_equal(two[0], one[0])
        np.testing.assert_array_equal(two[1], one[1])


def test_the_default_tiles_give_the_same_neighbours(rng):
    X = rng.normal(size=(2500, 64)).astype(np.float32)
    indices, distances = exact_neighbours(X, 20, threads=2)
    assert_exact(X, 20, indices, distances)


def calls_of_unsure(monkeypatch) -> list:
    """The positions each ``unsure()`` call returned, in order (the float32
    pass first: no probe before it)."""
    monkeypatch.setattr(blocked, "PROBE_FROM", 10**9)
    calls, unsure = [], blocked._Candidates.unsure
    monkeypatch.setattr(blocked._Candidates, "unsure",
                        lambda self: calls.append(unsure(self)) or calls[-1])
    return calls


def test_masses_of_exact_duplicates_are_ties_not_searched_again(rng, small_tiles,
                                                                monkeypatch):
    X = np.repeat(rng.normal(size=(12, 5)), 50, axis=0)  # 50 copies each
    calls = calls_of_unsure(monkeypatch)
    indices, distances = exact_neighbours(X, 20, threads=2)
    assert [len(c) for c in calls] == [0]  # 49 copies at 0: any 20 are right
    assert_exact(X, 20, indices, distances)
    assert (distances == 0).all()


def test_masses_of_near_duplicates_are_searched_again(rng, small_tiles,
                                                      monkeypatch):
    X = np.repeat(rng.normal(size=(12, 5)), 50, axis=0)
    X += 1e-9 * rng.normal(size=X.shape)  # copies told apart below float32
    calls = calls_of_unsure(monkeypatch)
    indices, distances = exact_neighbours(X, 20, threads=2)
    assert len(calls[0]) == len(X)
    assert_exact(X, 20, indices, distances)


def searches_made(monkeypatch) -> list:
    """(dtype of the products, rows) of each search of candidates, in order."""
    made, start = [], blocked._Candidates.__init__

    def init(self, space, rows, n_query):
        start(self, space, rows, n_query)
        made.append((space.columns.dtype, len(self.queries)))
    monkeypatch.setattr(blocked._Candidates, "__init__", init)
    return made


def test_rows_float32_cannot_prove_go_to_float64_after_a_probe(rng, small_tiles,
                                                               monkeypatch):
    X = np.repeat(rng.normal(size=(12, 5)), 50, axis=0)
    X += 1e-5 * rng.normal(size=X.shape)  # told apart below float32, not 64
    made = searches_made(monkeypatch)
    search = blocked.ExactSearch(X)
    indices, distances = search.neighbours(20, threads=2)
    assert made == [(np.float32, blocked.PROBE_ROWS),
                    (np.float64, blocked.PROBE_ROWS), (np.float64, 600)]
    assert_exact(X, 20, indices, distances)
    assert search._float32_fails and np.float32 not in search._columns
    made.clear()
    rows = np.arange(0, 600, 7)
    indices, distances = search.neighbours(5, rows=rows, threads=1)
    assert made == [(np.float64, len(rows))]  # no probe again
    assert_exact(X, 5, indices, distances, rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_no_product_can_prove_go_to_differences_after_a_probe(
        rng, small_tiles, monkeypatch, dtype):
    # Two clusters 1e7 apart, the median between them: every row lies far
    # from the centre against its neighbours' distances, in float64 too.
    X = rng.normal(size=(400, 6))
    X[200:] += 1e7
    X = X.astype(dtype)
    made = searches_made(monkeypatch)
    direct, asked = blocked.direct_neighbours, []
    monkeypatch.setattr(blocked, "direct_neighbours", lambda X, queries, *a:
                        asked.append(len(queries)) or direct(X, queries, *a))
    search = blocked.ExactSearch(X)
    steps = []
    indices, distances = search.neighbours(10, threads=2, advance=steps.append)
    assert made == [(np.float32, blocked.PROBE_ROWS),
                    (np.float64, blocked.PROBE_ROWS)]
    assert asked == [400] and sum(steps) == 400
    assert_exact(X, 10, indices, distances)
    assert not search.by_whole_rows(10)


def test_a_probe_float32_proves_keeps_float32(rng, small_tiles, monkeypatch):
    X = rng.normal(size=(300, 8)).astype(np.float32)
    made = searches_made(monkeypatch)
    search = blocked.ExactSearch(X)
    search.neighbours(10, rows=np.arange(50), threads=1)  # too few to probe
    search.neighbours(10, threads=2)
    indices, distances = search.neighbours(10, threads=2)
    assert made == [(np.float32, 50), (np.float32, blocked.PROBE_ROWS),
                    (np.float32, 300), (np.float32, 300)]
    assert search._float32_fails is False
    assert_exact(X, 10, indices, distances)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_far_from_the_centre_against_their_distances(rng, dtype):
    X = rng.normal(size=(400, 3))
    X[:200] += 1e8  # two groups: float products cannot resolve unit distances
    X = X.astype(dtype)
    indices, distances = exact_neighbours(X, 10, threads=2)
    assert_exact(X, 10, indices, distances)


@pytest.mark.parametrize("outlier", [1e10, 1e12])
def test_one_far_outlier_leaves_the_others_exact(rng, outlier):
    X = rng.normal(size=(300, 4)).astype(np.float32)
    X[7] = outlier
    indices, distances = exact_neighbours(X, 10, threads=2)
    assert_exact(X, 10, indices, distances)


@pytest.mark.parametrize("outlier, dtype", [(1e6, np.float32), (1e18, np.float64)])
def test_a_few_far_outliers_leave_the_other_rows_to_the_products(
        rng, small_tiles, monkeypatch, outlier, dtype):
    # Centred on the mean (or scaled for the outliers' sake), every row used to
    # fail its proof and went to the slow search by differences.
    X = rng.normal(size=(600, 8)).astype(np.float32)
    X[[5, 300, 599]] *= outlier
    direct, rows = blocked.direct_neighbours, []
    monkeypatch.setattr(blocked, "direct_neighbours", lambda X, queries, *a:
                        rows.extend(queries) or direct(X, queries, *a))
    calls = calls_of_unsure(monkeypatch)
    search = blocked.ExactSearch(X)
    indices, distances = search.neighbours(10, threads=2)
    assert_exact(X, 10, indices, distances)
    assert search.dtype == dtype and search.scale == 1.0
    assert len(calls[0]) <= 3 and set(rows) <= {5, 300, 599}


@pytest.mark.parametrize("pairs", [0, 10**9])
def test_rows_searched_by_differences_in_a_tree_or_from_every_row(rng, pairs,
                                                                  monkeypatch):
    monkeypatch.setattr(blocked, "BRUTE_PAIRS", pairs)
    X = np.round(rng.normal(size=(300, 5)), 1)  # ties too
    rows = np.array([0, 17, 17, 299])
    indices, distances = blocked.direct_neighbours(X, rows, 12, threads=1)
    assert_exact(X, 12, indices, distances, rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_distances_again_a_few_pairs_at_a_time(rng, monkeypatch, dtype):
    X = rng.normal(size=(40, 7)).astype(dtype)
    first, second = rng.integers(40, size=(2, 10))
    # 3 pairs of 7 features (two gathered rows and a float64 difference each)
    monkeypatch.setattr(blocked, "DIFFERENCE_BYTES", 3 * 7 * (2 * X.itemsize + 8))
    assert blocked.pairs_per_chunk(7, X.itemsize) == 3  # 4 chunks, the last of 1
    squared = blocked.squared_differences(X, first, second)
    direct = ((X[first].astype(float) - X[second]) ** 2).sum(axis=1)
    np.testing.assert_allclose(squared, direct, rtol=1e-14)
    assert len(blocked.squared_differences(X, first[:0], second[:0])) == 0


def test_distances_again_hold_a_bounded_chunk_whatever_the_features(rng):
    X = rng.normal(size=(50, 20_000)).astype(np.float32)
    first, second = rng.integers(50, size=(2, 2000))  # all at once: 320 MB
    peak = peak_allocation(blocked.squared_differences, X, first, second)
    assert peak < blocked.DIFFERENCE_BYTES + 2**20


def test_float32_operands_add_one_copy_of_the_features(rng, small_tiles,
                                                       monkeypatch):
    # Stored columns, left blocks made per tile, float64 centring (and rows
    # hashed or compared) a chunk at a time: the search held three copies and
    # more before.
    for module, name in [(blocked, "SPACE_BYTES"), (blocked, "DIFFERENCE_BYTES"),
                         (copies_module, "HASH_BYTES"), (blocked, "LEFT_BYTES")]:
        monkeypatch.setattr(module, name, 2**16)
    X = rng.normal(size=(1000, 2048)).astype(np.float32)
    search = blocked.ExactSearch(X)
    peak = peak_allocation(search.neighbours, 5, threads=1)
    assert search.dtype == np.float32
    assert peak < 1.5 * X.nbytes  # 8 times before


@pytest.mark.parametrize("dtype, rows", [(np.float32, 50), (np.float64, 25)])
def test_blocks_of_many_features_have_fewer_rows(rng, monkeypatch, dtype, rows):
    # 50 rows of 40 float32 features (42 with the norms) fill a block's bytes.
    monkeypatch.setattr(blocked, "BLOCK_BYTES", 50 * 42 * 4)
    monkeypatch.setattr(blocked, "LEAST_BLOCK", 20)
    assert blocked.block_rows(40, dtype) == rows
    assert blocked.block_rows(4000, dtype) == 20  # never fewer
    X = rng.normal(size=(260, 40))
    X[[3, 200]] *= 1 if dtype == np.float32 else 1e18  # float64 products
    sizes, start = [], blocked._Candidates.__init__

    def init(self, *args):
        start(self, *args)
        sizes.append({hi - lo for lo, hi in self.blocks + self.columns})
    monkeypatch.setattr(blocked._Candidates, "__init__", init)
    indices, distances = exact_neighbours(X, 15, threads=2)
    assert_exact(X, 15, indices, distances)
    assert sizes[-1] == {rows, 260 % rows}


@pytest.mark.parametrize("dense_from", [np.inf, 0.0])  # tiles, whole rows
def test_float64_products_of_every_row_hold_blocks_not_copies(rng, monkeypatch,
                                                             dense_from):
    # Near-duplicates fail the float32 probe: every row in float64, whose
    # operands are blocks made per tile (5 copies of the features before).
    for module, name in [(blocked, "SPACE_BYTES"), (blocked, "DIFFERENCE_BYTES"),
                         (blocked, "BLOCK_BYTES"), (blocked, "DENSE_BYTES"),
                         (copies_module, "HASH_BYTES")]:
        monkeypatch.setattr(module, name, 2**16)
    monkeypatch.setattr(blocked, "DENSE_FROM", dense_from)
    X = np.repeat(rng.normal(size=(12, 512)), 50, axis=0)
    X += 1e-9 * rng.normal(size=X.shape)
    search = blocked.ExactSearch(X)
    peak = peak_allocation(search.neighbours, 20, threads=1)
    assert search._float32_fails
    assert peak < X.nbytes  # the probe's float32 columns: half of it


def test_float64_columns_are_made_block_by_block(rng, small_tiles):
    X = rng.normal(size=(600, 8))
    X[[5, 300]] *= 1e18  # float64 products
    search = blocked.ExactSearch(X)
    indices, distances = search.neighbours(10, threads=2)
    assert_exact(X, 10, indices, distances)
    columns = search.columns(np.float64)
    assert search.dtype == np.float64 and columns.stored is None
    centred = X[10:20] - search.centre
    squared = (centred ** 2).sum(axis=1)
    made = np.column_stack([-2 * centred, np.ones(10), squared])
    np.testing.assert_allclose(columns.block(10, 20), made, rtol=1e-15)


def test_the_centre_is_the_median_of_fewer_rows_of_many_features(rng,
                                                                monkeypatch):
    monkeypatch.setattr(blocked, "CENTRE_BYTES", 2**20)  # 131 rows of 1000
    X = rng.normal(size=(2000, 1000)).astype(np.float32)
    peak = peak_allocation(blocked.robust_centre, X)
    centre, typical = blocked.robust_centre(X)
    sample = X[np.linspace(0, 1999, 131).astype(np.int64)].astype(np.float64)
    np.testing.assert_array_equal(centre, np.median(sample, axis=0))
    norms = np.sqrt(((sample - centre) ** 2).sum(axis=1))
    assert typical == pytest.approx(np.median(norms), rel=1e-12)
    assert peak < 3 * 2**20  # 4096 rows and three copies: 64 MB before


@pytest.mark.parametrize("far", [1e20, 1e140])
def test_tiny_rows_with_far_outliers_keep_their_relative_precision(rng, far):
    X = rng.normal(size=(300, 6)) * 1e-100
    X[:3] *= far  # 1e140: no scale fits both, the whole span is brought near 1
    search = blocked.ExactSearch(X)
    indices, distances = search.neighbours(10, threads=2)
    _, expected = brute_force(X, 10)
    np.testing.assert_allclose(distances, expected, rtol=1e-9, atol=0)
    again = np.sqrt(((X[indices] - X[:, None, :]) ** 2).sum(axis=-1))
    np.testing.assert_allclose(distances, again, rtol=1e-9, atol=0)
    # The typical row's norm near 1, or (1e140) the whole span near 1.
    brought = blocked.robust_centre(X)[1] if far == 1e20 else blocked.column_span(X)
    assert 1 <= brought * search.scale < 2


@pytest.mark.parametrize("scale", [1e-100, 1e-30, 1e25, 1e100])
def test_extreme_scales_are_exact_and_quiet(rng, scale, recwarn, monkeypatch):
    X = (rng.normal(size=(300, 6)) * scale).astype(np.float64)
    # Brought back to float32's range, no row needs the slow tree.
    monkeypatch.setattr(blocked, "direct_neighbours", None)
    indices, distances = exact_neighbours(X, 10, threads=2)
    assert_exact(X / scale, 10, indices, distances / scale)  # relative checks
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_ties_on_a_grid(small_tiles):
    grid = np.stack(np.meshgrid(*[np.arange(7)] * 3), axis=-1).reshape(-1, 3)
    indices, distances = exact_neighbours(grid.astype(float), 19, threads=2)
    assert_exact(grid, 19, indices, distances)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_large_common_offset_loses_no_neighbour(rng, small_tiles, dtype):
    X = (rng.normal(size=(300, 16)) + 1e4).astype(dtype)
    indices, distances = exact_neighbours(X, 12, threads=2)
    assert_exact(X, 12, indices, distances)


def test_float32_round_off_does_not_decide(rng, small_tiles):
    # Two tight clouds far apart: centring cannot shrink the norms, and float32
    # products of |x|^2 - 2 x.y + |y|^2 cannot tell the neighbours apart.
    cloud = rng.normal(size=(200, 8)) * 1e-3
    X = np.concatenate([cloud + 1e4, cloud[::-1] - 1e4 + 1e-4])
    plain = X.astype(np.float32)
    square = (plain ** 2).sum(axis=1)
    naive = square[:, None] - 2 * plain @ plain.T + square[None, :]
    naive_order = np.argsort(naive, axis=1, kind="stable")[:, :10]
    expected, _ = brute_force(X, 10)
    assert (np.sort(naive_order, 1) != np.sort(expected, 1)).any()
    indices, distances = exact_neighbours(X, 10, threads=2)
    assert_exact(X, 10, indices, distances)


def test_progress_adds_up_and_an_interrupt_stops_the_tiles(rng, small_tiles,
                                                           monkeypatch):
    X = rng.normal(size=(640, 4))
    steps = []
    exact_neighbours(X, 5, threads=2, advance=steps.append)
    assert sum(steps) == len(X) and min(steps) >= 0

    tiles = []
    original = blocked._Candidates.tile

    def slow_tile(self, *tile):
        tiles.append(tile)
        time.sleep(0.01)  # so that the pool cannot race through every tile
        original(self, *tile)

    monkeypatch.setattr(blocked._Candidates, "tile", slow_tile)
    monkeypatch.setattr(blocked, "PROBE_FROM", 10**9)  # its tiles not counted

    def interrupt(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        exact_neighbours(X, 5, threads=2, advance=interrupt)
    # 55 tiles in all (10 blocks); the pool stops after the few started.
    assert len(tiles) < 10


def test_exact_search_gives_index_dtype_and_agrees_with_the_tree(rng,
                                                                 monkeypatch):
    X = rng.normal(size=(3000, 3))
    options = SearchOptions(method="exact", threads=2)
    indices, distances = exact_search(X, 8, options, NullProgress())
    assert indices.dtype == np.int32
    monkeypatch.setattr("vbsw_cli.neighbors.TREE_ROWS", 1000)
    tree_indices, tree_distances = exact_search(X, 8, options, NullProgress())
    np.testing.assert_allclose(distances, tree_distances, rtol=1e-12)
    assert tree_indices.dtype == np.int32
    assert_exact(X, 8, tree_indices, tree_distances)


def test_a_timed_probe_picks_the_tree_or_the_products_exactly(rng, monkeypatch):
    monkeypatch.setattr("vbsw_cli.neighbors.TREE_ROWS", 1000)
    latent = rng.normal(size=(3000, 2)) @ rng.normal(size=(2, 8))
    options = SearchOptions(method="exact", threads=2)
    for X in (latent, rng.normal(size=(3000, 12))):
        indices, distances = exact_search(X, 10, options, NullProgress())
        assert_exact(X, 10, indices, distances)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_small_input_property(data):
    n = data.draw(st.integers(2, 90))
    d = data.draw(st.integers(1, 6))
    # Few distinct values: many duplicates and ties.
    values = st.sampled_from([-2.5, -1.0, 0.0, 0.5, 1.0, 3.0, 1e3])
    X = data.draw(hnp.arrays(np.float64, (n, d), elements=values))
    X = X + data.draw(st.sampled_from([0.0, 1e4]))
    k = data.draw(st.integers(1, n))
    block = data.draw(st.sampled_from([8, 16, 1024]))
    rows = data.draw(st.none() | st.lists(st.integers(0, n - 1), min_size=1,
                                          max_size=n, unique=True))
    rows = None if rows is None else np.array(rows)
    threads = data.draw(st.sampled_from([1, 2]))
    copies = data.draw(st.sampled_from([0, 4]))  # 0: identical rows grouped
    dense_from = data.draw(st.sampled_from([np.inf, 0.0]))  # tiles, whole rows
    sorted_merge = data.draw(st.sampled_from([0, 512]))  # 0: merges partition
    X = X.astype(np.float32)
    original = (blocked.BLOCK, copies_module.COPIES, blocked.DENSE_FROM,
                blocked.SORTED_MERGE)
    # No monkeypatch: hypothesis runs many examples.
    (blocked.BLOCK, copies_module.COPIES, blocked.DENSE_FROM,
     blocked.SORTED_MERGE) = block, copies, dense_from, sorted_merge
    try:
        indices, distances = exact_neighbours(X, k, rows=rows, threads=threads)
    finally:
        (blocked.BLOCK, copies_module.COPIES, blocked.DENSE_FROM,
         blocked.SORTED_MERGE) = original
    assert_exact(X, k, indices, distances, rows)


@pytest.mark.parametrize("scale", [1.0, 1e25])
def test_one_prepared_search_serves_samples_then_every_row(rng, small_tiles,
                                                           scale):
    """The column operand built for a first search is reused, whatever the
    rows and k of the next ones, and far out of float32's range too."""
    X = rng.normal(size=(300, 12)) * scale
    prepared = blocked.ExactSearch(X)
    rows = np.array([3, 150, 299])
    indices, distances = prepared.neighbours(7, rows=rows, threads=2)
    assert_exact(X, 7, indices, distances, rows)
    built = prepared.columns(prepared.dtype)
    indices, distances = prepared.neighbours(11, threads=2)
    assert_exact(X, 11, indices, distances)
    assert prepared.columns(prepared.dtype) is built


def test_a_clear_low_contrast_is_told_from_part_of_the_sample(rng, monkeypatch):
    """Gaussian noise goes to the exact search after an eighth of the sample;
    clustered rows need the whole sample (their graph is tuned on it)."""
    import vbsw_cli.neighbors as search

    searched = []
    real = search.exact_search

    def counting(X, n_query, options, progress, rows=None, prepared=None):
        searched.append(len(X) if rows is None else len(rows))
        return real(X, n_query, options, progress, rows=rows, prepared=prepared)

    monkeypatch.setattr(search, "exact_search", counting)
    monkeypatch.setattr(search, "CHEAP_EXACT_SECONDS", 0.0)
    monkeypatch.setattr(search, "QUERY_SECONDS", 0.0)  # a graph for free
    options = SearchOptions(exact_below=500, sample_size=400, threads=1)
    noise = rng.normal(size=(3000, 48))
    found = search.nearest_neighbours(noise, 10, options=options)
    assert found.method == "exact"
    assert "relative contrast" in found.details["reason"]
    assert searched == [8, 50, 3000]

    searched.clear()
    centres = rng.normal(size=(6, 48)) * 20
    clustered = centres[rng.integers(6, size=3000)] + rng.normal(size=(3000, 48))
    found = search.nearest_neighbours(clustered, 10, options=options)
    assert found.method == "hnsw"
    assert searched[:3] == [8, 50, 350]
    assert found.details["relative_contrast"] > search.HARD_CONTRAST


def test_relative_contrast_is_a_median_that_outliers_do_not_move(rng):
    """Against a direct computation; far outliers, in the sample or among the
    random partners, leave it where it was."""
    from vbsw_cli.neighbors import PARTNERS, contrast_ratios

    centres = rng.normal(size=(20, 16)) * 10
    X = centres[rng.integers(20, size=2000)] + rng.normal(size=(2000, 16))
    sample = np.arange(0, 2000, 4)
    reference = brute_force(X, 5, sample)[1]
    contrast = np.median(contrast_ratios(X, sample, reference,
                                         np.random.default_rng(1)))
    partners = np.random.default_rng(1).integers(2000, size=(len(sample),
                                                              PARTNERS))
    spread = np.linalg.norm(X[sample][:, None] - X[partners], axis=-1)
    direct = np.median(np.median(spread, axis=1) / reference[:, -1])
    assert contrast == pytest.approx(direct)

    X[rng.choice(2000, size=20, replace=False)] *= 1e4
    reference = brute_force(X, 5, sample)[1]
    with_outliers = np.median(contrast_ratios(X, sample, reference,
                                              np.random.default_rng(1)))
    assert with_outliers == pytest.approx(contrast, rel=0.1)


def test_far_outliers_do_not_make_clustered_rows_look_hard(rng, monkeypatch):
    import vbsw_cli.neighbors as search

    centres = rng.normal(size=(50, 32)) * 3
    X = centres[rng.integers(50, size=3000)] + 0.3 * rng.normal(size=(3000, 32))
    X[:30] *= 1e4  # 1%: a few of them in any sample
    monkeypatch.setattr(search, "CHEAP_EXACT_SECONDS", 0.0)
    options = SearchOptions(exact_below=500, sample_size=400, threads=1)
    found = search.nearest_neighbours(X, 10, options=options)
    assert found.details["relative_contrast"] > 2 * search.HARD_CONTRAST
    assert "relative contrast" not in found.details.get("reason", "")


def test_an_exact_search_cheaper_than_a_graph_runs_at_once(rng, monkeypatch):
    import vbsw_cli.neighbors as search

    centres = rng.normal(size=(20, 8)) * 10
    X = centres[rng.integers(20, size=3000)] + rng.normal(size=(3000, 8))
    options = SearchOptions(exact_below=500, sample_size=400, threads=1)
    monkeypatch.setattr(search, "CHEAP_EXACT_SECONDS", 1e9)
    found = search.nearest_neighbours(X, 10, options=options)
    assert found.method == "exact"
    assert "less than a graph would take" in found.details["reason"]
    monkeypatch.setattr(search, "CHEAP_EXACT_SECONDS", 0.0)
    monkeypatch.setattr(search, "QUERY_SECONDS", 0.0)  # a graph for free
    assert search.nearest_neighbours(X, 10, options=options).method == "hnsw"



def test_a_fixed_graph_slower_than_the_exact_search_gives_way_to_it(
        rng, monkeypatch):
    """Where the graph is the same on every run, its query's time is
    estimated from the sizes, and a graph estimated slower than the exact
    search gives way to it whatever the clock says (such a graph was kept:
    60,000 x 32 Gaussian rows, 8.9 s against 2.7 s); estimated free, it is
    kept."""
    import vbsw_cli.neighbors as search

    monkeypatch.setattr(search, "CHEAP_EXACT_SECONDS", 0.0)
    monkeypatch.setattr(search, "HARD_CONTRAST", 0.0)  # contrast decides nothing
    centres = rng.normal(size=(20, 8)) * 10
    X = centres[rng.integers(20, size=3000)] + rng.normal(size=(3000, 8))
    options = SearchOptions(exact_below=500, sample_size=400, threads=1)
    for factor in (1e-3, 1e3):
        clocked(monkeypatch, factor)
        found = search.nearest_neighbours(X, 10, options=options)
        assert found.method == "exact"
        assert found.details["why"] == search.SLOWER
    monkeypatch.setattr(search, "QUERY_SECONDS", 0.0)
    assert search.nearest_neighbours(X, 10, options=options).method == "hnsw"


def clocked(monkeypatch, factor: float):
    """neighbors' clock running ``factor`` times as fast as the real one."""
    import vbsw_cli.neighbors as search

    real = time.perf_counter
    monkeypatch.setattr(search, "time", type("Clock", (), {
        "perf_counter": staticmethod(lambda: real() * factor)}))


@pytest.mark.parametrize("rate", [None, 1.0])
@pytest.mark.parametrize("threads, reproducible", [(1, False), (2, True)])
def test_a_fixed_graph_is_chosen_without_a_clock(rng, monkeypatch, threads,
                                                 reproducible, rate):
    """Where the graph is the same on every run, so is the choice between
    it and exact search: a clock 1000 times faster or slower changes
    nothing. ``rate``: EXACT_PAIR_SECONDS so high that the graph is chosen."""
    import vbsw_cli.neighbors as search

    if rate is not None:
        monkeypatch.setattr(search, "EXACT_PAIR_SECONDS", rate)
    centres = rng.normal(size=(20, 8)) * 10
    X = centres[rng.integers(20, size=3000)] + rng.normal(size=(3000, 8))
    options = SearchOptions(exact_below=500, sample_size=400, threads=threads,
                            reproducible=reproducible)
    found = []
    for factor in (1e-3, 1e3):
        clocked(monkeypatch, factor)
        found.append(search.nearest_neighbours(X, 10, options=options))

    first, second = found
    assert first.method == second.method == ("exact" if rate is None else "hnsw")
    assert first.details.get("why") == second.details.get("why")
    assert ("ef" in first.details) == ("ef" in second.details)
    np.testing.assert_array_equal(first.indices, second.indices)


def test_a_graph_built_on_threads_is_chosen_by_the_clock(rng, monkeypatch):
    """The other side: one graph built on two threads (--no-reproducible),
    and measured times decide (the clock above would change the choice)."""
    import vbsw_cli.neighbors as search

    centres = rng.normal(size=(20, 8)) * 10
    X = centres[rng.integers(20, size=3000)] + rng.normal(size=(3000, 8))
    options = SearchOptions(exact_below=500, sample_size=400, threads=2,
                            reproducible=False)
    tried = []
    for factor in (1e-3, 1e3):
        clocked(monkeypatch, factor)
        tried.append("ef" in search.nearest_neighbours(X, 10,
                                                       options=options).details)
    assert tried == [False, True]

@pytest.mark.parametrize("k, tiles", [(10, True), (300, False)])
def test_a_whole_search_by_whole_rows_is_predicted_without_the_self_join(
        rng, k, tiles):
    """By tiles a self-join's row costs SELF_JOIN_SPEED_UP times less than a
    sampled one; by whole rows (k over a quarter of a block) as much."""
    from vbsw_cli.neighbors import SELF_JOIN_SPEED_UP, _predicted_exact

    X = rng.normal(size=(2000, 8))
    prepared = blocked.ExactSearch(X)
    assert prepared.by_whole_rows(k) == (not tiles)
    predicted = _predicted_exact(X, 1e-3, SearchOptions(), prepared, k)
    assert predicted == pytest.approx(2.0 / (SELF_JOIN_SPEED_UP if tiles else 1))


@pytest.mark.parametrize("options, words", [
    (SearchOptions(method="fast"), "--search fast"),
    (SearchOptions(recall=1.5), "--recall 1.5"),
    (SearchOptions(M=1), "--hnsw-m 1"),
    (SearchOptions(ef_construction=0), "--ef-construction 0"),
    (SearchOptions(ef=0), "--ef 0")])
def test_search_options_are_refused_by_the_public_check(options, words):
    check_search_options(SearchOptions())
    with pytest.raises(UsageError, match=words):
        check_search_options(options)


def test_durations_are_printed_apart():
    from vbsw_cli.neighbors import seconds_apart

    assert seconds_apart(0.84, 0.79) == ("0.84", "0.79")
    assert seconds_apart(12.34, 4.5) == ("12.3", "4.5")
    assert seconds_apart(0.8004, 0.8001) == ("0.800", "0.800")


def test_no_shortcut_to_exact_where_the_whole_search_probes_a_tree():
    """In 6 to 15 dimensions the whole exact search first times a tree, which
    the prediction leaves out."""
    from vbsw_cli.neighbors import _exact_at_once

    ratios = np.full(100, 5.0)  # a high contrast: a graph would do
    for d, cheap in [(12, False), (64, True), (4, True)]:
        X = np.zeros((40_000, d), np.float32)
        reason = _exact_at_once(SearchOptions(), X, ratios, 0.5, part=False)
        assert (reason is not None) == cheap, d


def pairs_by_differences(monkeypatch) -> list:
    """The pairs each call of ``squared_differences`` took, in order."""
    counts, differences = [], blocked.squared_differences
    monkeypatch.setattr(blocked, "squared_differences", lambda X, first, second:
                        counts.append(len(first)) or differences(X, first, second))
    return counts


def by_differences_alone(monkeypatch, X, k, **options):
    """The search with every candidate's distance from differences."""
    with monkeypatch.context() as patch:
        patch.setattr(blocked, "PRODUCT_WASTE", 0)
        return exact_neighbours(X, k, **options)


def assert_as_by_differences(monkeypatch, X, k, **options):
    """The same rows, order and ties as differences alone give, distances
    as near as float64 allows (equal where they tie)."""
    indices, distances = exact_neighbours(X, k, **options)
    expected, expected_distances = by_differences_alone(monkeypatch, X, k,
                                                        **options)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-13)
    assert (np.diff(distances, axis=1) >= 0).all()
    return indices, distances


@pytest.mark.parametrize("k, products", [(250, True), (5, False)])
def test_candidates_shared_by_a_block_take_distances_from_products(
        rng, monkeypatch, k, products):
    X = rng.normal(size=(300, 256)).astype(np.float32)
    X[8] = X[7]
    counts = pairs_by_differences(monkeypatch)
    indices, distances = exact_neighbours(X, k, threads=2)
    assert_exact(X, k, indices, distances)
    # Copies and the rows themselves at exactly 0 (products leave rounding).
    assert (distances[:, 0] == 0).all() and (distances[[7, 8], 1] == 0).all()
    pairs = 300 * k  # at least: every row's k nearest are candidates
    if products:  # k large: a block's rows share most of their candidates
        assert sum(counts) < 0.05 * pairs  # every pair before
    else:  # few shared: products would mostly be of no pair
        assert sum(counts) >= pairs


@pytest.fixture
def products(monkeypatch):
    """Products for the candidates' distances at any number of features."""
    monkeypatch.setattr(blocked, "PRODUCT_FEATURES", 1)


@pytest.mark.parametrize("dense_from", [np.inf, 0.0])  # tiles, whole rows
@pytest.mark.parametrize("spread", [8, 1e6])  # 1e6: few loose products
def test_products_give_the_ties_of_differences(small_tiles, products,
                                               monkeypatch, dense_from, spread):
    monkeypatch.setattr(blocked, "DENSE_FROM", dense_from)
    monkeypatch.setattr(blocked, "PRODUCT_SPREAD", spread)
    grid = np.stack(np.meshgrid(*[np.arange(6)] * 3), axis=-1).reshape(-1, 3)
    counts = pairs_by_differences(monkeypatch)
    for k in [20, 150]:
        indices, distances = assert_as_by_differences(monkeypatch, grid, k,
                                                      threads=2)
        assert_exact(grid, k, indices, distances)
    assert counts  # exact ties: runs of near-ties, by differences


@pytest.mark.parametrize("spread", [8, 1e6])
def test_near_ties_under_the_products_error_go_to_differences(
        rng, small_tiles, products, monkeypatch, spread):
    # A grid told apart by 1e-13: differences order the ties, products of
    # rows this far apart (error about 1e-12) cannot.
    monkeypatch.setattr(blocked, "PRODUCT_SPREAD", spread)
    grid = np.stack(np.meshgrid(*[np.arange(6)] * 3), axis=-1).reshape(-1, 3)
    X = grid + 1e-13 * rng.normal(size=grid.shape)
    square = ((X[:, None] - X[None]) ** 2).sum(axis=-1)
    assert len(np.unique(square[0])) > 0.9 * len(X)  # no exact ties left
    for k in [19, 100]:
        indices, distances = assert_as_by_differences(monkeypatch, X, k,
                                                      threads=2)
        assert_exact(X, k, indices, distances)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_products_of_rows_far_from_the_centre_go_to_differences(
        rng, small_tiles, products, monkeypatch, dtype):
    X = rng.normal(size=(400, 130))
    X[:200] += 1e5  # two groups: products cannot resolve unit distances
    X = X.astype(dtype)
    counts = pairs_by_differences(monkeypatch)
    indices, distances = assert_as_by_differences(monkeypatch, X, 150, threads=2)
    assert_exact(X, 150, indices, distances)
    assert sum(counts) >= 400 * 150


def test_products_in_float64(rng, small_tiles, products, monkeypatch):
    X = rng.normal(size=(300, 40))
    X[[3, 200]] *= 1e18  # beyond float32's range: float64 products
    made = searches_made(monkeypatch)
    counts = pairs_by_differences(monkeypatch)
    indices, distances = exact_neighbours(X, 100, threads=2)
    assert made == [(np.float64, blocked.PROBE_ROWS), (np.float64, 300)]
    assert sum(counts) < 0.05 * 300 * 100
    assert_as_by_differences(monkeypatch, X, 100, threads=2)
    assert_exact(X, 100, indices, distances)


@pytest.mark.parametrize("threads", [1, 2])
def test_products_for_some_rows_in_small_tables(rng, whole_rows, products,
                                                monkeypatch, threads):
    # Tables of a few query rows against a few candidates' rows at a time.
    monkeypatch.setattr(blocked, "SPACE_BYTES", 8 * 5 * 9)
    X = rng.normal(size=(200, 9)) + np.arange(200)[:, None] % 3
    rows = np.array([0, 7, 7, 150, 199])
    indices, distances = assert_as_by_differences(monkeypatch, X, 120, rows=rows,
                                                  threads=threads)
    assert_exact(X, 120, indices, distances, rows)
    indices, distances = assert_as_by_differences(monkeypatch, X, 120,
                                                  threads=threads)
    assert_exact(X, 120, indices, distances)


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_a_products_error_bound_holds_against_exact_rationals(rng, offset):
    from fractions import Fraction

    X = (rng.normal(size=(40, 150)) + offset).astype(np.float32)
    X[5] = X[6] + 1e-3  # a near-duplicate: loose, by differences
    columns = blocked._Columns.of(X, np.float32, blocked.robust_centre(X)[0])
    queries = np.array([3, 5, 17])
    row = np.repeat(np.arange(3), 40)
    union, place = np.arange(40), np.tile(np.arange(40), 3)
    squared, error = blocked.product_squares(columns, queries, row, place,
                                             (union, place))
    differences = blocked.squared_differences(X, queries[row], place)
    exact = [sum((Fraction(float(a)) - Fraction(float(b))) ** 2
                 for a, b in zip(X[queries[r]], X[p])) for r, p in zip(row, place)]
    loose = error == 0
    assert loose[40 + 6] and not loose[40 + 7]
    np.testing.assert_array_equal(squared[loose], differences[loose])
    for value, bound, truth, by_differences in zip(squared, error, exact,
                                                   differences):
        assert abs(Fraction(value) - truth) <= Fraction(bound)
        assert abs(value - by_differences) <= bound


def test_only_near_ties_among_the_first_k_are_unsettled():
    squared = np.array([[1.0, 5.0, 3.0, 3.05, 9.0, 9.05, np.inf],
                        [2.0, 2.0, 4.0, 4.0, 7.0, 7.0, 7.0]])
    error = np.array([[0.01, 0.01, 0.1, 0.1, 0.1, 0.1, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    under = np.isfinite(squared)
    under[1, 6] = False  # no candidate: never computed
    again = blocked.unsettled(squared, error, under, 3)
    # Row 0: 3 and 3.05 overlap (in the first k); 9 and 9.05 lie past it.
    # Row 1: exact ties of products (2, 2) and (4, 4) begin among the first 3.
    np.testing.assert_array_equal(again, [[0, 0, 1, 1, 0, 0, 0],
                                          [1, 1, 1, 1, 0, 0, 0]])
