"""Rows that are exact copies of each other, searched once per group.

Masses of identical rows (repeated records, saturated pixels, one-hot
tables) make any exact search slow: every copy is a tie at distance 0 for
every other copy. Searching the distinct rows only, then giving each row the
rows of its nearest groups, costs one hash per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vbsw_cli.progress import chunks

# Identical rows are searched once per group where a group holds more than
# COPIES x n_query rows: each copy is a tie of every other, which a search
# must keep or tell apart (the tiles keep them all as candidates, a graph's
# build slows down).
COPIES = 4

# Rows expanded at a time, and the bytes of the uint64 words hashed (or of
# the rows compared) at a time.
HASH_ROWS = 16_384
HASH_BYTES = 16 << 20


@dataclass
class Copies:
    """Groups of bit-for-bit identical rows.

    first : (n_groups,) the first row of each group, ascending: the
        distinct rows.
    group : (n_rows,) the group of each row.
    members : (n_rows,) the rows, group after group, ascending in each.
    start : (n_groups + 1,) where each group's rows begin in ``members``.
    """

    first: np.ndarray
    group: np.ndarray
    members: np.ndarray
    start: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.start)

    def massed(self, n_query: int) -> bool:
        """Whether a search for n_query neighbours should go by groups."""
        return self.sizes.max(initial=0) > max(1, COPIES * n_query)

    def expand(self, groups: np.ndarray, distances: np.ndarray, n_query: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Rows from the nearest groups of some rows.

        ``groups`` (n, m) and ``distances`` (n, m): each row's m nearest
        groups, ascending. Returns each row's n_query nearest rows: the rows
        of its groups in that order, ascending within a group. The m groups
        must hold n_query rows or more.
        """
        indices = np.empty((len(groups), n_query), np.int64)
        near = np.empty((len(groups), n_query), distances.dtype)
        place = np.arange(n_query)
        for lo, hi in chunks(len(groups), HASH_ROWS):
            taken = np.minimum(self.sizes[groups[lo:hi]], n_query)
            end = np.cumsum(taken, axis=1)
            # The group that gives each place: the first whose rows end past it.
            which = (end[:, None, :] <= place[None, :, None]).sum(axis=2)
            offset = place - np.take_along_axis(end - taken, which, axis=1)
            chosen = np.take_along_axis(groups[lo:hi], which, axis=1)
            indices[lo:hi] = self.members[self.start[chosen] + offset]
            near[lo:hi] = np.take_along_axis(distances[lo:hi], which, axis=1)
        return indices, near


def identical_rows(X: np.ndarray) -> Copies:
    """The groups of identical rows of X (each row alone where it has none)."""
    if not len(X):
        return alone(0)
    hashes = row_hashes(X)
    ordered = np.sort(hashes)
    if not (ordered[1:] == ordered[:-1]).any():  # no two rows alike
        return alone(len(X))
    _, first, inverse, sizes = np.unique(hashes, return_index=True,
                                         return_inverse=True, return_counts=True)
    # Groups numbered by their first row, so that the distinct rows keep the
    # order of X.
    rank = np.empty(len(first), np.int64)
    order = np.argsort(first, kind="stable")
    rank[order] = np.arange(len(first))
    group = rank[inverse.reshape(-1)]
    members = np.argsort(group, kind="stable")
    start = np.concatenate([[0], np.cumsum(sizes[order])])
    copies = Copies(first[order], group, members, start)
    if not _same_as_first(X, copies):  # two rows with one hash: a collision
        return alone(len(X))
    return copies


def alone(n: int) -> Copies:
    """n rows, each in a group of its own."""
    return Copies(np.arange(n), np.arange(n), np.arange(n), np.arange(n + 1))


def row_hashes(X: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's bytes: equal for identical rows."""
    raw = np.ascontiguousarray(X[:1]).view(np.uint8).reshape(1, -1)
    word = np.uint32 if raw.shape[1] % 4 == 0 else np.uint8
    width = raw.shape[1] // np.dtype(word).itemsize
    multipliers = np.random.default_rng(0).integers(
        1, 2**63, size=width, dtype=np.uint64) | np.uint64(1)
    hashes = np.empty(len(X), np.uint64)
    for lo, hi in chunks(len(X), max(1, HASH_BYTES // (8 * width))):
        words = np.ascontiguousarray(X[lo:hi]).view(np.uint8).view(word)
        hashes[lo:hi] = words.reshape(hi - lo, width).astype(np.uint64) @ multipliers
    return hashes


def _same_as_first(X: np.ndarray, copies: Copies) -> bool:
    """Whether every row is identical, bit for bit, to its group's first."""
    first = copies.first[copies.group]
    row_bytes = max(1, X[:1].nbytes)  # a count of rows would grow with d
    for lo, hi in chunks(len(X), max(1, HASH_BYTES // row_bytes)):
        rows = np.ascontiguousarray(X[lo:hi]).view(np.uint8)
        theirs = np.ascontiguousarray(X[first[lo:hi]]).view(np.uint8)
        if not np.array_equal(rows, theirs):
            return False
    return True
