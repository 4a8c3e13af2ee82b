"""k nearest neighbours of every point of a set, in that same set.

Two searches sit behind one function:

* exact: blocked matrix products with per-row thresholds
  (:mod:`vbsw_cli.exact`), or scikit-learn's k-d tree for large sets in few
  dimensions;
* approximate: hnswlib graphs (:mod:`vbsw_cli.graph`; with ``reproducible``,
  shards built on one thread each, so that every run gives the same
  neighbours). Their recall is measured, on a sample of rows,
  against the exact search; ``ef`` is raised until the recall asked for is
  reached. When no affordable ``ef`` reaches it, or when the exact search would
  be cheaper than the approximate one, the exact search is used instead and the
  result says why.

The point itself is counted once in its own neighbourhood (or not at all with
``include_self=False``), whatever order the search returns ties in: with
duplicate points the point may come back second, or not at all.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from vbsw_cli.copies import alone, identical_rows
from vbsw_cli.errors import DataError, UsageError
from vbsw_cli.exact import ExactSearch, column_span, squared_differences
from vbsw_cli.graph import build_graph, graph_count
from vbsw_cli.progress import NullProgress, Progress, chunks

METHODS = ("auto", "hnsw", "exact")

# Below this many rows an exact search costs well under a second on two cores,
# less than building any graph would.
EXACT_BELOW = 10_000

# Graph defaults, chosen on the benchmark's clustered embeddings: M = 12 with
# ef_construction = 40 builds a million 64-dimensional points in well under a
# minute on two cores and still reaches 0.95 recall@20 with a small ef.
DEFAULT_M = 12
DEFAULT_EF_CONSTRUCTION = 40

# Rows on which the recall of the graph is measured, and the largest ef tried.
# The graph's recall is measured on RECALL_SAMPLE rows; ef grows until the
# lower end of that estimate (mean minus two standard errors over the rows)
# reaches the target, so that the whole set reaches it too.
RECALL_SAMPLE = 1000
EF_LIMIT = 1024
EF_GROWTH = 1.25
PLATEAU = 0.002

# Relative contrast: for each sampled row, its distance to random rows (the
# median over PARTNERS of them) over its distance to its k-th neighbour; the
# median over the rows. Near 1, distances concentrate and a graph search needs
# a very large ef (about 1.35 for 64-dimensional Gaussian noise, against 2 for
# the digits pixels and 7 for clustered embeddings). Medians, so that a few
# far outliers do not decide. Below HARD_CONTRAST, when the exact search is
# predicted to take under HARD_EXACT_SECONDS, no graph is built at all.
HARD_CONTRAST = 1.45
HARD_EXACT_SECONDS = 60.0
PARTNERS = 8
# The contrast is first measured on every CONTRAST_STRIDE-th sampled row; when
# clearly more than half of them (by three standard deviations of a fair
# coin's count) lie below HARD_CONTRAST, the rest of the sample is not
# searched (on 50,000 x 64 Gaussian noise that saves about 0.2 s).
CONTRAST_STRIDE = 8
# An exact search predicted to take under CHEAP_EXACT_SECONDS is run at once:
# building, tuning and querying a graph would take longer.
CHEAP_EXACT_SECONDS = 1.0

# When a graph misses the recall, exact search replaces it if it is predicted
# to take under a minute or under EXACT_PATIENCE times what the graph cost;
# otherwise a graph twice as dense is tried once.
EXACT_PATIENCE = 3.0

# Rows the graph does not lead back to themselves are searched again (see
# _search_again): exactly among all rows while there are at most EXACT_AGAIN
# distances to compute (about a second on two cores: 2,000 rows among a
# million, 40,000 among 50,000), otherwise among themselves in a graph.
EXACT_AGAIN = 2e9
# Relative margin of the bound in provably_short: the graph's distances are
# float32.
SHORT_TOLERANCE = 1e-5

# Rows per call to the search libraries, so the progress bar moves, and rows
# per block when neighbourhoods are rearranged.
QUERY_CHUNK = 20_000
OWN_BLOCK = 65_536

# Features (values) up to which the exact search prepared for the sample is
# kept for the rows searched again (its operand is about 8 bytes a value):
# above, the graph needs the memory more.
KEEP_PREPARED = 8_000_000
# Feature values per chunk of rows compared in duplicate_rows.
REFINE_VALUES = 4 * 2**20

# Feature spans (see feature_span) whose squared distances stay well inside
# float32 (hnswlib) and float64 (any search).
FLOAT32_SPAN = 1e18
FLOAT64_SPAN = 1e150

# Exact search: blocked products (vbsw_cli.exact), or scikit-learn's k-d tree
# for more than TREE_ROWS rows in few dimensions, where it prunes: always up to
# TREE_DIMENSIONS; up to PROBE_DIMENSIONS only on data of few intrinsic
# dimensions, which timing both on a few rows tells. On 50,000 rows in 8
# dimensions, 2 cores: the tree takes 0.4 s near a 3-dimensional subspace but
# 3.7 s on Gaussian noise (32 s in 15 dimensions); the products 1.3 s.
TREE_DIMENSIONS = 5
PROBE_DIMENSIONS = 15
TREE_ROWS = 30_000
TREE_PROBE_ROWS = 64
# The blocked self-join of every row computes half the products, and merges
# fewer candidates per row, than the search of a sample of rows among all:
# its time per row is about SELF_JOIN_SPEED_UP times smaller. Not so for a k
# large against the blocks, searched by whole rows (11,000 x 4, k = 2000: a
# sample's row took 1.1 times as long as one of the whole search).
SELF_JOIN_SPEED_UP = 2.4  # 2.3 to 2.6 from 20,000 to 200,000 x 64, 2 cores

# A run whose graph is the same on every run (--reproducible, or one thread)
# chooses between the graph and exact search without a clock: the exact
# search's seconds are estimated from its size, EXACT_PAIR_SECONDS per pair
# of rows and thread for picking the candidates out of the tiles (whatever
# d), plus EXACT_FEATURE_SECONDS per pair and column of the products (d + 2),
# and the graph is kept whenever it reaches the recall. Timed on 2 cores,
# 40,000 Gaussian rows: 2.1 to 2.3 ns a pair and thread for d = 4 to 16, 3.4
# for 64, 4.9 for 128; 20,000 x 512: 15 ns. (One rate per entry, calibrated
# at d = 64, had predicted 0.85 s for 60,000 x 16 rows, which took 1.95 s.)
# A graph's seconds (for EXACT_PATIENCE) are estimated at GRAPH_RATE rows x d
# x M x (ef_construction + ef) per second and thread (50,000 x 64, M = 12,
# ef_construction = 40, ef = 20: 0.82 s to build and query on 2 cores).
EXACT_PAIR_SECONDS = 2.0e-9
EXACT_FEATURE_SECONDS = 2.5e-11
GRAPH_RATE = 1.4e9
# The query of such a graph at a given ef, which the exact search must beat
# or replace, is estimated at QUERY_SECONDS per row, graph searched, M, ef and
# QUERY_OFFSET + d, per thread. Timed on 60,000 Gaussian rows (2 shards on 2
# cores, M = 12, the ef each needed for 0.95): 0.6 to 1.2 ns for d = 16 to
# 64 (ef 42 to 514), 1.6 at d = 8; clustered rows of d = 64 take 0.35 to 0.75
# (ef 100 and 20). Without it, a fixed graph was kept whatever its cost:
# 60,000 x 32 Gaussian rows, ef 209, 8.9 s against 2.7 s for exact search.
QUERY_SECONDS = 0.87e-9
QUERY_OFFSET = 16

# Up to this many rows the graphs are reproducible unless asked otherwise
# (graph.py: shards built on one thread each). They cost about as much at
# 50,000 x 64 rows and 1.24 times as much at 200,000 (2 cores); at 1,000,000,
# 61.5 s against 47.5 s for one graph built on every thread, past the 60 s
# that size must take.
REPRODUCIBLE_ROWS = 200_000

# Why exact search ran where auto could have used a graph, in fixed words for
# the output's metadata (the messages give the measured figures, which differ
# from run to run).
CHEAPER = "exact search predicted faster than a graph"
LOW_CONTRAST = "relative contrast too low for a graph"
SLOWER = "the graph predicted slower than exact search at the recall asked for"
SHORT = "the graphs fell short of --recall"


@dataclass
class SearchOptions:
    """How to search; the defaults reach 0.95 recall@20 on embeddings."""

    method: str = "auto"
    recall: float = 0.95
    M: int = DEFAULT_M
    ef_construction: int = DEFAULT_EF_CONSTRUCTION
    ef: int | None = None
    threads: int | None = None
    sample_size: int = RECALL_SAMPLE
    exact_below: int = EXACT_BELOW
    seed: int = 0
    reproducible: bool | None = None  # None: up to REPRODUCIBLE_ROWS rows


@dataclass
class Neighbours:
    """The neighbourhoods used for local variance.

    indices : ndarray of shape (n_samples, k), int64. With the point included,
        column 0 is the point itself.
    distances : ndarray of shape (n_samples, k), float32 (graph) or float64
        (exact), Euclidean.
    method : ``"exact"`` or ``"hnsw"``.
    details : how the search ran (parameters, measured recall, timings, and the
        reason for a fallback to exact search).
    exact : the exact search prepared on the rows by the first later exact
        search of some of them (a recall check, rows searched again), kept
        for the next: preparing it takes about 0.5 s at a million rows. Set it
        to None to free its memory (a float32 copy of the rows).
    """

    indices: np.ndarray
    distances: np.ndarray
    method: str
    details: dict = field(default_factory=dict)
    exact: ExactSearch | None = field(default=None, repr=False, compare=False)


def thread_count(threads: int | None) -> int:
    """The threads to use: the given number, or every core this process may use."""
    if threads:
        return threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def reproducible_for(options: SearchOptions, n_samples: int) -> SearchOptions:
    """The options with ``reproducible`` decided: as given, else on up to
    REPRODUCIBLE_ROWS rows."""
    if options.reproducible is not None:
        return options
    return replace(options, reproducible=n_samples <= REPRODUCIBLE_ROWS)


def check_k(k: int, n_samples: int, include_self: bool) -> None:
    """Refuse a k the data cannot give."""
    if k < 2:
        raise UsageError(f"--k {k}: the unbiased variance needs k >= 2")
    available = n_samples if include_self else n_samples - 1
    if available < 2:
        others = "" if include_self else (
            f", {available} besides the point itself (--exclude-self)")
        raise DataError(f"a neighbourhood needs at least 2 points, and the data "
                        f"has {n_samples} row(s){others}")
    if k > available:
        who = "rows" if include_self else "other rows (--exclude-self)"
        raise UsageError(f"--k {k} is larger than the {available} {who} in the "
                         f"data; choose --k <= {available}")


def nearest_neighbours(X: np.ndarray, k: int, *, include_self: bool = True,
                       options: SearchOptions | None = None,
                       progress: Progress | None = None) -> Neighbours:
    """The k nearest neighbours of every row of X among the rows of X.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features).
    k : size of each neighbourhood, the point itself included when
        ``include_self`` (the paper's convention), excluded otherwise.
    options : search method and parameters.
    progress : receives progress reports.

    Returns
    -------
    Neighbours, rows in the order of X.
    """
    options = reproducible_for(options or SearchOptions(), len(X))
    progress = progress or NullProgress()
    check_search_options(options)
    check_k(k, len(X), include_self)
    n_query = k if include_self else k + 1
    copies = identical_rows(X)

    if copies.massed(n_query):
        # Masses of identical rows: each distinct row is searched once, and
        # every row gets the rows of its nearest groups.
        distinct = len(copies.first)
        indices, distances, method, details = _search(
            X[copies.first], min(n_query, distinct), options, progress,
            include_self, alone(distinct), rows="distinct rows")
        indices, distances = copies.expand(indices, distances, n_query)
        indices = indices.astype(index_dtype(len(X)))[copies.group]
        distances = distances[copies.group]
        details["distinct_rows"] = distinct
    else:
        indices, distances, method, details = _search(
            X, n_query, options, progress, include_self, copies)

    indices, distances = _own_neighbourhood(indices, distances, include_self)
    return Neighbours(indices, distances, method, details)


def _search(X, n_query, options, progress, include_self, copies, rows="rows"):
    """The n_query nearest rows of every row, by the method chosen: indices,
    distances, the method used and details of the choice. ``copies``: the
    groups of identical rows of X; ``rows``: what they are called in the
    reason."""
    graph_reason = _graph_cannot(X, options)
    if options.method == "exact" or graph_reason or (
            options.method == "auto" and len(X) <= options.exact_below):
        reason = "asked for" if options.method == "exact" else graph_reason or (
            f"{len(X)} {rows} <= {options.exact_below}: an index would not pay "
            "off")
        indices, distances = exact_search(X, n_query, options, progress,
                                          prepared=ExactSearch(X, copies))
        return indices, distances, "exact", {"reason": reason}
    return _approximate_or_exact(X, n_query, options, progress, include_self,
                                 copies)


def feature_span(X: np.ndarray) -> float:
    """The largest distance two rows can have, within a factor sqrt(d)."""
    if not X.size:
        return 0.0
    return column_span(X) * np.sqrt(X.shape[1])  # inf is refused as such


def _graph_cannot(X: np.ndarray, options: SearchOptions) -> str | None:
    """Why hnswlib cannot search X, if it cannot; refuse any search that can't.

    Squared distances must stay within float64 for any search, and within
    float32 for hnswlib, which computes them in float32.
    """
    span = feature_span(X)
    if span > FLOAT64_SPAN or 0 < span < 1 / FLOAT64_SPAN:
        shown = f"{span:.3g}" if np.isfinite(span) else "beyond float64"
        raise DataError(f"the features span {shown}: squared distances would "
                        "leave the range of float64; rescale the features "
                        "(vbsw weigh --standardize does)")
    if 1 / FLOAT32_SPAN < span < FLOAT32_SPAN or span == 0 \
            or options.method == "exact":
        return None
    if options.method == "hnsw":
        raise DataError(f"the features span {span:.3g}: hnswlib's float32 "
                        "distances would overflow or vanish; rescale the "
                        "features (--standardize) or use --exact")
    return (f"the features span {span:.3g}, beyond the float32 distances of "
            "hnswlib")


def check_search_options(options: SearchOptions) -> None:
    """Refuse search options no search accepts, naming the option (exit 2)."""
    if options.method not in METHODS:
        raise UsageError(f"--search {options.method}: choose one of "
                         + ", ".join(METHODS))
    if not 0.0 <= options.recall <= 1.0:
        raise UsageError(f"--recall {options.recall}: must lie in [0, 1]")
    if options.M < 2:
        raise UsageError(f"--hnsw-m {options.M}: must be at least 2")
    if options.ef_construction < 1:
        raise UsageError(f"--ef-construction {options.ef_construction}: must be "
                         "at least 1")
    if options.ef is not None and options.ef < 1:
        raise UsageError(f"--ef {options.ef}: must be at least 1")


# ---------------------------------------------------------------------------
# Exact search


def exact_search(X: np.ndarray, n_query: int, options: SearchOptions,
                 progress: Progress, rows: np.ndarray | None = None,
                 prepared: ExactSearch | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact neighbours of ``X[rows]`` (default: every row) among all of X.

    ``prepared``: X ready for blocked searches, shared by several calls.

    Returns
    -------
    indices : ndarray of shape (n_rows, n_query), ``index_dtype(len(X))``.
    distances : ndarray of shape (n_rows, n_query), float64, Euclidean,
        ascending in each row.
    """
    threads = thread_count(options.threads)
    blocked = prepared or ExactSearch(X)
    if blocked.grouped(n_query):  # masses of identical rows: each group once
        found = blocked.by_groups(n_query, rows, lambda distinct, n, wanted:
                                  exact_search(distinct.given, n, options,
                                               progress, wanted, distinct))
        return found[0].astype(index_dtype(len(X)), copy=False), found[1]
    # A sample's few rows go to the tree on one thread: joblib's start would
    # outweigh them (and spoil the time that predicts the whole search).
    tree = _tree(X, n_query, threads if rows is None else 1, blocked,
                 probe=rows is None)
    task = progress.task("exact search", len(X)) if rows is None else None
    queries = X if rows is None else X[rows]
    if tree is not None:
        found = _tree_search(tree, queries, n_query, task)
    else:
        found = blocked.neighbours(n_query, rows=rows, threads=threads,
                                   advance=task.advance if task else None)
    if task:
        task.close()
    return found[0].astype(index_dtype(len(X)), copy=False), found[1]


def _tree_only(X: np.ndarray) -> bool:
    """Whether X has so few dimensions that a k-d tree wins without a probe."""
    return len(X) > TREE_ROWS and X.shape[1] <= TREE_DIMENSIONS


def _probes(X: np.ndarray) -> bool:
    """Whether a whole exact search of X first times a tree against the
    products (which a prediction from a sample leaves out)."""
    return len(X) > TREE_ROWS and \
        TREE_DIMENSIONS < X.shape[1] <= PROBE_DIMENSIONS


def _tree(X, n_query, threads, blocked, probe):
    """scikit-learn's k-d tree fitted on X, where it beats the blocked search.

    ``probe``: in up to PROBE_DIMENSIONS, time both searches on a sample of
    rows (the whole search is worth it); otherwise trust the dimension alone.
    """
    if _tree_only(X):
        return _fitted_tree(X, blocked, threads)
    if not (probe and _probes(X)):
        return None
    tree = _fitted_tree(X, blocked, threads)
    rows = np.linspace(0, len(X) - 1, RECALL_SAMPLE).astype(np.int64)
    started = time.perf_counter()
    blocked.neighbours(n_query, rows=rows, threads=threads)
    per_row = (time.perf_counter() - started) / len(rows) / \
        self_join_speed_up(blocked, n_query)
    # Fewer rows for the tree, on one thread (joblib's start would outweigh
    # them): its time per row has no fixed part, and it is slow where it loses.
    rows = rows[::len(rows) // TREE_PROBE_ROWS]
    started = time.perf_counter()
    tree.set_params(n_jobs=1).kneighbors(X[rows], n_query)
    by_tree = (time.perf_counter() - started) / len(rows) / threads
    return tree.set_params(n_jobs=threads) if by_tree < per_row else None


def _fitted_tree(X, blocked, threads):
    """scikit-learn's k-d tree of X, fitted once for the searches of X."""
    from sklearn.neighbors import NearestNeighbors

    if blocked.tree is None:
        blocked.tree = NearestNeighbors(algorithm="kd_tree").fit(X)
    return blocked.tree.set_params(n_jobs=threads)


def _tree_search(tree, queries, n_query, task):
    """A k-d tree's neighbours of queries by chunks, so that progress moves."""
    indices = np.empty((len(queries), n_query), dtype=np.int64)
    distances = np.empty((len(queries), n_query), dtype=np.float64)
    for start, stop in chunks(len(queries), QUERY_CHUNK):
        distances[start:stop], indices[start:stop] = tree.kneighbors(
            queries[start:stop], n_query)
        if task:
            task.advance(stop - start)
    return indices, distances


# ---------------------------------------------------------------------------
# Approximate search


def _approximate_or_exact(X, n_query, options, progress, include_self=True,
                          copies=None):
    """hnswlib with a measured recall, or the exact search when that is better.

    Recall is that of the neighbourhoods as used: without the point itself
    when ``include_self`` is false.
    """
    prepared = ExactSearch(X, copies)
    sampled = _sampled_reference(X, n_query, options, progress, prepared,
                                 include_self)
    if sampled.reason:
        return _exact_first(X, prepared, n_query, options, progress,
                            sampled.reason, sampled.contrast)
    # The graph needs the prepared operand's memory more, unless it is small;
    # else the rows searched again build it anew (the groups of copies kept).
    kept = prepared if X.size <= KEEP_PREPARED \
        else ExactSearch(X, prepared.copies())
    del prepared
    return _graph_search(X, n_query, options, progress, sampled, kept)


@dataclass
class _Sampled:
    """The exact neighbourhoods of a sample of rows, and what they tell.

    rows : (n_sample,) the sampled rows, ascending.
    reference : (n_sample, n_query) their exact distances.
    include_self : whether neighbourhoods as used hold the point itself.
    contrast : the median relative contrast of the sampled rows.
    predicted_exact : the predicted seconds of the whole exact search.
    reason : (metadata, stderr) why the exact search runs at once; None
        where the graph is tried.
    """

    rows: np.ndarray
    reference: np.ndarray
    include_self: bool
    contrast: float
    predicted_exact: float
    reason: tuple[str, str] | None


def _sampled_reference(X, n_query, options, progress, prepared, include_self
                       ) -> _Sampled:
    """Search a sample of rows exactly, timed, and decide from its contrast
    and the predicted time whether the exact search should run at once."""
    rng = np.random.default_rng(options.seed)
    sample = np.sort(rng.choice(len(X), size=min(options.sample_size, len(X)),
                                replace=False))
    # A first small call pays the thread pool's start (and the probe of the
    # products' dtype), which the timed ones must not count: their time per
    # row predicts the whole exact search.
    prepared.products(n_query, None, thread_count(options.threads))
    fixed = fixed_choice(options)
    exact_search(X, n_query, options, progress, rows=sample[:8],
                 prepared=prepared)

    # A part of the sample tells the hard cases (a contrast near 1) for less;
    # only when it does not is the rest of the sample searched.
    first = np.zeros(len(sample), bool)
    first[::CONTRAST_STRIDE] = True
    reference = np.empty((len(sample), n_query), np.float64)
    seconds = _timed_reference(X, prepared, n_query, options, sample,
                               first, reference)
    ratios = contrast_ratios(X, sample[first], reference[first], rng)
    predicted_exact = estimated_exact(X, options) if fixed else \
        _predicted_exact(X, seconds / first.sum(), options, prepared, n_query)
    reason = _exact_at_once(options, X, ratios, predicted_exact, part=True)
    if reason:
        return _Sampled(sample, reference, include_self,
                        float(np.median(ratios)), predicted_exact, reason)

    seconds += _timed_reference(X, prepared, n_query, options, sample,
                                ~first, reference)
    ratios = contrast_ratios(X, sample, reference, rng)
    if not fixed:
        predicted_exact = _predicted_exact(X, seconds / len(sample), options,
                                           prepared, n_query)
    reason = _exact_at_once(options, X, ratios, predicted_exact, part=False)
    return _Sampled(sample, reference, include_self, float(np.median(ratios)),
                    predicted_exact, reason)


def _graph_search(X, n_query, options, progress, sampled: _Sampled, kept):
    """The graph (a denser one where the first falls short), queried and
    repaired; the exact search instead where it is predicted to be faster
    than reaching the recall. ``kept``: the exact search for the rows
    searched again."""
    predicted_exact = sampled.predicted_exact
    fixed = fixed_choice(options)
    details = {"recall_sample": int(len(sampled.rows)),
               "relative_contrast": sampled.contrast,
               "predicted_exact_s": predicted_exact}
    spent = 0.0
    attempts = _graph_attempts(options)
    for graph in attempts:
        started = time.perf_counter()
        index = build_index(X, graph, progress)
        details.update(M=graph.M, ef_construction=graph.ef_construction,
                       shards=graph_count(index),
                       reproducible=graph.reproducible,
                       build_s=time.perf_counter() - started)
        ceiling = predicted_exact if options.method == "auto" else None
        ef, recall, low, predicted_hnsw = _choose_ef(
            index, X, sampled.rows, sampled.reference, n_query, graph, ceiling,
            sampled.include_self, fixed)
        details.update(ef=ef, sample_recall=recall, sample_recall_low=low,
                       predicted_query_s=predicted_hnsw)
        spent += estimated_graph(X, graph, ef) if fixed else \
            details["build_s"] + predicted_hnsw
        if ceiling is not None and predicted_hnsw > ceiling:
            graph_s, exact_s = seconds_apart(predicted_hnsw, ceiling)
            reason = (f"hnswlib at ef={ef} (recall {floor_text(recall)}, "
                      f"predicted {graph_s} s) is slower than exact search "
                      f"(predicted {exact_s} s)")
            return _exact_instead(X, n_query, options, progress, details,
                                  (SLOWER, reason))
        last = graph is attempts[-1]
        found = None
        if low >= options.recall or options.ef is not None or last:
            # Queried, repaired and measured as used; a miss here is a miss
            # of the graph as much as one of the tuning below.
            found = query_index(index, X, n_query, ef, options, progress)
            del index  # before the repair, which may build a graph of its own
            if found is None:
                reason = (f"hnswlib could not return {n_query} neighbours for "
                          "every row")
                return _exact_instead(X, n_query, options, progress, details,
                                      (reason, reason))
            _repair(X, found, n_query, graph, ef, progress, kept, sampled, details)
            recall, low = details["sample_recall"], details["sample_recall_low"]
            if low >= options.recall or options.ef is not None:
                return _graph_result(found, options, details)
        else:
            del index
        short = _short_text(graph, ef, recall, low, options.recall,
                            queried=found is not None)
        if predicted_exact <= max(HARD_EXACT_SECONDS, EXACT_PATIENCE * spent):
            del found
            return _exact_instead(X, n_query, options, progress, details,
                                  (SHORT, short))
        if not last:
            del found  # free before the denser graph is built
    # Neither graph reached the recall and exact search would take far
    # longer: keep the last graph's answer, and say so.
    details["warning"] = (f"{short}; exact search would take about "
                          f"{predicted_exact:.0f} s (use --exact for it)")
    return (*found, "hnsw", details)


def _repair(X, found, n_query, graph, ef, progress, kept, sampled: _Sampled,
            details):
    """Search again, in place, the rows the graph does not lead back to, and
    those whose results provably miss neighbours; the sample's recall as used
    goes into ``details``."""
    again = _search_again(X, *found, n_query, graph, ef, progress, kept)
    short = _search_short(X, *found, n_query, graph, kept)
    sample = sampled.rows
    recall, low = _recall_as_used(found[0][sample], found[1][sample], sample,
                                  sampled.reference, sampled.include_self)
    details.update(searched_again=again, proven_short=short,
                   sample_recall=recall, sample_recall_low=low)


def provably_short(indices: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Rows whose results provably miss some of their nearest rows, the rows
    with most missed first.

    A row y's n results lie within its last distance D_y of y, so within
    d(x, y) + D_y of any row x: x has at least n rows within the least such
    bound over its results y, and each of its results beyond that bound
    stands in for a nearer row it missed. Default graphs miss none this way
    on the benchmark's clustered rows; a row the graph led into the wrong
    cluster (11 of 19 results there, a trial) misses many.
    """
    last = distances[:, -1].astype(np.float64)
    beyond = np.zeros(len(distances), np.int64)
    for start, stop in chunks(len(distances), OWN_BLOCK):  # a little memory
        far = distances[start:stop].astype(np.float64)
        bound = (far + last[indices[start:stop]]).min(axis=1)
        beyond[start:stop] = (far > bound[:, None] * (1 + SHORT_TOLERANCE)
                              ).sum(axis=1)
    rows = np.flatnonzero(beyond)
    return rows[np.argsort(-beyond[rows], kind="stable")]


def _search_short(X, indices, distances, n_query, graph, prepared) -> int:
    """Search exactly, in place, the rows :func:`provably_short` finds (as many
    as EXACT_AGAIN distances allow, the worst first); how many."""
    rows = provably_short(indices, distances)
    rows = np.sort(rows[:max(int(EXACT_AGAIN // len(X)), n_query)])
    if not len(rows):
        return 0
    found = prepared.neighbours(n_query, rows=rows,
                                threads=thread_count(graph.threads))
    indices[rows], distances[rows] = _nearest_of_both(
        (indices[rows], distances[rows]), found, n_query)
    return int(len(rows))


def _short_text(graph, ef, recall, low, target, queried: bool) -> str:
    """A graph's recall short of the target: after the query (``queried``,
    at its ef) or while tuning (ef up to ``ef``)."""
    at = f", ef={ef}" if queried else ""
    tuned = "" if queried else f" with ef up to {ef}"
    return (f"hnswlib (M={graph.M}, ef_construction={graph.ef_construction}"
            f"{at}) reached recall {floor_text(recall)} (at least "
            f"{floor_text(low)}){tuned}, short of --recall {target}")


def _graph_result(found, options, details):
    """The graph's answer as the search's result, with a warning where a
    fixed --ef left the recall short."""
    low = details["sample_recall_low"]
    if options.ef is not None and low < options.recall:
        details["warning"] = (f"with --ef {options.ef} fixed, the sample recall "
                              f"is {floor_text(details['sample_recall'])} (at "
                              f"least {floor_text(low)}), below --recall "
                              f"{options.recall}")
    return (*found, "hnsw", details)


def _timed_reference(X, prepared, n_query, options, sample, chosen, reference
                     ) -> float:
    """Fill ``reference[chosen]`` with the exact distances of those sampled
    rows; the seconds it took."""
    started = time.perf_counter()
    _, reference[chosen] = exact_search(X, n_query, options,
                                        NullProgress(), rows=sample[chosen],
                                        prepared=prepared)
    return time.perf_counter() - started


def _predicted_exact(X, per_row: float, options: SearchOptions,
                     prepared: ExactSearch, n_query: int) -> float:
    """Seconds the exact search of every row should take, from the time per
    sampled row."""
    if _tree_only(X):  # the sample ran on one thread, the whole on all
        return per_row * len(X) / thread_count(options.threads)
    # The sample was searched by blocked products, which do the whole set
    # faster per row (where a probe then picks a tree, faster still).
    return per_row * len(X) / self_join_speed_up(prepared, n_query)


def fixed_choice(options: SearchOptions) -> bool:
    """Whether the graph is the same on every run, and so must be the choice
    between it and exact search: no measured time may decide."""
    return options.reproducible or thread_count(options.threads) == 1


def estimated_exact(X: np.ndarray, options: SearchOptions) -> float:
    """Seconds of the exact search of every row, from its size alone."""
    pairs = float(len(X)) ** 2 / 2  # a self-join: half
    per_pair = EXACT_PAIR_SECONDS + EXACT_FEATURE_SECONDS * (X.shape[1] + 2)
    return pairs * per_pair / thread_count(options.threads)


def estimated_query(X: np.ndarray, graph: SearchOptions, ef: int,
                    shards: int) -> float:
    """Seconds to query every row of X at ``ef`` in ``shards`` graphs, from
    the sizes alone."""
    work = float(len(X)) * shards * graph.M * ef * (QUERY_OFFSET + X.shape[1])
    return work * QUERY_SECONDS / thread_count(graph.threads)


def estimated_graph(X: np.ndarray, graph: SearchOptions, ef: int) -> float:
    """Seconds to build and query a graph of X, from its size alone."""
    work = float(len(X)) * X.shape[1] * graph.M * (graph.ef_construction + ef)
    return work / (GRAPH_RATE * thread_count(graph.threads))


def self_join_speed_up(prepared: ExactSearch, n_query: int) -> float:
    """How many times less a row of the whole search costs than a sampled
    one: SELF_JOIN_SPEED_UP by tiles, 1 by whole rows."""
    return 1.0 if prepared.by_whole_rows(n_query) else SELF_JOIN_SPEED_UP


def _exact_at_once(options, X, ratios, predicted_exact, part
                   ) -> tuple[str, str] | None:
    """Why the exact search should run without trying a graph, if it should:
    the fixed phrase for the metadata and the text with the figures.

    ``part``: the ratios come from part of the sample, so a low contrast must
    be clear: more rows under HARD_CONTRAST than a fair coin would give by
    three standard deviations.
    """
    if options.method != "auto":
        return None
    if predicted_exact < CHEAP_EXACT_SECONDS and not _probes(X):
        return CHEAPER, (f"exact search predicted {predicted_exact:.2f} s, less "
                         "than a graph would take")
    below = int((ratios < HARD_CONTRAST).sum())
    clear = len(ratios) / 2 + 1.5 * np.sqrt(len(ratios)) if part \
        else len(ratios) / 2
    if below > clear and predicted_exact < HARD_EXACT_SECONDS:
        return LOW_CONTRAST, (f"relative contrast {np.median(ratios):.2f} < "
                              f"{HARD_CONTRAST}: a graph would need a huge ef; "
                              f"exact search predicted {predicted_exact:.1f} s")
    return None


def _exact_first(X, prepared, n_query, options, progress, reason, contrast):
    """The exact search, chosen before any graph was built."""
    indices, distances = exact_search(X, n_query, options, progress,
                                      prepared=prepared)
    why, reason = reason
    return indices, distances, "exact", {"reason": reason, "why": why,
                                         "relative_contrast": contrast}


def _search_again(X, indices, distances, n_query, graph, ef, progress,
                  prepared) -> int:
    """Search again the rows the graph did not lead back to themselves, in
    place; how many there were.

    A graph built on several threads can leave regions that its searches
    seldom enter, whatever ef: their rows miss most of their neighbours,
    which lie in the same region. Those rows are searched exactly among all
    rows where that is cheap (``prepared``: X ready for it), else among
    themselves, and each keeps the nearest of both answers.
    """
    rows = np.flatnonzero(distances[:, 0] > 0)
    if not len(rows):
        return 0
    task = progress.task("searching again", len(rows))
    threads = thread_count(graph.threads)
    if len(rows) * len(X) <= EXACT_AGAIN or len(rows) <= n_query:
        found = prepared.neighbours(n_query, rows=rows, threads=threads)
    else:
        among = np.ascontiguousarray(X[rows], dtype=np.float32)
        index = build_index(among, graph, NullProgress())
        found = query_index(index, among, n_query, max(ef, 2 * n_query), graph,
                            NullProgress())
        if found is None:  # a graph that cannot give k for each: exactly
            found = ExactSearch(among).neighbours(n_query, threads=threads)
        found = rows[found[0]], found[1]
    indices[rows], distances[rows] = _nearest_of_both(
        (indices[rows], distances[rows]), found, n_query)
    task.advance(len(rows))
    task.close()
    return int(len(rows))


def _nearest_of_both(first, second, n_query):
    """The n_query nearest of two answers for the same rows, each row once."""
    indices = np.concatenate([first[0], second[0].astype(first[0].dtype)], axis=1)
    distances = np.concatenate([first[1], second[1].astype(first[1].dtype)],
                               axis=1)
    order = np.argsort(indices, axis=1, kind="stable")
    ordered = np.take_along_axis(indices, order, axis=1)
    repeated = np.zeros(indices.shape, bool)
    np.put_along_axis(repeated, order[:, 1:], ordered[:, 1:] == ordered[:, :-1],
                      axis=1)
    distances[repeated] = np.inf
    order = np.argsort(distances, axis=1, kind="stable")[:, :n_query]
    return (np.take_along_axis(indices, order, axis=1),
            np.take_along_axis(distances, order, axis=1))


def _recall_as_used(indices, distances, owners, reference, include_self
                    ) -> tuple[float, float]:
    """Recall bounds of the results of rows ``owners`` (Euclidean distances)
    once made the neighbourhoods used: the point put first exactly once, or
    left out."""
    _, used = _own_neighbourhood(indices, distances, include_self,
                                 owners=owners)
    return recall_bounds(used, reference)


def _graph_attempts(options: SearchOptions) -> list[SearchOptions]:
    """The graph asked for, then (tuning ef only) one twice as dense."""
    attempts = [options]
    if options.ef is None:
        attempts.append(replace(options, M=options.M * 2,
                                ef_construction=options.ef_construction * 2))
    return attempts


def _exact_instead(X, n_query, options, progress, details, reason):
    """The exact search after a graph was tried; ``reason``: (the fixed
    phrase, the text with the figures)."""
    why, reason = reason
    indices, distances = exact_search(X, n_query, options, progress)
    return indices, distances, "exact", {**details, "reason": reason, "why": why}


def contrast_ratios(X, sample, reference, rng) -> np.ndarray:
    """For each sampled row, its median distance to PARTNERS random rows over
    its distance to its k-th neighbour (inf where that is 0)."""
    partners = rng.integers(len(X), size=(len(sample), PARTNERS))
    rows = X[sample].astype(np.float64)[:, None, :]
    spread = np.median(np.sqrt(((rows - X[partners]) ** 2).sum(-1)), axis=1)
    kth = reference[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(kth > 0, spread / np.where(kth > 0, kth, 1), np.inf)


def build_index(X: np.ndarray, options: SearchOptions, progress: Progress):
    """An hnswlib graph of the rows of X (float32, squared Euclidean); the
    same graph on every run with ``options.reproducible``."""
    return build_graph(X, M=options.M, ef_construction=options.ef_construction,
                       seed=options.seed, threads=thread_count(options.threads),
                       reproducible=options.reproducible, progress=progress)


def _choose_ef(index, X, sample, reference, n_query, options, ceiling=None,
               include_self=True, fixed=False):
    """The smallest ef (growing by a quarter) whose sample recall reaches it,
    with its recall, the recall's lower end and the predicted seconds of the
    whole query.

    The recall is that of the sampled rows the graph leads back to
    themselves: the others are searched again after the query (see
    ``_search_again``), and the recall of the result is measured then.
    Stops early once the predicted time of the whole query passes ``ceiling``
    (the predicted time of the exact search): a larger ef would only cost more.
    The query's time is predicted from the sample's, or, where the choice
    must not depend on a clock (``fixed``), from the sizes.
    """
    threads = thread_count(options.threads)
    ef = options.ef or max(n_query, 16)
    queries = np.ascontiguousarray(X[sample], dtype=np.float32)
    previous = 0.0
    while True:
        index.set_ef(max(ef, n_query))
        started = time.perf_counter()
        found = _knn_query(index, queries, n_query, threads)
        predicted = estimated_query(X, options, max(ef, n_query),
                                    graph_count(index)) if fixed else \
            (time.perf_counter() - started) / len(sample) * len(X)
        recall, low = (0.0, 0.0) if found is None else _sample_recall(
            found, sample, reference, reached_only=True,
            include_self=include_self)
        too_slow = ceiling is not None and predicted > ceiling
        # A sparse graph caps the recall: past 8 k, a step that gains under
        # PLATEAU says a larger ef will not get there.
        stalled = ef >= 8 * n_query and recall - previous < PLATEAU
        if options.ef is not None or low >= options.recall or ef >= EF_LIMIT \
                or too_slow or stalled:
            return max(ef, n_query), recall, low, predicted
        previous = recall
        ef = min(int(ef * EF_GROWTH) + 1, EF_LIMIT)


def _sample_recall(found, sample, reference, reached_only=False,
                   include_self=True) -> tuple[float, float]:
    """Recall bounds of the neighbourhoods as they will be used.

    A point the graph cannot reach does not come back in its own results; the
    neighbourhood used puts it back in front (dropping the farthest result),
    so the sample is scored the same way. ``reached_only``: only the rows
    that came back (or a duplicate, at distance 0) in their own results.
    """
    labels, squared = found
    distances = np.sqrt(np.maximum(squared, 0.0))
    if reached_only and (distances[:, 0] == 0).any():
        reached = distances[:, 0] == 0
        labels, distances = labels[reached], distances[reached]
        sample, reference = sample[reached], reference[reached]
    return _recall_as_used(labels, distances, sample, reference, include_self)


def _knn_query(index, queries, n_query, threads):
    """hnswlib's answer, or None where the graph cannot give n_query results."""
    try:
        return index.knn_query(queries, k=n_query, num_threads=threads)
    except RuntimeError:  # "Cannot return the results in a contiguous 2D array"
        return None


def query_index(index, X, n_query, ef, options, progress):
    """Neighbours of every row from the graph, Euclidean distances.

    Returns None when the graph cannot give n_query results for some row.
    """
    threads = thread_count(options.threads)
    index.set_ef(max(ef, n_query))
    indices = np.empty((len(X), n_query), dtype=index_dtype(len(X)))
    distances = np.empty((len(X), n_query), dtype=np.float32)
    task = progress.task("searching", len(X))
    for start, stop in chunks(len(X), QUERY_CHUNK):
        block = np.ascontiguousarray(X[start:stop], dtype=np.float32)
        found = _knn_query(index, block, n_query, threads)
        if found is None:
            task.close()
            return None
        labels, squared = found
        indices[start:stop] = labels
        distances[start:stop] = np.sqrt(np.maximum(squared, 0.0))
        task.advance(stop - start)
    task.close()
    return indices, distances


# ---------------------------------------------------------------------------
# Neighbourhoods and recall


def index_dtype(n_samples: int):
    """int32 row numbers where they fit: neighbour arrays are the largest."""
    return np.int32 if n_samples < 2**31 else np.int64


def _own_neighbourhood(indices: np.ndarray, distances: np.ndarray,
                       include_self: bool, owners: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Put the point first exactly once (or drop it), never trusting the order.

    Row r holds ``n_query`` results for point ``owners[r]`` (default: r). The
    point's own entry is removed where it came back; where it did not (ties
    among duplicates, a graph miss), the farthest result is removed instead.
    With the point included it is then put back in front at distance 0.
    Works by blocks of rows, so that memory holds little beyond the result.
    """
    n_rows, n_query = indices.shape
    owners = np.arange(n_rows) if owners is None else owners
    width = n_query if include_self else n_query - 1
    first = 1 if include_self else 0
    out_indices = np.empty((n_rows, width), dtype=indices.dtype)
    out_distances = np.empty((n_rows, width), dtype=distances.dtype)
    columns = np.arange(n_query - 1)
    for start, stop in chunks(n_rows, OWN_BLOCK):
        block = indices[start:stop]
        own = block == owners[start:stop, None]
        position = np.where(own.any(axis=1), own.argmax(axis=1), n_query - 1)
        # Columns to keep: every one but `position`, in their order.
        keep = columns + (columns >= position[:, None])
        out_indices[start:stop, first:] = np.take_along_axis(block, keep, axis=1)
        out_distances[start:stop, first:] = np.take_along_axis(
            distances[start:stop], keep, axis=1)
    if include_self:
        out_indices[:, 0] = owners
        out_distances[:, 0] = 0.0
    return out_indices, out_distances


def _hits(found: np.ndarray, reference: np.ndarray) -> np.ndarray:
    radius = reference.max(axis=1, keepdims=True)
    tolerance = 1e-5 * np.maximum(radius, 1e-12)
    return found <= radius + tolerance


def seconds_apart(first: float, second: float) -> tuple[str, str]:
    """Two durations with as many decimals (one to three) as tell them apart."""
    for digits in (1, 2):
        texts = f"{first:.{digits}f}", f"{second:.{digits}f}"
        if texts[0] != texts[1]:
            return texts
    return f"{first:.3f}", f"{second:.3f}"


def floor_text(value: float, digits: int = 3) -> str:
    """A recall rounded down, so that a shortfall never prints as reached."""
    scale = 10 ** digits
    return f"{np.floor(value * scale) / scale:.{digits}f}"


def recall_at_k(found: np.ndarray, reference: np.ndarray) -> float:
    """Share of found neighbours that are true k nearest neighbours.

    Compares distances, not indices, so that ties (duplicates) count as hits:
    a found neighbour is right when it lies no farther than the true k-th one.

    found, reference : ndarrays of shape (n_rows, k) of Euclidean distances.
    """
    return float(_hits(found, reference).mean())


def recall_bounds(found: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """recall@k and its lower end: the mean minus two standard errors over rows."""
    per_row = _hits(found, reference).mean(axis=1)
    spread = per_row.std(ddof=1) / np.sqrt(len(per_row)) if len(per_row) > 1 else 0
    return float(per_row.mean()), float(per_row.mean() - 2 * spread)


def measure_recall(X: np.ndarray, neighbours: Neighbours, n_rows: int, *,
                   include_self: bool, options: SearchOptions | None = None
                   ) -> float:
    """recall@k of ``neighbours`` against the exact search on ``n_rows`` rows."""
    options = options or SearchOptions()
    if n_rows < 1:
        raise UsageError(f"--check-recall {n_rows}: must be at least 1")
    rng = np.random.default_rng(options.seed + 1)
    rows = np.sort(rng.choice(len(X), size=min(n_rows, len(X)), replace=False))
    _, exact = _exact_neighbourhoods(X, neighbours, rows, include_self, options)
    return recall_at_k(neighbours.distances[rows], exact)


def exact_rows(X: np.ndarray, neighbours: Neighbours, rows: np.ndarray, *,
               include_self: bool, options: SearchOptions | None = None) -> None:
    """Replace, in place, the neighbourhoods of ``rows`` by exact ones."""
    neighbours.indices[rows], neighbours.distances[rows] = _exact_neighbourhoods(
        X, neighbours, rows, include_self, options or SearchOptions())


def _exact_neighbourhoods(X, neighbours: Neighbours, rows, include_self: bool,
                          options: SearchOptions):
    """The exact neighbourhoods of ``rows`` as used (k wide, the point first
    or left out), from the exact search ``neighbours`` keeps for X."""
    if neighbours.exact is None or neighbours.exact.given is not X:
        neighbours.exact = ExactSearch(X)
    k = neighbours.indices.shape[1]
    n_query = k if include_self else k + 1
    idx, dist = exact_search(X, n_query, options, NullProgress(), rows=rows,
                             prepared=neighbours.exact)
    return _own_neighbourhood(idx, dist, include_self, owners=rows)


def refined_distances(X: np.ndarray, neighbours: Neighbours) -> np.ndarray:
    """The distances of ``neighbours`` computed again in float64 from X (by
    the exact search's differences), a chunk of rows at a time: a graph's
    are hnswlib's float32 ones, from features rounded to float32 (rows 1e-6
    apart among values near 1: off by a few percent)."""
    indices = neighbours.indices
    refined = np.empty(indices.shape, np.float64)
    k = indices.shape[1]
    for start, stop in chunks(len(indices), QUERY_CHUNK):
        own = np.repeat(np.arange(start, stop), k)
        squared = squared_differences(X, own, indices[start:stop].ravel())
        refined[start:stop] = np.sqrt(squared).reshape(stop - start, k)
    return refined


def duplicate_rows(X: np.ndarray, neighbours: Neighbours, include_self: bool
                   ) -> tuple[int, int]:
    """Rows with an identical row (bit for bit in X) among their neighbours,
    and rows with more identical copies than their neighbourhood holds (which
    copies it holds then goes by row number).

    Only rows with a neighbour at distance 0 are looked at, and their
    neighbours compared with them: a graph's float32 distances also give 0
    to rows 1e-9 apart.
    """
    indices, distances = neighbours.indices, neighbours.distances
    if include_self:  # the point itself is column 0
        indices, distances = indices[:, 1:], distances[:, 1:]
    rows = np.flatnonzero((distances <= 0).any(axis=1))
    if not len(rows):
        return 0, 0
    same = np.zeros(len(rows), bool)
    for start, stop in chunks(len(rows), max(1, REFINE_VALUES // X[0].size
                                             // max(1, indices.shape[1]))):
        at = rows[start:stop]
        same[start:stop] = (X[indices[at]] == X[at, None]).all(axis=2).any(axis=1)
    if X.dtype.kind == "f" and np.signbit(X[X == 0]).any():
        X = X + 0.0  # -0.0 becomes 0.0: rows equal as numbers, one group
    copies = identical_rows(X)
    room = indices.shape[1] + 1  # the point and the others it holds
    crowded = int((copies.sizes[copies.group[rows[same]]] > room).sum())
    return int(same.sum()), crowded


def csr_graph(neighbours: Neighbours, include_self: bool):
    """The neighbour graph as a SciPy CSR matrix of distances, self left out."""
    from scipy.sparse import csr_matrix

    indices = neighbours.indices[:, 1:] if include_self else neighbours.indices
    distances = neighbours.distances[:, 1:] if include_self \
        else neighbours.distances
    n_samples, width = indices.shape
    indptr = np.arange(0, n_samples * width + 1, width)
    return csr_matrix((distances.ravel(), indices.ravel(), indptr),
                      shape=(n_samples, n_samples))
