"""``vbsw weigh`` as a user runs it: exit codes, stdout, stderr, files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.sparse import load_npz

from conftest import SAMPLE, run_vbsw, vectors, write_features
from test_weigh import reference_neighbours, reference_variance, reference_weights
from vbsw_cli.cli.weigh import _summary
from vbsw_cli.io import Labels
from vbsw_cli.neighbors import SearchOptions
from vbsw_cli.weigh import weigh

BREAST_CANCER = SAMPLE / "breast_cancer.parquet"


def read(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


def one_line(run) -> str:
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_sample_data_weighs_as_the_readme_says(tmp_path):
    out = tmp_path / "w.parquet"
    run = run_vbsw("weigh", BREAST_CANCER, "--k", "35", "--m", "50", "-o", out)
    assert run.code == 0, run.stderr
    assert run.stdout == b""
    assert "rows 569, dimensions 30, k 35" in run.stderr
    table = pq.read_table(out)
    source = pq.read_table(BREAST_CANCER)
    assert table.column_names == source.column_names + ["local_variance", "weight"]
    assert table.column("id").equals(source.column("id"))
    assert table.column("diagnosis").equals(source.column("diagnosis"))
    weight = table.column("weight").to_numpy()
    assert weight.mean() == pytest.approx(1.0)
    assert weight.max() / weight.min() == pytest.approx(50.0)
    record = json.loads(table.schema.metadata[b"vbsw"])
    assert record["command"] == "weigh"
    assert record["parameters"]["k"] == 35
    assert record["parameters"]["normalization"] == "mean"


def test_weights_equal_the_reference_through_the_command(tmp_path, rng):
    X = rng.normal(size=(80, 3))
    y = rng.choice(["a", "b", "c"], size=80)
    path = write_features(tmp_path / "f.parquet", X, y)
    run = run_vbsw("weigh", path, "--k", "6", "--m", "12", "-o", "-")
    assert run.code == 0, run.stderr
    table = read(run.stdout)
    variance = reference_variance(reference_neighbours(X, 6),
                                  [("classification", y)])
    np.testing.assert_allclose(table.column("local_variance").to_numpy(),
                               variance, atol=1e-12)
    np.testing.assert_allclose(table.column("weight").to_numpy(),
                               reference_weights(variance, 12), rtol=1e-9)
    assert table.column("label").to_pylist() == list(y)


def test_pipes_through_stdin_and_stdout(tmp_path, rng):
    path = write_features(tmp_path / "f.parquet", rng.normal(size=(50, 2)),
                          rng.normal(size=50))
    first = run_vbsw("weigh", path, "--k", "5", "-o", "-", "-q")
    assert first.code == 0 and first.stderr == ""
    second = run_vbsw("weigh", "-", "--k", "5", "--m", "3", "-o", "-", "-q",
                      stdin=first.stdout)
    assert second.code == 0, second.stderr
    table = read(second.stdout)
    history = json.loads(table.schema.metadata[b"vbsw.history"])
    assert [step["command"] for step in history] == ["weigh"]
    assert table.column("weight").to_numpy().max() > 1.0


def test_npy_features_with_npy_labels_and_npy_output(tmp_path, rng):
    X, y = rng.normal(size=(40, 4)), rng.integers(2, size=40)
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", y)
    run = run_vbsw("weigh", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
                   "--k", "5", "-o", tmp_path / "w.npy")
    assert run.code == 0, run.stderr
    weight = np.load(tmp_path / "w.npy")
    variance = reference_variance(reference_neighbours(X, 5),
                                  [("classification", y)])
    np.testing.assert_allclose(weight, reference_weights(variance, 40))


def test_numeric_feature_columns_weights_only_and_graph(tmp_path):
    out, graph = tmp_path / "w.parquet", tmp_path / "g.npz"
    run = run_vbsw("weigh", SAMPLE / "double_moon.parquet", "--feature-columns",
                   "x0,x1", "--k", "20", "--m", "100", "--weights-only",
                   "--graph", graph, "-o", out)
    assert run.code == 0, run.stderr
    table = pq.read_table(out)
    assert table.column_names == ["id", "local_variance", "weight"]
    matrix = load_npz(graph)
    assert matrix.shape == (300, 300)
    assert matrix.nnz == 300 * 19
    assert (matrix.diagonal() == 0).all()


@pytest.mark.parametrize("standardize", [False, True])
def test_a_graph_search_writes_float64_distances(tmp_path, rng, standardize):
    """hnswlib's distances come from features rounded to float32: rows 1e-6
    apart among values near 1 were off by up to a few percent in the graph
    written; they are computed again from the features searched."""
    X = 1 + rng.normal(size=(1500, 1)) * 1e-3
    path = write_features(tmp_path / "f.parquet", X, rng.normal(size=1500))
    graph = tmp_path / "g.npz"
    run = run_vbsw("weigh", path, "--k", "8", "--search", "hnsw", "--graph",
                   graph, "-o", tmp_path / "w.parquet", "-q",
                   *(["--standardize"] if standardize else []))
    assert run.code == 0, run.stderr
    matrix = load_npz(graph).tocoo()
    space = (X - X.mean()) / X.std() if standardize else X
    expected = np.abs(space[matrix.row, 0] - space[matrix.col, 0])
    np.testing.assert_allclose(matrix.data, expected, rtol=1e-9, atol=1e-15)


def test_exclude_self_changes_the_neighbourhood(tmp_path, rng):
    X, y = rng.normal(size=(60, 2)), rng.normal(size=60)
    path = write_features(tmp_path / "f.parquet", X, y)
    run = run_vbsw("weigh", path, "--k", "5", "--exclude-self", "-o", "-", "-q")
    assert run.code == 0, run.stderr
    expected = reference_variance(reference_neighbours(X, 5, include_self=False),
                                  [("regression", y)])
    np.testing.assert_allclose(read(run.stdout).column("local_variance")
                               .to_numpy(), expected, rtol=1e-9)


def test_hnsw_with_recall_check_and_same_seed_same_bytes(tmp_path, rng):
    X = rng.normal(size=(3000, 6)).astype(np.float32)
    path = write_features(tmp_path / "f.parquet", X, rng.integers(4, size=3000))
    args = ("weigh", path, "--k", "10", "--search", "hnsw", "--threads", "1",
            "--check-recall", "200", "--seed", "7", "-o", "-")
    first, second = run_vbsw(*args), run_vbsw(*args)
    assert first.code == 0, first.stderr
    assert "search: hnsw" in first.stderr
    recall = float(first.stderr.split("against exact search: ")[1].split()[0])
    assert recall >= 0.95
    assert first.stdout == second.stdout


def test_reproducible_graphs_give_the_same_bytes_on_two_threads(tmp_path, rng):
    centres = rng.normal(size=(30, 16)) * 3
    cluster = rng.integers(30, size=12_000)
    X = (centres[cluster] + rng.normal(size=(12_000, 16))).astype(np.float32)
    path = write_features(tmp_path / "f.parquet", X, cluster % 3)
    args = ("weigh", path, "--k", "10", "--search", "hnsw", "--threads", "2",
            "--hnsw-m", "4", "--ef-construction", "8", "--ef", "10",
            "--reproducible", "-o", "-")
    first, second = run_vbsw(*args), run_vbsw(*args)
    assert first.code == 0, first.stderr
    assert "search: hnsw (2 graphs built on a thread each, M=4" in first.stderr
    assert first.stdout == second.stdout
    search = json.loads(read(first.stdout).schema.metadata[b"vbsw"]
                        )["parameters"]["search"]
    assert (search["reproducible"], search["shards"]) == (True, 2)



def test_auto_choosing_exact_by_time_writes_the_same_bytes(tmp_path, rng):
    """12,000 rows: auto times a sample and picks the exact search; the
    predicted seconds stay on stderr, out of the metadata."""
    X = rng.normal(size=(12_000, 4)).astype(np.float32)
    path = write_features(tmp_path / "f.parquet", X, rng.integers(3, size=12_000))
    args = ("weigh", path, "--k", "5", "-o", "-")
    first, second = run_vbsw(*args), run_vbsw(*args)
    assert first.code == 0, first.stderr
    assert "search: exact (exact search predicted " in first.stderr
    search = json.loads(read(first.stdout).schema.metadata[b"vbsw"]
                        )["parameters"]["search"]
    assert search["reason"] == "exact search predicted faster than a graph"
    assert first.stdout == second.stdout


def test_graphs_are_reproducible_by_default_up_to_a_size(tmp_path, rng,
                                                         capfdbinary,
                                                         monkeypatch):
    """Up to REPRODUCIBLE_ROWS rows the default is --reproducible; above, one
    graph on every thread, with a note; --no-reproducible asks for it."""
    from conftest import run_here
    import vbsw_cli.cli.weigh as weigh_cli
    import vbsw_cli.neighbors as search

    centres = rng.normal(size=(30, 16)) * 3
    cluster = rng.integers(30, size=12_000)
    X = (centres[cluster] + rng.normal(size=(12_000, 16))).astype(np.float32)
    path = write_features(tmp_path / "f.parquet", X, cluster % 3)
    args = ("weigh", path, "--k", "10", "--search", "hnsw", "--threads", "2",
            "-o", "-")
    first, second = run_here(capfdbinary, *args), run_here(capfdbinary, *args)
    assert first.code == 0, first.stderr
    assert "search: hnsw (2 graphs built on a thread each" in first.stderr
    assert first.stdout == second.stdout
    assert "above" not in first.stderr

    for limit, given, note in ((1000, [], True),
                               (1000, ["--no-reproducible"], False)):
        monkeypatch.setattr(search, "REPRODUCIBLE_ROWS", limit)
        monkeypatch.setattr(weigh_cli, "REPRODUCIBLE_ROWS", limit)
        run = run_here(capfdbinary, *args, *given)
        assert run.code == 0, run.stderr
        assert "search: hnsw (M=12" in run.stderr
        assert ("note: above 1,000 rows one graph is built on 2 threads at "
                "once" in run.stderr) == note
        search_record = json.loads(read(run.stdout).schema.metadata[b"vbsw"]
                                   )["parameters"]["search"]
        assert (search_record["reproducible"], search_record["shards"]) == \
            (False, 1)

def test_provenance_names_the_threads_and_the_checked_recall(tmp_path, rng):
    X = rng.normal(size=(12_000, 4)).astype(np.float32)
    path = write_features(tmp_path / "f.parquet", X, rng.integers(3, size=12_000))
    out, graph = tmp_path / "w.parquet", tmp_path / "g.npz"
    run = run_vbsw("weigh", path, "--k", "5", "--threads", "2", "--reproducible",
                   "--check-recall", "50", "--graph", graph, "-o", out)
    assert run.code == 0, run.stderr
    parameters = json.loads(pq.read_schema(out).metadata[b"vbsw"])["parameters"]
    assert parameters["threads"] == 2 and parameters["check_recall"] == 50
    shown = float(run.stderr.split("against exact search: ")[1].split()[0])
    assert parameters["checked_recall"] == pytest.approx(shown, abs=1e-4)
    assert f"wrote {out} and {graph}" in run.stderr


def test_duplicates_and_all_equal_labels_are_noticed(tmp_path, rng):
    X = np.repeat(rng.normal(size=(10, 2)), 3, axis=0)
    path = write_features(tmp_path / "f.parquet", X, np.full(30, 2))
    run = run_vbsw("weigh", path, "--k", "4", "-o", "-")
    assert run.code == 0, run.stderr
    assert "30 rows have a duplicate feature vector" in run.stderr
    assert "more identical copies than" not in run.stderr  # 3 copies, k = 4
    assert "(all labels are equal): all weights are 1" in run.stderr
    assert (read(run.stdout).column("weight").to_numpy() == 1).all()


@pytest.mark.parametrize("exclude_self", [False, True])
def test_duplicates_are_counted_with_or_without_the_point(tmp_path, rng,
                                                          exclude_self):
    """--exclude-self dropped a real neighbour from the count (200 rows with a
    copy were called 0 to 100)."""
    X = rng.normal(size=(1000, 3))
    X[500:600] = X[:100]
    path = write_features(tmp_path / "f.parquet", X, rng.normal(size=1000))
    run = run_vbsw("weigh", path, "--k", "5", "-o", tmp_path / "w.parquet",
                   *(["--exclude-self"] if exclude_self else []))
    assert run.code == 0, run.stderr
    assert "200 rows have a duplicate feature vector" in run.stderr


def test_rows_a_graph_puts_at_distance_0_are_not_called_copies(tmp_path, rng):
    """hnswlib's float32 distances are 0 for rows 1e-9 apart: no row here has
    a copy, and none is said to."""
    X = rng.normal(size=(4000, 4))
    X[1::2] = X[0::2] + 1e-9 * rng.normal(size=(2000, 4))
    path = write_features(tmp_path / "f.parquet", X, rng.normal(size=4000))
    run = run_vbsw("weigh", path, "--k", "5", "--search", "hnsw",
                   "-o", tmp_path / "w.parquet")
    assert run.code == 0, run.stderr
    assert "search: hnsw" in run.stderr
    assert "duplicate feature vector" not in run.stderr


@pytest.mark.parametrize("copies, exclude_self, crowded", [
    (20, False, False), (21, False, True), (21, True, False), (22, True, True)])
def test_the_crowded_note_only_when_copies_outnumber_the_neighbourhood(
        tmp_path, rng, copies, exclude_self, crowded):
    """k = 20: 20 copies fill a neighbourhood with the point (21 without it,
    each then holding all the others); one more copy and which 20 it holds
    goes by row number. With the point, 20 copies share one neighbourhood
    and one weight."""
    X = rng.normal(size=(200, 3))
    X[:copies] = X[0]
    path = write_features(tmp_path / "f.parquet", X, rng.normal(size=200))
    run = run_vbsw("weigh", path, "--k", "20", "-o", "-",
                   *(["--exclude-self"] if exclude_self else []))
    assert run.code == 0, run.stderr
    assert "duplicate feature vector" in run.stderr
    noted = f"{copies} rows have more identical copies than" in run.stderr
    assert noted == crowded, run.stderr
    weight = read(run.stdout).column("weight").to_numpy()[:copies]
    if not crowded and not exclude_self:
        np.testing.assert_allclose(weight, weight[0], rtol=1e-12)


def test_copies_differing_in_the_sign_of_a_zero_are_one_group(tmp_path, rng):
    """-0.0 equals 0.0: seven such rows are seven copies, more than k = 5
    holds (they were counted as groups of 4 and 3 by their bits)."""
    X = rng.normal(size=(507, 3))
    X[500:] = [0.0, 1.0, 2.0]
    X[504:, 0] = -0.0
    path = write_features(tmp_path / "f.parquet", X, rng.normal(size=507))
    run = run_vbsw("weigh", path, "--k", "5", "--exact", "-o", "-")
    assert run.code == 0, run.stderr
    assert "7 rows have a duplicate feature vector" in run.stderr
    assert "7 rows have more identical copies than a neighbourhood holds" \
        in run.stderr


def test_labels_all_different_are_not_called_equal(tmp_path, rng):
    X = rng.normal(size=(60, 2))
    path = write_features(tmp_path / "f.parquet", X, np.arange(60))

    run = run_vbsw("weigh", path, "--k", "5", "-o", tmp_path / "w.parquet")

    assert run.code == 0, run.stderr
    assert "(every row has a class of its own): all weights are 1" in run.stderr
    assert "note: label column 'label' has 60 classes for 60 rows; if these " \
           "are numbers to regress, use --task regression" in run.stderr


def test_an_integer_target_of_many_values_gets_a_note_classes_do_not(tmp_path,
                                                                     rng):
    X = rng.normal(size=(400, 2))
    prices = np.round(100 * np.tanh(X[:, 0])).astype(np.int64)  # ~200 values
    many = write_features(tmp_path / "p.parquet", X, prices)
    ten = write_features(tmp_path / "c.parquet", X, prices % 10)

    noted = run_vbsw("weigh", many, "-o", tmp_path / "w.parquet")
    plain = run_vbsw("weigh", ten, "-o", tmp_path / "w.parquet")
    regression = run_vbsw("weigh", many, "--task", "regression", "-o",
                          tmp_path / "w.parquet")

    assert noted.code == plain.code == regression.code == 0
    assert "classes for 400 rows; if these are numbers to regress" in noted.stderr
    assert "classes for" not in plain.stderr + regression.stderr


def test_summary_says_what_it_changed_or_could_not_check(tmp_path, rng):
    X = rng.normal(size=(40, 3))
    path = write_features(tmp_path / "f.parquet", X, rng.integers(2, size=40))
    whole = run_vbsw("weigh", path, "--k", "40", "--check-recall", "1000",
                     "-v", "-o", "-")
    assert whole.code == 0, whole.stderr
    assert "against exact search: 1.0000 (on 40 rows)" in whole.stderr
    assert "every neighbourhood holds every row" in whole.stderr
    lines = whole.stderr.splitlines()
    # The header comes before the search reports its progress.
    assert lines[0].startswith("rows 40, dimensions 3, k 40"), whole.stderr
    assert lines[1].startswith("exact search: 40 in"), whole.stderr

    big = write_features(tmp_path / "g.parquet", rng.normal(size=(12_000, 3)),
                         rng.integers(2, size=12_000))
    raised = run_vbsw("weigh", big, "--k", "10", "--search", "hnsw", "--ef", "1",
                      "--threads", "1", "-o", "-")
    assert raised.code == 0, raised.stderr
    assert "note: --ef 1 raised to 10" in raised.stderr
    low = float(re.split(r"[;)]", raised.stderr.split("at least ")[1])[0])
    assert ("warning: with --ef 1 fixed" in raised.stderr) == (low < 0.95)

    hard = write_features(tmp_path / "h.parquet", rng.normal(size=(12_000, 32)),
                          rng.integers(2, size=12_000))
    sparse = run_vbsw("weigh", hard, "--k", "10", "--search", "hnsw", "--ef", "10",
                      "--hnsw-m", "6", "--ef-construction", "10", "--threads", "1",
                      "-o", "-")
    assert sparse.code == 0, sparse.stderr
    assert "warning: with --ef 10 fixed, the sample recall is" in sparse.stderr

    exact = run_vbsw("weigh", path, "--k", "5", "--ef", "30", "-o", "-")
    assert "note: --ef 30 not used: exact search ran" in exact.stderr
    graph = run_vbsw("weigh", path, "--k", "5", "--hnsw-m", "4", "-o", "-")
    assert "note: --hnsw-m 4 not used: exact search ran" in graph.stderr


def test_a_graph_that_fails_falls_back_without_recall_warnings(tmp_path, rng):
    path = write_features(tmp_path / "h.parquet", rng.normal(size=(12_000, 64)),
                          rng.integers(2, size=12_000))
    run = run_vbsw("weigh", path, "--search", "hnsw", "--ef", "5", "--hnsw-m",
                   "2", "--ef-construction", "2", "--threads", "1", "-o", "-")
    assert run.code == 0, run.stderr
    assert "note: fell back to exact search" in run.stderr
    assert "warning" not in run.stderr
    assert "not used" not in run.stderr


def test_a_column_named_like_a_pattern_is_taken_by_its_name(tmp_path, rng):
    X = rng.normal(size=(30, 2))
    path = write_features(tmp_path / "f.parquet", X, rng.integers(2, size=30),
                          **{"[red]lab:x:": rng.integers(2, size=30)})
    run = run_vbsw("weigh", path, "--k", "5", "--label", "[red]lab:x:", "-o", "-")
    assert run.code == 0, run.stderr
    assert "labels [red]lab:x:: classification" in run.stderr


# ---------------------------------------------------------------------------
# Errors: one line, the right exit code, no output file


@pytest.fixture
def small(tmp_path, rng):
    return write_features(tmp_path / "small.parquet", rng.normal(size=(12, 2)),
                          rng.integers(2, size=12))


def _fails(tmp_path, args, code, *needles, stdin=None):
    out = tmp_path / "never.parquet"
    run = run_vbsw("weigh", *args, "-o", out, stdin=stdin)
    assert run.code == code, run.stderr
    line = one_line(run)
    for needle in needles:
        assert needle in line, line
    assert run.stdout == b""
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    return line


def test_error_missing_and_misspelt_columns(tmp_path, small):
    _fails(tmp_path, [small, "--label", "lable"], 1, "small.parquet",
           "'lable'", "did you mean 'label'")
    _fails(tmp_path, [small, "--features", "feature"], 1, "'feature'",
           "did you mean 'features'")


def test_error_features_without_labels_say_what_is_missing(tmp_path, rng):
    """A bare array holds no labels; a Parquet file of features alone lacks
    the label column (it was told as if it were an array)."""
    X = rng.normal(size=(40, 3))
    npy = tmp_path / "x.npy"
    np.save(npy, X)
    parquet = tmp_path / "only.parquet"
    pq.write_table(pa.table({"features": vectors(X)}), parquet)
    array = run_vbsw("weigh", npy, "--k", "5", "-o", tmp_path / "a.parquet")
    assert array.code == 1
    assert one_line(array).endswith("x.npy: an array holds no labels; give "
                                    "them with --labels FILE")
    table = run_vbsw("weigh", parquet, "--k", "5", "-o", tmp_path / "b.parquet")
    assert table.code == 1
    assert one_line(table).endswith("only.parquet: no label column 'label' (the "
                                    "only column is 'features'); give the "
                                    "labels with --labels FILE")
    assert not (tmp_path / "a.parquet").exists()
    assert not (tmp_path / "b.parquet").exists()


@pytest.mark.parametrize("task, noted", [("auto", True), ("regression", False)])
def test_integer_label_vectors_read_as_regression_are_noted(tmp_path, rng, task,
                                                            noted):
    """A 2-D integer .npy of labels is read as regression targets, though
    integers alone are classes: said, unless --task says it."""
    np.save(tmp_path / "x.npy", rng.normal(size=(60, 3)))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, size=(60, 2)))
    run = run_vbsw("weigh", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
                   "--k", "5", "--task", task, "-o", tmp_path / "w.parquet")
    assert run.code == 0, run.stderr
    assert "labels label: regression" in run.stderr
    assert ("holds vectors of integers: read as regression targets"
            in run.stderr) == noted


def test_error_nan_features_and_infinite_labels(tmp_path, rng):
    X = rng.normal(size=(12, 2))
    X[3, 0] = np.nan
    bad = write_features(tmp_path / "nan.parquet", X, np.zeros(12))
    _fails(tmp_path, [bad], 1, "nan.parquet", "NaN or infinite", "row 3")
    y = np.zeros(12)
    y[5] = np.inf
    bad = write_features(tmp_path / "inf.parquet", rng.normal(size=(12, 2)), y)
    _fails(tmp_path, [bad], 1, "label column 'label'", "row 5")


def _numeric_columns(path, X, **extra):
    """A Parquet file with the columns of ``X`` as x0, x1, ... and labels."""
    columns = {f"x{j}": X[:, j] for j in range(X.shape[1])}
    pq.write_table(pa.table({**columns, **extra}), path)
    return path


def test_error_nan_in_numeric_columns_names_the_first_bad_values_column(
        tmp_path, rng):
    X = rng.random((500, 8))
    X[411, 3] = np.nan
    path = _numeric_columns(tmp_path / "f.parquet", X,
                            label=rng.integers(3, size=500))
    line = _fails(tmp_path, [path, "--feature-columns", "x*"], 1)
    assert line.endswith("f.parquet: feature column 'x3' has NaN or infinite "
                         "values in 1 row (first: row 411)"), line
    X[[30, 30, 411], [6, 2, 3]] = [np.inf, np.nan, np.nan]
    path = _numeric_columns(tmp_path / "f.parquet", X,
                            label=rng.integers(3, size=500))
    line = _fails(tmp_path, [path, "--feature-columns", "x*"], 1)
    assert line.endswith("feature column 'x2' has NaN or infinite values in 1 "
                         "row (first: row 30); also in 2 other columns"), line


def test_error_nulls_in_numeric_columns_name_the_first_row_of_any(tmp_path, rng):
    nulls = {"x1": 100, "x3": 5, "x6": 5}
    columns = {name: pa.array(rng.random(500),
                              mask=np.arange(500) == nulls.get(name, -1))
               for name in [f"x{j}" for j in range(8)]}
    pq.write_table(pa.table({**columns, "label": rng.integers(3, size=500)}),
                   tmp_path / "f.parquet")
    line = _fails(tmp_path, [tmp_path / "f.parquet", "--feature-columns", "x*"], 1)
    assert line.endswith("f.parquet: feature column 'x3' has 1 missing value (first: "
                         "row 5); also in 2 other columns"), line


@pytest.mark.parametrize("rows", [[], [[]]])
def test_error_a_list_column_of_empty_rows_is_refused(tmp_path, rng, rows):
    features = pa.array([rows] * 500, type=pa.list_(pa.float32()) if not rows
                        else pa.list_(pa.list_(pa.float32())))
    pq.write_table(pa.table({"features": features,
                             "label": rng.integers(3, size=500)}),
                   tmp_path / "f.parquet")
    line = _fails(tmp_path, [tmp_path / "f.parquet"], 1)
    assert line.endswith("f.parquet: column 'features' has no values per row "
                         "(width 0)"), line


@pytest.mark.parametrize("shape", [(500, 0), (500, 3, 0), (0, 0)])
def test_error_an_npy_of_no_values_per_row_is_refused(tmp_path, rng, shape):
    np.save(tmp_path / "x.npy", np.zeros(shape))
    np.save(tmp_path / "y.npy", rng.integers(3, size=shape[0]))
    line = _fails(tmp_path, [tmp_path / "x.npy", "--labels", tmp_path / "y.npy"],
                  1)
    assert line.endswith(f"x.npy: the array of shape {shape} has no values per "
                         "row (width 0)"), line


def test_error_an_npy_of_no_rows_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((0, 5)))
    np.save(tmp_path / "y.npy", np.zeros(0))
    line = _fails(tmp_path, [tmp_path / "x.npy", "--labels", tmp_path / "y.npy"],
                  1)
    assert line.endswith("x.npy: the file has no rows"), line



@pytest.mark.parametrize("bad_row, words", [
    (1000, "(3 in row 0, 2 in row 1000)"), (1005, "(3 in row 0, 2 in row 1005)"),
    (1003, "1 empty (null) row (first: row 1003)")])
def test_error_a_bad_row_in_a_later_row_group_is_named_by_its_row(
        tmp_path, rng, bad_row, words):
    rows = rng.standard_normal((2000, 3)).tolist()
    rows[bad_row] = None if "null" in words else rows[bad_row][:2]
    table = pa.table({"features": pa.array(rows), "label": rng.random(2000)})
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=1000)

    run = run_vbsw("weigh", tmp_path / "f.parquet", "--k", "5")

    assert run.code == 1
    assert words in one_line(run)


@pytest.mark.parametrize("bad_rows, words", [
    ([4], "1 missing value inside its lists (first: row 4)"),
    ([1003, 1500], "2 missing values inside its lists (first: row 1003)")])
def test_error_a_null_inside_a_list_is_named_by_its_row(tmp_path, rng,
                                                        bad_rows, words):
    rows = rng.standard_normal((2000, 3)).tolist()
    for row in bad_rows:
        rows[row][1] = None
    table = pa.table({"features": pa.array(rows), "label": rng.random(2000)})
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=1000)

    _fails(tmp_path, [tmp_path / "f.parquet", "--k", "5"], 1, "f.parquet",
           "column 'features'", words)


def test_keyword_options_are_taken_in_any_case(tmp_path, small):
    out = tmp_path / "w.parquet"
    run = run_vbsw("weigh", small, "--k", "5", "--search", "EXACT", "--exact",
                   "--task", "Regression", "--normalize", "SUM", "-o", out)

    assert run.code == 0, run.stderr
    parameters = json.loads(pq.read_schema(out).metadata[b"vbsw"])["parameters"]
    assert parameters["search"]["requested"] == "exact"
    assert parameters["tasks"] == {"label": "regression"}
    assert parameters["normalization"] == "sum"
    assert pq.read_table(out).column("weight").to_numpy().sum() == \
        pytest.approx(1)


def test_error_k_and_m_out_of_range(tmp_path, small):
    _fails(tmp_path, [small, "--k", "13"], 2, "--k 13", "12 rows")
    _fails(tmp_path, [small, "--k", "12", "--exclude-self"], 2, "--k 12")
    _fails(tmp_path, [small, "--k", "1"], 2, "--k 1")
    _fails(tmp_path, [small, "--m", "0.5"], 2, "--m 0.5", "at least 1")
    _fails(tmp_path, [small, "--normalize", "max"], 2, "--normalize max")
    _fails(tmp_path, [small, "--k", "five"], 2, "'--k'", "'five'")


def test_error_corrupt_empty_and_missing_files(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1" + b"\0" * 50)
    _fails(tmp_path, [corrupt], 1, "corrupt.parquet", "not a readable Parquet")
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    _fails(tmp_path, [empty], 1, "empty.parquet", "empty")
    _fails(tmp_path, [tmp_path / "absent.parquet"], 1, "no such file")
    _fails(tmp_path, ["-"], 1, "stdin", stdin=b"")


def test_error_keeps_an_existing_output_untouched(tmp_path, small):
    out = tmp_path / "keep.parquet"
    out.write_bytes(b"earlier result")
    run = run_vbsw("weigh", small, "--label", "nope", "-o", out)
    assert run.code == 1
    assert out.read_bytes() == b"earlier result"


def test_one_row_is_refused_naming_the_file(tmp_path):
    path = write_features(tmp_path / "one.parquet", np.zeros((1, 2)), [0])
    _fails(tmp_path, [path, "--k", "2"], 1,
           f"error: {path}: a neighbourhood needs at least 2 points")
    two = write_features(tmp_path / "two.parquet", np.eye(2), [0, 1])
    _fails(tmp_path, [two, "--k", "2", "--exclude-self"], 1,
           "the data has 2 row(s), 1 besides the point itself (--exclude-self)")


def test_debug_shows_the_traceback(tmp_path, small):
    run = run_vbsw("weigh", small, "--label", "nope", "-o", "-", "--debug")
    assert run.code != 0
    assert "Traceback" in run.stderr




def test_several_label_columns_make_one_multi_output_target(tmp_path, rng):
    X = rng.normal(size=(40, 2))
    y1, y2 = rng.normal(size=40), rng.normal(size=40)
    path = write_features(tmp_path / "f.parquet", X, y1, other=y2)
    run = run_vbsw("weigh", path, "--label", "label,other", "--k", "5", "-o", "-",
                   "-q")
    assert run.code == 0, run.stderr
    expected = reference_variance(reference_neighbours(X, 5),
                                  [("regression", np.column_stack([y1, y2]))])
    np.testing.assert_allclose(read(run.stdout).column("local_variance")
                               .to_numpy(), expected, rtol=1e-9)
    record = json.loads(read(run.stdout).schema.metadata[b"vbsw"])
    assert record["parameters"]["labels"] == ["label", "other"]


def test_error_overlapping_empty_and_contradictory_options(tmp_path, small):
    _fails(tmp_path, [small, "--feature-columns", "id"], 2,
           "'id' cannot be both a feature")
    _fails(tmp_path, [small, "--features", "label"], 2, "'label'")
    _fails(tmp_path, [small, "--label", ""], 2, "--label", "column name")
    _fails(tmp_path, [small, "--exact", "--search", "hnsw"], 2, "--exact")
    _fails(tmp_path, [small, "--seed", "-1"], 2, "--seed")
    _fails(tmp_path, [small, "--m", "inf"], 2, "--m inf", "finite")
    _fails(tmp_path, [small, "--graph", tmp_path / "nodir" / "g.npz"], 1,
           "--graph", "does not exist")
    _fails(tmp_path, [small, "--feature-columns", "lab*"], 2,
           "'lab*' matches only label, which has another role")
    _fails(tmp_path, [small, "--features", "features", "--feature-columns",
                      "x*"], 2, "--features", "--feature-columns", "give one")



@pytest.mark.parametrize("option, words", [
    (["--search", "bogus"], ("--search bogus", "exact")),
    (["--search", "Bogus"], ("--search Bogus", "exact")),
    (["--recall", "1.5"], ("--recall 1.5",)), (["--hnsw-m", "1"], ("--hnsw-m 1",)),
    (["--ef", "0"], ("--ef 0",))])
def test_error_search_options_come_alone_before_the_file_is_read(
        tmp_path, small, option, words):
    _fails(tmp_path, [small, *option], 2, *words)

def test_error_too_few_rows_names_the_file(tmp_path, rng):
    one = write_features(tmp_path / "one.parquet", rng.normal(size=(1, 2)), [1])
    _fails(tmp_path, [one], 1, "one.parquet:", "at least 2 points")


def test_patterns_never_take_the_label_or_the_id(tmp_path, rng):
    table = pa.table({"id": np.arange(30), "x0": rng.normal(size=30),
                      "x1": rng.normal(size=30), "label": rng.integers(2, size=30)})
    pq.write_table(table, tmp_path / "cols.parquet")
    run = run_vbsw("weigh", tmp_path / "cols.parquet", "--feature-columns", "*",
                   "--k", "4", "-o", "-", "-q")
    assert run.code == 0, run.stderr
    record = json.loads(read(run.stdout).schema.metadata[b"vbsw"])
    assert record["parameters"]["features"] == ["x0", "x1"]


def test_output_path_problems_are_named_before_any_work(tmp_path, small):
    (tmp_path / "folder.parquet").mkdir()
    run = run_vbsw("weigh", small, "-o", tmp_path / "folder.parquet")
    assert run.code == 2 and "is a folder" in one_line(run)
    run = run_vbsw("weigh", small, "-o", tmp_path / "missing" / "w.parquet")
    assert run.code == 1 and "does not exist" in one_line(run)
    (tmp_path / "file.txt").write_text("x")
    run = run_vbsw("weigh", small, "-o", tmp_path / "file.txt" / "w.parquet")
    assert run.code == 1 and one_line(run).endswith(
        f"{tmp_path / 'file.txt'} is not a folder")
    run = run_vbsw("weigh", small, "-o", "/dev/null/w.parquet")
    assert run.code == 1 and "/dev/null is not a folder" in one_line(run)


@pytest.mark.parametrize("method", ["exact", "hnsw"])
def test_the_ef_note_only_when_the_graph_was_kept(rng, method):
    X = rng.normal(size=(60, 3))
    labels = [Labels("label", "regression", rng.normal(size=(60, 1)))]
    result = weigh(X, labels, k=5, m=10, search=SearchOptions(method="exact"))
    result.neighbours.method = method
    result.neighbours.details.update(
        M=12, ef_construction=40, ef=40, sample_recall=0.9, sample_recall_low=0.8,
        reason="hnswlib at ef=40 is slower than exact search")
    lines = []
    reporter = SimpleNamespace(quiet=False, say=lines.append,
                               notice=lambda text: lines.append(f"note: {text}"))
    _summary(reporter, X, 5, result, {"search_s": 0.1}, "-", "mean", 10, None,
             True, [], labels)
    raised = [line for line in lines if "--ef 10 raised to 40" in line]
    fell_back = [line for line in lines if "fell back to exact search" in line]
    assert (len(raised), len(fell_back)) == ((1, 0) if method == "hnsw" else (0, 1))


def test_dev_null_takes_the_output_and_the_graph(tmp_path, small):
    """Users time a run with -o /dev/null: all the work, nothing kept."""
    run = run_vbsw("weigh", small, "--k", "5", "-o", os.devnull,
                   "--graph", os.devnull)
    assert run.code == 0, run.stderr
    assert run.stdout == b""
    assert "weight (mean 1)" in run.stderr
    assert f"wrote {os.devnull}" in run.stderr
    assert Path(os.devnull).is_char_device()


@pytest.mark.parametrize("kind", ["fifo", "link to a file", "link to a fifo"])
def test_an_output_that_is_not_a_regular_file_is_refused(tmp_path, small, kind):
    """The output is renamed into place: it would replace a pipe or a link
    (as root even /dev/stdout), not write through it."""
    fifo, kept = tmp_path / "pipe", tmp_path / "kept.parquet"
    os.mkfifo(fifo)
    kept.write_bytes(b"old")
    target = tmp_path / "out.parquet"
    if kind == "fifo":
        target = fifo
    else:
        target.symlink_to(kept if kind == "link to a file" else fifo)
    run = run_vbsw("weigh", small, "--k", "5", "-o", target)
    assert run.code == 2
    said = "exists and is not a regular file" if kind == "fifo" \
        else "is a symbolic link, which would be replaced"
    assert said in one_line(run)
    assert kept.read_bytes() == b"old" and fifo.is_fifo()
    assert target.is_fifo() if kind == "fifo" else target.is_symlink()

def test_huge_m_keeps_finite_weights(tmp_path, rng):
    path = write_features(tmp_path / "f.parquet", rng.normal(size=(40, 2)),
                          rng.integers(2, size=40))
    run = run_vbsw("weigh", path, "--k", "5", "--m", "1e308", "-o", "-")
    assert run.code == 0, run.stderr
    assert "Warning" not in run.stderr
    weight = read(run.stdout).column("weight").to_numpy()
    assert np.isfinite(weight).all() and weight.mean() == pytest.approx(1.0)
    assert weight.max() / weight.min() == pytest.approx(1e308, rel=1e-6)


def test_npy_features_need_labels_and_labels_are_written_back(tmp_path, rng):
    np.save(tmp_path / "x.npy", rng.normal(size=(20, 3)))
    run = run_vbsw("weigh", tmp_path / "x.npy", "-o", "-")
    assert run.code == 1 and "--labels FILE" in one_line(run)
    np.save(tmp_path / "y.npy", rng.integers(2, size=20))
    run = run_vbsw("weigh", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
                   "--k", "4", "-o", "-", "-q")
    assert run.code == 0, run.stderr
    table = read(run.stdout)
    assert table.column_names == ["features", "label", "local_variance", "weight"]
    np.testing.assert_array_equal(table.column("label").to_numpy(),
                                  np.load(tmp_path / "y.npy"))


def test_a_closed_pipe_ends_quietly(tmp_path, rng):
    import subprocess
    import sys

    path = write_features(tmp_path / "f.parquet", rng.normal(size=(30000, 8)),
                          rng.integers(3, size=30000))
    command = (f"{sys.executable} -m vbsw_cli weigh {path} --exact --k 3 -q "
               "-o - | head -c 10 > /dev/null")
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"],
                          capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr and "error" not in done.stderr


def test_refuses_to_overwrite_its_input_before_any_work(tmp_path, small):
    before = small.read_bytes()
    run = run_vbsw("weigh", small, "-o", small)
    assert run.code == 2 and "refusing to overwrite the input" in one_line(run)
    assert small.read_bytes() == before


@pytest.mark.parametrize("scale", [1e160, 1e-300, None])
def test_features_beyond_float64_distances_are_refused(tmp_path, rng, scale):
    X = rng.normal(size=(50, 3))
    if scale is None:  # the span itself overflows
        X[0, 0], X[1, 0] = 1e308, -1e308
    else:
        X *= scale
    path = write_features(tmp_path / "f.parquet", X, rng.integers(0, 2, 50))
    run = run_vbsw("weigh", path, "--k", "5", "-o", tmp_path / "w.parquet")

    assert run.code == 1, run.stderr
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert errors == run.stderr.strip().splitlines()[-1:]
    assert "f.parquet: the features span" in errors[0]
    assert "rescale" in run.stderr
    assert not (tmp_path / "w.parquet").exists()


def test_features_beyond_float32_search_exactly_or_refuse_the_graph(tmp_path, rng):
    X = rng.normal(size=(500, 4)) * 1e25
    y = rng.integers(0, 3, len(X))
    path = write_features(tmp_path / "f.parquet", X, y)

    run = run_vbsw("weigh", path, "--k", "6", "-o", tmp_path / "w.parquet")
    assert run.code == 0, run.stderr
    assert "search: exact (the features span" in run.stderr
    assert "Warning" not in run.stderr
    variance = pq.read_table(tmp_path / "w.parquet").column("local_variance")
    expected = reference_variance(reference_neighbours(X / 1e25, 6),
                                  [("classification", y)])
    np.testing.assert_allclose(variance.to_numpy(), expected, atol=1e-12)

    run = run_vbsw("weigh", path, "--k", "6", "--search", "hnsw", "-o",
                   tmp_path / "h.parquet")
    assert run.code == 1
    assert "hnswlib's float32 distances" in run.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "h.parquet").exists()


def test_rows_searched_again_read_in_the_right_number():
    from vbsw_cli.cli.weigh import _searched_again

    assert _searched_again(0) == ""
    assert _searched_again(1) == ("; searched again: 1 row the graph did not "
                                  "lead back to")
    assert _searched_again(12_345).startswith("; searched again: 12,345 rows")
    assert _searched_again(0, 1) == ("; searched again: 1 row whose results "
                                     "provably missed nearer rows")
    assert _searched_again(2, 3) == ("; searched again: 2 rows the graph did not "
                                     "lead back to, 3 rows whose results "
                                     "provably missed nearer rows")
    assert _searched_again(0, 0, 1000) == ("; searched again: 1,000 rows of "
                                           "largest local variance")


def test_labels_beyond_float64_variance_fail_in_one_line_and_write_nothing(
        tmp_path, rng):
    path = write_features(tmp_path / "f.parquet", rng.normal(size=(60, 3)),
                          rng.normal(size=60) * 1e160)
    out = tmp_path / "w.parquet"
    run = run_vbsw("weigh", path, "--k", "5", "-o", out, "--graph",
                   tmp_path / "g.npz")
    assert run.code == 1
    assert one_line(run) == (f"vbsw weigh: error: {path}: label column 'label' "
                             "spans " + one_line(run).split("spans ")[1])
    assert "its variance would leave float64's range" in run.stderr
    assert not out.exists() and not (tmp_path / "g.npz").exists()


def test_labels_from_another_file_are_joined_on_id(tmp_path, rng):
    X, y = rng.normal(size=(80, 3)), rng.integers(3, size=80)
    order = rng.permutation(80)
    features = tmp_path / "f.parquet"
    pq.write_table(pa.table({"id": order, "features": vectors(X[order])}), features)
    labels = tmp_path / "l.parquet"
    pq.write_table(pa.table({"id": np.arange(80), "y": y}), labels)
    joined = run_vbsw("weigh", features, "--labels", labels, "--label", "y",
                      "--k", "5", "--exact", "-o", "-")
    assert joined.code == 0, joined.stderr
    together = write_features(tmp_path / "t.parquet", X, y)  # rows in id order
    plain = run_vbsw("weigh", together, "--k", "5", "--exact", "-o", "-")
    weight = read(joined.stdout).column("weight").to_numpy()
    np.testing.assert_allclose(weight, read(plain.stdout).column("weight")
                               .to_numpy()[order], rtol=1e-12)
    assert "matched by row position" not in joined.stderr

    pq.write_table(pa.table({"y": y}), tmp_path / "no_id.parquet")
    by_row = run_vbsw("weigh", features, "--labels", tmp_path / "no_id.parquet",
                      "--label", "y", "--k", "5", "-o", "-")
    assert by_row.code == 0, by_row.stderr
    assert f"note: {features} has an 'id' column and {tmp_path / 'no_id.parquet'}" \
        " has none: labels matched by row position" in by_row.stderr


@pytest.mark.parametrize("ids, message", [
    (np.r_[np.arange(79), 5], "id 5 appears more than once"),
    (np.arange(1, 81), "no labels for 1 id of"),
])
def test_ids_that_cannot_be_joined_are_refused(tmp_path, rng, ids, message):
    features = write_features(tmp_path / "f.parquet", rng.normal(size=(80, 2)),
                              rng.integers(2, size=80))
    labels = tmp_path / "l.parquet"
    pq.write_table(pa.table({"id": ids, "y": rng.integers(2, size=80)}), labels)
    out = tmp_path / "w.parquet"
    run = run_vbsw("weigh", features, "--labels", labels, "--label", "y", "-o", out)
    assert run.code == 1 and message in one_line(run)
    assert not out.exists()


def test_input_columns_the_output_reuses_are_noticed(tmp_path, rng):
    X = rng.normal(size=(40, 2))
    path = write_features(tmp_path / "f.parquet", X, rng.integers(2, size=40))
    first = run_vbsw("weigh", path, "--k", "4", "-o", tmp_path / "w.parquet")
    assert first.code == 0 and "replaced" not in first.stderr
    again = run_vbsw("weigh", tmp_path / "w.parquet", "--k", "4", "-o", "-")
    assert again.code == 0, again.stderr
    assert f"note: 'local_variance' and 'weight' of {tmp_path / 'w.parquet'} " \
        "replaced by the new values" in again.stderr
    assert read(again.stdout).column_names.count("weight") == 1

    table = pa.table({"features": vectors(X), "label": rng.integers(2, size=40),
                      "row": np.arange(40)[::-1] * 10})
    pq.write_table(table, tmp_path / "r.parquet")
    only = run_vbsw("weigh", tmp_path / "r.parquet", "--k", "4", "--weights-only",
                    "-o", "-")
    assert only.code == 0, only.stderr
    assert "note: the output's 'row' is the row number, not the 'row' column" \
        in only.stderr
    assert read(only.stdout).column("row").to_pylist() == list(range(40))


def test_labels_of_shape_n_by_1_in_npy_are_what_a_1d_array_is(tmp_path, rng):
    X, y = rng.normal(size=(120, 4)), rng.integers(3, size=120)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "flat.npy", y)
    np.save(tmp_path / "column.npy", y.reshape(-1, 1))
    runs = [run_vbsw("weigh", tmp_path / "X.npy", "--labels", tmp_path / name,
                     "--k", "6", "--exact", "-o", "-") for name in
            ("flat.npy", "column.npy")]
    for run in runs:
        assert run.code == 0, run.stderr
        assert "labels label: classification" in run.stderr
    assert read(runs[0].stdout).equals(read(runs[1].stdout).replace_schema_metadata(
        read(runs[0].stdout).schema.metadata))


def test_labels_from_a_file_replace_the_features_files_own(tmp_path, rng):
    X = rng.normal(size=(60, 3))
    own, theirs = rng.integers(2, size=60), rng.integers(3, size=60)
    features = write_features(tmp_path / "f.parquet", X, own)
    pq.write_table(pa.table({"id": np.arange(60), "label": theirs}),
                   tmp_path / "l.parquet")
    run = run_vbsw("weigh", features, "--labels", tmp_path / "l.parquet",
                   "--k", "5", "--exact", "-o", "-")
    assert run.code == 0, run.stderr
    out = read(run.stdout)
    assert out.column("label").to_pylist() == theirs.tolist()
    assert out.column_names.count("label") == 1
    assert f"note: 'label' of {features} replaced by the --labels file's, from " \
        "which the weights come" in run.stderr
    alone = write_features(tmp_path / "a.parquet", X, theirs)
    plain = read(run_vbsw("weigh", alone, "--k", "5", "--exact", "-o", "-").stdout)
    np.testing.assert_allclose(out.column("weight").to_numpy(),
                               plain.column("weight").to_numpy(), rtol=1e-12)


def test_ids_of_another_type_are_named_in_the_refusal(tmp_path, rng):
    features = write_features(tmp_path / "f.parquet", rng.normal(size=(20, 2)),
                              rng.integers(2, size=20))
    pq.write_table(pa.table({"id": [str(i) for i in range(20)],
                             "y": rng.integers(2, size=20)}), tmp_path / "l.parquet")
    run = run_vbsw("weigh", features, "--labels", tmp_path / "l.parquet", "--label",
                   "y", "-o", "-")
    assert run.code == 1
    assert one_line(run).endswith(f"no labels for 20 ids of {features} (first: 0)"
                                  f"; its ids are string, those of {features} int64")


def test_out_of_memory_suggests_a_smaller_k(tmp_path, rng):
    path = write_features(tmp_path / "f.parquet", rng.normal(size=(30, 2)),
                          rng.integers(2, size=30))
    script = ("import sys, vbsw_cli.cli.weigh as cli\n"
              "def short(*a, **k): raise MemoryError\n"
              "cli.weigh = short\n"
              "from vbsw_cli.cli import main\n"
              "main(sys.argv[1:])\n")
    run = subprocess.run([sys.executable, "-c", script, "weigh", str(path),
                          "--k", "5", "-o", str(tmp_path / "w.parquet")],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "vbsw weigh: error: out of memory; try a smaller "
                                  "input or a smaller --k (the search holds 32 "
                                  "bytes per row and neighbour)")
    assert not (tmp_path / "w.parquet").exists()


@pytest.mark.parametrize("index", ["reversed range", "named"])
def test_pandas_finds_the_input_index_again(tmp_path, rng, index):
    import pandas as pd

    frame = pd.DataFrame({"x0": rng.normal(size=80), "x1": rng.normal(size=80),
                          "label": rng.integers(2, size=80)})
    frame.index = frame.index[::-1] if index == "reversed range" \
        else pd.Index(np.arange(80) * 10, name="sample")
    frame.to_parquet(tmp_path / "in.parquet")

    for extra in ([], ["--weights-only"]):
        run = run_vbsw("weigh", tmp_path / "in.parquet", "--feature-columns", "x*",
                       "--k", "5", *extra, "-o", tmp_path / "out.parquet")
        assert run.code == 0, run.stderr
        back = pd.read_parquet(tmp_path / "out.parquet")
        if extra and index == "named":  # the index column is not written
            assert back.index.equals(pd.RangeIndex(80))
        else:
            assert back.index.equals(frame.index)
        assert back["weight"].mean() == pytest.approx(1.0)
