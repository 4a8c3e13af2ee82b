"""File handling shared by every command."""

from __future__ import annotations

import io as stdio
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbsw_cli import io
from vbsw_cli.errors import DataError, UsageError
from conftest import vectors, write_features


def test_fixed_size_list_features_are_read_without_change(rng):
    X = rng.normal(size=(7, 3)).astype(np.float32)
    table = pa.table({"features": vectors(X)})
    got, used = io.feature_matrix(table, "f.parquet")
    assert used == ["features"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, X)


def test_variable_lists_and_pandas_object_columns_of_equal_width(tmp_path, rng):
    X = rng.normal(size=(5, 4))
    frame = pd.DataFrame({"emb": list(X), "label": [0, 1, 0, 1, 1]})
    frame.to_parquet(tmp_path / "p.parquet")
    table = io.read_table(tmp_path / "p.parquet")
    got, _ = io.feature_matrix(table, "p", column="emb")
    np.testing.assert_allclose(got, X)


def test_lists_of_different_widths_are_refused():
    table = pa.table({"features": pa.array([[1.0, 2.0], [1.0, 2.0, 3.0]])})
    with pytest.raises(DataError, match="different widths.*row 1"):
        io.feature_matrix(table, "f.parquet")



def ragged_chunks(short_row: int) -> pa.ChunkedArray:
    """Three chunks of four rows of width 3; ``short_row`` has width 2."""
    rows = [[1.0, 2.0, 3.0]] * 12
    rows[short_row] = [1.0, 2.0]
    return pa.chunked_array([pa.array(rows[i:i + 4]) for i in range(0, 12, 4)])


@pytest.mark.parametrize("short_row", [5, 8])
def test_a_ragged_row_in_a_later_chunk_is_named_by_its_row(short_row):
    with pytest.raises(DataError, match=rf"\(3 in row 0, 2 in row {short_row}\)"):
        io.list_column_matrix(ragged_chunks(short_row), "f", "features")


@pytest.mark.parametrize("short_row", [0, 2])
def test_a_batch_is_named_by_the_rows_of_its_file(short_row):
    """A batch from row 9000 of a file whose row 0 had width 3."""
    words = rf"\(3 in row 0, 2 in row {9000 + short_row}\)"
    with pytest.raises(DataError, match=words):
        io.list_column_matrix(ragged_chunks(short_row), "f", "features",
                              first_row=9000, expected=(3, 0))


def test_a_null_row_is_named_by_its_row():
    rows = pa.chunked_array([pa.array([[1.0]] * 4),
                             pa.array([[1.0], None, None, [1.0]])])
    with pytest.raises(DataError, match=r"2 empty \(null\) rows \(first: row 105\)"):
        io.list_column_matrix(rows, "f", "features", first_row=100)


def test_a_null_inside_a_list_is_named_by_its_row():
    """Counted over every chunk, named by the first one's row in the file."""
    rows = pa.chunked_array([pa.array([[1.0, 2.0]] * 4),
                             pa.array([[1.0, 2.0], [1.0, None], [None, 2.0]])])
    one = pa.chunked_array([rows.chunk(1).slice(0, 2)])
    with pytest.raises(DataError, match=r"2 missing values inside its lists "
                       r"\(first: row 105\)"):
        io.list_column_matrix(rows, "f", "features", first_row=100)
    with pytest.raises(DataError, match=r"1 missing value inside its lists "
                       r"\(first: row 1\)"):
        io.list_column_matrix(one, "f", "features")


@pytest.mark.parametrize("inner", [[None, 2.0], None])
def test_a_null_inside_a_nested_list_is_named_by_its_row(inner):
    """A missing number or a missing inner list, as one missing value."""
    rows = [[[1.0, 2.0], [3.0, 4.0]]] * 3 + [[[1.0, 2.0], inner]]
    table = pa.table({"features": pa.array(rows)})
    with pytest.raises(DataError, match=r"'features' has 1 missing value "
                       r"inside its lists \(first: row 3\)"):
        io.feature_matrix(table, "f")


def test_nested_lists_are_flattened_row_by_row():
    rows = [[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]
    table = pa.table({"features": pa.array(rows)})
    got, _ = io.feature_matrix(table, "f")
    np.testing.assert_array_equal(got, [[1, 2, 3, 4], [5, 6, 7, 8]])


def test_numeric_columns_by_name_and_pattern(rng):
    table = pa.table({"x1": [1.0, 2.0], "x2": [3, 4], "id": [0, 1]})
    got, used = io.feature_matrix(table, "t", columns=["x*"])
    assert used == ["x1", "x2"]
    np.testing.assert_array_equal(got, [[1, 3], [2, 4]])


def test_missing_column_suggests_the_close_name():
    table = pa.table({"featurez": pa.array([[1.0]]), "label": [1]})
    with pytest.raises(DataError, match="did you mean 'featurez'"):
        io.feature_matrix(table, "f.parquet")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinite_features_name_the_column_and_row(bad):
    X = np.ones((4, 2))
    X[2, 1] = bad
    with pytest.raises(DataError, match="'features'.*first: row 2"):
        io.feature_matrix(pa.table({"features": vectors(X)}), "f")


def test_label_types_are_read_by_kind():
    table = pa.table({
        "i": [3, 1, 3], "s": ["b", "a", "b"], "f": [0.5, 1.5, 2.5],
        "c": pa.array(["x", "y", "x"]).dictionary_encode(), "b": [True, False, True],
    })
    labels = io.read_labels(table, "t", ["i", "s", "f", "c", "b"])
    kinds = [label.kind for label in labels]
    assert kinds == ["classification", "classification", "regression",
                     "classification", "classification"]
    assert labels[1].classes == ["a", "b"]
    np.testing.assert_array_equal(labels[1].values, [1, 0, 1])
    forced = io.read_labels(table, "t", ["i"], task="regression")[0]
    np.testing.assert_array_equal(forced.values[:, 0], [3.0, 1.0, 3.0])


def test_nan_labels_and_nulls_are_refused():
    with pytest.raises(DataError, match="label column 'y'.*NaN"):
        io.read_labels(pa.table({"y": [1.0, np.nan]}), "t", ["y"])
    with pytest.raises(DataError, match=r"label column 'y' has 1 missing value "
                       r"\(first: row 1\)"):
        io.read_labels(pa.table({"y": pa.array([1, None])}), "t", ["y"])
    with pytest.raises(DataError, match=r"'y'.*NaN or infinite values in 1 row "
                       r"\(first: row 0\)"):
        io.read_labels(pa.table({"y": [np.nan, 2.0]}), "t", ["y"])


def test_missing_numbers_in_feature_columns_name_the_first_row():
    table = pa.table({"a": [1.0, 2.0, None, None], "b": [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(DataError, match=r"column 'a' has 2 missing values "
                       r"\(first: row 2\)"):
        io.feature_matrix(table, "t", columns=["a", "b"])



def test_files_are_read_by_their_content_whatever_their_name(tmp_path):
    X = np.arange(12.0).reshape(4, 3)
    np.save(tmp_path / "a.npy", X)
    (tmp_path / "a.npy").rename(tmp_path / "array.parquet")
    table = io.read_table(tmp_path / "array.parquet")
    np.testing.assert_array_equal(io.feature_matrix(table, "t")[0], X)
    pq.write_table(pa.table({"features": vectors(X), "label": [0, 1, 0, 1]}),
                   tmp_path / "table.npy")
    assert io.read_table(tmp_path / "table.npy").column_names == ["features",
                                                                 "label"]
    (tmp_path / "bad.npy").write_bytes(b"neither format")
    with pytest.raises(DataError, match="bad.npy: not a readable .npy"):
        io.read_table(tmp_path / "bad.npy")

def test_corrupt_empty_and_rowless_files(tmp_path):
    corrupt = tmp_path / "bad.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable Parquet"):
        io.read_table(corrupt)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        io.read_table(empty)
    rowless = tmp_path / "none.parquet"
    pq.write_table(pa.table({"features": vectors(np.ones((0, 2)))}), rowless)
    with pytest.raises(DataError, match="no rows"):
        io.require_rows(io.read_table(rowless), str(rowless))


def test_npy_input_becomes_a_features_column(tmp_path, rng):
    X = rng.normal(size=(6, 2, 3))
    np.save(tmp_path / "x.npy", X)
    table = io.read_table(tmp_path / "x.npy")
    got, _ = io.feature_matrix(table, "x.npy")
    np.testing.assert_array_equal(got, X.reshape(6, 6))


def test_stdin_is_sniffed(monkeypatch, rng):
    X = rng.normal(size=(3, 2))
    buffer = stdio.BytesIO()
    np.save(buffer, X)
    monkeypatch.setattr("sys.stdin", stdio.TextIOWrapper(
        stdio.BytesIO(buffer.getvalue())))
    got, _ = io.feature_matrix(io.read_table("-"), "-")
    np.testing.assert_array_equal(got, X)


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.parquet"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with io.atomic_output(target) as temporary:
            with open(temporary, "wb") as handle:
                handle.write(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]


def test_refuses_to_overwrite_an_input(tmp_path):
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"a": [1]}), source)
    with pytest.raises(UsageError, match="overwrite the input"):
        io.write_table(pa.table({"a": [2]}), source, inputs=[str(source)])
    assert io.read_table(source).column("a").to_pylist() == [1]


def test_provenance_keeps_the_chain_of_steps(tmp_path):
    first = io.with_provenance(pa.table({"a": [1]}), io.provenance("embed", {"x": 1}))
    second = io.with_provenance(first, io.provenance("weigh", {"k": 5}),
                                first.schema.metadata)
    io.write_table(second, tmp_path / "o.parquet")
    metadata = pq.read_schema(tmp_path / "o.parquet").metadata
    assert json.loads(metadata[b"vbsw"])["command"] == "weigh"
    history = json.loads(metadata[b"vbsw.history"])
    assert [step["command"] for step in history] == ["embed"]
    assert io.read_provenance(tmp_path / "o.parquet")["parameters"] == {"k": 5}


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int64, np.float16,
                                   np.float32, np.float64])
def test_numbers_cross_between_numpy_and_arrow_unchanged(dtype):
    values = (np.arange(12) - 3).astype(dtype)
    array = io.from_numpy(values)
    sliced = array.slice(2, 7)  # an offset into the buffer
    chunked = pa.chunked_array([array.slice(0, 5), array.slice(5)])

    assert array.type == pa.from_numpy_dtype(np.dtype(dtype))
    assert array.equals(pa.array(values))
    np.testing.assert_array_equal(io.to_numpy(sliced), values[2:9])
    np.testing.assert_array_equal(io.to_numpy(chunked), values)
    assert io.to_numpy(array.slice(0, 0)).shape == (0,)


def test_arrays_with_nulls_or_other_types_keep_pyarrow_conversion():
    with_null = pa.array([1.0, None, 3.0])
    np.testing.assert_array_equal(io.to_numpy(with_null), [1.0, np.nan, 3.0])
    assert io.to_numpy(pa.array(["a", "b"])).tolist() == ["a", "b"]
    assert io.from_numpy(np.array([True, False])).type == pa.bool_()


def test_weighing_a_file_does_not_import_pandas(tmp_path, rng):
    import subprocess
    import sys

    path = write_features(tmp_path / "f.parquet", rng.normal(size=(50, 3)),
                          rng.integers(2, size=50))
    script = ("import sys\nfrom vbsw_cli.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print('pandas' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script, "weigh", str(path),
                           "--k", "5", "-q", "-o", str(tmp_path / "w.parquet")],
                          capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr


def test_counts_read_with_their_noun_and_thousands():
    assert io.counted(1, "row") == "1 row"
    assert io.counted(2500, "missing value") == "2,500 missing values"


def test_a_parquet_file_with_a_column_named_twice_is_refused(tmp_path,
                                                             monkeypatch):
    label = pa.array([0, 1])
    table = pa.Table.from_arrays([vectors(np.ones((2, 2))), label, label],
                                 names=["features", "label", "label"])
    pq.write_table(table, tmp_path / "dup.parquet")
    words = "column 'label' appears 2 times; column names must be unique"
    with pytest.raises(DataError, match=f"dup.parquet: {words}"):
        io.read_table(tmp_path / "dup.parquet")
    monkeypatch.setattr("sys.stdin", stdio.TextIOWrapper(
        stdio.BytesIO((tmp_path / "dup.parquet").read_bytes())))
    with pytest.raises(DataError, match=f"stdin: {words}"):
        io.read_table("-")


def test_a_single_value_npy_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.float64(3))
    with pytest.raises(DataError, match=r"x.npy: holds a single value \(a "
                       r"0-dimensional array\); expected one row per sample"):
        io.read_table(tmp_path / "x.npy")


@pytest.mark.parametrize("values", [np.array(["b", "a", "b"]),
                                    np.array([b"b", b"a", b"b"])])
def test_a_text_npy_is_read_as_strings_for_labels_only(tmp_path, values):
    np.save(tmp_path / "y.npy", values)
    table = io.read_table(tmp_path / "y.npy", text=True)
    assert table.column("features").type == pa.string()
    labels = io.read_labels(table, "y.npy", ["features"])[0]
    assert labels.kind == "classification" and labels.classes == ["a", "b"]
    np.testing.assert_array_equal(labels.values, [1, 0, 1])
    with pytest.raises(DataError, match=r"y.npy: holds [<|][US]1 values; "
                       "expected numbers"):
        io.read_table(tmp_path / "y.npy")


def test_text_npy_labels_must_be_1d_utf8_and_never_objects(tmp_path):
    np.save(tmp_path / "wide.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(DataError, match=r"wide.npy: an array of text of shape "
                       r"\(2, 2\); text labels need one value per row"):
        io.read_table(tmp_path / "wide.npy", text=True)
    np.save(tmp_path / "latin.npy", np.array([b"caf\xe9"]))
    with pytest.raises(DataError, match="latin.npy: holds bytes that are not "
                       "UTF-8 text"):
        io.read_table(tmp_path / "latin.npy", text=True)
    np.save(tmp_path / "objects.npy", np.array(["a", 1], dtype=object))
    with pytest.raises(DataError, match="objects.npy: not a readable .npy file "
                       r"\(Object arrays cannot be loaded"):
        io.read_table(tmp_path / "objects.npy", text=True)
