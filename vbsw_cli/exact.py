"""Exact k nearest neighbours by blocked matrix products.

Squared distances come in tiles of BLOCK x BLOCK rows, each from one float32
matrix product: ``[x, |x|^2, 1] . [-2 y, 1, |y|^2] = |x - y|^2`` on centred
features, BLAS's fastest kernel. In a self-join each tile serves both of its
blocks of rows (the distance matrix is symmetric), so half of the products
are computed.

Picking the k smallest of each row is what makes a plain blocked brute force
slow. Here each row keeps a threshold, an upper bound of its k-th squared
distance: the k-th smallest value seen so far plus twice a bound of the
rounding error of the entries of rows that near. A tile yields only the few
entries under the threshold; every few tiles they are merged into the row's
best candidates, which tightens the threshold. Where k is large against a
block, most entries pass and each merge would handle them all again: there a
chunk of rows gets its entries against every row at once, and one partition of
each row gives its candidates and threshold. Last, the candidates' distances
are computed again in float64 and the k nearest kept: from the features as
given, a few pairs at a time, by differences; or, where a block's rows share
most of their candidates (k large against the rows), from one float64 product
of the block's rows and their candidates' rows, whose error bound proves the
order of all but near-ties, which go to differences.

Each row then proves its result: its last threshold lies above its k-th
distance by more than the rounding error of any row that near, and no
candidate dropped for want of room (more than ``2 k`` under the threshold)
can be nearer than the k-th. Rows that fail - masses of near-duplicates, or
rows far from the centre compared with their neighbours' distances - are
searched again with float64 products, and those still unproven by a tree of
float64 differences. Where float32 fails most rows of a probe (thousands of
features make its rounding coarse), float64 products serve every row at once.

Memory: besides X and the results, the candidates (2 k keys a row), the
float32 column operand (a copy of the features), the operand of the query rows
where only some are searched, and blocks, chunks and tiles of bounded bytes:
float64 operands of every row are made a block at a time, never stored whole.
Only the tree, for many unproven rows, takes a float64 copy of X.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from vbsw_cli.copies import Copies, identical_rows
from vbsw_cli.progress import chunks

# 1024 x 1024 float32 tiles (4 MiB) stay in the L3 cache, and the Python work
# per tile is small against the product. At most 2**15 (rows are int16).
# Timed on 50,000 x 64 floats, 2 cores: 768 to 1536 are as fast, 2048 slower.
BLOCK = 1024
# Bytes of one block's operand: BLOCK rows of up to 2046 float32 features,
# fewer rows of more (each thread holds two blocks at a time, and 1024 rows of
# 10,000 float64 features took 80 MB), but never under LEAST_BLOCK rows (tiles
# of fewer would be mostly Python work).
BLOCK_BYTES = 16 * 2**20
LEAST_BLOCK = 64
# Tiles between two merges of a block's candidates, and the pending entries
# (per row of the block, on average) that force a merge earlier, so that a
# block's pending candidates stay few.
MERGE_EVERY = 4
PENDING_PER_ROW = 64

# Bytes of float64 rows centred (or differences taken) at a time when the
# tiles' operands are made or rows are searched by differences: 16,384 rows of
# 64 features, fewer of more (a count of rows grew with the features). Casts
# take as much again.
SPACE_BYTES = 8 * 2**20

# Merges sort candidate tables up to this many columns, and partition wider
# ones (timed on 50,000 x 64, k = 20: sorting 0.07 s, partitioning 0.3 s).
SORTED_MERGE = 512

# A self-join's left operand is made once up to this size, else a block at
# a time for each tile (about 5% of the search at 50,000 x 64).
LEFT_BYTES = 64 << 20

# Rows whose median is the centre (a sample, evenly spread), fewer where they
# pass CENTRE_BYTES in float64: 4096 rows of up to 512 features (the sample
# and its copies took 1.3 GB at 10,000 features).
CENTRE_ROWS = 4096
CENTRE_BYTES = 16 * 2**20

# The largest span a scale may leave: its squared distances stay far inside
# float64's range.
FAR_SPAN = 2.0 ** 400

# Rows the products cannot prove are searched by differences from every row
# while (rows x n_samples) stays under this, else in a tree (whose import and
# build cost more than a few rows' differences).
BRUTE_PAIRS = 20_000_000

# Bytes of gathered rows and their float64 differences held at a time when
# distances are computed again from the features as given, so that this step's
# memory does not grow with the rows, k or the features (it once held every
# candidate of a block at once: 8 GB for 1000 x 10,000 floats). Timed on 40,000
# pairs of 10,000 floats: 1 to 8 MiB as fast (in cache), 64 MiB twice as slow.
DIFFERENCE_BYTES = 4 * 2**20

# The candidates' distances come from float64 products of a block's rows and
# every row that is a candidate of one of them where those products have at
# most PRODUCT_WASTE entries per candidate, and the rows PRODUCT_FEATURES
# features or more. A pair's difference costs as much as 25 entries of a
# product (1000 x 5000 floats, k = 999, 1 thread: 0.2 s against 5 s), but with
# k small against a block the rows share few candidates (50,000 x 64, k = 20:
# 580 entries per candidate), and with few features the sorts that find the
# near-ties cost more than the differences (1000 rows, k = 999: products 50%
# slower at 4 to 16 features, as fast at 64, 35% faster at 128).
PRODUCT_WASTE = 8
PRODUCT_FEATURES = 128
# A product's distance stands only where its error bound, unit (|x| + |y|)^2
# on centred rows, is at most PRODUCT_SPREAD times unit |x - y|^2, a few times
# what the differences are sure of ((|x| + |y|)^2 is about 2 |x - y|^2 for rows
# of many standard normal features, 3 for their nearest at 64 features); rows
# themselves, copies, near-duplicates and rows near each other far from the
# centre go to differences.
PRODUCT_SPREAD = 8

# A search of at least PROBE_FROM rows in float32 first searches PROBE_ROWS of
# them, spread evenly: where most of those fail their proof (many features,
# whose rounding hides the order of the neighbours, or masses of near-
# duplicates), float32 would only have to be followed by float64 for most
# rows, and every later search of the rows goes to float64 at once.
PROBE_ROWS = 32
PROBE_FROM = 100

# Where k passes DENSE_FROM of a block's rows, whole rows of entries replace
# the tiles and merges (see _Dense). Timed on 11,000 rows of 4 and 64 floats,
# 1 thread: merges won up to k = 128 (0.62 s against 0.97 s at 4 floats), tied
# at 256, lost from 512 (2.8 s against 1.4 s); so too on 5000 x 512.
DENSE_FROM = 0.25
# Rows of a chunk of whole rows: DENSE_BYTES at 32 bytes an entry (the entry,
# its key and their temporaries), but at least LEAST_BLOCK rows: 2 kB per row
# of X, less than the candidates' keys (16 k bytes a row) where blocks are
# full, or than X where they are short (8 kB a row or more). 8 to 64 MiB were
# as fast on 11,000 x 4, k = 2000.
DENSE_BYTES = 32 * 2**20

# Columns whose minimum stands for them when a first tile sets a threshold.
GROUPS = 8

# A candidate is one uint64: its squared distance's float32 bits (order
# preserving for values >= 0) above its column, so one sort orders both.
SHIFT = np.uint64(32)
COLUMN = np.uint64(0xFFFFFFFF)
EMPTY = np.iinfo(np.uint64).max


def exact_neighbours(X: np.ndarray, n_query: int, *, rows: np.ndarray | None = None,
                     threads: int = 1, advance=None) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_query`` nearest rows of X to each row of ``X[rows]``, exactly.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), float32 or float64.
    n_query : neighbours per row, at most n_samples.
    rows : ndarray of shape (n_rows,) of row numbers; default every row, in
        which case the symmetric self-join is used.
    threads : threads for the tiles (BLAS runs one thread in each).
    advance : called with a number of rows as the work progresses (the calls
        sum to n_rows).

    Returns
    -------
    indices : ndarray of shape (n_rows, n_query), int64.
    distances : ndarray of shape (n_rows, n_query), float64, Euclidean,
        ascending in each row.
    """
    return ExactSearch(X).neighbours(n_query, rows=rows, threads=threads,
                                     advance=advance)


class ExactSearch:
    """Exact searches among the rows of X, which are prepared once.

    Several searches of the same rows (a sample, then every row) share the
    column operand of the tile products, the costliest part to prepare.
    """

    def __init__(self, X: np.ndarray, copies: Copies | None = None):
        """``copies``: the groups of identical rows of X, where known."""
        self.given = X
        self._copies = copies
        self._distinct: ExactSearch | None = None
        # Distances do not change under a shift, and small norms keep the
        # products' rounding small: centre on the median of a sample of rows,
        # which a few far outliers do not drag away from the others.
        self.centre, typical = robust_centre(X)
        span = column_span(X)
        # Nor do neighbours change when every feature is multiplied by a
        # power of two, and the product is exact: where most rows lie far
        # out of float32's range, bring them back to it.
        self.scale = _chosen_scale(span, typical, X.shape[1])
        if self.scale != 1.0:
            X = np.multiply(X, self.scale, dtype=np.float64)  # one copy, not two
            span = span * self.scale
            self.centre = self.centre * self.scale
        self.X = X
        # A few rows far beyond the others need float64 (no scale fits both).
        self.dtype = np.float32 if _fits_float32(span, X.shape[1]) else np.float64
        self._columns: dict = {}
        # Whether float32 (float64) products failed most rows of a probe
        # (None: no probe yet).
        self._float32_fails: bool | None = None
        self._float64_fails: bool | None = None
        # Where a caller searches X with a tree instead, it keeps it here.
        self.tree = None

    def neighbours(self, n_query: int, *, rows: np.ndarray | None = None,
                   threads: int = 1, advance=None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """As :func:`exact_neighbours`, on the prepared rows."""
        from threadpoolctl import threadpool_limits

        if self.grouped(n_query):
            total = len(self.given) if rows is None else len(rows)

            def search(distinct, n_groups, wanted):
                steps = len(distinct.given) if wanted is None else len(wanted)
                return distinct.neighbours(
                    n_groups, rows=wanted, threads=threads,
                    advance=_rescaled(advance, steps, total))
            return self.by_groups(n_query, rows, search)

        # Overflow or underflow shows up as rows that fail their check, which
        # are searched again: numpy's warnings would only be noise on stderr.
        with threadpool_limits(limits=1, user_api="blas"), \
                np.errstate(all="ignore"):
            indices, distances = self._search(n_query, rows, threads, advance)
        return indices, distances / self.scale

    def copies(self) -> Copies:
        """The groups of identical rows, found on first use."""
        if self._copies is None:
            self._copies = identical_rows(self.given)
        return self._copies

    def grouped(self, n_query: int) -> bool:
        """Whether searches for n_query neighbours go by groups of copies."""
        return self.copies().massed(n_query)

    def by_groups(self, n_query: int, rows: np.ndarray | None, search
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Search the distinct rows once, then give each row its nearest
        groups' rows.

        ``search(distinct, n_groups, wanted)``: the ``n_groups`` nearest
        distinct rows of the distinct rows ``wanted`` (None: all), given
        their :class:`ExactSearch`.
        """
        copies = self.copies()
        queried = copies.group if rows is None else copies.group[rows]
        wanted, place = np.unique(queried, return_inverse=True)
        if self._distinct is None:
            self._distinct = ExactSearch(self.given[copies.first])
        n_groups = len(copies.first)
        groups, distances = search(self._distinct, min(n_query, n_groups),
                                   None if len(wanted) == n_groups else wanted)
        indices, distances = copies.expand(groups, distances, n_query)
        return indices[place.reshape(-1)], distances[place.reshape(-1)]

    def columns(self, dtype) -> _Columns:
        """The column operand in ``dtype``, built on first use."""
        if dtype not in self._columns:
            self._columns[dtype] = _Columns.of(self.X, dtype, self.centre)
        return self._columns[dtype]

    def products(self, n_query: int, rows: np.ndarray | None, threads: int
                 ) -> type | None:
        """The dtype of the products: float64 where float32 does not fit or
        failed most rows of the probe (see PROBE_ROWS), else float32; None
        where float64 failed most of them too (two clusters 1e7 apart, the
        centre between them), and the rows go to float64 differences at
        once. The probe runs on the first call with 100 rows or more; a
        caller that times a search calls this first."""
        count = len(self.X) if rows is None else len(rows)
        if count < PROBE_FROM:
            return self._chosen()
        if self.dtype == np.float32 and self._float32_fails is None:
            self._float32_fails = self._probe_fails(np.float32, n_query, rows,
                                                    threads)
            if self._float32_fails:
                del self._columns[np.float32]  # no later search uses it
        if self._chosen() == np.float64 and self._float64_fails is None:
            self._float64_fails = self._probe_fails(np.float64, n_query, rows,
                                                    threads)
        return self._chosen()

    def _chosen(self) -> type | None:
        """The products decided so far (None: none, differences)."""
        if self._float64_fails:
            return None
        return np.float64 if self._float32_fails else self.dtype

    def by_whole_rows(self, n_query: int) -> bool:
        """Whether searches for n_query neighbours go by whole rows (each
        entry computed for each of its rows, so that a self-join costs as
        much per row as the search of a few rows), not by tiles."""
        dtype = self._chosen()
        return dtype is not None and whole_rows(self.X.shape[1], dtype, n_query)

    def _probe_fails(self, dtype, n_query, rows, threads) -> bool:
        """Whether ``dtype`` products fail the proof of most rows of a probe."""
        queries = np.arange(len(self.X)) if rows is None else np.asarray(rows)
        spread = np.linspace(0, len(queries) - 1, PROBE_ROWS).astype(np.int64)
        probe = np.unique(queries[spread])
        found = _candidates(self.columns(dtype), probe, n_query)
        _run(found, threads, None)
        found.results(threads)
        return 2 * len(found.unsure()) > len(probe)

    def _search(self, n_query, rows, threads, advance):
        dtype = self.products(n_query, rows, threads)
        if dtype is None:
            return self._by_differences(n_query, rows, threads, advance)
        found = _candidates(self.columns(dtype), rows, n_query)
        _run(found, threads, advance)
        indices, distances = found.results(threads)
        unsure = found.unsure()
        if len(unsure) and dtype == np.float32:
            # Near-ties too many for float32, or rounding too coarse for the
            # distances: those rows again in float64.
            queries = found.queries[unsure]
            again = _candidates(self.columns(np.float64), queries, n_query)
            _run(again, threads, None)
            indices[unsure], distances[unsure] = again.results(threads)
            unsure = unsure[again.unsure()]
        if len(unsure):
            # Rows far from the others' centre against their neighbours'
            # distances: products cannot tell those apart, differences can.
            indices[unsure], distances[unsure] = self._differences(
                found.queries[unsure], n_query, threads)
        return indices, distances

    def _by_differences(self, n_query, rows, threads, advance):
        """Every row asked for by float64 differences."""
        queries = np.arange(len(self.X)) if rows is None else np.asarray(rows)
        found = self._differences(queries, n_query, threads)
        if advance is not None:
            advance(len(queries))
        return found

    def _differences(self, queries, n_query, threads):
        """Neighbours of rows ``queries`` by float64 differences of the
        features as given (a scale may have left float64's resolution behind
        for them), distances in scaled units as the products give them."""
        indices, distances = direct_neighbours(self.given, queries, n_query,
                                               threads)
        return indices, distances * self.scale


def _candidates(columns: _Columns, rows: np.ndarray | None, n_query: int
                ) -> _Candidates:
    """The search of ``rows`` (None: every row) among ``columns``: by tiles
    and merges, or by whole rows where k is large against a block."""
    space = _Space.of(columns, rows, n_query)
    dense = whole_rows(columns.exact.shape[1], columns.dtype, n_query)
    return (_Dense if dense else _Candidates)(space, rows, n_query)


def whole_rows(n_features: int, dtype, n_query: int) -> bool:
    """Whether k passes DENSE_FROM of a block's rows: whole rows, not tiles."""
    return n_query > DENSE_FROM * block_rows(n_features, dtype)


def _rescaled(advance, steps: int, total: int):
    """``advance`` for a task of ``steps`` that stands for ``total`` rows."""
    if advance is None:
        return None
    done = {"steps": 0, "rows": 0}

    def step(count: int) -> None:
        done["steps"] += count
        rows = done["steps"] * total // steps
        advance(rows - done["rows"])
        done["rows"] = rows
    return step


def _chosen_scale(span: float, typical: float, n_features: int) -> float:
    """1 where every row fits float32; else the power of two that brings the
    typical row near 1, unless the farthest would then leave FAR_SPAN (rows
    too far apart for any one scale: the whole span is brought near 1)."""
    if _fits_float32(span, n_features):
        return 1.0
    scale = unit_scale(typical, n_features)
    if not span * scale <= FAR_SPAN:
        return unit_scale(span, n_features)
    return scale


def unit_scale(span: float, n_features: int) -> float:
    """1, or the power of two that brings a ``span`` near 1 when its squared
    distances would leave float32's range."""
    if _fits_float32(span, n_features) or not np.isfinite(span):
        return 1.0
    return float(np.ldexp(1.0, -int(np.floor(np.log2(span)))))


def _fits_float32(span: float, n_features: int) -> bool:
    """Whether squared distances of rows this far apart fit float32 products."""
    largest = np.sqrt(1e30 / max(n_features, 1))  # squared distances < 1e30
    return span == 0 or largest * 1e-30 < span < largest


def column_span(X: np.ndarray) -> float:
    """The largest range of a column (inf where it overflows)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.max(X.max(axis=0) - X.min(axis=0), initial=0.0))


def robust_centre(X: np.ndarray) -> tuple[np.ndarray, float]:
    """The median row of a sample of rows (float64; see CENTRE_ROWS), and the
    median distance of those rows from it (a typical norm once centred)."""
    fit = CENTRE_BYTES // (8 * max(X.shape[1], 1))
    count = max(1, min(CENTRE_ROWS, fit))
    rows = np.unique(np.linspace(0, len(X) - 1, count).astype(np.int64))
    with np.errstate(over="ignore", invalid="ignore"):
        sample = np.asarray(X[rows], np.float64)
        centre = np.median(sample, axis=0)
        sample -= centre  # in place: one sample's memory, not three
        typical = np.median(np.sqrt(np.square(sample, out=sample).sum(axis=1)))
    return centre, float(typical)


def direct_neighbours(X: np.ndarray, queries: np.ndarray, n_query: int,
                      threads: int) -> tuple[np.ndarray, np.ndarray]:
    """The slow, sure way for a few rows: float64 differences, from every
    row where that is cheap, else in a tree."""
    if len(queries) * len(X) <= BRUTE_PAIRS:
        return _brute_neighbours(X, queries, n_query)
    from sklearn.neighbors import NearestNeighbors

    tree = "kd_tree" if X.shape[1] <= 16 else "ball_tree"
    search = NearestNeighbors(n_neighbors=n_query, algorithm=tree,
                              n_jobs=threads).fit(np.asarray(X, np.float64))
    distances, indices = search.kneighbors(np.asarray(X[queries], np.float64))
    return indices.astype(np.int64), distances


def _brute_neighbours(X: np.ndarray, queries: np.ndarray, n_query: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's distance to every row, a chunk of rows at a time."""
    indices = np.empty((len(queries), n_query), np.int64)
    distances = np.empty((len(queries), n_query), np.float64)
    squared = np.empty(len(X))
    for position, row in enumerate(queries):
        query = np.asarray(X[row], np.float64)
        for start, stop in chunks(len(X), space_rows(X.shape[1])):
            difference = np.subtract(X[start:stop], query, dtype=np.float64)
            squared[start:stop] = np.einsum("ij,ij->i", difference, difference)
        nearest = np.argpartition(squared, n_query - 1)[:n_query]
        nearest = nearest[np.argsort(squared[nearest], kind="stable")]
        indices[position], distances[position] = nearest, np.sqrt(squared[nearest])
    return indices, distances


def block_rows(n_features: int, dtype) -> int:
    """Rows of a block: BLOCK, fewer where their operand passes BLOCK_BYTES."""
    fit = BLOCK_BYTES // ((n_features + 2) * np.dtype(dtype).itemsize)
    return min(BLOCK, max(fit, LEAST_BLOCK))


def space_rows(n_features: int) -> int:
    """Rows of ``n_features`` float64 values that fill SPACE_BYTES."""
    return max(1, SPACE_BYTES // (8 * max(n_features, 1)))


def squared_differences(X: np.ndarray, first: np.ndarray, second: np.ndarray
                        ) -> np.ndarray:
    """``|X[first] - X[second]|^2`` row pair by row pair, from float64
    differences, a chunk of pairs at a time (about DIFFERENCE_BYTES)."""
    squared = np.empty(len(first))
    step = pairs_per_chunk(X.shape[1], X.dtype.itemsize)
    # Buffers reused by every chunk: fresh ones of this size would each be
    # mapped and faulted in anew.
    size = min(step, len(first))
    left, right = np.empty((2, size, X.shape[1]), X.dtype)
    difference = np.empty((size, X.shape[1]))
    for start, stop in chunks(len(first), step):
        count = stop - start
        # "clip" skips take's buffering of out; the row numbers are valid.
        np.take(X, first[start:stop], axis=0, out=left[:count], mode="clip")
        np.take(X, second[start:stop], axis=0, out=right[:count], mode="clip")
        np.subtract(left[:count], right[:count], out=difference[:count],
                    dtype=np.float64)
        rows = difference[:count]
        # A stack of 1 x d by d x 1 products: BLAS's dot, 3 times faster than
        # einsum here (numpy >= 1.24 has no vecdot).
        squared[start:stop] = (rows[:, None, :] @ rows[:, :, None]).ravel()
    return squared


def candidate_squares(columns: _Columns, queries: np.ndarray,
                      candidates: np.ndarray, under: np.ndarray, k: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Float64 squared distances of rows ``queries`` to their ``candidates``
    (a row of candidates each; inf where not ``under``), and a bound of each
    one's error (0 where differences gave it).

    By differences, or by products where the candidates are few against
    the pairs (see PRODUCT_WASTE). A product's bound holds against the exact
    square and the differences' alike, and near-ties among the first k go to
    differences (see :func:`unsettled`): the k nearest, their order and their
    ties come out as from differences alone.
    """
    row, slot = np.nonzero(under)
    second = candidates[row, slot]
    squared = np.full(candidates.shape, np.inf)
    error = np.zeros(candidates.shape)
    shared = _shared_rows(columns, second, len(queries))
    if shared is None:
        squared[row, slot] = squared_differences(columns.exact, queries[row],
                                                 second)
        return squared, error
    squared[row, slot], error[row, slot] = product_squares(
        columns, queries, row, second, shared)
    again = np.nonzero(unsettled(squared, error, under, k))
    squared[again] = squared_differences(columns.exact, queries[again[0]],
                                         candidates[again])
    error[again] = 0
    return squared, error


def _shared_rows(columns: _Columns, second: np.ndarray, n_rows: int
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """The distinct rows of the candidates ``second`` of ``n_rows`` query
    rows, ascending, and each candidate's place among them (np.unique's,
    without its sort); None where products do not pay (see PRODUCT_WASTE)."""
    if columns.exact.shape[1] < PRODUCT_FEATURES or not len(second):
        return None
    present = np.zeros(len(columns.exact), bool)
    present[second] = True
    union = np.flatnonzero(present)
    if len(union) * n_rows > PRODUCT_WASTE * len(second):
        return None
    return union, (np.cumsum(present) - 1)[second]


def product_squares(columns: _Columns, queries: np.ndarray, row: np.ndarray,
                    second: np.ndarray, shared: tuple[np.ndarray, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances of pairs (``queries[row]``, ``second``) from float64
    products, ``row`` ascending, and a bound of each one's distance from both
    the exact square and the differences' one (``shared``: see
    :func:`_shared_rows`).

    A product's error is at most unit (|x| + |y|)^2 (as the tiles' entries'),
    the differences' at most unit |x - y|^2 / 2, which is less: twice the
    first bounds both. Where that is loose against the square (see
    PRODUCT_SPREAD), the pair is by differences, its bound 0.
    """
    # In place: these are a few arrays of every candidate of a block.
    left, right = columns.squared[queries[row]], columns.squared[second]
    squared = _pair_products(columns, queries, row, *shared)
    squared *= -2
    squared += left
    squared += right
    reach = np.sqrt(left, out=left)
    reach += np.sqrt(right, out=right)
    reach **= 2
    loose = ~(reach <= PRODUCT_SPREAD * squared)  # NaN, <= 0 too
    error = np.multiply(reach, 2 * product_unit(columns.exact.shape[1]), out=reach)
    squared[loose] = squared_differences(columns.exact, queries[row[loose]],
                                         second[loose])
    error[loose] = 0
    return squared, error


def product_unit(n_features: int) -> float:
    """The unit of a float64 product's error bound (see _Space.of)."""
    return (n_features + 8) * float(np.finfo(np.float64).eps)


def _pair_products(columns: _Columns, queries: np.ndarray, row: np.ndarray,
                   union: np.ndarray, place: np.ndarray) -> np.ndarray:
    """``x . y`` of the centred rows of each pair (``queries[row]``,
    ``union[place]``), ``row`` ascending: a chunk of query rows against
    every row of ``union`` at a time, in tables of about SPACE_BYTES."""
    dot = np.empty(len(row))
    step = max(1, min(space_rows(columns.exact.shape[1]),
                      SPACE_BYTES // (8 * len(union))))
    for start, stop in chunks(len(queries), step):
        table = _product_table(columns, queries[start:stop], union)
        mine = slice(*np.searchsorted(row, [start, stop]))
        dot[mine] = table[row[mine] - start, place[mine]]
    return dot


def _product_table(columns: _Columns, queries: np.ndarray, union: np.ndarray
                   ) -> np.ndarray:
    """``x . y`` of the centred rows ``queries`` and ``union``, in float64,
    the rows of ``union`` a chunk at a time (about SPACE_BYTES)."""
    left = columns.centred(queries)
    table = np.empty((len(queries), len(union)))
    for start, stop in chunks(len(union), space_rows(columns.exact.shape[1])):
        table[:, start:stop] = left @ columns.centred(union[start:stop]).T
    return table


def unsettled(squared: np.ndarray, error: np.ndarray, under: np.ndarray, k: int
              ) -> np.ndarray:
    """Where the candidates' distances from products may not give the order
    of the k nearest that differences would.

    Sorted by distance, a cut between two places is proven where every
    distance before it plus its error lies under every one after it less
    its error: the exact squares, and the differences', are in the same
    order across it. A place between two cuts stands. Runs of places with
    no cut inside (near-ties) are computed again where they begin among
    the first k; the ties differences leave then go by the candidates'
    order, as they would have. ``under``: the candidates.
    """
    order = np.argsort(squared, axis=1, kind="stable")
    value = np.take_along_axis(squared, order, axis=1)
    spread = np.take_along_axis(error, order, axis=1)
    top = np.maximum.accumulate(value + spread, axis=1)
    bottom = np.subtract(value, spread, out=value)[:, ::-1]  # in place: a few
    np.minimum.accumulate(bottom, axis=1, out=bottom)  # arrays of every pair
    cut = np.ones((len(value), value.shape[1] + 1), bool)  # before each place
    cut[:, 1:-1] = top[:, :-1] < bottom[:, ::-1][:, 1:]
    # A place from the k-th on is in a run begun before it unless a cut lies
    # between.
    again = ~(cut[:, :-1] & cut[:, 1:])
    again[:, k:] &= ~np.logical_or.accumulate(cut[:, k:-1], axis=1)
    again &= np.take_along_axis(under, order, axis=1)
    unsorted = np.empty_like(again)
    np.put_along_axis(unsorted, order, again, axis=1)
    return unsorted


def pairs_per_chunk(n_features: int, itemsize: int) -> int:
    """Row pairs whose gathered rows and float64 differences fill about
    DIFFERENCE_BYTES."""
    return max(1, DIFFERENCE_BYTES // (max(n_features, 1) * (2 * itemsize + 8)))


@dataclass
class _Columns:
    """Every row of X as a column of the tile products.

    exact : (n, d) the features as given, cast to float64 row by row for
        the final distances (a float64 copy of a million rows would double
        the search's memory).
    squared : (n,) float64 squared norms of the centred rows.
    centre : (d,) float64 the centre.
    dtype : the working dtype.
    stored : (n, d + 2) ``[-2 y, 1, |y|^2]`` on centred rows, in float32; None
        in float64, whose blocks are made from ``exact`` when a tile needs
        them: stored, they would take twice a float32 input's memory (and
        a block costs a tenth to a thirtieth of a product to make: 1024 rows
        of 8 to 2048 features, 209 rows of 10,000).
    """

    exact: np.ndarray
    squared: np.ndarray
    centre: np.ndarray
    dtype: type
    stored: np.ndarray | None

    @classmethod
    def of(cls, X: np.ndarray, dtype, centre: np.ndarray) -> _Columns:
        n, d = X.shape
        squared = np.empty(n)
        stored = np.empty((n, d + 2), dtype) if dtype == np.float32 else None
        for start, stop in chunks(n, space_rows(d)):  # a chunk at a time
            centred = np.subtract(X[start:stop], centre, dtype=np.float64)
            squared[start:stop] = np.einsum("ij,ij->i", centred, centred)
            if stored is not None:
                _fill_right(stored[start:stop], centred, squared[start:stop])
        return cls(X, squared, centre, dtype, stored)

    def centred(self, rows: np.ndarray) -> np.ndarray:
        """``X[rows]`` (row numbers) less the centre, in float64."""
        return np.subtract(self.exact[rows], self.centre, dtype=np.float64)

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop as the right operand ``[-2 y, 1, |y|^2]``."""
        if self.stored is not None:
            return self.stored[start:stop]
        return self.operand(slice(start, stop), right=True)

    def operand(self, rows: slice | np.ndarray, right: bool) -> np.ndarray:
        """``X[rows]`` (a slice, or row numbers) as the left operand ``[x,
        |x|^2, 1]`` or the right one, in the working dtype.

        Centred in float64 straight into the operand (then rounded to it),
        and for the right one doubled there (exact in float64, the dtype of
        every right operand made here): with a centred copy, a tile's blocks
        took 40% of its product's time at 10,000 float64 features. Row
        numbers are gathered a chunk at a time.
        """
        d = self.exact.shape[1]
        made = np.empty((len(self.squared[rows]), d + 2), self.dtype)
        for start, stop in chunks(len(made), space_rows(d)):
            np.subtract(self.exact[_part(rows, start, stop)], self.centre,
                        out=made[start:stop, :d], dtype=np.float64)
        ones, norms = (d, d + 1) if right else (d + 1, d)
        if right:
            made[:, :d] *= -2
        made[:, ones], made[:, norms] = 1, self.squared[rows]
        return made


def _part(rows: slice | np.ndarray, start: int, stop: int) -> slice | np.ndarray:
    """``rows[start:stop]``; of a slice, a slice (a view, not a copy)."""
    if isinstance(rows, slice):
        return slice(rows.start + start, rows.start + stop)
    return rows[start:stop]


def _fill_right(out: np.ndarray, centred: np.ndarray, squared: np.ndarray
                ) -> None:
    """``out = [-2 y, 1, |y|^2]`` for centred rows y."""
    d = centred.shape[1]
    np.multiply(centred, -2, out=out[:, :d])  # exact, then rounded to out
    out[:, d], out[:, d + 1] = 1, squared


def _left_of_right(right: np.ndarray) -> np.ndarray:
    """``[x, |x|^2, 1]`` from ``[-2 x, 1, |x|^2]``, exactly (a power of two)."""
    d = right.shape[1] - 2
    left = np.empty_like(right)
    np.multiply(right[:, :d], -0.5, out=left[:, :d])
    left[:, d], left[:, d + 1] = right[:, d + 1], 1
    return left


@dataclass
class _Space:
    """Features ready for tiles: ``left_block(q) . columns.block(j)`` is
    ``|x_q - x_j|^2``.

    columns : the :class:`_Columns`.
    left : (n_queries, d + 2) ``[x, |x|^2, 1]`` for the query rows; None in a
        self-join of more than LEFT_BYTES, whose blocks are made when a tile
        needs them (a copy of every row would add a feature matrix to the
        memory).
    slack : (n_queries,) bound of the rounding error of any entry in a row.
    """

    columns: _Columns
    left: np.ndarray | None
    slack: np.ndarray
    norm: np.ndarray
    unit: float

    @property
    def exact(self) -> np.ndarray:
        return self.columns.exact

    @classmethod
    def of(cls, columns: _Columns, queries: np.ndarray | None, n_query: int
           ) -> _Space:
        """The space of ``columns``, with ``left`` for ``queries`` (None:
        every row)."""
        squared, dtype = columns.squared, columns.dtype
        d = columns.exact.shape[1]
        reach = np.sqrt(np.partition(squared, n_query - 1)[n_query - 1])
        left = None
        if queries is not None:
            left = columns.operand(queries, right=False)
            squared = squared[queries]
        elif columns.stored is not None and columns.stored.nbytes <= LEFT_BYTES:
            left = _left_of_right(columns.stored)  # made once: few rows
        # An entry's error is at most unit * (|x| + |y|)^2: d + 2 products
        # plus the roundings of the inputs, with eps = twice the unit
        # round-off as a margin. A true neighbour y of x has |y| <= 2 |x| +
        # reach (reach: the k-th smallest norm, so the k-th neighbour is
        # nearer than |x| + reach), so far rows do not widen every slack.
        unit = (d + 8) * float(np.finfo(dtype).eps)
        norm = np.sqrt(squared)
        slack = unit * (3 * norm + reach) ** 2
        return cls(columns, left, slack.astype(dtype), norm, unit)

    def left_block(self, lo: int, hi: int) -> np.ndarray:
        """The query rows lo:hi as the left operand ``[x, |x|^2, 1]``."""
        if self.left is not None:
            return self.left[lo:hi]
        if self.columns.stored is not None:
            return _left_of_right(self.columns.stored[lo:hi])
        return self.columns.operand(slice(lo, hi), right=False)


class _Candidates:
    """For each query row: its best candidates so far and its threshold.

    keys : (n_rows, width) candidates as sortable uint64 (see SHIFT), unordered.
    threshold : (n_rows,) upper bound of the k-th squared distance plus the
        rounding error: no true neighbour lies above it.
    dropped : (n_rows,) the smallest value dropped for want of room: where
        it lies under the final threshold, the row is crowded (some of its
        candidates were told apart on rounded values alone).
    """

    def __init__(self, space: _Space, rows: np.ndarray | None, n_query: int):
        n = len(space.exact)
        # No row has more than n candidates.
        self.space, self.k, self.width = space, n_query, min(2 * n_query, n)
        self.self_join = rows is None
        self.queries = np.arange(n) if rows is None else np.asarray(rows)
        self.slack = space.slack
        count = len(self.queries)
        self.keys = np.full((count, self.width), EMPTY, np.uint64)
        self.threshold = np.full(count, np.inf, space.columns.dtype)
        self.proven = np.zeros(count, bool)
        self.tied = np.zeros(count, bool)
        self.dropped = np.full(count, np.inf, self.threshold.dtype)
        size = block_rows(space.exact.shape[1], space.columns.dtype)
        self.blocks = chunks(count, size)
        self.columns = self.blocks if rows is None else chunks(n, size)
        self.pending = [[] for _ in self.blocks]
        self.tiles = [0] * len(self.blocks)
        self.locks = [threading.Lock() for _ in self.blocks]

    def tile_list(self) -> list[tuple[int, int]]:
        """(query block, column block) pairs; each pair once in a self-join.

        Self-join: the diagonal first, then rounds in which every block meets
        one other (circle method), so that the tiles two threads work on at a
        time share no block and every threshold tightens at the same pace.
        """
        if not self.self_join:
            return [(q, c) for c in range(len(self.columns))
                    for q in range(len(self.blocks))]
        count = len(self.blocks)
        seats = list(range(count + count % 2))
        pairs = [(b, b) for b in range(count)]
        for _ in range(len(seats) - 1):
            half = len(seats) // 2
            pairs += [(min(a, b), max(a, b)) for a, b in
                      zip(seats[:half], reversed(seats[half:])) if max(a, b) < count]
            seats = [seats[0], seats[-1], *seats[1:-1]]
        return pairs

    def tile(self, block: int, column: int) -> None:
        """Offer one tile's entries to its query block (and column block)."""
        lo, hi = self.blocks[block]
        start, stop = self.columns[column]
        tile = self.space.left_block(lo, hi) @ \
            self.space.columns.block(start, stop).T
        both = self.self_join and column != block

        # One pass finds the entries under either block's thresholds.
        bound = self._bound(block, tile, transposed=False)
        under = tile <= bound[:, None]
        if both:
            column_bound = self._bound(column, tile, transposed=True)
            under |= tile <= column_bound[None, :]
        flat = np.flatnonzero(under)
        values = tile.ravel()[flat]
        i, j = np.divmod(flat, tile.shape[1])

        mine = values <= bound[i] if both else slice(None)
        self.offer(block, i[mine], values[mine], j[mine] + start, bound)
        if both:
            theirs = values <= column_bound[j]
            self.offer(column, j[theirs], values[theirs], i[theirs] + lo,
                        column_bound)

    def _bound(self, block: int, tile: np.ndarray, transposed: bool
               ) -> np.ndarray:
        """The thresholds of ``block``'s rows for this tile.

        Rows without one yet take the k-th value of the tile as theirs.
        ``transposed``: the block's rows are the tile's columns.
        """
        lo, hi = self.blocks[block]
        threshold = self.threshold[lo:hi].copy()
        fresh = np.isinf(threshold)
        if fresh.any() and tile.shape[int(not transposed)] >= self.k:
            part = tile[:, fresh].T if transposed else tile[fresh]
            threshold[fresh] = _kth_bound(part, self.k) + 2 * self.slack[lo:hi][fresh]
        return threshold

    def offer(self, block: int, rows: np.ndarray, values: np.ndarray,
              columns: np.ndarray, threshold: np.ndarray) -> None:
        """Queue candidates (rows within the block); merge when enough wait."""
        lo, hi = self.blocks[block]
        rows = rows.astype(np.int16)  # a radix sort groups them in the merge
        keys = _keys(values, columns)
        with self.locks[block]:
            np.fmin(self.threshold[lo:hi], threshold, out=self.threshold[lo:hi])
            if len(rows):
                self.pending[block].append((rows, keys))
            self.tiles[block] += 1
            waiting = sum(len(r) for r, _ in self.pending[block])
            if self.tiles[block] >= MERGE_EVERY or \
                    waiting > PENDING_PER_ROW * (hi - lo):
                self.merge(block)

    def merge(self, block: int) -> None:
        """Fold a block's pending candidates into its best ones (lock held)."""
        pending, self.pending[block] = self.pending[block], []
        self.tiles[block] = 0
        if not pending:
            return
        lo, hi = self.blocks[block]
        rows = np.concatenate([r for r, _ in pending])
        keys = np.concatenate([k for _, k in pending])
        order = np.argsort(rows, kind="stable")
        rows, keys = rows[order], keys[order]
        counts = np.bincount(rows, minlength=hi - lo)
        hit = np.flatnonzero(counts)
        # Column of each key in a padded (rows hit) x (width + most) table.
        place = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
        slot = np.zeros(hi - lo, np.int64)
        slot[hit] = np.arange(len(hit))
        table = np.full((len(hit), self.width + counts.max()), EMPTY, np.uint64)
        table[:, :self.width] = self.keys[lo + hit]
        table[slot[rows], self.width + place] = keys
        # The k-th key, the (width + 1)-th and the width smallest, unordered:
        # a full sort of every merge took most of the time with a large k,
        # but sorts short rows four times faster than a partition.
        if table.shape[1] <= SORTED_MERGE:
            table.sort(axis=1)
        else:
            table.partition([self.k - 1, self.width], axis=1)
        at = lo + hit
        kth = _values(table[:, self.k - 1]) + 2 * self.slack[at]
        self.threshold[at] = np.fmin(self.threshold[at], kth)  # EMPTY is NaN
        self.dropped[at] = np.fmin(self.dropped[at], _values(table[:, self.width]))
        self.keys[at] = table[:, :self.width]

    def results(self, threads: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest of each query row, from float64 distances."""
        count = len(self.queries)
        indices = np.empty((count, self.k), np.int64)
        distances = np.empty((count, self.k), np.float64)

        def finish(block):
            lo, hi = self.blocks[block]
            self.merge(block)
            indices[lo:hi], distances[lo:hi] = self._nearest(lo, hi)

        for _ in _map(finish, range(len(self.blocks)), threads):
            pass
        return indices, distances

    def unsure(self) -> np.ndarray:
        """Positions of the query rows whose result is not proven exact.

        Either the threshold may have filtered out a true neighbour (see
        ``_proven``), or candidates under it were dropped for want of room
        (masses of near-duplicates) and one of them may lie nearer than the
        k-th neighbour found.
        """
        crowded = self.dropped <= _single(self.threshold)
        return np.flatnonzero((crowded & ~self.tied) | ~self.proven)

    def _nearest(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        bound = _single(self.threshold[lo:hi, None])  # in the keys' rounding
        keys = self._under(lo, hi, bound)
        columns = (keys & COLUMN).astype(np.int64)
        squared, error = candidate_squares(self.space.columns, self.queries[lo:hi],
                                           columns, _values(keys) <= bound, self.k)
        order = np.argsort(squared, axis=1, kind="stable")[:, :self.k]
        squared = np.take_along_axis(squared, order, axis=1)
        error = np.take_along_axis(error, order[:, -1:], axis=1)[:, 0]
        self._check(lo, hi, squared[:, -1] + error)
        return np.take_along_axis(columns, order, axis=1), np.sqrt(squared)

    def _under(self, lo: int, hi: int, bound: np.ndarray) -> np.ndarray:
        """The keys of rows lo:hi, sorted, the first ``most`` of each row: the
        keys under the row's bound, then others (``most``: the most keys
        under a bound, at least k).

        Sorted, the keys break ties of the float64 distances, whatever order
        the merges (on any threads) left them in, and the float32 order makes
        the float64 one quick to sort.
        """
        keys = self.keys[lo:hi]
        under = (_values(keys) <= bound).sum(axis=1)
        most = max(int(under.max(initial=0)), self.k)
        if most < keys.shape[1]:  # a large k: half the keys lie above it
            keys = np.partition(keys, most - 1, axis=1)[:, :most]
        return np.sort(keys, axis=1)

    def _check(self, lo: int, hi: int, kth: np.ndarray) -> None:
        """Whether rounding can have hidden a nearer row than the k-th found.

        A true neighbour y of x lies within ``kth`` (the k-th squared distance
        found, plus its error where a product gave it), so |y| <= |x| +
        sqrt(kth), and its entry was at most ``kth`` plus that entry's
        rounding error: ``proven`` when every threshold the row had (the last
        is the smallest) lies above that.
        A dropped candidate is no nearer than the k-th (``tied``) when the
        k-th is 0, or when its entry, less the error, is not under it.
        """
        norm = self.space.norm[lo:hi]
        error = self.space.unit * (2 * norm + np.sqrt(kth)) ** 2
        self.proven[lo:hi] = np.isfinite(kth) & \
            (self.threshold[lo:hi] >= kth + error)
        # Keys round values up; one step down bounds the entry from below.
        entry = np.nextafter(self.dropped[lo:hi].astype(np.float32),
                             np.float32(-np.inf)).astype(np.float64)
        self.tied[lo:hi] = (kth == 0) | (entry - error >= kth)


class _Dense(_Candidates):
    """Candidates from whole rows of entries, for a k large against a block:
    there most entries of every tile pass the thresholds, and each merge
    partitions them all again.

    A chunk of query rows gets its entries against every row at once: the
    width smallest keys of each row are its candidates, the k-th smallest
    (plus twice the slack) its threshold and the next one past the width its
    ``dropped``, just as merges of every tile would leave them. No tile
    serves two chunks in a self-join: the products cost twice as much.
    """

    def __init__(self, space: _Space, rows: np.ndarray | None, n_query: int):
        super().__init__(space, rows, n_query)
        n = len(space.exact)
        self.blocks = chunks(len(self.queries), dense_rows(n))
        self.pending = [[] for _ in self.blocks]
        self.tiles = [0] * len(self.blocks)
        self.locks = [threading.Lock() for _ in self.blocks]

    def tile_list(self) -> list[tuple[int]]:
        """One chunk of query rows at a time."""
        return [(block,) for block in range(len(self.blocks))]

    def tile(self, block: int) -> None:
        """The candidates and threshold of one chunk of query rows."""
        lo, hi = self.blocks[block]
        keys = _row_keys(self._entries(lo, hi))
        past = keys.shape[1] > self.width  # a key past the width to drop
        keys.partition([self.k - 1, self.width] if past else self.k - 1, axis=1)
        self.threshold[lo:hi] = _values(keys[:, self.k - 1]) + \
            2 * self.slack[lo:hi]
        if past:
            self.dropped[lo:hi] = _values(keys[:, self.width])
        self.keys[lo:hi] = keys[:, :self.width]

    def _entries(self, lo: int, hi: int) -> np.ndarray:
        """The entries of query rows lo:hi against every row."""
        left = self.space.left_block(lo, hi)
        entries = np.empty((hi - lo, len(self.space.exact)), left.dtype)
        for start, stop in self.columns:
            entries[:, start:stop] = left @ self.space.columns.block(start, stop).T
        return entries


def dense_rows(n_samples: int) -> int:
    """Query rows whose entries against every row fill DENSE_BYTES (at least
    LEAST_BLOCK)."""
    return max(DENSE_BYTES // (32 * n_samples), LEAST_BLOCK)


def _row_keys(entries: np.ndarray) -> np.ndarray:
    """The keys of whole rows of entries (column j: row j), with fewer
    temporaries than :func:`_keys`; ``entries`` is overwritten."""
    single = _single(np.maximum(entries, 0, out=entries))
    keys = single.view(np.uint32).astype(np.uint64)
    keys <<= SHIFT
    keys |= np.arange(entries.shape[1], dtype=np.uint64)
    return keys


def _kth_bound(values: np.ndarray, k: int) -> np.ndarray:
    """An upper bound of the k-th smallest value of each row of ``values``.

    With room for it, the k-th smallest of the minima of GROUPS columns at a
    time: nearly as tight, and GROUPS times less to partition.
    """
    groups = values.shape[1] // GROUPS
    if groups >= 4 * k:
        values = values[:, :groups * GROUPS].reshape(len(values), GROUPS, groups)
        values = values.min(axis=1)
    return np.partition(values, k - 1, axis=1)[:, k - 1]


def _keys(values: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Sortable candidates: values (>= 0, rounded up to float32) over columns."""
    single = _single(np.maximum(values, 0))  # true squared distances are >= 0
    return (single.view(np.uint32).astype(np.uint64) << SHIFT) | \
        columns.astype(np.uint64)


def _single(values: np.ndarray) -> np.ndarray:
    """float32 values, rounded up: a key never claims a row nearer than it is.

    Rounding up keeps order: values under a threshold keep their keys under
    the threshold rounded up.
    """
    single = values.astype(np.float32)
    if values.dtype == np.float32:
        return single
    return np.where(single < values, np.nextafter(single, np.float32(np.inf)),
                    single)


def _values(keys: np.ndarray) -> np.ndarray:
    """The float32 values of keys (NaN for EMPTY: no comparison passes it)."""
    return (keys >> SHIFT).astype(np.uint32).view(np.float32)


def _run(found: _Candidates, threads: int, advance) -> None:
    """Every tile, over ``threads`` threads; progress in rows, summing to n_rows."""
    tiles = found.tile_list()
    total, done = len(found.queries), 0
    results = _map(lambda t: found.tile(*t), tiles, threads)
    try:
        for count, _ in enumerate(results, 1):
            if advance is not None:
                step = count * total // len(tiles) - done
                done += step
                advance(step)
    finally:
        results.close()  # an interrupt cancels the tiles not yet started


def _map(function, items, threads: int):
    """``map`` over a thread pool; results in order, as they come."""
    if threads <= 1:
        yield from map(function, items)
        return

    def quiet(item):  # numpy's error state is per thread
        with np.errstate(all="ignore"):
            return function(item)

    with ThreadPoolExecutor(threads) as pool:
        yield from pool.map(quiet, items)
