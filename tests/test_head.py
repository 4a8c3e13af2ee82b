"""vbsw retrain-head: the weighted head, its ONNX export, the merged model."""

from __future__ import annotations

import json
from pathlib import Path


import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import SAMPLE, Run, run_here, run_vbsw, write_features
from vbsw_cli.errors import DataError, UsageError
from vbsw_cli.head import (HeadOptions, head_to_onnx, merge_with_backbone,
                           read_metadata, train_head)
from vbsw_cli.io import Labels
from vbsw_cli.onnx_graph import cut, find_cut, make_model

LBFGS = HeadOptions(optimizer="lbfgs", epochs=500, l2=1e-6, tol=1e-10)


def classes(codes, names=None) -> list[Labels]:
    codes = np.asarray(codes)
    names = names or sorted(set(codes.tolist()))
    return [Labels("label", "classification", codes, list(names))]


def targets(Y) -> list[Labels]:
    Y = np.asarray(Y, dtype=np.float64).reshape(len(Y), -1)
    return [Labels("y", "regression", Y)]


def run_onnx(model: onnx.ModelProto, X: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: X.astype(np.float32)})[0]


def blobs(rng, n=150, n_features=4, n_classes=3):
    centres = rng.normal(scale=3, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, n)
    X = centres[y] + rng.normal(size=(n, n_features))
    return (X * 5 + 2).astype(np.float32), y


def vbsw(capture, *args) -> Run:
    return run_here(capture, *args)


# ---------------------------------------------------------------------------
# Weights


def test_equal_weights_train_the_unweighted_head(rng):
    X, y = blobs(rng)
    options = HeadOptions(epochs=40, hidden=3)
    plain = train_head(X, classes(y), None, options=options)
    equal = train_head(X, classes(y), np.full(len(X), 3.7), options=options)
    assert plain.epochs_run == equal.epochs_run
    for a, b in zip(plain.layers(), equal.layers()):
        np.testing.assert_allclose(a[0], b[0], atol=1e-4)
        np.testing.assert_allclose(a[1], b[1], atol=1e-4)


def test_equal_weights_reach_the_unweighted_optimum(rng):
    # lbfgs follows rounding differences to slightly different paths, so compare
    # the converged (convex, linear) heads rather than the iterates.
    X, y = blobs(rng)
    plain = train_head(X, classes(y), None, options=LBFGS)
    equal = train_head(X, classes(y), np.full(len(X), 0.2), options=LBFGS)
    np.testing.assert_allclose(plain.predict_proba(X), equal.predict_proba(X),
                               atol=1e-3)


@settings(max_examples=6, deadline=None)
@given(scale=st.floats(0.01, 100), seed=st.integers(0, 2**16))
def test_weight_scale_does_not_change_the_head(scale, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(60, 3)).astype(np.float32)
    Y = X @ rng.normal(size=(3, 1)) + rng.normal(size=(60, 1))
    weight = rng.uniform(1, 20, len(X))
    a = train_head(X, targets(Y), weight, options=LBFGS)
    b = train_head(X, targets(Y), weight * scale, options=LBFGS)
    np.testing.assert_allclose(a.predict(X), b.predict(X), atol=1e-3)


def assert_same_head(a, b, atol=1e-6):
    for (Wa, ba), (Wb, bb) in zip(a.layers(), b.layers()):
        np.testing.assert_allclose(Wa, Wb, atol=atol)
        np.testing.assert_allclose(ba, bb, atol=atol)


@pytest.mark.parametrize("scale", [1e-8, 1e8, 1e-300, 1e300])
def test_any_weight_scale_trains_the_same_head(rng, scale):
    # scikit-learn divides the L2 term by the batch's weight sum: unscaled,
    # weights x 1e-8 train with an L2 penalty 1e8 times larger.
    X, y = blobs(rng)
    weight = rng.uniform(1, 40, len(X))
    options = HeadOptions(epochs=30, hidden=3, l2=1.0)
    plain = train_head(X, classes(y), weight, options=options)
    scaled = train_head(X, classes(y), weight * scale, options=options)
    assert plain.epochs_run == scaled.epochs_run
    assert_same_head(plain, scaled)


def test_raw_weights_train_the_mean_one_head(rng):
    X = rng.normal(size=(80, 3)).astype(np.float32)
    Y = X @ rng.normal(size=(3, 1)) + rng.normal(size=(80, 1))
    raw = rng.uniform(1, 50, len(X))
    options = HeadOptions(epochs=30, l2=1.0)
    a = train_head(X, targets(Y), raw, options=options)
    b = train_head(X, targets(Y), raw / raw.mean(), options=options)
    assert_same_head(a, b)


def test_heavy_points_are_fitted_better_in_regression(rng):
    # Two groups on the same inputs with opposite slopes: one line cannot fit
    # both, so the weights decide which group it follows.
    x = rng.uniform(-1, 1, size=(200, 1)).astype(np.float32)
    group_a = np.arange(200) < 100
    y = np.where(group_a, 2 * x[:, 0], -x[:, 0] + 0.5)
    weight = np.where(group_a, 20.0, 1.0)
    plain = train_head(x, targets(y), None, options=LBFGS)
    weighted = train_head(x, targets(y), weight, options=LBFGS)

    def mse(head, rows):
        return float(np.mean((head.predict(x)[rows, 0] - y[rows]) ** 2))

    assert mse(weighted, group_a) < 0.5 * mse(plain, group_a)
    assert mse(weighted, ~group_a) > mse(plain, ~group_a)


def test_heavy_points_are_fitted_better_in_classification(rng):
    # Overlapping classes: heavily weighted rows of class 1 pull the boundary.
    X, y = blobs(rng, n=300, n_features=2, n_classes=2)
    X = X + rng.normal(scale=20, size=X.shape).astype(np.float32)
    heavy = y == 1
    weight = np.where(heavy, 15.0, 1.0)
    plain = train_head(X, classes(y), None, options=LBFGS)
    weighted = train_head(X, classes(y), weight, options=LBFGS)
    p_plain = plain.predict_proba(X)[heavy, 1]
    p_weighted = weighted.predict_proba(X)[heavy, 1]
    assert np.mean(np.log(p_weighted)) > np.mean(np.log(p_plain))
    assert np.mean(weighted.predict(X)[heavy] == 1) >= \
        np.mean(plain.predict(X)[heavy] == 1)


def test_bad_weights_are_refused(rng):
    X, y = blobs(rng, n=20)
    for weight, text in [(np.full(20, np.nan), "NaN"), (-np.ones(20), "negative"),
                         (np.zeros(20), "every weight is 0"),
                         (np.ones(5), "5 weights for 20 rows")]:
        with pytest.raises(DataError, match=text):
            train_head(X, classes(y), weight)


def test_the_command_offers_the_core_optimizers():
    from vbsw_cli.cli import head as cli_head
    from vbsw_cli import head as core_head

    assert cli_head.OPTIMIZERS == core_head.OPTIMIZERS
    assert set(cli_head.STEP_OPTIONS) <= set(vars(core_head.HeadOptions()))


def test_cli_momentum_reaches_sgd(capfdbinary, tmp_path, weighted):
    for args, momentum in [(["--momentum", "0.5"], 0.5), ([], 0.9)]:
        out = tmp_path / f"h{momentum}.onnx"
        run = vbsw(capfdbinary, "retrain-head", weighted, "-o", out,
                   "--optimizer", "sgd", "--epochs", "2", *args)
        assert run.code == 0, run.stderr
        training = read_metadata(onnx.load(str(out)))["training"]
        assert training["momentum"] == momentum


def test_cli_head_to_the_null_device_for_a_smoke_check(capfdbinary, weighted):
    run = vbsw(capfdbinary, "retrain-head", weighted, "-o", "/dev/null",
               "--epochs", "2")
    assert run.code == 0, run.stderr
    assert "wrote /dev/null" in run.stderr


def test_cli_merged_model_follows_a_head_to_the_null_device(capfdbinary,
                                                           tmp_path, rng):
    backbone = small_backbone(rng)
    onnx.save(backbone, str(tmp_path / "bb.onnx"))
    images = rng.normal(size=(30, 3, 4)).astype(np.float32)
    features = run_onnx(cut(backbone, "embedding"), images)
    write_features(tmp_path / "f.parquet", features, rng.integers(0, 2, 30),
                   weight=np.ones(30))
    before = sorted(p.name for p in Path("/dev").iterdir())

    for merged in ([], ["--merged-output", "/dev/null"]):
        run = vbsw(capfdbinary, "retrain-head", tmp_path / "f.parquet", "-o",
                   "/dev/null", "--backbone", tmp_path / "bb.onnx", "--epochs",
                   "2", *merged)
        assert run.code == 0, run.stderr

    # never a file beside the null device (/dev/null.merged.onnx)
    assert sorted(p.name for p in Path("/dev").iterdir()) == before


def test_cli_step_options_reach_adam_with_their_defaults(capfdbinary, tmp_path,
                                                         weighted):
    given = ["--learning-rate", "0.01", "--batch-size", "32"]
    for args, rate, batch in [(given, 0.01, 32), ([], 1e-3, 256)]:
        out = tmp_path / f"h{batch}.onnx"
        run = vbsw(capfdbinary, "retrain-head", weighted, "-o", out,
                   "--epochs", "2", *args)
        assert run.code == 0, run.stderr
        training = read_metadata(onnx.load(str(out)))["training"]
        assert (training["learning_rate"], training["batch_size"]) == (rate, batch)


def test_options_are_checked():
    for options, text in [(HeadOptions(optimizer="rmsprop"), "--optimizer rmsprop"),
                          (HeadOptions(epochs=0), "--epochs 0"),
                          (HeadOptions(learning_rate=-1), "--learning-rate -1"),
                          (HeadOptions(hidden=-2), "--hidden -2"),
                          (HeadOptions(l2=-0.5), "--l2 -0.5")]:
        with pytest.raises(UsageError, match=text):
            options.check()


def test_one_class_is_refused(rng):
    X = rng.normal(size=(10, 2))
    with pytest.raises(DataError, match="single class"):
        train_head(X, classes(np.zeros(10, int)))


# ---------------------------------------------------------------------------
# ONNX export


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("hidden", [0, 5])
@pytest.mark.parametrize("standardize", [True, False])
def test_onnx_head_gives_the_estimator_probabilities(rng, n_classes, hidden,
                                                     standardize):
    X, y = blobs(rng, n_classes=n_classes)
    options = HeadOptions(hidden=hidden, epochs=30, standardize=standardize)
    head = train_head(X, classes(y), rng.uniform(1, 5, len(X)), options=options)
    model = head_to_onnx(head)
    out = run_onnx(model, X)
    assert out.shape == (len(X), n_classes)
    np.testing.assert_allclose(out, head.predict_proba(X), atol=1e-5)
    nodes = [node.op_type for node in model.graph.node]
    assert ("Sigmoid" in nodes) == (n_classes == 2)
    assert ("Relu" in nodes) == (hidden > 0)
    assert model.ir_version == 9


@pytest.mark.parametrize("hidden", [0, 4])
def test_onnx_head_gives_the_estimator_predictions(rng, hidden):
    X = rng.normal(size=(120, 5)).astype(np.float32)
    Y1 = X @ rng.normal(size=(5, 1)) * 3 + 10
    Y2 = np.column_stack([np.sin(X[:, 0]), X[:, 1] ** 2])
    labels = [Labels("a", "regression", Y1), Labels("b", "regression", Y2)]
    head = train_head(X, labels, options=HeadOptions(hidden=hidden, epochs=30))
    out = run_onnx(head_to_onnx(head), X)
    assert out.shape == (120, 3)
    np.testing.assert_allclose(out, head.predict(X), rtol=1e-5, atol=1e-5)
    assert read_metadata(head_to_onnx(head))["n_outputs"] == [1, 2]


def test_string_classes_are_kept_in_the_metadata(rng):
    X, y = blobs(rng)
    names = ["cat", "dog", "émeu"]
    head = train_head(X, classes(y, names), options=HeadOptions(epochs=20))
    metadata = read_metadata(head_to_onnx(head))
    assert metadata["task"] == "classification"
    assert metadata["classes"] == names
    assert metadata["labels"] == ["label"]


# ---------------------------------------------------------------------------
# Merging with a backbone


def small_backbone(rng) -> onnx.ModelProto:
    """Image 3x4 -> Flatten -> MatMul+Relu (6) -> Gemm (3) -> Softmax."""
    W1 = rng.normal(size=(12, 6)).astype(np.float32)
    W2 = rng.normal(size=(6, 3)).astype(np.float32)
    b2 = rng.normal(size=3).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W1"], ["hidden"]),
             helper.make_node("Relu", ["hidden"], ["embedding"]),
             helper.make_node("Gemm", ["embedding", "W2", "b2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["scores"], axis=1)]
    graph = helper.make_graph(
        nodes, "backbone",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2"),
         numpy_helper.from_array(b2, "b2")])
    return make_model(graph, metadata={"vbsw": "{}", "author": "test"})


@pytest.mark.parametrize("layer", ["auto", "hidden", "output"])
def test_merged_model_equals_cut_then_head(rng, layer):
    backbone = small_backbone(rng)
    images = rng.normal(size=(40, 3, 4)).astype(np.float32)
    tensor = find_cut(backbone, layer)
    features = run_onnx(cut(backbone, tensor), images).reshape(40, -1)
    y = rng.integers(0, 4, 40)
    head = train_head(features, classes(y, ["a", "b", "c", "d"]),
                      options=HeadOptions(hidden=3, epochs=20))
    head_model = head_to_onnx(head)
    merged = merge_with_backbone(backbone, head_model, layer)
    np.testing.assert_allclose(run_onnx(merged, images), run_onnx(head_model, features),
                               atol=1e-5)
    assert read_metadata(merged)["classes"] == ["a", "b", "c", "d"]
    assert [i.name for i in merged.graph.input] == ["image"]
    assert len(backbone.graph.node) == 5  # the backbone itself is unchanged


def test_merge_refuses_a_head_of_another_width(rng):
    backbone = small_backbone(rng)
    head = train_head(rng.normal(size=(30, 5)), classes(rng.integers(0, 2, 30)),
                      options=HeadOptions(epochs=5))
    with pytest.raises(DataError, match="has 6 features per row, the head takes 5"):
        merge_with_backbone(backbone, head_to_onnx(head))


# ---------------------------------------------------------------------------
# Command line


@pytest.fixture
def weighted(tmp_path, rng):
    X, y = blobs(rng, n=80)
    names = np.array(["ant", "bee", "cow"])[y]
    return write_features(tmp_path / "w.parquet", X, y,
                          weight=rng.uniform(0.5, 2, 80), name=names)


def test_cli_writes_a_head_that_runs(tmp_path, weighted):
    out = tmp_path / "head.onnx"
    run = run_vbsw("retrain-head", weighted, "-o", out, "--label", "name",
                   "--hidden", "4", "--epochs", "30", "--seed", "3")
    assert run.code == 0, run.stderr
    assert run.stdout == b""
    assert "weighted" in run.stderr and "wrote" in run.stderr
    model = onnx.load(str(out))
    metadata = read_metadata(model)
    assert metadata["classes"] == ["ant", "bee", "cow"]
    assert metadata["trained_on"]["weight_column"] == "weight"
    assert metadata["training"]["seed"] == 3
    X = pq.read_table(weighted).column("features").combine_chunks()
    X = X.flatten().to_numpy().reshape(80, -1)
    proba = run_onnx(model, X)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)


def test_cli_is_deterministic_and_writes_to_stdout(capfdbinary, weighted):
    args = ("retrain-head", weighted, "-o", "-", "--epochs", "10", "-q")
    first = vbsw(capfdbinary, *args)
    second = vbsw(capfdbinary, *args)
    assert first.code == 0 and first.stderr == ""
    model = onnx.load_from_string(first.stdout)
    assert model.graph.output[0].name == "probabilities"
    again = onnx.load_from_string(second.stdout)
    assert model.graph.initializer == again.graph.initializer


def test_cli_baseline_ignores_the_weights(capfdbinary, tmp_path, weighted):
    table = pq.read_table(weighted).drop_columns(["weight"])
    pq.write_table(table, tmp_path / "plain.parquet")
    run = vbsw(capfdbinary, "retrain-head", tmp_path / "plain.parquet", "--no-weights",
                   "-o", tmp_path / "b.onnx", "--epochs", "5")
    assert run.code == 0, run.stderr
    assert "unweighted" in run.stderr
    metadata = read_metadata(onnx.load(str(tmp_path / "b.onnx")))
    assert metadata["trained_on"]["weight_column"] is None


def test_cli_merges_with_a_backbone(capfdbinary, tmp_path, rng):
    backbone = small_backbone(rng)
    onnx.save(backbone, str(tmp_path / "bb.onnx"))
    images = rng.normal(size=(50, 3, 4)).astype(np.float32)
    features = run_onnx(cut(backbone, "embedding"), images)
    y = rng.integers(0, 2, 50)
    write_features(tmp_path / "f.parquet", features, y, weight=np.ones(50))
    run = vbsw(capfdbinary, "retrain-head", tmp_path / "f.parquet",
               "-o", tmp_path / "h.onnx",
                   "--backbone", tmp_path / "bb.onnx", "--epochs", "10")
    assert run.code == 0, run.stderr
    merged = onnx.load(str(tmp_path / "h.merged.onnx"))
    head = onnx.load(str(tmp_path / "h.onnx"))
    np.testing.assert_allclose(run_onnx(merged, images), run_onnx(head, features),
                               atol=1e-5)


@pytest.mark.parametrize("args, code, text", [
    (["--weight-column", "wieght"], 1, "no weight column 'wieght'; did you mean "
     "'weight'?"),
    (["--label", "lable"], 1, "no label column 'lable'"),
    (["--features", "feats"], 1, "no feature column 'feats'"),
    (["--optimizer", "rmsprop"], 2, "--optimizer rmsprop: choose one of adam"),
    (["--epochs", "0"], 2, "--epochs 0: must be at least 1"),
    (["--task", "ranking"], 2, "--task ranking"),
    (["--merged-output", "m.onnx"], 2, "--merged-output needs --backbone"),
    (["--layer", "embedding"], 2, "--layer embedding needs --backbone MODEL.onnx"),
    (["--momentum", "0.5"], 2, "--momentum 0.5 applies to --optimizer sgd only, "
     "not --optimizer adam"),
    (["--momentum", "0", "--optimizer", "lbfgs"], 2, "--momentum 0 applies to "
     "--optimizer sgd only, not --optimizer lbfgs"),
    (["--learning-rate", "0.1", "--optimizer", "lbfgs"], 2, "--learning-rate 0.1 "
     "applies to --optimizer adam or sgd only, not --optimizer lbfgs"),
    (["--batch-size", "32", "--optimizer", "lbfgs"], 2, "--batch-size 32 "
     "applies to --optimizer adam or sgd only"),
    (["--no-weights", "--weight-column", "weight"], 2, "--weight-column weight "
     "and --no-weights: the baseline reads no weights"),
])
def test_cli_errors_are_one_line(capfdbinary, tmp_path, weighted, args, code, text):
    out = tmp_path / "h.onnx"
    run = vbsw(capfdbinary, "retrain-head", weighted, "-o", out, *args)
    assert run.code == code
    assert text in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert run.stdout == b""
    assert not out.exists()


def test_cli_data_errors(capfdbinary, tmp_path, rng):
    X, y = blobs(rng, n=20)
    bad = np.ones(20)
    bad[4] = np.nan
    write_features(tmp_path / "nan_w.parquet", X, y, weight=bad)
    X_nan = X.copy()
    X_nan[2, 1] = np.inf
    write_features(tmp_path / "nan_x.parquet", X_nan, y, weight=np.ones(20))
    write_features(tmp_path / "one.parquet", X, np.zeros(20, int),
                   weight=np.ones(20))
    pq.write_table(pa.table({"features": pa.array([], pa.list_(pa.float32())),
                             "label": pa.array([], pa.int64())}),
                   tmp_path / "empty.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "bb.onnx").write_bytes(b"not a model")
    write_features(tmp_path / "ok.parquet", X, y, weight=np.ones(20))
    cases = [("nan_w.parquet", [], "weight column 'weight' has NaN"),
             ("nan_x.parquet", [], "feature column 'features' has NaN"),
             ("one.parquet", [], "one.parquet: label column 'label' has a "
              "single class"),
             ("empty.parquet", [], "no rows"),
             ("corrupt.parquet", [], "not a readable Parquet file"),
             ("missing.parquet", [], "no such file"),
             ("ok.parquet", ["--backbone", tmp_path / "bb.onnx"],
              "not a valid ONNX model")]
    for name, extra, text in cases:
        out = tmp_path / "h.onnx"
        run = vbsw(capfdbinary, "retrain-head", tmp_path / name, "-o", out, *extra)
        assert run.code == 1, (name, run.stderr)
        assert text in run.stderr, name
        assert len(run.stderr.strip().splitlines()) == 1, name
        assert not out.exists()


def test_cli_refuses_features_of_width_0(capfdbinary, tmp_path, rng):
    pq.write_table(pa.table({
        "features": pa.array([[]] * 40, type=pa.list_(pa.float32())),
        "label": rng.integers(3, size=40), "weight": np.ones(40)}),
        tmp_path / "empty.parquet")
    out = tmp_path / "h.onnx"
    run = vbsw(capfdbinary, "retrain-head", tmp_path / "empty.parquet", "-o", out)
    assert run.code == 1, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"vbsw retrain-head: error: {tmp_path / 'empty.parquet'}: column "
        "'features' has no values per row (width 0)"]
    assert not out.exists()


@pytest.mark.parametrize("args, column", [
    (["--label", "features"], "features"),
    (["--feature-columns", "a0,a1", "--label", "a1"], "a1"),
    (["--feature-columns", "a*,label"], "label"),
])
def test_cli_refuses_a_label_among_the_features(capfdbinary, tmp_path, rng,
                                                args, column):
    X, y = blobs(rng, n=20, n_features=2)
    write_features(tmp_path / "f.parquet", X, y, a0=X[:, 0], a1=X[:, 1])
    out = tmp_path / "h.onnx"
    run = vbsw(capfdbinary, "retrain-head", tmp_path / "f.parquet", "-o", out,
               "--no-weights", *args)
    assert run.code == 2, run.stderr
    assert f"f.parquet: column '{column}' cannot be both a feature and a " \
        "label" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("args, text", [
    (["--feature-columns", "a0,a1", "--weight-column", "a1"],
     "column 'a1' cannot be both a feature"),
    (["--feature-columns", "a0,a1", "--label", "w", "--weight-column", "w"],
     "--weight-column w: 'w' is also a label"),
    (["--feature-columns", "a0,a1", "--weight-column", "id"],
     "--weight-column id: 'id' is also the id"),
])
def test_cli_refuses_the_weight_as_a_feature_or_label(capfdbinary, tmp_path, rng,
                                                      args, text):
    X, y = blobs(rng, n=20, n_features=2)
    write_features(tmp_path / "f.parquet", X, y, a0=X[:, 0], a1=X[:, 1],
                   w=np.ones(20))
    out = tmp_path / "h.onnx"
    run = vbsw(capfdbinary, "retrain-head", tmp_path / "f.parquet", "-o", out,
               *args)
    assert run.code == 2, run.stderr
    assert text in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_feature_patterns_skip_the_label_and_id(capfdbinary, tmp_path, rng):
    X, y = blobs(rng, n=20, n_features=2)
    pq.write_table(pa.table({"id": np.arange(20), "a0": X[:, 0], "a1": X[:, 1],
                             "label": y}), tmp_path / "f.parquet")
    out = tmp_path / "h.onnx"
    run = vbsw(capfdbinary, "retrain-head", tmp_path / "f.parquet", "-o", out,
               "--no-weights", "--feature-columns", "*", "--epochs", "3")
    assert run.code == 0, run.stderr
    assert read_metadata(onnx.load(str(out)))["trained_on"]["features"] == [
        "a0", "a1"]


def test_cli_failed_merge_leaves_old_outputs(capfdbinary, tmp_path, rng):
    backbone = small_backbone(rng)
    onnx.save(backbone, str(tmp_path / "bb.onnx"))
    write_features(tmp_path / "f.parquet", rng.normal(size=(30, 5)),
                   rng.integers(0, 2, 30), weight=np.ones(30))
    (tmp_path / "h.onnx").write_bytes(b"old")
    run = vbsw(capfdbinary, "retrain-head", tmp_path / "f.parquet",
               "-o", tmp_path / "h.onnx",
                   "--backbone", tmp_path / "bb.onnx", "--epochs", "5")
    assert run.code == 1
    assert f"error: {tmp_path / 'bb.onnx'}: the backbone's tensor" in run.stderr
    assert "the head takes 5" in run.stderr
    assert (tmp_path / "h.onnx").read_bytes() == b"old"
    assert not (tmp_path / "h.merged.onnx").exists()
    assert "Traceback" not in run.stderr


@pytest.fixture
def trainings(monkeypatch) -> list:
    """Every call of train_head, which is refused: a run that trains fails."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append("train_head")
        raise AssertionError("train_head was called")
    monkeypatch.setattr("vbsw_cli.head.train_head", refuse)
    return calls


@pytest.mark.parametrize("layer, code, text", [
    ([], 1, "the backbone's tensor 'embedding' has 6 features per row, the head "
     "takes 5; give the model the features were embedded with, cut with the "
     "--layer used then"),
    (["--layer", "nosuch"], 2, "--layer nosuch: no tensor of that name"),
])
def test_cli_checks_the_backbone_before_training(capfdbinary, tmp_path, rng,
                                                 trainings, layer, code, text):
    onnx.save(small_backbone(rng), str(tmp_path / "bb.onnx"))
    write_features(tmp_path / "f.parquet", rng.normal(size=(30, 5)),
                   rng.integers(0, 2, 30), weight=np.ones(30))
    run = vbsw(capfdbinary, "retrain-head", tmp_path / "f.parquet",
               "-o", tmp_path / "h.onnx", "--backbone", tmp_path / "bb.onnx",
               *layer)
    assert trainings == []
    assert run.code == code, run.stderr
    assert text in run.stderr
    assert not (tmp_path / "h.onnx").exists()


# ---------------------------------------------------------------------------
# A new user's trial: outputs, seeds, conflicting options, metadata


@pytest.fixture
def with_backbone(tmp_path, rng):
    backbone = small_backbone(rng)
    backbone.metadata_props.add(key="test_accuracy", value="0.97")
    backbone.metadata_props.add(key="seed", value="0")
    onnx.save(backbone, str(tmp_path / "bb.onnx"))
    images = rng.normal(size=(40, 3, 4)).astype(np.float32)
    features = run_onnx(cut(backbone, "embedding"), images)
    write_features(tmp_path / "f.parquet", features, rng.integers(0, 2, 40),
                   weight=np.ones(40))
    return tmp_path / "f.parquet", tmp_path / "bb.onnx"


@pytest.mark.parametrize("option", ["-o", "--merged-output"])
def test_cli_refuses_to_overwrite_the_backbone(capfdbinary, tmp_path,
                                               with_backbone, option):
    features, backbone = with_backbone
    before = backbone.read_bytes()
    other = "--merged-output" if option == "-o" else "-o"
    run = vbsw(capfdbinary, "retrain-head", features, "--backbone", backbone,
               option, backbone, other, tmp_path / "other.onnx", "--epochs", "3")
    assert run.code == 2, run.stderr
    assert f"{option} {backbone}: refusing to overwrite the input file" \
        in run.stderr
    assert backbone.read_bytes() == before
    assert not (tmp_path / "other.onnx").exists()


def test_cli_refuses_one_path_for_head_and_merged_model(capfdbinary, tmp_path,
                                                        with_backbone):
    features, backbone = with_backbone
    out = tmp_path / "both.onnx"
    run = vbsw(capfdbinary, "retrain-head", features, "--backbone", backbone,
               "-o", out, "--merged-output", out, "--epochs", "3")
    assert run.code == 2
    assert "the same file" in run.stderr
    assert not out.exists()


def test_cli_refuses_a_missing_output_folder_before_training(capfdbinary,
                                                             tmp_path, weighted):
    run = vbsw(capfdbinary, "retrain-head", weighted, "-v",
               "-o", tmp_path / "nowhere" / "h.onnx")
    assert run.code == 1
    assert "does not exist" in run.stderr and "training head" not in run.stderr


@pytest.mark.parametrize("seed", ["-1", "99999999999"])
def test_cli_seed_out_of_range_is_a_usage_error(capfdbinary, tmp_path, weighted,
                                                seed):
    run = vbsw(capfdbinary, "retrain-head", weighted, "-o", tmp_path / "h.onnx",
               "--seed", seed)
    assert run.code == 2
    assert f"error: --seed {seed}: must be in [0, 4294967295]" in run.stderr
    assert "unexpected" not in run.stderr


@pytest.mark.parametrize("args, text", [
    (["--feature-columns", "x0", "--features", "features"], "give one of them"),
    (["--label", "name,name"], "column 'name' is named twice"),
])
def test_cli_conflicting_options_are_refused(capfdbinary, tmp_path, weighted,
                                             args, text):
    run = vbsw(capfdbinary, "retrain-head", weighted, "-o", tmp_path / "h.onnx",
               *args)
    assert run.code == 2
    assert text in run.stderr
    assert not (tmp_path / "h.onnx").exists()


def test_cli_notes_real_values_read_as_classes(capfdbinary, tmp_path, rng):
    X = rng.normal(size=(60, 3))
    write_features(tmp_path / "reg.parquet", X, X @ [1.0, 2.0, 3.0],
                   weight=np.ones(60))
    run = vbsw(capfdbinary, "retrain-head", tmp_path / "reg.parquet", "-o",
               tmp_path / "h.onnx", "--task", "classification", "--epochs", "2")
    assert run.code == 0, run.stderr
    assert "note: label column 'label' has 60 classes for 60 rows" in run.stderr
    plain = vbsw(capfdbinary, "retrain-head", tmp_path / "reg.parquet", "-o",
                 tmp_path / "r.onnx", "--epochs", "2")
    assert "classes for" not in plain.stderr


def test_cli_without_o_writes_to_a_pipe(tmp_path, weighted):
    run = run_vbsw("retrain-head", weighted.name, "--epochs", "3", "-q",
                   cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert onnx.load_from_string(run.stdout).graph.output[0].name == \
        "probabilities"
    assert not (tmp_path / "w.head.onnx").exists()


def test_merged_model_moves_the_backbone_metadata(capfdbinary, tmp_path,
                                                  with_backbone):
    features, backbone = with_backbone
    run = vbsw(capfdbinary, "retrain-head", features, "--backbone", backbone,
               "-o", tmp_path / "h.onnx", "--epochs", "3", "--seed", "5")
    assert run.code == 0, run.stderr
    merged = onnx.load(str(tmp_path / "h.merged.onnx"))
    keys = {entry.key: entry.value for entry in merged.metadata_props}
    assert "test_accuracy" not in keys and "seed" not in keys
    assert keys["backbone.test_accuracy"] == "0.97"
    metadata = read_metadata(merged)
    assert metadata["training"]["seed"] == 5
    assert metadata["merged"] == {"cut": "embedding"}
    assert "merged" not in read_metadata(onnx.load(str(tmp_path / "h.onnx")))


def test_cli_keyword_options_are_taken_in_any_case(capfdbinary, tmp_path,
                                                   with_backbone):
    features, backbone = with_backbone
    run = vbsw(capfdbinary, "retrain-head", features, "--backbone", backbone,
               "--layer", "AUTO", "--task", "Regression", "--optimizer", "SGD",
               "-o", tmp_path / "h.onnx", "--epochs", "3")
    assert run.code == 0, run.stderr
    metadata = read_metadata(onnx.load(str(tmp_path / "h.merged.onnx")))
    assert metadata["merged"] == {"cut": "embedding"}
    assert metadata["task"] == "regression"
    assert metadata["training"]["optimizer"] == "sgd"


def test_cli_keeps_the_whole_provenance_history(capfdbinary, tmp_path, weighted):
    table = pq.read_table(weighted)
    embed = {"command": "embed", "parameters": {"model": "bb.onnx"}}
    weigh = {"command": "weigh", "parameters": {"k": 7}}
    table = table.replace_schema_metadata({
        b"vbsw.history": json.dumps([embed]).encode(),
        b"vbsw": json.dumps(weigh).encode()})
    pq.write_table(table, tmp_path / "chain.parquet")
    run = vbsw(capfdbinary, "retrain-head", tmp_path / "chain.parquet", "-o",
               tmp_path / "h.onnx", "--epochs", "3")
    assert run.code == 0, run.stderr
    metadata = read_metadata(onnx.load(str(tmp_path / "h.onnx")))
    assert metadata["trained_on"]["upstream"] == [embed, weigh]


def test_cli_verbose_reports_the_epochs_run(capfdbinary, tmp_path, weighted):
    run = vbsw(capfdbinary, "retrain-head", weighted, "-o", tmp_path / "h.onnx",
               "--epochs", "7", "--tol", "0", "-v")
    assert run.code == 0, run.stderr
    assert "training head, epochs: 7 in" in run.stderr
    assert "trained 7 epochs" in run.stderr


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_tol_zero_runs_every_epoch(capfdbinary, tmp_path, rng, optimizer):
    # A large step makes the loss jump about: with the default patience of 10
    # epochs without improvement, training would stop after 100 to 250 epochs.
    X = rng.normal(size=(40, 2)).astype(np.float32)
    write_features(tmp_path / "f.parquet", X, (X[:, 0] > 0).astype(int))
    run = vbsw(capfdbinary, "retrain-head", tmp_path / "f.parquet", "-o",
               tmp_path / "h.onnx", "--no-weights", "--optimizer", optimizer,
               "--lr", "0.5", "--batch-size", "8", "--epochs", "300",
               "--tol", "0")
    assert run.code == 0, run.stderr
    assert "trained 300 epochs" in run.stderr
    assert "still falling" not in run.stderr


@pytest.mark.parametrize("rate, why", [(10.0, "the loss went from"),
                                       (1000.0, "the weights left float64's range")])
def test_a_diverged_training_is_refused_not_written(rng, rate, why):
    X = rng.normal(size=(300, 5))
    y = X @ rng.normal(size=5) + 0.1 * rng.normal(size=300)
    labels = [Labels("y", "regression", y.reshape(-1, 1))]
    with pytest.raises(DataError, match=f"^training diverged at --learning-rate "
                       f"{rate:g}; lower it \\({why}"):
        train_head(X, labels, options=HeadOptions(optimizer="sgd",
                                                  learning_rate=rate, seed=0))
    calm = train_head(X, labels, options=HeadOptions(optimizer="sgd",
                                                     learning_rate=1e-3, seed=0))
    assert calm.estimator.loss_curve_[-1] < calm.estimator.loss_curve_[0]


@pytest.fixture
def separable(tmp_path, rng):
    """200 linearly separable rows: one batch, so 200 epochs are 200 steps."""
    X = rng.normal(size=(200, 2)).astype(np.float32)
    return write_features(tmp_path / "sep.parquet", X,
                          (X[:, 0] + X[:, 1] > 0).astype(int))


def test_cli_few_steps_on_small_data_suggest_more_epochs_or_lbfgs(
        capfdbinary, tmp_path, separable):
    run = vbsw(capfdbinary, "retrain-head", separable, "--no-weights",
               "-o", tmp_path / "h.onnx")
    assert run.code == 0, run.stderr
    note = next(line for line in run.stderr.splitlines() if "note:" in line)
    assert "still falling after 200 epochs, only 200 adam steps" in note
    assert "raise --epochs" in note and "--optimizer lbfgs" in note
    lbfgs = vbsw(capfdbinary, "retrain-head", separable, "--no-weights",
                 "-o", tmp_path / "h.onnx", "--optimizer", "lbfgs")
    assert "training accuracy 1.0000" in lbfgs.stderr
    assert "still falling" not in lbfgs.stderr


def test_cli_lbfgs_still_falling_suggests_no_refused_option(capfdbinary,
                                                           tmp_path, separable):
    run = vbsw(capfdbinary, "retrain-head", separable, "--no-weights",
               "-o", tmp_path / "h.onnx", "--optimizer", "lbfgs", "--epochs", "2")
    assert run.code == 0, run.stderr
    assert "note: the loss was still falling after 2 iterations of lbfgs; " \
        "raise --epochs" in run.stderr
    assert "--learning-rate" not in run.stderr


def test_cli_a_merged_model_takes_a_new_head(capfdbinary, tmp_path):
    """Its head/ and flatten names taken, the second merge picks others, cuts
    where the features were embedded, and onnxruntime runs the result."""
    backbone = SAMPLE / "digits_backbone.onnx"
    features = tmp_path / "train.parquet"
    assert run_here(capfdbinary, "embed", backbone,
                    SAMPLE / "digits_train.parquet", "-o", features, "-q").code == 0
    first, second = tmp_path / "m1.onnx", tmp_path / "m2.onnx"
    # The first head's hidden layer has the features' width (64): auto would
    # cut the merged model there; the tensor the features came from is used.
    for source, merged, hidden in ((backbone, first, ["--hidden", "64"]),
                                   (first, second, [])):
        run = run_here(capfdbinary, "retrain-head", features, "--no-weights",
                       "-o", tmp_path / "h.onnx", "--backbone", source,
                       "--merged-output", merged, *hidden)
        assert run.code == 0, run.stderr
    assert "another file than --backbone" in run.stderr  # embedded from backbone
    assert "backbone cut at '/act3/Relu_output_0' (where the features were " \
        "embedded)" in run.stderr
    names = [node.name for node in onnx.load(str(second)).graph.node]
    assert len(names) == len(set(names))
    run = run_here(capfdbinary, "evaluate", second, SAMPLE / "digits_test.parquet",
                   "--json", "-", "-q")
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout)["metrics"]["accuracy"] > 0.9


def test_cli_a_head_is_refused_as_a_backbone(capfdbinary, tmp_path, rng,
                                             trainings):
    X = rng.normal(size=(30, 4))
    write_features(tmp_path / "f.parquet", X, rng.integers(2, size=30))
    head = head_to_onnx(train_head(X, [Labels("label", "classification",
                                              rng.integers(2, size=30), [0, 1])],
                                   options=HeadOptions(epochs=5)))
    onnx.save(head, str(tmp_path / "head.onnx"))
    run = run_here(capfdbinary, "retrain-head", tmp_path / "f.parquet", "-o",
                   tmp_path / "h.onnx", "--backbone", tmp_path / "head.onnx")
    assert (run.code, trainings) == (1, [])
    assert "is a head written by vbsw retrain-head, not a backbone" in run.stderr
    assert not (tmp_path / "h.onnx").exists()


def test_a_merged_model_onnxruntime_refuses_is_not_written():
    from vbsw_cli.head import _check_loads

    nodes = [helper.make_node("Identity", ["x"], ["y"], name="same"),
             helper.make_node("Identity", ["y"], ["z"], name="same")]
    graph = helper.make_graph(
        nodes, "twice", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                       ["N", 2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 2])])
    with pytest.raises(DataError, match="would not load in onnxruntime"):
        _check_loads(make_model(graph))


def test_cli_a_stop_a_library_swallowed_ends_the_run_before_training(
        capfdbinary, tmp_path, rng, monkeypatch):
    """A signal lost inside pyarrow (its lazy import of pandas) is remembered:
    the run stops before training, not after all its epochs."""
    import signal

    import vbsw_cli.io as io_module
    from vbsw_cli import stopping

    write_features(tmp_path / "f.parquet", rng.normal(size=(40, 3)),
                   rng.integers(2, size=40))
    real, fits = io_module.read_labels, []

    def swallowed(*args, **kwargs):
        stopping.request_stop(signal.SIGTERM)  # the exception was lost
        return real(*args, **kwargs)

    monkeypatch.setattr(io_module, "read_labels", swallowed)
    monkeypatch.setattr("vbsw_cli.head._fit", lambda *a, **k: fits.append(1))
    try:
        run = run_here(capfdbinary, "retrain-head", tmp_path / "f.parquet",
                       "--no-weights", "-o", tmp_path / "h.onnx")
    finally:
        stopping.clear_stop()
    assert (run.code, fits) == (143, [])
    assert run.stderr.strip().splitlines()[-1] == (
        "vbsw retrain-head: error: interrupted; no output was written")
    assert not (tmp_path / "h.onnx").exists()
