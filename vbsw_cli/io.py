"""Reading and writing the files every command shares.

Conventions (see DESIGN.md):

* inputs are Parquet (``.parquet``) or NumPy (``.npy``); ``-`` reads stdin, and the
  format is then recognised from the first bytes;
* features are one list column (fixed-size, variable-length or object lists of
  equal width) or several numeric columns;
* labels are one or more columns, kept as they were in every output;
* outputs are written atomically (a temporary file beside the target, then a
  rename) and carry their provenance in the Parquet key-value metadata; the
  null device (``-o /dev/null``, to time a run) is written directly.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import io
import json
import os
import stat
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vbsw_cli import __version__
from vbsw_cli.errors import DataError, UsageError
from vbsw_cli.stopping import check_stop

STDIO = "-"
PARQUET_MAGIC = b"PAR1"
NPY_MAGIC = b"\x93NUMPY"
PROVENANCE_KEY = b"vbsw"
HISTORY_KEY = b"vbsw.history"
DEFAULT_FEATURES = "features"
READ_BUFFER = 16 << 20
READ_BATCH = 65_536
WRITE_ROW_GROUP = 131_072
DEFAULT_LABEL = "label"
ID_COLUMN = "id"
TASKS = ("auto", "classification", "regression")


# ---------------------------------------------------------------------------
# Reading


def describe(path: str | os.PathLike) -> str:
    """Name a path the way messages show it (stdin for ``-``)."""
    return "stdin" if str(path) == STDIO else str(path)


def read_table(path: str | os.PathLike, *, columns: Sequence[str] | None = None,
               text: bool = False) -> pa.Table:
    """Read a Parquet or ``.npy`` file (or stdin) into an Arrow table.

    A ``.npy`` array becomes one column named ``features``: a fixed-size list
    for a 2-D array (higher dimensions flattened per row), numbers for 1-D.
    With ``text`` (a labels file), a 1-D array of text (unicode or bytes)
    becomes a string column, as string labels are in Parquet, and an array
    of one value per row, shape (N, 1), is read as the 1-D array it stands
    for (so integers there are classes, as in a 1-D array).
    """
    path = str(path)
    if path == STDIO:
        data = sys.stdin.buffer.read()
        return _read_bytes(data, "stdin", columns, text)

    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, expected a .parquet or .npy file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")

    # The first bytes decide, as on stdin and in embed, whatever the name
    # says; the name only says which reader reports a damaged file.
    kind = data_kind(path)
    suffix = Path(path).suffix.lower()
    if kind == "npy" or (suffix == ".npy" and kind is None):
        return _npy_table(_load_npy(path, path), path, text)
    if kind == "parquet" or suffix in (".parquet", ".pq"):
        return _read_parquet(path, path, columns)
    raise DataError(f"{path}: unknown file type; expected .parquet or .npy")


def data_kind(path: str | os.PathLike) -> str | None:
    """``"npy"`` or ``"parquet"`` from a file's first bytes, else None."""
    with open(path, "rb") as handle:
        head = handle.read(len(NPY_MAGIC))
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    return None


def _read_bytes(data: bytes, name: str, columns, text: bool) -> pa.Table:
    if not data:
        raise DataError(f"{name}: no data on standard input")
    if data.startswith(NPY_MAGIC):
        return _npy_table(_load_npy(io.BytesIO(data), name), name, text)
    if data.startswith(PARQUET_MAGIC):
        return _read_parquet(pa.BufferReader(data), name, columns)
    raise DataError(f"{name}: neither Parquet nor .npy data on standard input")


def _read_parquet(source, name: str, columns) -> pa.Table:
    """Read Parquet batch by batch through a small buffer.

    Reading a large column chunk whole holds its compressed and decoded forms
    at once (about four times the data); a buffered stream of batches holds
    little more than the table itself.
    """
    try:
        handle = pq.ParquetFile(source, buffer_size=READ_BUFFER, pre_buffer=False)
        schema = handle.schema_arrow
        refuse_duplicate_columns(schema, name)
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns],
                               metadata=schema.metadata)
        batches = list(handle.iter_batches(batch_size=READ_BATCH, columns=columns))
    except (pa.ArrowInvalid, pa.ArrowException, OSError, KeyError) as error:
        raise DataError(f"{name}: not a readable Parquet file ({_short(error)})")
    return pa.Table.from_batches(batches, schema=schema)


def refuse_duplicate_columns(schema: pa.Schema, name: str) -> None:
    """Refuse a file whose columns are not named uniquely: a name would not
    say which of them is meant."""
    names = schema.names
    twice = next((c for i, c in enumerate(names) if c in names[:i]), None)
    if twice is not None:
        raise DataError(f"{describe(name)}: column '{twice}' appears "
                        f"{names.count(twice)} times; column names must be "
                        "unique")


def _load_npy(source, name: str) -> np.ndarray:
    try:
        array = np.load(source, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"{name}: not a readable .npy file ({_short(error)})")
    if not isinstance(array, np.ndarray):
        raise DataError(f"{name}: expected one array, found an archive")
    return array


def read_array(path: str | os.PathLike) -> np.ndarray:
    """Read a ``.npy`` file (or stdin holding one) as an array."""
    path = str(path)
    if path == STDIO:
        return _load_npy(io.BytesIO(sys.stdin.buffer.read()), "stdin")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    return _load_npy(path, path)


def _npy_table(array: np.ndarray, name: str = ".npy", text: bool = False
               ) -> pa.Table:
    if array.dtype.names is not None:
        raise DataError(f"{name}: structured arrays are not supported; use "
                        "Parquet")
    if array.ndim == 0:
        raise DataError(f"{name}: holds a single value (a 0-dimensional array); "
                        "expected one row per sample")
    if text and array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]  # one label per row
    if text and array.dtype.kind in "US":
        return pa.table({DEFAULT_FEATURES: _text_column(array, name)})
    if array.dtype.kind not in "biuf":
        raise DataError(f"{name}: holds {array.dtype} values; expected numbers "
                        "(integers or floats)")
    if array.ndim == 1:
        return pa.table({DEFAULT_FEATURES: array})
    width = int(np.prod(array.shape[1:]))
    if width == 0:
        raise DataError(f"{name}: the array of shape {array.shape} has no values "
                        "per row (width 0)")
    flat = np.ascontiguousarray(array.reshape(len(array), width))
    return pa.table({DEFAULT_FEATURES: fixed_size_list(flat)})


def _text_column(array: np.ndarray, name: str) -> pa.Array:
    """A 1-D array of text (unicode, or bytes read as UTF-8) as strings."""
    if array.ndim != 1:
        raise DataError(f"{name}: an array of text of shape {array.shape}; "
                        "text labels need one value per row (a 1-D array)")
    if array.dtype.kind == "S":
        try:
            array = np.char.decode(array, "utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{name}: holds bytes that are not UTF-8 text "
                            f"({error.reason} at byte {error.start})")
    return pa.array(array, type=pa.string())


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ---------------------------------------------------------------------------
# Columns


def require_rows(table: pa.Table, name: str) -> None:
    """Refuse a table without rows."""
    if table.num_rows == 0:
        raise DataError(f"{describe(name)}: the file has no rows")


def column_or_error(table: pa.Table, column: str, name: str, role: str
                    ) -> pa.ChunkedArray:
    """Return a column, or raise naming it, the file, and the close matches."""
    if column in table.column_names:
        return table.column(column)
    raise DataError(missing_column_message(table, column, name, role))


def missing_column_message(table: pa.Table, column: str, name: str, role: str
                           ) -> str:
    names = table.column_names
    close = difflib.get_close_matches(column, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return (f"{describe(name)}: no {role} column '{column}'{hint} "
            f"(columns: {shown})")


def expand_columns(table: pa.Table, patterns: Sequence[str], name: str,
                   role: str, skip: Sequence[str] = ()) -> list[str]:
    """Resolve column names and shell-style patterns (``pixel_*``) in order.

    Patterns never match the columns in ``skip``. A column's exact name wins
    over reading it as a pattern (a column may be called ``[a]``).
    """
    chosen: list[str] = []
    for pattern in patterns:
        if pattern not in table.column_names and any(ch in pattern for ch in "*?["):
            found = [c for c in table.column_names
                     if fnmatch.fnmatchcase(c, pattern)]
            matches = [c for c in found if c not in skip]
            if found and not matches:
                raise UsageError(f"{describe(name)}: '{pattern}' matches only "
                                 f"{', '.join(found)}, which has another role "
                                 f"(label, id or weight), not {role}")
            if not matches:
                raise DataError(f"{describe(name)}: no {role} column matches "
                                f"'{pattern}'")
        else:
            column_or_error(table, pattern, name, role)
            matches = [pattern]
        chosen.extend(c for c in matches if c not in chosen)
    return chosen


def split_names(text: str | None, option: str | None = None) -> list[str]:
    """Split a comma-separated option value into names.

    With ``option``, an empty value (``--label ''``) is a usage error.
    """
    if text is None:
        return []
    names = [part.strip() for part in text.split(",") if part.strip()]
    if option and not names:
        raise UsageError(f"{option} '{text}': give at least one column name")
    twice = [name for i, name in enumerate(names) if name in names[:i]]
    if option and twice:
        raise UsageError(f"{option} {text}: column '{twice[0]}' is named twice")
    return names


def feature_matrix(table: pa.Table, name: str, *, column: str | None = None,
                   columns: Sequence[str] = (), exclude: Sequence[str] = (),
                   role: str = "feature") -> tuple[np.ndarray, list[str]]:
    """Features as a 2-D float array, with the columns they came from.

    Parameters
    ----------
    table : the input table.
    name : the file name used in messages.
    column : one list column (default ``features``).
    columns : several numeric columns (names or patterns); wins over ``column``.
    exclude : columns that cannot be features (the labels, ``id``): patterns
        skip them, and naming one is an error.
    role : what the columns are called in messages ("input" in tbs-sample).

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), float32 or float64.
    used : the source column names.
    """
    if columns:
        used = expand_columns(table, columns, name, role, skip=exclude)
        _refuse_overlap(used, exclude, name)
        X = np.column_stack(_numeric_columns(table, used, name, role))
    else:
        column = column or DEFAULT_FEATURES
        _refuse_overlap([column], exclude, name)
        if column not in table.column_names:
            message = missing_column_message(table, column, name, role)
            raise DataError(message + "; name numeric columns with "
                            "--feature-columns")
        used = [column]
        X = list_column_matrix(table.column(column), name, column)

    X = _as_float(X)
    check_finite(X, name, used if columns else column, role)
    return X, used


def _refuse_overlap(features: Sequence[str], exclude: Sequence[str], name: str
                    ) -> None:
    both = [c for c in features if c in exclude]
    if both:
        raise UsageError(f"{describe(name)}: column '{both[0]}' cannot be both a "
                         "feature and a label (or the id, or the weight)")


def list_column_matrix(chunked: pa.ChunkedArray, name: str, column: str, *,
                       first_row: int = 0, expected: tuple[int, int] | None = None
                       ) -> np.ndarray:
    """A list column whose rows all have the same width as a 2-D array.

    Each chunk is viewed in place; only several chunks are copied, once, into
    one array. For a batch of a file, ``first_row`` is the file's number of its
    first row and ``expected`` the ``(width, row)`` of an earlier batch, so
    errors name rows as the file numbers them.
    """
    kind = chunked.type
    if isinstance(kind, pa.ExtensionType):
        kind = kind.storage_type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return _numeric_column(chunked, name, column, first_row)[:, None]
    if not _is_list(kind):
        raise DataError(f"{describe(name)}: column '{column}' holds {kind}, "
                        "expected a list of numbers per row")
    if chunked.null_count:
        first = first_row + _first_null(chunked)
        raise DataError(f"{describe(name)}: column '{column}' has "
                        f"{counted(chunked.null_count, 'empty (null) row')} "
                        f"(first: row {first})")
    _refuse_missing_inside(chunked, name, column, first_row)

    blocks, offset = [], first_row
    for chunk in chunked.chunks:
        if len(chunk):
            blocks.append(_chunk_matrix(chunk, name, column, offset, expected))
            expected = expected or (blocks[-1].shape[1], offset)
        offset += len(chunk)
    if not blocks:
        return np.empty((0, 0))
    if len(blocks) == 1:
        return blocks[0]
    out = np.empty((offset - first_row, expected[0]),
                   dtype=np.result_type(*blocks))
    for start, block in zip(np.cumsum([0] + [len(b) for b in blocks]), blocks):
        out[start:start + len(block)] = block
    return out


def _chunk_matrix(array: pa.Array, name: str, column: str, offset: int,
                  expected: tuple[int, int] | None) -> np.ndarray:
    """One chunk of a list column as a 2-D array (a view where possible).

    ``offset``: the row number of its first row; ``expected``: the ``(width,
    row)`` every row must match (default: its own first row's).
    """
    if isinstance(array.type, pa.ExtensionType):
        array = array.storage
    while isinstance(array.type.value_type, pa.ExtensionType):
        array = array.cast(pa.list_(array.type.value_type.storage_type))
    if _is_list(array.type.value_type):
        # Nested lists (images as rows of rows): flatten them row by row.
        array = _flatten_nested(array)

    lengths = to_numpy(pc.list_value_length(array))
    width, where = expected or (int(lengths[0]), offset)
    if (lengths != width).any():
        bad = int(np.argmax(lengths != width))
        _different_widths(name, column, (width, where),
                          (int(lengths[bad]), offset + bad))
    if width == 0:
        raise DataError(f"{describe(name)}: column '{column}' has no values per "
                        "row (width 0)")
    values = pc.list_flatten(array)
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
            or pa.types.is_boolean(values.type)):
        raise DataError(f"{describe(name)}: column '{column}' holds lists of "
                        f"{values.type}, expected numbers")
    return to_numpy(values).reshape(len(array), width)


def _refuse_missing_inside(chunked: pa.ChunkedArray, name: str, column: str,
                           first_row: int) -> None:
    """Refuse nulls inside the rows' lists (numbers or, nested, inner lists),
    naming the first one's row."""
    counts = [sum(level.null_count for level in _list_levels(chunk)[1:])
              for chunk in chunked.chunks]
    missing = sum(counts)
    if not missing:
        return
    at = next(i for i, count in enumerate(counts) if count)
    row = first_row + sum(len(chunk) for chunk in chunked.chunks[:at])
    row += _first_missing_row(chunked.chunk(at))
    raise DataError(f"{describe(name)}: column '{column}' has "
                    f"{counted(missing, 'missing value')} inside its lists "
                    f"(first: row {row})")


def _list_levels(array: pa.Array) -> list[pa.Array]:
    """A list array, its flattened values, theirs, ... down to the numbers."""
    levels = [array]
    while True:
        if isinstance(levels[-1].type, pa.ExtensionType):
            levels[-1] = levels[-1].storage
        if not _is_list(levels[-1].type):
            return levels
        levels.append(levels[-1].flatten())


def _first_missing_row(array: pa.Array) -> int:
    """The row, counted from the array's start, of its first null inside."""
    levels = _list_levels(array)
    rows = []
    for depth, level in enumerate(levels[1:], start=1):
        if level.null_count:
            index = pc.index(level.is_null(), True).as_py()
            for outer in reversed(levels[:depth]):
                index = pc.list_parent_indices(outer)[index].as_py()
            rows.append(index)
    return min(rows)


def _different_widths(name, column, first, other):
    """``first`` and ``other``: ``(width, row)`` of two rows that differ."""
    raise DataError(f"{describe(name)}: column '{column}' has rows of different "
                    f"widths ({first[0]} in row {first[1]}, {other[0]} in row "
                    f"{other[1]}); every row needs the same width")


def _flatten_nested(array: pa.Array) -> pa.Array:
    """Turn a list of lists (of lists...) into one flat list per row."""
    row_starts = np.arange(len(array) + 1)
    current = array
    while _is_list(current.type):
        lengths = to_numpy(pc.list_value_length(current))
        element_starts = np.concatenate([[0], np.cumsum(lengths)])
        row_starts = element_starts[row_starts]
        current = pc.list_flatten(current)
    offsets = from_numpy(row_starts.astype(np.int64))
    return pa.LargeListArray.from_arrays(offsets, current)


def _is_list(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind))


def _numeric_column(chunked: pa.ChunkedArray, name: str, column: str,
                    first_row: int = 0) -> np.ndarray:
    _require_numbers(chunked, name, column)
    refuse_nulls(chunked, name, f"column '{column}'", first_row)
    return to_numpy(chunked)


def _numeric_columns(table: pa.Table, columns: Sequence[str], name: str,
                     role: str = "feature") -> list[np.ndarray]:
    """Several numeric columns as arrays; missing values are named by the
    first row that has one in any of them."""
    chunked = [table.column(c) for c in columns]
    for values, column in zip(chunked, columns):
        _require_numbers(values, name, column, role)
    missing = [(_first_null(values), at) for at, values in enumerate(chunked)
               if values.null_count]
    if missing:
        at = min(missing)[1]
        refuse_nulls(chunked[at], name, f"{role} column '{columns[at]}'",
                     others=len(missing) - 1)
    return [to_numpy(values) for values in chunked]


def _require_numbers(chunked: pa.ChunkedArray, name: str, column: str,
                     role: str = "feature") -> None:
    kind = chunked.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
            or pa.types.is_boolean(kind)):
        raise DataError(f"{describe(name)}: {role} column '{column}' holds "
                        f"{kind}, expected numbers")


def counted(count: int, noun: str) -> str:
    """``1 row``, ``2,500 rows``: a count with its noun in the right number."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def refuse_nulls(chunked: pa.ChunkedArray, name: str, what: str,
                 first_row: int = 0, others: int = 0) -> None:
    """Refuse a column with missing values, naming the first one's row.

    ``others``: how many other columns have some too (said after it).
    """
    if not chunked.null_count:
        return
    first = first_row + _first_null(chunked)
    raise DataError(f"{describe(name)}: {what} has "
                    f"{counted(chunked.null_count, 'missing value')} "
                    f"(first: row {first}){_also(others)}")


def _first_null(chunked: pa.ChunkedArray) -> int:
    """The row of a column's first missing value (it has one)."""
    return pc.index(chunked.is_null(), True).as_py()


def _also(others: int) -> str:
    """``; also in 2 other columns``, or nothing for none."""
    return f"; also in {counted(others, 'other column')}" if others else ""


def _as_float(X: np.ndarray) -> np.ndarray:
    if X.dtype in (np.float32, np.float64):
        return np.ascontiguousarray(X)
    return np.ascontiguousarray(X, dtype=np.float64)


def check_finite(X: np.ndarray, name: str, column: str | Sequence[str],
                 role: str) -> None:
    """Refuse NaN or infinite values, naming the first bad row.

    ``column`` is the name of the column ``X`` came from, or one name per
    column of ``X`` (several numeric columns): the message then names the
    column of the first bad value, and counts the other bad columns.
    """
    finite = np.isfinite(X)
    if finite.all():
        return
    bad, also = ~finite.reshape(len(X), -1), ""
    if not isinstance(column, str):
        column, bad, also = _first_bad_column(bad, column)
    rows = bad.any(axis=1)
    raise DataError(f"{describe(name)}: {role} column '{column}' has NaN or "
                    f"infinite values in {counted(int(rows.sum()), 'row')} "
                    f"(first: row {int(np.argmax(rows))}){also}")


def _first_bad_column(bad: np.ndarray, columns: Sequence[str]):
    """The name and the bad values of the column of the first bad value
    (row by row), and a note of how many other columns have some."""
    at = int(np.argmax(bad[int(np.argmax(bad.any(axis=1)))]))
    others = int(bad.any(axis=0).sum()) - 1
    return columns[at], bad[:, at:at + 1], _also(others)


# ---------------------------------------------------------------------------
# Labels


@dataclass
class Labels:
    """Label columns turned into arrays the computations can use.

    ``kind`` is ``"classification"`` (``values`` are integer class codes and
    ``classes`` the original values) or ``"regression"`` (``values`` a float array
    of shape (n_samples, n_outputs)).
    """

    column: str
    kind: str
    values: np.ndarray
    classes: list | None = None


def read_labels(table: pa.Table, name: str, columns: Sequence[str], *,
                task: str = "auto") -> list[Labels]:
    """Label columns as :class:`Labels`, classified by their type.

    Floats are regression targets; integers, booleans, strings and categoricals
    are classes. ``task`` forces one reading for every column.
    """
    used = expand_columns(table, columns, name, "label")
    return [_one_label(table.column(c), name, c, task) for c in used]


def _one_label(chunked: pa.ChunkedArray, name: str, column: str, task: str
               ) -> Labels:
    refuse_nulls(chunked, name, f"label column '{column}'")
    kind = chunked.type
    if pa.types.is_dictionary(kind):
        chunked = chunked.cast(kind.value_type)
        kind = chunked.type
    is_float = pa.types.is_floating(kind)
    is_listy = pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind)
    is_class = (pa.types.is_integer(kind) or pa.types.is_boolean(kind)
                or pa.types.is_string(kind) or pa.types.is_large_string(kind))

    if is_listy:
        if task == "classification":
            raise DataError(f"{describe(name)}: label column '{column}' holds "
                            "vectors, which cannot be classes")
        Y = _as_float(list_column_matrix(chunked, name, column))
        check_finite(Y, name, column, "label")
        return Labels(column, "regression", Y)
    if not (is_float or is_class):
        raise DataError(f"{describe(name)}: label column '{column}' holds "
                        f"{kind}; expected numbers, strings or categories")

    regression = task == "regression" or (task == "auto" and is_float)
    if regression:
        if not (is_float or pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
            raise DataError(f"{describe(name)}: label column '{column}' holds "
                            f"{kind}, which cannot be a regression target")
        Y = to_numpy(chunked).astype(np.float64)[:, None]
        check_finite(Y, name, column, "label")
        return Labels(column, "regression", Y)

    raw = to_numpy(chunked)
    if is_float:
        check_finite(raw.astype(np.float64), name, column, "label")
    classes, codes = np.unique(raw, return_inverse=True)
    return Labels(column, "classification", codes.astype(np.int64),
                  classes.tolist())


# ---------------------------------------------------------------------------
# Writing


def fixed_size_list(X: np.ndarray) -> pa.FixedSizeListArray:
    """A 2-D array as a fixed-size list column, without copying."""
    X = np.ascontiguousarray(X)
    return pa.FixedSizeListArray.from_arrays(from_numpy(X.reshape(-1)), X.shape[1])


# ---------------------------------------------------------------------------
# numpy <-> Arrow for plain numbers
#
# pyarrow's own conversions (pa.array, Array.to_numpy) import pandas on their
# first call, to check for pandas types: 0.2-0.4 s of every run. Numbers
# without missing values share one memory layout, so they are converted here
# by their buffers; anything else goes through pyarrow.


def _plain_numbers(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def from_numpy(values: np.ndarray) -> pa.Array:
    """A 1-D numpy array as an Arrow array (no copy for plain numbers)."""
    if values.ndim != 1 or values.dtype.kind not in "iuf":
        return pa.array(values)
    values = np.ascontiguousarray(values)
    kind = pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


def to_numpy(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow array (or chunked array) as numpy (a view for plain numbers)."""
    if isinstance(array, pa.ChunkedArray):
        if array.num_chunks == 1:
            return to_numpy(array.chunk(0))
        if not _plain_numbers(array.type) or array.null_count:
            return array.to_numpy()
        return np.concatenate([to_numpy(c) for c in array.chunks]) \
            if array.num_chunks else np.empty(0, array.type.to_pandas_dtype())
    if not _plain_numbers(array.type) or array.null_count:
        return array.to_numpy(zero_copy_only=False)
    dtype = np.dtype(array.type.to_pandas_dtype())
    if len(array) == 0:
        return np.empty(0, dtype=dtype)
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array),
                         offset=array.offset * dtype.itemsize)


def provenance(command: str, parameters: dict) -> dict:
    """The record of how an output was made."""
    return {"command": command, "version": __version__,
            "parameters": _jsonable(parameters)}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    return value


def with_provenance(table: pa.Table, record: dict,
                    upstream: dict[bytes, bytes] | None = None, *,
                    same_rows: Sequence[str] = ()) -> pa.Table:
    """Attach this step's record, keeping earlier steps' records as history.

    ``upstream`` is the metadata of the input file; its own vbsw record moves
    into ``vbsw.history``. pandas metadata is dropped (the columns changed),
    unless the table holds the input's rows in their order (``same_rows``:
    the columns this step wrote): then it is kept for the input's other
    columns, so that pandas finds the input's index again.
    """
    metadata = {**(table.schema.metadata or {}), **(upstream or {})}
    described = metadata.pop(b"pandas", None)
    if same_rows and described:
        metadata.update(_pandas_for(described, table, same_rows))
    history = json.loads(metadata.get(HISTORY_KEY, b"[]"))
    if PROVENANCE_KEY in metadata:
        history.append(json.loads(metadata[PROVENANCE_KEY]))
    metadata[HISTORY_KEY] = json.dumps(history).encode()
    metadata[PROVENANCE_KEY] = json.dumps(record, sort_keys=True).encode()
    return table.replace_schema_metadata(metadata)


def _pandas_for(described: bytes, table: pa.Table, written: Sequence[str]
                ) -> dict[bytes, bytes]:
    """pandas metadata of the input, less the columns gone or written anew;
    none where an index column is gone."""
    pandas = json.loads(described)
    kept = set(table.column_names) - set(written)
    index = [c for c in pandas.get("index_columns", []) if isinstance(c, str)]
    if not set(index) <= kept:
        return {}
    pandas["columns"] = [c for c in pandas.get("columns", [])
                         if c.get("field_name", c.get("name")) in kept]
    return {b"pandas": json.dumps(pandas).encode()}


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, in hex (models are recorded by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def latest_parameters(table: pa.Table, command: str) -> dict | None:
    """The parameters of the latest step ``command`` among a table's records
    (its own, then its history, newest first)."""
    metadata = table.schema.metadata or {}
    records = []
    for key in (HISTORY_KEY, PROVENANCE_KEY):  # oldest first
        try:
            found = json.loads(metadata.get(key, b"null"))
        except ValueError:
            continue
        records += found if isinstance(found, list) else [found]
    for record in reversed(records):
        if isinstance(record, dict) and record.get("command") == command:
            parameters = record.get("parameters")
            return parameters if isinstance(parameters, dict) else {}
    return None


def read_provenance(path_or_table) -> dict | None:
    """The provenance record of a Parquet file or table, if it has one."""
    if isinstance(path_or_table, pa.Table):
        metadata = path_or_table.schema.metadata or {}
    else:
        metadata = pq.read_schema(path_or_table).metadata or {}
    raw = metadata.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else None


@contextmanager
def atomic_output(path: str | os.PathLike, *, inputs: Sequence[str] = ()
                  ) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it into place on success.

    On any error, or an interrupt, the temporary file is removed and ``path`` is
    left as it was. Refuses to overwrite one of the ``inputs``. The null
    device is yielded itself: nothing can be renamed onto it.
    """
    if is_devnull(path):
        yield os.devnull
        check_stop()
        return
    target = Path(path)
    _refuse_input_overwrite(target, inputs)
    folder = target.parent if str(target.parent) else Path(".")
    problem = _folder_problem(target)
    if problem:
        raise DataError(f"{target}: {problem}")
    if target.is_dir():
        raise DataError(f"{target}: is a folder; give a file name")
    if _not_regular(target):
        raise DataError(f"{target}: {_not_regular_text(target)}")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.",
                                             suffix=".tmp", dir=folder)
    except OSError as error:
        raise DataError(f"{target}: cannot write in {folder} "
                        f"({error.strerror or error})")
    os.close(handle)
    # mkstemp makes the file private (0600); outputs follow the umask instead.
    os.chmod(temporary, 0o666 & ~_umask())
    try:
        yield temporary
        check_stop()
        os.replace(temporary, target)
        written.append(str(target))
    except BaseException as error:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(error, OSError) and not isinstance(error, BrokenPipeError):
            raise DataError(f"{target}: cannot write ({error.strerror or error})")
        raise


def is_devnull(path: str | os.PathLike | None) -> bool:
    """Whether an output path is the null device (``-o /dev/null``)."""
    if path is None or str(path) in ("", STDIO):
        return False
    return os.path.realpath(path) == os.devnull


def check_output_path(path: str | None, option: str) -> None:
    """Refuse, before any work, an output that cannot be written."""
    if path is None or path == STDIO:
        return
    if path == "":
        raise UsageError(f"{option} '': give a file name, or - for stdout")
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    if _not_regular(target):
        stdout = " (or - for stdout)" if option == "-o" else ""
        raise UsageError(f"{option} {path}: {_not_regular_text(target)}; "
                         f"give a file name{stdout}")
    problem = _folder_problem(target)
    if problem:
        raise DataError(f"{option} {path}: {problem}")


def _folder_problem(target: Path) -> str | None:
    """Why the folder of an output cannot hold it, if it cannot."""
    folder = target.parent if str(target.parent) else Path(".")
    if folder.is_dir():
        return None
    if os.path.lexists(folder):
        return f"{folder} is not a folder"
    return f"the folder {folder} does not exist"


def _not_regular(target: Path) -> bool:
    """Whether an output exists as something else than a regular file: the
    rename that puts the output in place would replace a link, a device or a
    pipe, not write through it. The null device is written directly."""
    return os.path.lexists(target) and not is_devnull(target) \
        and (target.is_symlink() or not target.is_file())


def _not_regular_text(target: Path) -> str:
    """What an output that is no regular file is, in a few words."""
    if target.is_symlink():
        dangling = "" if target.exists() else " (to nothing)"
        return f"is a symbolic link{dangling}, which would be replaced"
    return "exists and is not a regular file"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_input_overwrite(target: Path, inputs: Sequence[str]) -> None:
    source = _input_at(target, inputs)
    if source is not None:
        raise UsageError(f"{target}: refusing to overwrite the input file"
                         + _through_stdin(source))


def refuse_stdout_on_inputs(inputs) -> None:
    """Refuse to write to standard output when it is one of the input files,
    named or read through standard input (``vbsw weigh f.parquet 1<>
    f.parquet``, ``vbsw weigh - -o - < f.parquet 1<> f.parquet``)."""
    data = _data_stdout.fileno() if _data_stdout is not None else 1
    try:
        taken = os.fstat(data)
    except (OSError, ValueError):  # no stdout
        return
    source = _same_input(taken, inputs) if stat.S_ISREG(taken.st_mode) else None
    if source is not None:
        what = "the file standard input reads" if source == STDIO \
            else f"the input file {source}"
        raise UsageError(f"standard output is {what}; refusing to overwrite it "
                         "(give -o FILE)")


def _input_at(path: str | os.PathLike, inputs) -> str | None:
    """The input (a path, or - for standard input) that is the file at
    ``path``, if it exists and is one."""
    try:
        found = os.stat(path)
    except (OSError, ValueError):  # nothing there yet
        return None
    return _same_input(found, inputs)


def _same_input(found: os.stat_result, inputs) -> str | None:
    """The input (a path, or - for standard input, whatever it is redirected
    from) that is the file ``found``, if any."""
    for source in inputs:
        if not source:
            continue
        try:
            given = os.fstat(0) if source == STDIO else os.stat(source)
        except (OSError, ValueError):
            continue
        if (given.st_dev, given.st_ino) == (found.st_dev, found.st_ino):
            return source
    return None


def _through_stdin(source: str) -> str:
    return " (standard input reads it)" if source == STDIO else ""


def same_path(a: str, b: str) -> bool:
    """Whether two paths name one file (existing or not)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return Path(a).resolve() == Path(b).resolve()


def refuse_overwrite(path: str | None, option: str, inputs) -> None:
    """Refuse, before any work, an output that is one of the inputs."""
    if path == STDIO:
        refuse_stdout_on_inputs(inputs)
        return
    source = None if path is None else _input_at(path, inputs)
    if source is not None:
        raise UsageError(f"{option} {path}: refusing to overwrite the input file"
                         + _through_stdin(source))


def match_label_rows(table: pa.Table, name: str, other: pa.Table,
                     labels_file: str) -> tuple[pa.Table, list[str]]:
    """The rows of ``other`` (from ``--labels``) for the rows of ``table``:
    joined on ``id`` when both have one, else row for row. Returns them
    and notes on how they were matched."""
    mine = ID_COLUMN in table.column_names
    theirs = ID_COLUMN in other.column_names
    if mine and theirs:
        return _joined_on_id(table, name, other, labels_file), []
    if other.num_rows != table.num_rows:
        raise DataError(f"{labels_file}: {other.num_rows} label rows for "
                        f"{table.num_rows} rows in {describe(name)}")
    if mine == theirs:
        return other, []
    has, lacks = (labels_file, name) if theirs else (name, labels_file)
    return other, [f"{describe(has)} has an '{ID_COLUMN}' column and "
                   f"{describe(lacks)} has none: labels matched by row position"]


def _joined_on_id(table, name, other, labels_file) -> pa.Table:
    """The label rows in the order of the data's ids (each id once there)."""
    theirs: dict = {}
    for position, value in enumerate(other.column(ID_COLUMN).to_pylist()):
        if value in theirs:
            raise DataError(f"{labels_file}: id {value!r} appears more than "
                            "once; the labels are joined on id")
        theirs[value] = position
    ids = table.column(ID_COLUMN).to_pylist()
    missing = [value for value in ids if value not in theirs]
    if missing:
        kinds = (f"; its ids are {other.schema.field(ID_COLUMN).type}, those of "
                 f"{describe(name)} {table.schema.field(ID_COLUMN).type}"
                 if other.schema.field(ID_COLUMN).type
                 != table.schema.field(ID_COLUMN).type else "")
        raise DataError(f"{labels_file}: no labels for {counted(len(missing), 'id')}"
                        f" of {describe(name)} (first: {missing[0]!r}){kinds}")
    return other.take(pa.array([theirs[value] for value in ids], pa.int64()))


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding: text and categories, not numbers.

    Trying a dictionary on float vectors costs about half the write time and
    is always abandoned.
    """
    return [f.name for f in schema
            if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
            or pa.types.is_dictionary(f.type) or pa.types.is_boolean(f.type)]


# ---------------------------------------------------------------------------
# stdout carries data only

_data_stdout = None


# Whether this run has taken the data stream to write: an interrupt after that
# may leave a partial stream, and the error line says so.
stdout_started = False

# The outputs this run has put in place whole (paths, "stdout"): an interrupt
# after them says they were written.
written: list[str] = []


def data_stdout():
    """The binary stream data goes to when the output is ``-``."""
    global stdout_started
    stdout_started = True
    return _data_stdout if _data_stdout is not None else sys.stdout.buffer


def write_stdout(data: bytes) -> None:
    """Write data (bytes) to stdout and flush."""
    check_stop()
    stream = data_stdout()
    stream.write(data)
    stream.flush()
    written.append("stdout")


@contextmanager
def stdout_for_data() -> Iterator[None]:
    """Keep file descriptor 1 for data while a command runs.

    Anything else written to stdout meanwhile (a user's function that prints,
    a library's message) goes to stderr instead, so a pipe never receives
    text mixed into Parquet.
    """
    global _data_stdout, stdout_started
    stdout_started = False
    sys.stdout.flush()
    try:
        original = os.dup(1)
    except OSError:  # no stdout at all
        yield
        return
    _data_stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        yield
    finally:
        try:
            sys.stdout.flush()
            _data_stdout.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass
        os.dup2(original, 1)
        os.close(original)
        try:
            _data_stdout.close()
        except (BrokenPipeError, OSError):
            pass
        _data_stdout = None


def write_table(table: pa.Table, path: str | os.PathLike, *,
                inputs: Sequence[str] = ()) -> None:
    """Write a table as Parquet to a path (atomically) or to stdout (``-``)."""
    path = str(path)
    if path == STDIO:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=WRITE_ROW_GROUP,
                       use_dictionary=dictionary_columns(table.schema))
        write_stdout(sink.getvalue().to_pybytes())
        return
    with atomic_output(path, inputs=inputs) as temporary:
        pq.write_table(table, temporary, row_group_size=WRITE_ROW_GROUP,
                       use_dictionary=dictionary_columns(table.schema))


def write_array(array: np.ndarray, path: str | os.PathLike, *,
                inputs: Sequence[str] = ()) -> None:
    """Write an array as ``.npy`` to a path (atomically) or to stdout."""
    path = str(path)
    if path == STDIO:
        buffer = io.BytesIO()
        np.save(buffer, array)
        write_stdout(buffer.getvalue())
        return
    with atomic_output(path, inputs=inputs) as temporary:
        with open(temporary, "wb") as handle:
            np.save(handle, array)


def output_kind(path: str | os.PathLike, default: str = "parquet") -> str:
    """``"npy"`` or ``"parquet"`` from an output path's suffix; ``default``
    for stdout and the null device."""
    if str(path) == STDIO or is_devnull(path):
        return default
    suffix = Path(str(path)).suffix.lower()
    if suffix == ".npy":
        return "npy"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise UsageError(f"-o {path}: unknown output type; use .parquet or .npy")
