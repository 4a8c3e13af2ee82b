"""vbsw evaluate: metrics against scikit-learn and scipy, models, comparisons."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from scipy import stats
from sklearn import metrics as skm

from conftest import SAMPLE, Run, run_here, run_vbsw, write_features
from vbsw_cli.errors import DataError
from vbsw_cli.evaluate import (as_probabilities, classification_metrics,
                               compare, disagreements, macro_f1,
                               regression_metrics, run_model, softmax, summary)
from vbsw_cli.head import HeadOptions, head_to_onnx, train_head
from vbsw_cli.io import Labels
from vbsw_cli.onnx_graph import make_model

def vbsw(capture, *args) -> Run:
    return run_here(capture, *args)


# ---------------------------------------------------------------------------
# Metrics against independent references


@pytest.mark.parametrize("n_classes", [2, 5])
def test_classification_metrics_match_scikit_learn(rng, n_classes):
    y = rng.integers(0, n_classes, 300)
    proba = softmax(rng.normal(scale=2, size=(300, n_classes)))
    got = classification_metrics(y, proba)
    pred = proba.argmax(axis=1)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert got["log_loss"] == pytest.approx(
        skm.log_loss(y, proba, labels=range(n_classes)), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1,
                max_size=40))
def test_macro_f1_matches_scikit_learn_on_any_labels(pairs):
    y_true, y_pred = (np.array(column) for column in zip(*pairs))
    expected = skm.f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert macro_f1(y_true, y_pred) == pytest.approx(expected)


def test_log_loss_of_a_certain_wrong_answer_is_finite():
    loss = classification_metrics(np.array([0]), np.array([[0.0, 1.0]]))["log_loss"]
    assert loss == pytest.approx(-math.log(np.finfo(float).eps))


def test_regression_metrics_match_scikit_learn_and_scipy(rng):
    y = rng.normal(size=200)
    p = y + rng.normal(scale=0.5, size=200)
    p[:20] = np.round(p[:20])  # ties for the ranks
    got = regression_metrics(y, p)
    assert got["mse"] == pytest.approx(skm.mean_squared_error(y, p))
    assert got["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y, p)))
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(y, p))
    assert got["max_abs_error"] == pytest.approx(skm.max_error(y, p))
    assert got["pearson"] == pytest.approx(stats.pearsonr(y, p)[0])
    assert got["spearman"] == pytest.approx(stats.spearmanr(y, p)[0])


def test_multi_output_regression_averages_over_outputs(rng):
    Y = rng.normal(size=(100, 3))
    P = Y * [1, 2, -1] + rng.normal(size=(100, 3))
    got = regression_metrics(Y, P)
    assert got["mse"] == pytest.approx(skm.mean_squared_error(Y, P))
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(Y, P))
    assert got["max_abs_error"] == pytest.approx(np.abs(Y - P).max())
    pearson = np.mean([stats.pearsonr(Y[:, j], P[:, j])[0] for j in range(3)])
    assert got["pearson"] == pytest.approx(pearson)


@pytest.mark.parametrize("scale", [1e78, 1e-90, 1e-200, 1e150])
def test_regression_metrics_are_right_at_any_scale(rng, scale):
    # sqrt((a @ a) * (b @ b)) overflowed at 1e78 (Pearson 0.0) and underflowed
    # at 1e-90 (Pearson None, "constant"); errors squared underflowed at 1e-200.
    y = rng.random(100)
    p = y + 0.1 * rng.random(100)
    got = regression_metrics(y * scale, p * scale)
    assert got["pearson"] == pytest.approx(stats.pearsonr(y, p)[0], rel=1e-12)
    assert got["spearman"] == pytest.approx(stats.spearmanr(y, p)[0], rel=1e-12)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(y, p) * scale,
                                       rel=1e-12)
    assert got["rmse"] == pytest.approx(
        math.sqrt(skm.mean_squared_error(y, p)) * scale, rel=1e-12)
    assert got["mse"] == pytest.approx(skm.mean_squared_error(y, p)
                                       * scale ** 2, rel=1e-12)


def test_metrics_beyond_float64_are_inf_and_the_rest_exact():
    y = np.array([1e308, 0.0, 0.0, 0.0])
    p = np.array([-1e308, 0.0, 0.0, 0.0])  # an error of 2e308: beyond float64
    with np.errstate(all="raise"):
        got = regression_metrics(y, p)
    assert got["mae"] == pytest.approx(5e307)
    assert got["rmse"] == pytest.approx(1e308)
    assert math.isinf(got["mse"]) and math.isinf(got["max_abs_error"])
    big = regression_metrics(np.array([1.0, 2.0, 3.0]) * 1e200,
                             np.array([1.5, 2.0, 3.0]) * 1e200)
    assert math.isinf(big["mse"]) and big["rmse"] == pytest.approx(
        math.sqrt(0.25 / 3) * 1e200)
    assert big["pearson"] == pytest.approx(stats.pearsonr([1, 2, 3],
                                                          [1.5, 2, 3])[0])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), power=st.integers(-300, 300),
       n=st.integers(3, 40))
def test_correlations_do_not_depend_on_the_scale(seed, power, n):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=n)
    p = y + rng.normal(size=n)
    scale = 10.0 ** power
    plain = regression_metrics(y, p)
    scaled = regression_metrics(y * scale, p * scale)
    assert scaled["pearson"] == pytest.approx(plain["pearson"], abs=1e-12)
    assert scaled["spearman"] == pytest.approx(plain["spearman"], abs=1e-12)
    for name, power_of_scale in [("mae", 1), ("rmse", 1), ("mse", 2)]:
        expected = plain[name] * scale ** power_of_scale \
            if abs(power * power_of_scale) < 300 else None
        if expected is not None:
            assert scaled[name] == pytest.approx(expected, rel=1e-9)


def test_constant_predictions_have_no_correlation(rng):
    got = regression_metrics(rng.normal(size=10), np.ones(10))
    assert got["pearson"] is None and got["spearman"] is None


def test_outputs_become_probabilities():
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    proba, note = as_probabilities(logits, 3)
    np.testing.assert_allclose(proba, softmax(logits))
    assert "softmax" in note
    same, note = as_probabilities(softmax(logits), 3)
    np.testing.assert_allclose(same, softmax(logits))
    assert note is None
    binary, _ = as_probabilities(np.array([[0.25], [0.9]]), 2)
    np.testing.assert_allclose(binary, [[0.75, 0.25], [0.1, 0.9]])
    with pytest.raises(DataError, match="4 outputs per row for 3 classes"):
        as_probabilities(np.zeros((2, 4)), 3)


# ---------------------------------------------------------------------------
# Comparisons


def record(run, seed, accuracy, mse=None, group=None):
    metrics = {"accuracy": accuracy}
    if mse is not None:
        metrics["mse"] = mse
    return {"run": run, "seed": seed, "group": group, "metrics": metrics}


def test_summary_is_best_mean_and_standard_error():
    values = [0.9, 0.8, 0.95, 0.85]
    got = summary(values)
    assert got["best"] == 0.95 and got["n"] == 4
    assert got["mean"] == pytest.approx(np.mean(values))
    assert got["se"] == pytest.approx(np.std(values, ddof=1) / 2)
    assert summary([3.0, 1.0], lower_is_better=True)["best"] == 1.0
    assert summary([0.5])["se"] is None


def test_gain_per_model_follows_table_4():
    # Two base models (groups), each with one baseline and three VBSW runs.
    records = [record("baseline", None, 0.90, 2.0, group="M1"),
               record("baseline", None, 0.80, 3.0, group="M2")]
    records += [record("vbsw", s, a, e, group="M1")
                for s, a, e in [(0, 0.91, 1.9), (1, 0.93, 2.5), (2, 0.89, 1.5)]]
    records += [record("vbsw", s, a, e, group="M2")
                for s, a, e in [(0, 0.79, 3.5), (1, 0.78, 3.1), (2, 0.80, 3.2)]]
    result = compare(records)
    gain = result["gains"]["vbsw"]["accuracy"]
    assert gain["n_models"] == 2
    assert gain["best"] == pytest.approx(0.03)      # M1: 0.93 - 0.90
    assert gain["mean"] == pytest.approx((0.03 + 0.00) / 2)
    mse_gain = result["gains"]["vbsw"]["mse"]       # lower is better
    assert mse_gain["best"] == pytest.approx(0.5)   # M1: 2.0 - 1.5
    assert mse_gain["mean"] == pytest.approx((0.5 - 0.1) / 2)
    runs = result["runs"]["vbsw"]
    assert runs["accuracy"]["best"] == pytest.approx(0.93)
    assert runs["mse"]["best"] == pytest.approx(1.5)
    assert result["runs"]["baseline"]["accuracy"]["n"] == 2


def test_runs_without_group_pair_by_seed():
    records = [record("baseline", s, 0.5 + s / 10) for s in range(3)]
    records += [record("vbsw", s, 0.52 + s / 10) for s in range(3)]
    records.append(record("vbsw", 7, 0.99))  # no baseline with seed 7
    gain = compare(records)["gains"]["vbsw"]["accuracy"]
    assert gain["n_models"] == 3
    assert gain["mean"] == pytest.approx(0.02)


# ---------------------------------------------------------------------------
# Running models


def linear_model(W, b, shape, *, softmax_out=False, dtype=TensorProto.FLOAT):
    """Flatten the input of ``shape`` then Gemm (and Softmax)."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "W", "b"],
                              ["z" if softmax_out else "y"])]
    if softmax_out:
        nodes.append(helper.make_node("Softmax", ["z"], ["y"], axis=1))
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", dtype, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", W.shape[1]])],
        [numpy_helper.from_array(W.astype(np.float32), "W"),
         numpy_helper.from_array(b.astype(np.float32), "b")])
    return make_model(graph)


def test_rows_are_reshaped_to_the_model_input(rng):
    W, b = rng.normal(size=(6, 2)), rng.normal(size=2)
    X = rng.normal(size=(25, 6))
    for shape in (["N", 6], ["N", 2, 3], ["N", 1, "h", 3]):
        out = run_model(linear_model(W, b, shape), X, batch_size=7).outputs
        np.testing.assert_allclose(out, X @ W + b, rtol=1e-5, atol=1e-5)


def test_mismatched_inputs_are_refused(rng):
    W, b = rng.normal(size=(6, 2)), rng.normal(size=2)
    with pytest.raises(DataError, match="takes 8 values per row"):
        run_model(linear_model(rng.normal(size=(8, 2)), b, ["N", 8]),
                  rng.normal(size=(4, 6)))
    with pytest.raises(DataError, match="do not fit"):
        run_model(linear_model(W, b, ["N", "h", 4]), rng.normal(size=(4, 6)))
    with pytest.raises(DataError, match="takes STRING tensors"):
        run_model(linear_model(W, b, ["N", 6], dtype=TensorProto.STRING),
                  rng.normal(size=(4, 6)))


# ---------------------------------------------------------------------------
# Command line


@pytest.fixture
def trained(tmp_path, rng):
    """A string-label head, its test data, and the head's own probabilities."""
    X = rng.normal(size=(90, 4)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=90) > 0).astype(int) + (X[:, 1] > 1)
    names = np.array(["low", "mid", "top"])[y]
    head = train_head(X, [Labels("kind", "classification", y,
                                 ["low", "mid", "top"])],
                      options=HeadOptions(epochs=30))
    model = tmp_path / "head.onnx"
    onnx.save(head_to_onnx(head), str(model))
    data = write_features(tmp_path / "test.parquet", X, y, kind=names)
    return model, data, head.predict_proba(X), y


def test_cli_evaluates_a_head_with_string_labels(trained):
    model, data, proba, y = trained
    run = run_vbsw("evaluate", model, data, "--label", "kind", "--json", "-",
                   "--run-name", "vbsw", "--seed", "4")
    assert run.code == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["classes"] == ["low", "mid", "top"]
    assert result["run"] == "vbsw" and result["seed"] == 4
    expected = classification_metrics(y, proba)
    for name, value in expected.items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-5)
    assert "accuracy" in run.stderr and "macro_f1" in run.stderr


def test_cli_dash_o_writes_the_record_like_every_command(capfdbinary, tmp_path,
                                                          trained):
    model, data, _, _ = trained
    out = tmp_path / "m.json"
    run = vbsw(capfdbinary, "evaluate", model, data, "--label", "kind", "-o", out)
    assert run.code == 0, run.stderr
    assert "accuracy" in json.loads(out.read_text())["metrics"]

    again = vbsw(capfdbinary, "evaluate", out, data, "--label", "kind")
    assert again.code == 2
    assert again.stderr.strip() == (f"vbsw evaluate: error: MODEL {out}: a "
                                    ".json file is a run record, not a model; "
                                    "to compare run records, give --compare")


def test_cli_dev_null_takes_the_predictions_and_the_record(capfdbinary,
                                                          trained):
    model, data, _, _ = trained
    run = vbsw(capfdbinary, "evaluate", model, data, "--label", "kind",
               "--save-predictions", os.devnull, "--json", os.devnull)
    assert run.code == 0, run.stderr
    assert run.stdout == b""
    assert "accuracy" in run.stderr
    assert Path(os.devnull).is_char_device()


def test_cli_predictions_round_trip(capfdbinary, tmp_path, trained):
    model, data, _, _ = trained
    saved = tmp_path / "pred.parquet"
    first = vbsw(capfdbinary, "evaluate", model, data, "--label", "kind", "--json",
                     tmp_path / "a.json", "--save-predictions", saved, "-q")
    assert first.code == 0 and first.stdout == b"" and first.stderr == ""
    table = pq.read_table(saved)
    assert set(table.column_names) == {"id", "kind", "probabilities", "prediction"}
    again = vbsw(capfdbinary, "evaluate", "--predictions", saved, "--label", "kind",
                     "--json", "-", "-q")
    assert again.code == 0, again.stderr
    a = json.loads((tmp_path / "a.json").read_text())["metrics"]
    assert json.loads(again.stdout)["metrics"] == pytest.approx(a)
    classes_only = table.drop_columns(["probabilities"])
    pq.write_table(classes_only, tmp_path / "classes.parquet")
    third = vbsw(capfdbinary, "evaluate", "--predictions", tmp_path / "classes.parquet",
                     "--label", "kind", "--json", "-", "-q")
    metrics = json.loads(third.stdout)["metrics"]
    assert "log_loss" not in metrics
    assert metrics["accuracy"] == pytest.approx(a["accuracy"])


def test_cli_regression_predictions_file(capfdbinary, tmp_path, rng):
    y, p = rng.normal(size=50), rng.normal(size=50)
    pq.write_table(pa.table({"label": y, "prediction": p}), tmp_path / "p.parquet")
    run = vbsw(capfdbinary, "evaluate", "--predictions", tmp_path / "p.parquet",
                   "--json", "-", "-q")
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout)["metrics"]["mae"] == pytest.approx(
        skm.mean_absolute_error(y, p))


def test_cli_task_is_taken_in_any_case(capfdbinary, tmp_path, rng):
    y, p = rng.integers(3, size=50), rng.normal(size=50)
    pq.write_table(pa.table({"label": y, "prediction": p}), tmp_path / "p.parquet")
    run = vbsw(capfdbinary, "evaluate", "--predictions", tmp_path / "p.parquet",
               "--task", "Regression", "--json", "-", "-q")
    assert run.code == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["task"] == "regression"
    assert record["metrics"]["mae"] == pytest.approx(
        skm.mean_absolute_error(y, p))


def test_cli_model_without_metadata_and_image_column(capfdbinary, tmp_path, rng):
    W, b = rng.normal(size=(6, 3)), rng.normal(size=3)
    onnx.save(linear_model(W, b, ["N", 2, 3], softmax_out=True),
              str(tmp_path / "m.onnx"))
    X = rng.normal(size=(40, 6))
    y = rng.integers(0, 3, 40)
    pq.write_table(pa.table({"image": pa.FixedSizeListArray.from_arrays(
        pa.array(X.reshape(-1)), 6), "label": y}), tmp_path / "d.parquet")
    run = vbsw(capfdbinary, "evaluate", tmp_path / "m.onnx", tmp_path / "d.parquet",
                   "--json", "-", "-q")
    assert run.code == 0, run.stderr
    expected = classification_metrics(y, softmax(X @ W + b))
    assert json.loads(run.stdout)["metrics"] == pytest.approx(expected, abs=1e-5)


def test_cli_prefers_the_column_named_as_the_model_input(capfdbinary, tmp_path,
                                                         rng):
    W, b = rng.normal(size=(6, 3)), rng.normal(size=3)
    onnx.save(linear_model(W, b, ["N", 6]), str(tmp_path / "m.onnx"))
    X, other = rng.normal(size=(30, 6)), rng.normal(size=(30, 6))
    y = rng.integers(0, 3, 30)
    write_features(tmp_path / "d.parquet", other, y, x=io_vectors(X))
    run = vbsw(capfdbinary, "evaluate", tmp_path / "m.onnx", tmp_path / "d.parquet",
               "--json", "-", "-q")
    assert run.code == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["features"] == ["x"]
    expected = classification_metrics(y, softmax(X @ W + b))
    assert record["metrics"] == pytest.approx(expected, abs=1e-5)


def test_cli_refuses_a_backbone_fed_embedded_features(capfdbinary, tmp_path):
    """8 x 8 digits and 64 features: the widths agree, the inputs do not."""
    backbone, images = SAMPLE / "digits_backbone.onnx", SAMPLE / "digits_test.parquet"
    features, head = tmp_path / "test.parquet", tmp_path / "head.onnx"
    merged = tmp_path / "merged.onnx"
    assert vbsw(capfdbinary, "embed", backbone, images, "-o", features,
                "-q").code == 0
    run = vbsw(capfdbinary, "retrain-head", features, "--no-weights", "-o", head,
               "--backbone", backbone, "--merged-output", merged, "-q")
    assert run.code == 0, run.stderr

    for model, what in ((backbone, "is the backbone that made them"),
                        (merged, "is a merged model")):
        run = vbsw(capfdbinary, "evaluate", model, features, "--json", "-")
        assert (run.code, run.stdout) == (1, b""), run.stderr
        assert run.stderr.count("\n") == 1
        assert what in run.stderr and "--features features" in run.stderr

    asked = vbsw(capfdbinary, "evaluate", backbone, features, "--features",
                 "features", "--json", "-", "-q")
    assert asked.code == 0, asked.stderr
    table = pq.read_table(features)  # renamed, its records kept
    for name in ("emb", "image"):  # "image": named as the backbone's input
        pq.write_table(table.rename_columns(["id", "label", name])
                       .replace_schema_metadata(table.schema.metadata),
                       tmp_path / "renamed.parquet")
        run = vbsw(capfdbinary, "evaluate", backbone, tmp_path / "renamed.parquet")
        assert run.code == 1, run.stderr
        assert f"column '{name}' holds features made by vbsw embed" \
            in run.stderr and f"--features {name}" in run.stderr
    for model, data in ((head, features), (merged, images)):
        run = vbsw(capfdbinary, "evaluate", model, data, "--json", "-", "-q")
        assert run.code == 0, run.stderr
        assert json.loads(run.stdout)["metrics"]["accuracy"] > 0.5


def test_cli_compare_prints_and_writes_the_table(capfdbinary, tmp_path):
    paths = []
    for name, seed, accuracy in [("baseline", 0, 0.9), ("baseline", 1, 0.8),
                                 ("vbsw", 0, 0.92), ("vbsw", 1, 0.83)]:
        path = tmp_path / f"{name}{seed}.json"
        path.write_text(json.dumps(record(name, seed, accuracy)))
        paths.append(path)
    run = vbsw(capfdbinary, "evaluate", "--compare", *paths, "--json", "-")
    assert run.code == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["gains"]["vbsw"]["accuracy"]["best"] == pytest.approx(0.03)
    assert "gain per model" in run.stderr and "0.9200" in run.stderr


def test_compare_prints_run_names_as_typed(capfdbinary, tmp_path):
    paths = []
    for name, seed in [("base[red]", 0), ("v[bold]:smile:", 0)]:
        path = tmp_path / f"{seed}{len(paths)}.json"
        path.write_text(json.dumps(record(name, seed, 0.9)))
        paths.append(path)
    run = vbsw(capfdbinary, "evaluate", "--compare", *paths)

    assert run.code == 0, run.stderr
    assert "base[red] (n=1)" in run.stderr
    assert "v[bold]:smile: (n=1)" in run.stderr


@pytest.mark.parametrize("make_args, code, text", [
    (lambda m, d, t: [m, d, "--label", "nope"], 1, "no label column 'nope'"),
    (lambda m, d, t: [m, d, "--features", "feats"], 1, "no feature column"),
    (lambda m, d, t: [m], 2, "give MODEL.onnx and DATA"),
    (lambda m, d, t: [m, d, d], 2, "3 paths given ("),
    (lambda m, d, t: [m, d, "--task", "x"], 2, "--task x"),
    (lambda m, d, t: ["-", d], 2, "MODEL -: the model cannot come from stdin"),
    (lambda m, d, t: [m, d, "--save-predictions", t / "p.csv"], 2,
     "are written as .parquet (or - for stdout)"),
    (lambda m, d, t: [m, d, "--batch-size", "0"], 2, "--batch-size 0"),
    (lambda m, d, t: [t / "bad.onnx", d], 1, "not a valid ONNX model"),
    (lambda m, d, t: [m, t / "empty.parquet"], 1, "no rows"),
    (lambda m, d, t: [m, t / "wide.parquet", "--label", "kind"], 1,
     "takes 4 values per row"),
    (lambda m, d, t: [m, t / "nan.parquet", "--label", "kind"], 1, "NaN"),
    (lambda m, d, t: [m, d, "--label", "label"], 1,
     "not among the model's 3 classes"),
    (lambda m, d, t: ["--compare", t / "bad.json"], 1, "not a JSON run record"),
    (lambda m, d, t: ["--predictions", d, "--label", "kind"], 1,
     "needs 'probabilities' or 'prediction'"),
])
def test_cli_errors(capfdbinary, tmp_path, rng, trained, make_args, code, text):
    model, data, _, _ = trained
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    (tmp_path / "bad.json").write_text("{not json")
    pq.write_table(pa.table({"features": pa.array([], pa.list_(pa.float32())),
                             "label": pa.array([], pa.int64())}),
                   tmp_path / "empty.parquet")
    write_features(tmp_path / "wide.parquet", rng.normal(size=(5, 7)),
                   np.zeros(5, int), kind=["low"] * 5)
    X = rng.normal(size=(5, 4))
    X[3, 2] = np.nan
    write_features(tmp_path / "nan.parquet", X, np.zeros(5, int), kind=["low"] * 5)
    out = tmp_path / "out.json"
    args = make_args(model, data, tmp_path)
    run = vbsw(capfdbinary, "evaluate", *args, "--json", out)
    assert run.code == code, run.stderr
    assert text in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert run.stdout == b""
    assert not out.exists()


def test_cli_refuses_features_of_width_0(capfdbinary, tmp_path, trained):
    model = trained[0]
    pq.write_table(pa.table({
        "features": pa.array([[]] * 5, type=pa.list_(pa.float32())),
        "kind": ["low"] * 5}), tmp_path / "empty.parquet")
    out = tmp_path / "out.json"
    run = vbsw(capfdbinary, "evaluate", model, tmp_path / "empty.parquet",
               "--label", "kind", "--json", out)
    assert run.code == 1, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"vbsw evaluate: error: {tmp_path / 'empty.parquet'}: column "
        "'features' has no values per row (width 0)"]
    assert run.stdout == b"" and not out.exists()


# ---------------------------------------------------------------------------
# A new user's trial


def log_model(n_features: int) -> onnx.ModelProto:
    """y = log(x): NaN for negative inputs."""
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["y"])], "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_features])])
    return make_model(graph)


def test_nan_outputs_are_refused(capfdbinary, tmp_path, rng):
    X = np.abs(rng.normal(size=(20, 2))) + 0.1
    X[[3, 9], 1] = -1.0
    with pytest.raises(DataError, match="NaN or infinite outputs for 2 of 20 "
                       r"rows \(first: row 3\)"):
        run_model(log_model(2), X, name="log.onnx")
    onnx.save(log_model(2), str(tmp_path / "log.onnx"))
    write_features(tmp_path / "d.parquet", X, rng.integers(0, 2, 20))
    run = vbsw(capfdbinary, "evaluate", tmp_path / "log.onnx",
               tmp_path / "d.parquet", "--json", tmp_path / "r.json")
    assert run.code == 1
    assert str(tmp_path / "log.onnx") in run.stderr and "2 of 20 rows" in run.stderr
    assert not (tmp_path / "r.json").exists()


def test_undefined_metrics_are_null_in_strict_json(capfdbinary, tmp_path, rng):
    onnx.save(linear_model(np.zeros((3, 1)), np.ones(1), ["N", 3]),
              str(tmp_path / "flat.onnx"))
    write_features(tmp_path / "d.parquet", rng.normal(size=(30, 3)),
                   rng.normal(size=30))
    run = vbsw(capfdbinary, "evaluate", tmp_path / "flat.onnx",
               tmp_path / "d.parquet", "--json", "-")
    assert run.code == 0, run.stderr

    def refuse(constant):
        raise AssertionError(f"{constant} in the JSON")

    metrics = json.loads(run.stdout, parse_constant=refuse)["metrics"]
    assert metrics["pearson"] is None and metrics["spearman"] is None
    assert metrics["mse"] > 0
    assert "pearson, spearman undefined" in run.stderr


@pytest.mark.parametrize("scale, notes", [
    (1e200, ["mse beyond float64's range (above 1.8e308): inf in the table, "
             "null in the JSON"]),
    (1e-90, [])])
def test_cli_huge_and_tiny_metrics_are_honest(capfdbinary, tmp_path, rng,
                                              scale, notes):
    y = rng.random(100)
    p = y + 0.1 * rng.random(100)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"label": y * scale, "prediction": p * scale}), path)
    run = vbsw(capfdbinary, "evaluate", "--predictions", path, "--json", "-")
    assert run.code == 0, run.stderr
    assert "constant" not in run.stderr and "Warning" not in run.stderr
    record = json.loads(run.stdout)
    assert record["metrics"]["pearson"] == pytest.approx(stats.pearsonr(y, p)[0])
    assert record["notes"] == notes
    assert all(f"note: {note}" in run.stderr for note in notes)
    # in the table, in scientific notation rather than written out in full
    assert f"{skm.mean_absolute_error(y, p) * scale:.3e}" in run.stderr


@pytest.mark.parametrize("fixed", [1, 7, 8])
def test_a_fixed_batch_dimension_is_padded(rng, fixed):
    W, b = rng.normal(size=(6, 2)), rng.normal(size=2)
    X = rng.normal(size=(25, 6))
    result = run_model(linear_model(W, b, [fixed, 6]), X, batch_size=10)
    np.testing.assert_allclose(result.outputs, X @ W + b, rtol=1e-5, atol=1e-5)
    assert any("exactly" in note for note in result.notes) == bool(25 % fixed)


@pytest.mark.parametrize("args, text", [
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--label", "kind,kind"], "column 'kind' is named twice"),
    (["--features", "features", "--feature-columns", "kind"], "give one of them"),
    (["--task", "regression"], "is a classification model (its vbsw metadata"),
    (["--reference", "vbsw"], "--reference vbsw names the run gains are"),
])
def test_cli_usage_errors(capfdbinary, tmp_path, trained, args, text):
    model, data, _, _ = trained
    run = vbsw(capfdbinary, "evaluate", model, data, *args,
               "--json", tmp_path / "r.json")
    assert run.code == 2
    assert text in run.stderr
    assert not (tmp_path / "r.json").exists()



@pytest.mark.parametrize("name", ["record.parquet", "record.NPY"])
def test_cli_json_under_a_data_name_is_refused(capfdbinary, tmp_path, trained,
                                               name):
    model, data, _, _ = trained
    run = vbsw(capfdbinary, "evaluate", model, data, "--json", tmp_path / name)
    assert (run.code, run.stdout) == (2, b"")
    assert f"--json {tmp_path / name}: the run record is JSON" in run.stderr
    assert not (tmp_path / name).exists()


def test_cli_refuses_swapped_paths_and_two_files_on_stdin(capfdbinary,
                                                          tmp_path, trained):
    model, data, _, y = trained
    run = vbsw(capfdbinary, "evaluate", data, model)
    assert run.code == 2 and f"DATA {model} is an ONNX model: the model comes " \
        "first" in run.stderr
    disguised = tmp_path / "model.parquet"  # swapped, and the suffix misleads
    disguised.write_bytes(model.read_bytes())
    run = vbsw(capfdbinary, "evaluate", data, disguised)
    assert run.code == 2 and f"MODEL {data} holds data, not a model" in run.stderr
    np.save(tmp_path / "y.npy", y)
    run = vbsw(capfdbinary, "evaluate", model, "-", "--labels", "-")
    assert run.code == 2 and "DATA - and --labels -: stdin holds one file" \
        in run.stderr
    run = vbsw(capfdbinary, "evaluate", "--predictions", "-", "--labels", "-")
    assert run.code == 2 and "--predictions - and --labels -" in run.stderr


def test_cli_notes_labels_taken_from_the_labels_file(capfdbinary, tmp_path,
                                                     trained):
    model, data, _, y = trained
    np.save(tmp_path / "y.npy", np.array(["low", "mid", "top"])[y])
    run = vbsw(capfdbinary, "evaluate", model, data, "--labels",
               tmp_path / "y.npy", "--json", "-")
    assert run.code == 0, run.stderr
    assert f"note: 'label' of {data} not used: the labels come from the " \
        "--labels file" in run.stderr

def test_cli_predictions_go_to_stdout(capfdbinary, tmp_path, trained):
    model, data, proba, _ = trained
    run = vbsw(capfdbinary, "evaluate", model, data, "--label", "kind",
               "--save-predictions", "-", "--json", tmp_path / "r.json", "-q")
    assert run.code == 0, run.stderr
    table = pq.read_table(pa.BufferReader(run.stdout))
    np.testing.assert_allclose(table.column("probabilities").to_pylist(), proba,
                               atol=1e-5)
    assert (tmp_path / "r.json").exists()
    both = vbsw(capfdbinary, "evaluate", model, data, "--label", "kind",
                "--save-predictions", "-", "--json", "-")
    assert both.code == 2 and both.stdout == b""
    assert "--json - and --save-predictions -: stdout takes one" in both.stderr


def test_cli_notes_predictions_that_disagree_with_probabilities(
        capfdbinary, tmp_path, trained):
    model, data, proba, _ = trained
    saved = tmp_path / "pred.parquet"
    run = vbsw(capfdbinary, "evaluate", model, data, "--label", "kind",
               "--save-predictions", saved, "-q")
    assert run.code == 0, run.stderr
    table = pq.read_table(saved)
    agreeing = vbsw(capfdbinary, "evaluate", "--predictions", saved, "--label",
                    "kind", "--json", "-")
    assert "disagree" not in agreeing.stderr and "scored from" not in \
        agreeing.stderr
    predicted = table.column("prediction").to_pylist()
    flipped = ["low" if p != "low" else "top" for p in predicted[:5]]
    changed = table.set_column(table.schema.get_field_index("prediction"),
                               "prediction", pa.array(flipped + predicted[5:]))
    pq.write_table(changed, tmp_path / "bad.parquet")
    run = vbsw(capfdbinary, "evaluate", "--predictions", tmp_path / "bad.parquet",
               "--label", "kind", "--json", "-")
    assert run.code == 0, run.stderr
    note = (f"scored from 'probabilities'; 'prediction' is not its most probable "
            f"class on 5 of {len(predicted)} rows")
    assert f"note: {note}" in run.stderr
    record = json.loads(run.stdout)
    assert record["notes"] == [note]
    assert record["metrics"] == json.loads(agreeing.stdout)["metrics"]


def test_disagreements_count_ties_and_unknown_classes():
    proba = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    assert disagreements(proba, ["a", "b"], ["b", "a", "b", "b"]) == 0
    assert disagreements(proba, ["a", "b"], ["a", "b", None, "c"]) == 3
    assert disagreements(proba, [0, 1], [1.0, 0, 1, 1]) == 0


def test_cli_output_paths_are_checked_first(capfdbinary, tmp_path, trained):
    model, data, _, _ = trained
    same = tmp_path / "same.parquet"
    run = vbsw(capfdbinary, "evaluate", model, data, "--save-predictions", same,
               "--json", same)
    assert run.code == 2 and "the same file" in run.stderr
    assert not same.exists()
    before = data.read_bytes()
    run = vbsw(capfdbinary, "evaluate", model, data, "--save-predictions", data)
    assert run.code == 2
    assert f"--save-predictions {data}: refusing to overwrite" in run.stderr
    assert "-o " not in run.stderr
    assert data.read_bytes() == before
    run = vbsw(capfdbinary, "evaluate", model, data, "--json", model)
    assert run.code == 2 and f"--json {model}: refusing" in run.stderr


def test_cli_notes_labels_matched_by_position(capfdbinary, tmp_path, rng):
    W, b = rng.normal(size=(3, 2)), rng.normal(size=2)
    onnx.save(linear_model(W, b, ["N", 3], softmax_out=True),
              str(tmp_path / "m.onnx"))
    np.save(tmp_path / "x.npy", rng.normal(size=(12, 3)).astype(np.float32))
    pq.write_table(pa.table({"id": np.arange(12)[::-1],
                             "label": rng.integers(0, 2, 12)}),
                   tmp_path / "labels.parquet")
    run = vbsw(capfdbinary, "evaluate", tmp_path / "m.onnx", tmp_path / "x.npy",
               "--labels", tmp_path / "labels.parquet")
    assert run.code == 0, run.stderr
    assert "has an 'id' column" in run.stderr
    assert "labels matched by row position" in run.stderr


@pytest.fixture
def regression_head(tmp_path, rng):
    X = rng.normal(size=(40, 3)).astype(np.float32)
    Y = X @ rng.normal(size=(3, 2))
    head = train_head(X, [Labels("a", "regression", Y[:, :1]),
                          Labels("b", "regression", Y[:, 1:])],
                      options=HeadOptions(optimizer="lbfgs", epochs=50))
    record = {"trained_on": {"features": ["x0", "x1", "x2"]}}
    onnx.save(head_to_onnx(head, extra_metadata=record),
              str(tmp_path / "reg.onnx"))
    table = pa.table({"x0": X[:, 0], "x1": X[:, 1], "x2": X[:, 2],
                      "a": Y[:, 0], "b": Y[:, 1], "label": np.zeros(40),
                      "features": io_vectors(X[:, ::-1])})
    pq.write_table(table, tmp_path / "reg.parquet")
    return tmp_path / "reg.onnx", tmp_path / "reg.parquet", head.predict(X), Y


def io_vectors(X):
    X = np.ascontiguousarray(X)
    return pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])


def test_cli_uses_the_heads_recorded_columns(capfdbinary, tmp_path,
                                            regression_head):
    model, data, predicted, Y = regression_head
    saved = tmp_path / "pred.parquet"
    run = vbsw(capfdbinary, "evaluate", model, data, "--json", "-",
               "--save-predictions", saved)
    assert run.code == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["labels"] == ["a", "b"]
    assert result["features"] == ["x0", "x1", "x2"]
    assert result["metrics"]["mse"] == pytest.approx(
        float(np.mean((predicted - Y) ** 2)), rel=1e-4)
    assert "model input 'features' <- 3 columns (x0, x1, x2)" in run.stderr
    field = pq.read_schema(saved).field("prediction")
    assert json.loads(field.metadata[b"labels"]) == ["a", "b"]
    again = vbsw(capfdbinary, "evaluate", "--predictions", saved, "--json", "-")
    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["metrics"] == pytest.approx(result["metrics"])



def test_cli_refuses_labels_in_another_order(capfdbinary, tmp_path,
                                             regression_head):
    """Trained on a,b: --label b,a would score output a against column b."""
    model, data, _, _ = regression_head
    saved = tmp_path / "pred.parquet"
    run = vbsw(capfdbinary, "evaluate", model, data, "--save-predictions", saved,
               "-q")
    assert run.code == 0, run.stderr
    for args in ([model, data], ["--predictions", saved]):
        run = vbsw(capfdbinary, "evaluate", *args, "--label", "b,a", "--json",
                   tmp_path / "r.json")
        assert run.code == 2
        assert "--label b,a: the outputs follow the labels in the order a,b" \
            in run.stderr
        assert not (tmp_path / "r.json").exists()
    run = vbsw(capfdbinary, "evaluate", model, data, "--label", "a,label",
               "--json", "-")
    assert run.code == 0, run.stderr
    assert "note: the model was trained to predict 2 columns (a, b); scored " \
        "against 2 columns (a, label) as asked" in run.stderr

def test_cli_refuses_permuted_or_missing_feature_columns(capfdbinary, tmp_path,
                                                         regression_head):
    model, data, _, _ = regression_head
    run = vbsw(capfdbinary, "evaluate", model, data,
               "--feature-columns", "x2,x1,x0")
    assert run.code == 2 and "in the order x0,x1,x2" in run.stderr
    other = vbsw(capfdbinary, "evaluate", model, data, "--features", "features")
    assert other.code == 0, other.stderr
    assert "note: the head was trained on 3 columns" in other.stderr
    pq.write_table(pq.read_table(data).drop_columns(["x1"]), tmp_path / "no.parquet")
    run = vbsw(capfdbinary, "evaluate", model, tmp_path / "no.parquet")
    assert run.code == 1
    assert "trained on 3 columns" in run.stderr and "no column 'x1'" in run.stderr


@pytest.mark.parametrize("args, column", [
    (["--label", "x1"], "x1"),
    (["--feature-columns", "x0,x1,x2,a", "--label", "a"], "a"),
    (["--features", "features", "--label", "features"], "features"),
])
def test_cli_refuses_a_label_among_the_features(capfdbinary, tmp_path,
                                                regression_head, args, column):
    model, data, _, _ = regression_head
    run = vbsw(capfdbinary, "evaluate", model, data, *args,
               "--json", tmp_path / "r.json")
    assert run.code == 2, run.stderr
    assert f"reg.parquet: column '{column}' cannot be both a feature and a " \
        "label" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


def test_cli_predictions_errors_name_the_file(capfdbinary, tmp_path, rng):
    proba = rng.dirichlet(np.ones(3), size=6)
    field = pa.field("probabilities", pa.list_(pa.float64(), 3),
                     metadata={b"classes": b"[0, 1]"})
    table = pa.table({"label": np.zeros(6, int)}).append_column(
        field, io_vectors(proba))
    pq.write_table(table, tmp_path / "p.parquet")
    run = vbsw(capfdbinary, "evaluate", "--predictions", tmp_path / "p.parquet")
    assert run.code == 1, run.stderr
    assert f"error: {tmp_path / 'p.parquet'}: 'probabilities' names 2 " \
        "classes" in run.stderr


def test_compare_refuses_mixed_tasks_under_one_name():
    records = [{**record("vbsw", 0, 0.9), "task": "classification"},
               {"run": "vbsw", "seed": 1, "task": "regression",
                "metrics": {"mse": 0.1}}]
    with pytest.raises(DataError, match="runs named 'vbsw' mix tasks"):
        compare(records)


@pytest.mark.parametrize("mode", [["--predictions", "p.parquet"],
                                  ["--compare", "a.json"]])
def test_cli_save_predictions_without_a_model_run_is_refused(capfdbinary,
                                                             tmp_path, mode):
    run = vbsw(capfdbinary, "evaluate", *mode, "--save-predictions",
               tmp_path / "s.parquet")

    assert run.code == 2
    assert "--save-predictions saves a model's predictions; with " \
           f"{mode[0]} no model runs" in run.stderr
    assert not (tmp_path / "s.parquet").exists()


def test_cli_compare_refuses_a_record_file_given_twice(capfdbinary, tmp_path,
                                                      trained):
    model, data, _, _ = trained
    record = tmp_path / "r.json"
    made = vbsw(capfdbinary, "evaluate", model, data, "--label", "kind",
                "--json", record)
    assert made.code == 0, made.stderr

    (tmp_path / "linked.json").hardlink_to(record)
    twice = vbsw(capfdbinary, "evaluate", "--compare", record,
                 tmp_path / "." / "r.json")
    linked = vbsw(capfdbinary, "evaluate", "--compare", record,
                  tmp_path / "linked.json")
    once = vbsw(capfdbinary, "evaluate", "--compare", record, "--json", "-")

    for run in (twice, linked):
        assert run.code == 2
        assert "is given twice" in run.stderr and run.stdout == b""
    assert once.code == 0, once.stderr


def test_cli_compare_reads_a_record_from_stdin(tmp_path, trained):
    model, data, _, _ = trained
    record = tmp_path / "r.json"
    made = run_vbsw("evaluate", model, data, "--label", "kind", "--run-name",
                    "b", "--json", record)
    assert made.code == 0, made.stderr
    other = record.read_text().replace('"run": "b"', '"run": "a"')

    run = run_vbsw("evaluate", "--compare", record, "-", "--json", "-",
                   stdin=other.encode())

    assert run.code == 0, run.stderr
    table = json.loads(run.stdout)
    assert {"a", "b"} <= set(json.dumps(table).replace('"', " ").split())
