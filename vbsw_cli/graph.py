"""hnswlib graphs: one shared by every thread, or shards that are the same on every run.

hnswlib builds a graph on several threads by inserting rows concurrently:
which rows a new row links to then depends on the threads' timing, so two runs
on the same input give different neighbours (60,000 x 16 clustered features:
9% of local variances differed). A graph built on one thread is the same on
every run, but one thread builds it slowly.

With ``reproducible``, the rows are dealt into shards (row r to shard r mod
S), each shard's graph is built on one thread, the shards side by side, and a
query searches every shard and keeps the k nearest of their answers. The
graphs, hence the answers, depend only on the rows, the options and the shard
count, which follows the thread count. The price is the query: each row is
searched in every shard, and a shard's search costs about as much as one of a
graph of every row. The whole weigh command on 1,000,000 x 64 clustered
features, two threads: 61.5 s (build 28 s, query 28 s) against 47.5 s with one
shared graph (build 28 s, query 15 s); 200,000 rows: 12.4 s against 9.5 s.
With more threads, fewer shards than threads keep the query's share down
(about the square root of twice the threads), and the build then uses only as
many cores as there are shards.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import numpy as np

from vbsw_cli.progress import Progress, chunks

# Rows handed to hnswlib at a time, so that progress moves and only a chunk of
# rows is copied to float32 at once.
ADD_CHUNK = 20_000


def shard_count(threads: int) -> int:
    """Shards for a search on ``threads`` threads: one per thread up to three
    threads, then about sqrt(2 threads) (4 on 8 threads, 6 on 16), which
    balances a build that shrinks with the shards against a query that grows
    with them."""
    return max(1, min(threads, round(math.sqrt(2 * threads))))


class Shards:
    """Several hnswlib graphs queried as one, with hnswlib's query interface.

    Each graph's labels are the rows' numbers in X, so answers need no
    translation. Ties in distance are broken by shard, then by hnswlib's
    own order: the merged answer is as reproducible as the graphs.
    """

    def __init__(self, indexes: list, sizes: list[int]):
        self.indexes, self.sizes = indexes, sizes

    def set_ef(self, ef: int) -> None:
        for index in self.indexes:
            index.set_ef(ef)

    def knn_query(self, queries: np.ndarray, k: int, num_threads: int = -1
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(labels, squared distances) of the k nearest rows over every shard.

        Raises RuntimeError, as hnswlib does, when a shard cannot give its
        share (a shard smaller than k gives all its rows).
        """
        answers = [index.knn_query(queries, k=min(k, size), num_threads=num_threads)
                   for index, size in zip(self.indexes, self.sizes)]
        labels = np.concatenate([found for found, _ in answers], axis=1)
        squared = np.concatenate([values for _, values in answers], axis=1)
        if labels.shape[1] < k:
            raise RuntimeError(f"the shards hold fewer than {k} rows")
        order = np.argsort(squared, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(labels, order, axis=1),
                np.take_along_axis(squared, order, axis=1))


def graph_count(index) -> int:
    """How many graphs ``index`` (from :func:`build_graph`) searches."""
    return len(index.indexes) if isinstance(index, Shards) else 1


def build_graph(X: np.ndarray, *, M: int, ef_construction: int, seed: int,
                threads: int, reproducible: bool, progress: Progress):
    """A graph of the rows of X (squared Euclidean) with hnswlib's interface.

    ``reproducible``: shards built on one thread each (see the module's text);
    else one graph built on every thread at once, faster on many cores but
    different from run to run.
    """
    shards = shard_count(threads) if reproducible else 1
    shards = min(shards, len(X))
    parts = [np.arange(s, len(X), shards) for s in range(shards)]
    task = progress.task("building index", len(X))
    lock, stop = threading.Lock(), threading.Event()

    def advance(count: int) -> None:
        with lock:
            task.advance(count)

    def build(rows: np.ndarray, on_threads: int):
        index = _empty_index(X.shape[1], len(rows), M, ef_construction, seed)
        for start, end in chunks(len(rows), ADD_CHUNK):
            if stop.is_set():  # another shard failed or the run was stopped
                return None
            part = rows[start:end]
            # Every row in order (one graph): a slice, no copy of float32 rows.
            taken = X[start:end] if len(rows) == len(X) else X[part]
            block = np.ascontiguousarray(taken, dtype=np.float32)
            index.add_items(block, part, num_threads=on_threads)
            advance(len(part))
        return index

    try:
        if shards == 1:
            indexes = [build(parts[0], threads if not reproducible else 1)]
        else:
            with ThreadPoolExecutor(shards, thread_name_prefix="vbsw-graph") as pool:
                futures = [pool.submit(build, rows, 1) for rows in parts]
                indexes = _results(futures, stop)
    finally:
        task.close()
    return indexes[0] if shards == 1 else Shards(indexes, [len(p) for p in parts])


def _results(futures: list, stop: threading.Event) -> list:
    """The futures' results; at the first error (or an interrupt), the other
    shards are told to stop after their current chunk, and the error raised."""
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f.exception() for f in futures if f.done() and f.exception()]
        if failed:
            raise failed[0]
        return [future.result() for future in futures]
    except BaseException:
        stop.set()
        raise


def _empty_index(dim: int, rows: int, M: int, ef_construction: int, seed: int):
    import hnswlib

    index = hnswlib.Index(space="l2", dim=dim)
    index.init_index(max_elements=rows, M=M, ef_construction=ef_construction,
                     random_seed=seed)
    return index
