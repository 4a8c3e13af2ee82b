"""vbsw embed: the cut, each input kind, devices, streaming output, errors."""

from __future__ import annotations

import io as bytes_io
import json
import os
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
from PIL import Image

from conftest import SAMPLE, run_here, run_vbsw
from vbsw_cli import embed as core
from vbsw_cli import onnx_graph
from vbsw_cli.cli import embed as cli
from vbsw_cli.errors import DataError, UsageError

BACKBONE = SAMPLE / "digits_backbone.onnx"
TEST = SAMPLE / "digits_test.parquet"
AUTO_TENSOR = "/act3/Relu_output_0"


# ---------------------------------------------------------------------------
# Helpers: an independent reference run, small generated models and inputs


def digits(n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, images (n, 64) float32, labels) of the digits test split."""
    table = pq.read_table(TEST)
    images = np.stack(table.column("image").to_numpy(zero_copy_only=False))
    ids, labels = table.column("id").to_numpy(), table.column("label").to_numpy()
    return ids[:n], images[:n].astype(np.float32), labels[:n]


def full_model(X: np.ndarray, tensor: str | None = None) -> np.ndarray:
    """The uncut sample backbone run directly with onnxruntime."""
    session = ort.InferenceSession(str(BACKBONE), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": X.reshape(-1, 1, 8, 8)})[0]


def embed_all(model=BACKBONE, path=TEST, batch_size=64, **options):
    """Features and carried columns from the core, concatenated."""
    layer = options.pop("layer", "auto")
    shape = options.pop("input_shape", None)
    backbone = core.load_backbone(str(model), layer=layer, device="cpu",
                                  input_shape=shape)
    source = core.open_input(str(path), backbone, **options)
    batches = list(core.embed(backbone, source, batch_size=batch_size))
    features = np.concatenate([b.features for b in batches])
    carried = {name: pa.concat_arrays([b.carried[name] for b in batches])
               .to_pylist() for name in batches[0].carried}
    return features, carried, source


def mlp_model(path: Path, *, softmax=False, matmul=False, input_shape=(2, 3),
              dtype=TensorProto.FLOAT, seed=0) -> tuple[Path, dict]:
    """x (N, *input_shape) -> flatten -> linear to 5 + ReLU -> linear 5->3.

    Returns the path and its weights, so tests compute the reference in numpy.
    An open size in ``input_shape`` counts as 2.
    """
    rng = np.random.default_rng(seed)
    n_in = int(np.prod([d if isinstance(d, int) else 2 for d in input_shape]))
    w1, b1 = rng.standard_normal((n_in, 5)), rng.standard_normal(5)
    w2, b2 = rng.standard_normal((5, 3)), rng.standard_normal(3)
    weights = {k: v.astype(np.float32) for k, v in
               dict(w1=w1, b1=b1, w2=w2, b2=b2).items()}
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Flatten", ["xf"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "w1", "b1"], ["hidden"]),
             helper.make_node("Relu", ["hidden"], ["features"])]
    if matmul:
        nodes += [helper.make_node("MatMul", ["features", "w2"], ["product"]),
                  helper.make_node("Add", ["product", "b2"], ["logits"])]
    else:
        nodes.append(helper.make_node("Gemm", ["features", "w2", "b2"],
                                      ["logits"]))
    last = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        last = "probs"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", dtype,
                                                     ["N", *input_shape])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    onnx.save(onnx_graph.make_model(graph), str(path))
    return path, weights


def mlp_features(X: np.ndarray, weights: dict) -> np.ndarray:
    hidden = X.reshape(len(X), -1).astype(np.float64) @ weights["w1"] + weights["b1"]
    return np.maximum(hidden, 0)


def image_folder(root: Path, n_per_class: int = 4, mode: str = "L") -> Path:
    """PNG digits in sub-folders named after their class."""
    _, images, labels = digits()
    for label in (3, 7):
        folder = root / f"digit{label}"
        folder.mkdir(parents=True)
        for i, row in enumerate(images[labels == label][:n_per_class]):
            pixels = np.round(row.reshape(8, 8) * 255).astype(np.uint8)
            Image.fromarray(pixels, "L").convert(mode).save(folder / f"{i}.png")
    return root


def read_output(path_or_bytes) -> pa.Table:
    if isinstance(path_or_bytes, bytes):
        return pq.read_table(pa.BufferReader(path_or_bytes))
    return pq.read_table(path_or_bytes)


def features_of(table: pa.Table) -> np.ndarray:
    return np.stack(table.column("features").to_numpy(zero_copy_only=False))




@pytest.fixture
def here(capfdbinary):
    """Run ``vbsw ARGS`` in this process: ``here("embed", ...)``."""
    return lambda *args: run_here(capfdbinary, *args)


def assert_failed(run, code: int, *words: str, after_rows: bool = False
                  ) -> None:
    """One error line on stderr, and nothing else; empty stdout.

    With ``after_rows`` (an error found after the first batch was embedded),
    the report of the model and the input may come before it.
    """
    assert run.code == code, run.stderr
    lines = run.stderr.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert errors == lines[-1:], run.stderr
    if not after_rows:
        assert len(lines) == 1, run.stderr
    assert all(line.split(":")[0] in ("model", "features", "device", "note",
                                      "input") for line in lines[:-1]), run.stderr
    assert run.stdout == b""
    for word in words:
        assert word in lines[-1], lines[-1]


def no_files_left(folder: Path, name: str) -> None:
    assert not any(p.name.startswith(name) or p.name.startswith(f".{name}")
                   for p in folder.iterdir()), list(folder.iterdir())


# ---------------------------------------------------------------------------
# The cut, checked without trusting it


def test_auto_cut_times_removed_layer_gives_the_logits():
    _, X, _ = digits()
    features, _, _ = embed_all()
    removed = onnx_graph.last_linear(onnx_graph.load_model(str(BACKBONE)))

    logits = features.astype(np.float64) @ removed.weight + removed.bias

    assert features.shape == (len(X), 64)
    assert removed.weight.shape == (64, 10)
    np.testing.assert_allclose(logits, full_model(X), atol=1e-4)


def test_cli_output_features_reproduce_the_logits(tmp_path):
    out = tmp_path / "features.parquet"
    run = run_vbsw("embed", BACKBONE, TEST, "-o", out)
    table = read_output(out)
    removed = onnx_graph.last_linear(onnx_graph.load_model(str(BACKBONE)))
    _, X, labels = digits()

    logits = features_of(table).astype(np.float64) @ removed.weight + removed.bias

    assert run.code == 0, run.stderr
    assert run.stdout == b""
    assert table.column_names == ["id", "label", "features"]
    assert table.schema.field("features").type == pa.list_(pa.float32(), 64)
    assert table.column("label").to_pylist() == labels.tolist()
    np.testing.assert_allclose(logits, full_model(X), atol=1e-4)
    assert f"tensor '{AUTO_TENSOR}'" in run.stderr


@pytest.mark.parametrize("softmax, matmul", [(False, False), (True, False),
                                             (True, True), (False, True)])
def test_auto_cut_of_gemm_or_matmul_add_with_or_without_softmax(tmp_path, rng,
                                                                softmax, matmul):
    model, weights = mlp_model(tmp_path / "m.onnx", softmax=softmax, matmul=matmul)
    X = rng.standard_normal((7, 2, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)

    features, carried, _ = embed_all(model, tmp_path / "x.npy", batch_size=3)

    np.testing.assert_allclose(features, mlp_features(X, weights), atol=1e-5)
    assert carried["id"] == list(range(7))


def test_an_unnamed_last_layer_is_named_by_its_output(tmp_path):
    model_path, _ = mlp_model(tmp_path / "m.onnx")
    model = onnx_graph.load_model(str(model_path))
    last = model.graph.node[-1]
    last.name = ""
    last.attribute.append(helper.make_attribute("transA", 1))

    with pytest.raises(DataError) as failure:
        onnx_graph.find_cut(model, "auto")

    assert "the last Gemm (unnamed, output 'logits') transposes" in str(failure.value)


def test_layer_by_name_and_output(tmp_path):
    _, X, _ = digits(50)
    np.save(tmp_path / "x.npy", X)
    auto, _, _ = embed_all(path=tmp_path / "x.npy")

    before_relu, _, _ = embed_all(path=tmp_path / "x.npy", layer="/fc1/Gemm_output_0")
    output, _, _ = embed_all(path=tmp_path / "x.npy", layer="output")

    assert (before_relu < 0).any()
    np.testing.assert_allclose(np.maximum(before_relu, 0), auto, atol=1e-6)
    np.testing.assert_allclose(output, full_model(X), atol=1e-5)


def test_a_tensor_named_like_a_keyword_in_another_case_is_taken_by_name(
        tmp_path):
    model_path, _ = mlp_model(tmp_path / "m.onnx")
    model = onnx_graph.load_model(str(model_path))
    for node in model.graph.node:
        node.input[:] = ["Output" if t == "hidden" else t for t in node.input]
        node.output[:] = ["Output" if t == "hidden" else t for t in node.output]

    assert onnx_graph.find_cut(model, "Output") == "Output"
    assert onnx_graph.find_cut(model, "OUTPUT") == "logits"
    assert onnx_graph.find_cut(model, "output") == "logits"
    assert onnx_graph.find_cut(model, "Auto") == "features"


def test_keyword_options_are_taken_in_any_case(tmp_path, here):
    out = tmp_path / "f.parquet"
    run = here("embed", BACKBONE, TEST, "-o", out, "--device", "CPU",
               "--layer", "Output", "-v")

    assert run.code == 0, run.stderr
    parameters = json.loads(pq.read_schema(out).metadata[b"vbsw"])["parameters"]
    assert parameters["device"] == "cpu"
    assert parameters["layer"] == "output"
    assert "(the model's output)" in run.stderr
    np.testing.assert_allclose(features_of(read_output(out)),
                               full_model(digits()[1]), atol=1e-5)


def test_layer_by_name_from_the_command_line(tmp_path, here):
    out = tmp_path / "f.parquet"
    run = here("embed", BACKBONE, TEST, "--layer", "/pool/MaxPool_output_0",
                   "-o", out)
    features = features_of(read_output(out))

    assert run.code == 0, run.stderr
    assert features.shape == (360, 32 * 4 * 4)
    assert json.loads(pq.read_schema(out).metadata[b"vbsw"])["parameters"][
        "tensor"] == "/pool/MaxPool_output_0"


def test_list_layers_prints_tensors_and_shapes_on_stdout():
    run = run_vbsw("embed", BACKBONE, "--list-layers")
    lines = run.stdout.decode().splitlines()
    by_name = {line.split()[0]: line for line in lines}
    ops = [op.op_type for op in onnx.load(str(BACKBONE)).graph.node]

    assert run.code == 0, run.stderr
    assert run.stderr == ""
    assert len(lines) == len(ops)
    assert "[batch, 64]" in by_name[AUTO_TENSOR]
    assert "<- --layer auto" in by_name[AUTO_TENSOR]
    assert sum("<-" in line for line in lines) == 1
    assert "[batch, 32, 4, 4]" in by_name["/pool/MaxPool_output_0"]


@pytest.mark.parametrize("extra, named", [([str(TEST)], "INPUT"),
                                          (["-o", "f.parquet"], "-o")])
def test_list_layers_refuses_what_it_would_ignore(tmp_path, here, extra, named):
    run = here("embed", BACKBONE, "--list-layers", *extra)

    assert_failed(run, 2, "--list-layers", f"drop {named}")
    assert not (tmp_path / "f.parquet").exists()


# ---------------------------------------------------------------------------
# Input kinds


@pytest.mark.parametrize("shape", [(64,), (1, 8, 8), (8, 8)])
def test_npy_of_any_row_shape_and_dtype(tmp_path, shape):
    _, X, _ = digits(40)
    np.save(tmp_path / "x.npy", X.astype(np.float64).reshape(40, *shape))

    features, carried, source = embed_all(path=tmp_path / "x.npy", batch_size=16)

    assert source.kind == "npy"
    np.testing.assert_allclose(features, embed_all()[0][:40], atol=1e-6)
    assert carried["id"] == list(range(40))


def test_fortran_ordered_npy_file(tmp_path):
    _, X, _ = digits(30)
    np.save(tmp_path / "x.npy", np.asfortranarray(X))

    features, _, _ = embed_all(path=tmp_path / "x.npy", batch_size=8)

    np.testing.assert_allclose(features, embed_all()[0][:30], atol=1e-6)


def test_parquet_variable_lists_and_named_columns(tmp_path):
    ids, X, labels = digits(30)
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({
        "key": pa.array([f"r{i}" for i in ids]),
        "pixels": pa.array([row.tolist() for row in X], pa.list_(pa.float64())),
        "digit": pa.array(labels.astype(str)),
        "image": pa.array(np.zeros((30, 3)).tolist()),  # not the tensor here
    }), path)

    features, carried, _ = embed_all(path=path, tensor_column="pixels",
                                     id_column="key", label_column="digit")

    np.testing.assert_allclose(features, embed_all()[0][:30], atol=1e-6)
    assert carried["key"] == [f"r{i}" for i in ids]
    assert carried["digit"] == labels.astype(str).tolist()
    assert "id" in carried and carried["id"] == list(range(30))


def test_parquet_falls_back_to_a_features_column(tmp_path):
    _, X, _ = digits(10)
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"features": cli.io.fixed_size_list(X)}), path)

    features, carried, source = embed_all(path=path)

    assert source.tensor == "features"
    assert set(carried) == {"id"}
    np.testing.assert_allclose(features, embed_all()[0][:10], atol=1e-6)


def test_image_folder_labels_from_folder_names(tmp_path):
    root = image_folder(tmp_path / "images")
    files = sorted(root.glob("*/*.png"))
    pixels = np.stack([np.asarray(Image.open(f), np.float32) / 255 for f in files])

    features, carried, source = embed_all(path=root, batch_size=3)

    assert source.kind == "image folder"
    np.testing.assert_allclose(features, embed_all(path=_npy(tmp_path, pixels))[0],
                               atol=1e-6)
    assert carried["label"] == [f.parent.name for f in files]
    assert carried["path"] == [f"{f.parent.name}/{f.name}" for f in files]
    assert carried["id"] == list(range(len(files)))


def _npy(folder: Path, X: np.ndarray) -> Path:
    path = folder / "reference.npy"
    np.save(path, X)
    return path


@pytest.mark.parametrize("input_shape, channels_first", [((2, 3, 3), False),
                                                         ((3, 2, 3), True)])
def test_image_mean_std_resize_rgb(tmp_path, input_shape, channels_first):
    model, weights = mlp_model(tmp_path / "m.onnx", input_shape=input_shape)
    height, width = input_shape[:2] if not channels_first else input_shape[1:]
    root = image_folder(tmp_path / "images", n_per_class=2, mode="RGB")
    files = sorted(root.glob("*/*.png"))
    resized = np.stack([np.asarray(Image.open(f).convert("RGB").resize(
        (width, height), Image.Resampling.BILINEAR), np.float32) for f in files])
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.25, 0.5, 1.0])
    X = (resized / 255 - mean) / std  # (n, H, W, C)
    if channels_first:
        X = np.moveaxis(X, -1, 1)

    features, _, _ = embed_all(model, root, images=core.ImageOptions(
        mean=tuple(mean), std=tuple(std)))

    np.testing.assert_allclose(features, mlp_features(X, weights), atol=1e-4)


def test_open_input_shape_is_filled_by_the_option(tmp_path, rng):
    model, weights = mlp_model(tmp_path / "m.onnx", input_shape=("a", 3))
    X = rng.standard_normal((5, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)

    features, _, _ = embed_all(model, tmp_path / "x.npy", input_shape=(2, 3))

    np.testing.assert_allclose(features, mlp_features(X, weights), atol=1e-5)
    with pytest.raises(DataError, match="--input-shape"):
        embed_all(model, tmp_path / "x.npy")
    with pytest.raises(UsageError, match="dimension 2 of 'x' is 3"):
        embed_all(model, tmp_path / "x.npy", input_shape=(3, 2))


def test_fixed_batch_dimension(tmp_path, rng):
    one, weights = mlp_model(tmp_path / "one.onnx")
    model = onnx.load(str(one))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(one))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(model, str(tmp_path / "four.onnx"))
    X = rng.standard_normal((6, 2, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)

    features, _, _ = embed_all(one, tmp_path / "x.npy", batch_size=4)

    np.testing.assert_allclose(features, mlp_features(X, weights), atol=1e-5)
    with pytest.raises(DataError, match="fixed at 4, which does not divide"):
        embed_all(tmp_path / "four.onnx", tmp_path / "x.npy")


def test_fixed_batch_model_says_batch_size_is_not_used(tmp_path, here, rng):
    path, weights = mlp_model(tmp_path / "one.onnx")
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(path))
    X = rng.standard_normal((3, 2, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)

    run = here("embed", path, tmp_path / "x.npy", "--batch-size", "64",
               "-o", tmp_path / "f.parquet")
    quiet = here("embed", path, tmp_path / "x.npy", "-o", tmp_path / "g.parquet")

    assert run.code == 0, run.stderr
    assert "note: the model's batch dimension is fixed at 1: batches of 1 row, " \
        "not --batch-size 64" in run.stderr
    assert run.stderr.index("model: ") < run.stderr.index("fixed at 1")
    assert "float32 1x2x3" in run.stderr  # the batch as the model fixes it
    assert "fixed at" not in quiet.stderr
    np.testing.assert_allclose(features_of(read_output(tmp_path / "f.parquet")),
                               mlp_features(X, weights), atol=1e-5)


def test_integer_model_input_gets_integral_values(tmp_path):
    model, weights = mlp_model(tmp_path / "m.onnx", dtype=TensorProto.INT64)
    X = np.arange(24, dtype=np.float64).reshape(4, 6)
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "bad.npy", X + 0.5)

    features, _, _ = embed_all(model, tmp_path / "x.npy")

    np.testing.assert_allclose(features, mlp_features(X, weights), rtol=1e-5)
    with pytest.raises(DataError, match=r"bad.npy: .*int64.*fractional.*"
                       r"\(first: row 0, value 0.5\)"):
        embed_all(model, tmp_path / "bad.npy")


@pytest.mark.parametrize("dtype, values, shown", [
    (TensorProto.UINT8, [-1, 0, 1, 2, 3, 4], "(0 to 255)"),
    (TensorProto.UINT8, [300, 0, 1, 2, 3, 4], "(0 to 255)"),
    (TensorProto.INT8, [0, 1, 2, 3, 4, 200], "(-128 to 127)"),
    (TensorProto.INT32, [0, 1, 2, 3, 4, 2.0**31], "(-2147483648 to 2147483647)"),
])
def test_integer_input_refuses_values_that_do_not_fit(tmp_path, here, dtype,
                                                      values, shown):
    model, _ = mlp_model(tmp_path / "m.onnx", dtype=dtype)
    X = np.array([[0, 1, 2, 3, 4, 5]] * 3 + [values])
    np.save(tmp_path / "x.npy", X)
    run = here("embed", model, tmp_path / "x.npy", "-o", tmp_path / "f.parquet")

    name = onnx.TensorProto.DataType.Name(dtype).lower()
    assert_failed(run, 1, "x.npy", f"'x' is {name} {shown}", "do not fit",
                  "row 3")
    no_files_left(tmp_path, "f.parquet")


def test_integer_input_takes_the_ends_of_its_range(tmp_path):
    model, weights = mlp_model(tmp_path / "m.onnx", dtype=TensorProto.UINT8)
    X = np.array([[0, 255, 0, 255, 1, 254], [255, 0, 7, 8, 9, 10]], np.int64)
    np.save(tmp_path / "x.npy", X)

    features, _, _ = embed_all(model, tmp_path / "x.npy")

    # float32 sums of terms up to 255 * |w|: about 1e-5 absolute rounding.
    np.testing.assert_allclose(features, mlp_features(X, weights), rtol=1e-5,
                               atol=1e-3)


def test_float16_input_refuses_values_that_overflow(tmp_path, here):
    model, _ = mlp_model(tmp_path / "m.onnx", dtype=TensorProto.FLOAT16)
    np.save(tmp_path / "x.npy", np.array([[1.0, 2, 3, 4, 5, 1e6]]))
    run = here("embed", model, tmp_path / "x.npy", "-o", tmp_path / "f.parquet")

    assert_failed(run, 1, "x.npy", "float16", "65504", "do not fit", "row 0")


INTEGER_TARGETS = [np.uint8, np.int8, np.int16, np.int32, np.int64]
SOURCES = [np.int64, np.uint64, np.int16, np.float16, np.float32, np.float64]


def fits_by_hand(values: list, target) -> bool:
    """Whether every value is a whole number in the target's range (Python)."""
    info = np.iinfo(target)
    return all(float(v).is_integer() and info.min <= int(v) <= info.max
               for v in values)


@settings(max_examples=60, deadline=None)
@given(target=st.sampled_from(INTEGER_TARGETS), source=st.sampled_from(SOURCES),
       data=st.data())
def test_integer_cast_is_exact_or_refused(target, source, data):
    """model_input either gives exactly the values, or refuses: never wraps."""
    if np.dtype(source).kind == "f":
        limit = float(np.finfo(source).max)
        element = st.floats(-limit, limit, width=np.finfo(source).bits) | \
            st.integers(-300, 300).map(float)
    else:
        info = np.iinfo(source)
        element = st.integers(int(info.min), int(info.max)) | st.integers(-300, 300)
        element = element.filter(lambda v: info.min <= v <= info.max)
    values = data.draw(st.lists(element, min_size=4, max_size=4))
    X = np.array([values], dtype=source)
    backbone = core.Backbone("m.onnx", "t", "x", (4,), np.dtype(target), "cpu",
                             None)
    source_ = core.Source()
    source_.name = "x.npy"
    raw = core.RawBatch(X, {}, 0)
    hand = [v.item() for v in X.reshape(-1)]

    if fits_by_hand(hand, target):
        out = core.model_input(raw, backbone, source_)
        assert out.dtype == target
        assert [int(v) for v in out.reshape(-1)] == [int(v) for v in hand]
    else:
        with pytest.raises(DataError, match="x.npy: the model's input 'x' is"):
            core.model_input(raw, backbone, source_)


@settings(max_examples=12, deadline=None)
@given(batch_size=st.integers(1, 40), kind=st.sampled_from(["parquet", "npy"]))
def test_features_do_not_depend_on_the_batch_size(batch_size, kind):
    path = TEST if kind == "parquet" else digits_npy()
    features, carried, _ = embed_all(path=path, batch_size=batch_size)

    ids = digits()[0].tolist() if kind == "parquet" else list(range(360))
    np.testing.assert_allclose(features, REFERENCE_FEATURES(), atol=1e-5)
    assert carried["id"] == ids


def digits_npy(cache={}) -> Path:  # noqa: B006 - one file for every example
    if "path" not in cache:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="vbsw-embed-test-"))
        cache["path"] = folder / "digits.npy"
        np.save(cache["path"], digits()[1].reshape(-1, 1, 8, 8))
    return cache["path"]


def REFERENCE_FEATURES(cache={}):  # noqa: B006 - a cache across examples
    if "x" not in cache:
        cache["x"] = embed_all(batch_size=360)[0]
    return cache["x"]


def test_many_row_groups_are_written_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "MAX_GROUP_ROWS", 100)
    monkeypatch.setattr(cli, "GROUP_BYTES", 1)
    backbone = core.load_backbone(str(BACKBONE), device="cpu")
    source = core.open_input(str(TEST), backbone)
    out = tmp_path / "f.parquet"

    n_rows, n_features = cli.write_features(
        core.embed(backbone, source, batch_size=30), source, str(out), {},
        inputs=[str(TEST)])

    assert (n_rows, n_features) == (360, 64)
    assert pq.read_metadata(out).num_row_groups == 12
    np.testing.assert_allclose(features_of(read_output(out)), REFERENCE_FEATURES(),
                               atol=1e-5)
    assert read_output(out).column("id").to_pylist() == digits()[0].tolist()


@pytest.mark.parametrize("cores, layout", [(1, (1, 1)), (2, (2, 1)), (3, (2, 1)),
                                           (16, (2, 8))])
def test_cpu_layout_splits_the_cores_between_two_batches(cores, layout):
    assert core.cpu_layout(cores) == layout


def backbone_in_flight(in_flight: int) -> core.Backbone:
    from dataclasses import replace

    return replace(core.load_backbone(str(BACKBONE), device="cpu"),
                   in_flight=in_flight)


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_batches_in_flight_come_back_in_order(in_flight):
    backbone = backbone_in_flight(in_flight)
    source = core.open_input(str(TEST), backbone)

    batches = list(core.embed(backbone, source, batch_size=7))

    assert [len(b.features) for b in batches] == [7] * 51 + [3]
    np.testing.assert_allclose(np.concatenate([b.features for b in batches]),
                               REFERENCE_FEATURES(), atol=1e-5)
    ids = pa.concat_arrays([b.carried["id"] for b in batches]).to_pylist()
    assert ids == digits()[0].tolist()


def test_a_failed_run_in_flight_is_raised_after_the_batches_before_it():
    backbone = backbone_in_flight(2)
    good = digits(12)[1].reshape(-1, 1, 8, 8)
    wrong_dtype = good[:4].astype(np.float64)  # onnxruntime refuses it
    parts = [(good[:6], {}), (good[6:], {}), (wrong_dtype, {}), (good[:6], {})]

    batches = core.run_in_order(backbone, iter(parts))
    first, second = next(batches), next(batches)

    np.testing.assert_allclose(np.concatenate([first.features, second.features]),
                               REFERENCE_FEATURES()[:12], atol=1e-5)
    with pytest.raises(Exception, match="(?i)type"):
        next(batches)


def test_stopping_early_leaves_no_batch_running():
    import threading

    backbone = backbone_in_flight(2)
    source = core.open_input(str(TEST), backbone)
    batches = core.embed(backbone, source, batch_size=10)

    next(batches)
    batches.close()

    assert not [t for t in threading.enumerate()
                if t.name.startswith("vbsw-embed")]


# ---------------------------------------------------------------------------
# Pipes, provenance, devices


def test_stdin_parquet_to_stdout_into_weigh():
    embedded = run_vbsw("embed", BACKBONE, "-", "-o", "-", stdin=TEST.read_bytes())
    weighed = run_vbsw("weigh", "-", "--k", "10", "-o", "-", stdin=embedded.stdout)
    table = read_output(weighed.stdout)

    assert embedded.code == 0, embedded.stderr
    assert weighed.code == 0, weighed.stderr
    assert table.num_rows == 360
    assert table.column("id").to_pylist() == digits()[0].tolist()
    assert {"features", "weight", "local_variance"} <= set(table.column_names)
    np.testing.assert_allclose(features_of(table), REFERENCE_FEATURES(), atol=1e-5)


def test_stdin_npy_streams(tmp_path):
    _, X, _ = digits(25)
    buffer = bytes_io.BytesIO()
    np.save(buffer, X.reshape(25, 1, 8, 8))

    run = run_vbsw("embed", BACKBONE, "-", "-o", "-", "--batch-size", "7",
                   stdin=buffer.getvalue())
    table = read_output(run.stdout)

    assert run.code == 0, run.stderr
    assert table.column_names == ["id", "features"]
    np.testing.assert_allclose(features_of(table), REFERENCE_FEATURES()[:25],
                               atol=1e-5)


def digits_with_nan(path: Path, row: int) -> Path:
    """The digits test split as Parquet, with a NaN pixel in ``row``."""
    ids, X, labels = digits()
    X[row, 5] = np.nan
    pq.write_table(pa.table({"id": ids, "image": pa.array(list(X)),
                             "label": labels}), path)
    return path


def assert_cut_stream(stdout: bytes) -> None:
    """Row groups went out, but no footer: a reader refuses the stream."""
    assert stdout.startswith(b"PAR1") and len(stdout) > 10_000
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(bytes_io.BytesIO(stdout))


def test_a_run_failing_after_rows_went_to_stdout_leaves_no_footer(
        tmp_path, here, monkeypatch):
    monkeypatch.setattr(cli, "MAX_GROUP_ROWS", 30)
    monkeypatch.setattr(cli, "GROUP_BYTES", 1)
    monkeypatch.setattr(cli, "HOLD_BYTES", 1)
    source = digits_with_nan(tmp_path / "nan.parquet", row=300)

    run = here("embed", BACKBONE, source, "-o", "-", "--batch-size", "30")
    weighed = run_vbsw("weigh", "-", "--k", "10", "-o", "-", stdin=run.stdout)

    assert run.code == 1, run.stderr
    assert "NaN" in run.stderr.strip().splitlines()[-1]
    assert_cut_stream(run.stdout)
    assert weighed.code == 1, weighed.stderr
    assert weighed.stdout == b""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_after_rows_went_to_stdout_leaves_no_footer(
        capfdbinary, monkeypatch, name):
    import os
    import signal

    monkeypatch.setattr(cli, "MAX_GROUP_ROWS", 30)
    monkeypatch.setattr(cli, "GROUP_BYTES", 1)
    monkeypatch.setattr(cli, "HOLD_BYTES", 1)
    real = cli.embed

    def signalled(*args, **kwargs):
        for number, batch in enumerate(real(*args, **kwargs)):
            if number == 8:  # several row groups have been written by now
                os.kill(os.getpid(), getattr(signal, name))
            yield batch

    monkeypatch.setattr(cli, "embed", signalled)
    run = run_here(capfdbinary, "embed", BACKBONE, TEST, "--batch-size", "30",
                   "-o", "-")

    assert run.code == 128 + getattr(signal, name), run.stderr
    assert_cut_stream(run.stdout)


def interrupt_after(monkeypatch, batches: int) -> None:
    """Make embed's batches stop with an interrupt after ``batches`` of them."""
    real = cli.embed

    def cut_short(*args, **kwargs):
        for number, batch in enumerate(real(*args, **kwargs)):
            if number == batches:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(cli, "embed", cut_short)


@pytest.mark.parametrize("stop", ["nan", "interrupt"])
def test_a_run_stopped_before_much_output_writes_nothing_to_stdout(
        tmp_path, capfdbinary, monkeypatch, stop):
    """Row groups are written (GROUP_BYTES 1), but held back, not sent."""
    monkeypatch.setattr(cli, "MAX_GROUP_ROWS", 30)
    monkeypatch.setattr(cli, "GROUP_BYTES", 1)
    source = digits_with_nan(tmp_path / "nan.parquet", row=300)
    if stop == "interrupt":
        source = TEST
        interrupt_after(monkeypatch, 8)
    run = run_here(capfdbinary, "embed", BACKBONE, source, "-o", "-",
                   "--batch-size", "30")

    assert run.stdout == b""
    last = run.stderr.strip().splitlines()[-1]
    if stop == "nan":
        assert run.code == 1 and "NaN" in last
    else:
        assert (run.code, last) == (130, "vbsw embed: error: interrupted; no "
                                         "output was written")


def test_provenance_records_the_cut_and_the_device(tmp_path, here):
    out = tmp_path / "f.parquet"
    here("embed", BACKBONE, TEST, "-o", out, "--device", "cpu")
    record = json.loads(pq.read_schema(out).metadata[b"vbsw"])

    assert record["command"] == "embed"
    assert record["parameters"]["tensor"] == AUTO_TENSOR
    assert record["parameters"]["provider"] == "CPUExecutionProvider"
    assert record["parameters"]["tensor_column"] == "image"
    assert record["parameters"]["n_features"] == 64


def codecs_of(path: Path) -> set[str]:
    meta = pq.read_metadata(path)
    return {meta.row_group(g).column(c).compression
            for g in range(meta.num_row_groups) for c in range(meta.num_columns)}


@pytest.mark.parametrize("option, codec", [(None, "UNCOMPRESSED"),
                                           ("none", "UNCOMPRESSED"),
                                           ("snappy", "SNAPPY"), ("zstd", "ZSTD"),
                                           ("ZSTD", "ZSTD"), ("Snappy", "SNAPPY")])
def test_compression_is_chosen_and_recorded(tmp_path, here, option, codec):
    out = tmp_path / "f.parquet"
    extra = ["--compression", option] if option else []
    run = here("embed", BACKBONE, TEST, "-o", out, "--device", "cpu", *extra)

    assert run.code == 0, run.stderr
    assert codecs_of(out) == {codec}
    record = json.loads(pq.read_schema(out).metadata[b"vbsw"])
    assert record["parameters"]["compression"] == (option or "none").lower()
    np.testing.assert_allclose(features_of(read_output(out)), REFERENCE_FEATURES(),
                               atol=1e-5)


def test_unknown_compression_is_a_usage_error(tmp_path, here):
    run = here("embed", BACKBONE, TEST, "-o", tmp_path / "f.parquet",
               "--compression", "rar")

    assert_failed(run, 2, "--compression rar", "snappy")
    no_files_left(tmp_path, "f.parquet")


def test_device_cuda_fails_cleanly_without_a_gpu(tmp_path):
    if "CUDAExecutionProvider" in _working_providers():
        pytest.skip("a CUDA GPU is usable here; this checks the failure path")
    out = tmp_path / "f.parquet"
    run = run_vbsw("embed", BACKBONE, TEST, "-o", out, "--device", "cuda")

    assert_failed(run, 1, "--device cuda", "CUDA is not usable")
    assert not out.exists()


def test_device_auto_falls_back_with_one_notice_and_clean_stderr(tmp_path):
    if "CUDAExecutionProvider" in _working_providers():
        pytest.skip("a CUDA GPU is usable here; this checks the fallback")
    run = run_vbsw("embed", BACKBONE, TEST, "-o", tmp_path / "f.parquet")
    notices = [line for line in run.stderr.splitlines() if line.startswith("note:")]

    assert run.code == 0
    assert len(notices) == 1 and "running on the CPU" in notices[0]
    assert "onnxruntime:" not in run.stderr and "[W:" not in run.stderr
    assert "device: CPU" in run.stderr


def _working_providers() -> list[str]:
    session = ort.InferenceSession(str(BACKBONE),
                                   providers=ort.get_available_providers())
    return session.get_providers()


# ---------------------------------------------------------------------------
# Errors: one line, exit code, no output file


def test_shape_that_cannot_match(tmp_path, here):
    np.save(tmp_path / "x.npy", np.zeros((4, 10), np.float32))
    run = here("embed", BACKBONE, tmp_path / "x.npy", "-o", tmp_path / "f.parquet")

    assert_failed(run, 1, "x.npy: rows have 10 values; the model's input "
                  "'image' takes 64 values (1x8x8); see --input-shape")
    no_files_left(tmp_path, "f.parquet")
    np.save(tmp_path / "x.npy", np.zeros((4, 2, 5), np.float32))
    run = here("embed", BACKBONE, tmp_path / "x.npy", "-o", tmp_path / "f.parquet")

    assert_failed(run, 1, "rows have 10 values (2x5); the model's input")


def test_dtype_that_cannot_match(tmp_path, here):
    pq.write_table(pa.table({"image": pa.array([["a"] * 64] * 3)}),
                   tmp_path / "t.parquet")
    np.save(tmp_path / "c.npy", np.zeros((3, 64), np.complex64))

    strings = here("embed", BACKBONE, tmp_path / "t.parquet", "-o",
                       tmp_path / "f.parquet")
    complex_ = here("embed", BACKBONE, tmp_path / "c.npy", "-o",
                        tmp_path / "f.parquet")

    assert_failed(strings, 1, "t.parquet", "'image'", "expected numbers")
    assert_failed(complex_, 1, "c.npy", "complex64", "expected numbers")
    no_files_left(tmp_path, "f.parquet")


@pytest.mark.parametrize("option, words", [
    (["--tensor-column", "imag"], ["no tensor column 'imag'", "did you mean 'image'"]),
    (["--label-column", "digit"], ["no label column 'digit'", "--label-column"]),
    (["--id-column", "key"], ["no id column 'key'", "--id-column"]),
])
def test_missing_named_column(tmp_path, option, words, here):
    run = here("embed", BACKBONE, TEST, "-o", tmp_path / "f.parquet", *option)

    assert_failed(run, 1, "digits_test.parquet", *words)
    no_files_left(tmp_path, "f.parquet")


@pytest.mark.parametrize("option", [["--label", "image"],
                                    ["--label-column", "image"],
                                    ["--id-column", "image"]])
def test_label_or_id_that_is_the_tensor_column(tmp_path, option, here):
    run = here("embed", BACKBONE, TEST, "-o", tmp_path / "f.parquet", *option)
    role = "id" if option[0] == "--id-column" else "label"

    assert_failed(run, 2, f"--{role}-column image", "'image' is the tensor "
                  f"column of {TEST}", "--tensor-column")
    assert "no label column" not in run.stderr
    no_files_left(tmp_path, "f.parquet")


@pytest.mark.parametrize("option", [
    ["--tensor-column", "label", "--label", "label"],
    ["--id-column", "label", "--label-column", "label"],
])
def test_two_roles_for_one_column(tmp_path, option, here):
    run = here("embed", BACKBONE, TEST, "-o", tmp_path / "f.parquet", *option)

    assert_failed(run, 2, f"{option[0]} label and", "name the same column")
    no_files_left(tmp_path, "f.parquet")


@pytest.mark.parametrize("option", [["--id-column", "label"],
                                    ["--label-column", "id"], ["--label", "id"]])
def test_a_default_role_counts_as_taken(tmp_path, option, here):
    run = here("embed", BACKBONE, TEST, "-o", tmp_path / "f.parquet", *option)

    role = "id" if option[0] == "--id-column" else "label"
    assert_failed(run, 2, f"--{role}-column {option[1]}",
                  "cannot be both the id and the label")
    no_files_left(tmp_path, "f.parquet")


@pytest.mark.parametrize("option, dropped", [(["--id-column", "label"], "label"),
                                             (["--label-column", "id"], "id")])
def test_a_role_named_for_a_missing_column_says_it_is_missing(tmp_path, here,
                                                              option, dropped):
    table = pq.read_table(TEST).drop_columns([dropped])
    pq.write_table(table, tmp_path / "in.parquet")
    run = here("embed", BACKBONE, tmp_path / "in.parquet", "-o",
               tmp_path / "f.parquet", *option)

    assert_failed(run, 1, f"'{dropped}'", f"given with {option[0]}")
    no_files_left(tmp_path, "f.parquet")


def test_the_input_id_is_kept_beside_a_named_id_column(tmp_path):
    ids, X, labels = digits(10)
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ids + 100, "image": cli.io.fixed_size_list(X),
                             "label": labels, "key": [f"k{i}" for i in ids]}),
                   path)

    _, carried, source = embed_all(path=path, id_column="key")

    assert [f.name for f in source.fields] == ["id", "key", "label"]
    assert carried["id"] == (ids + 100).tolist()
    assert carried["key"] == [f"k{i}" for i in ids]


@pytest.mark.parametrize("name, words", [
    ("model.onnx", ["-o ", "model.onnx: vbsw embed writes Parquet", ".parquet"]),
    ("f.npy", ["f.npy: vbsw embed writes Parquet"]),
    ("folder", ["folder: is a folder; give a file name"]),
])
def test_output_that_is_not_a_parquet_file(tmp_path, here, name, words):
    (tmp_path / "folder").mkdir()
    run = here("embed", BACKBONE, TEST, "-o", tmp_path / name)

    assert_failed(run, 2, *words)
    assert "unknown output type" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_no_tensor_column_at_all(tmp_path, here):
    pq.write_table(pa.table({"x0": [1.0], "label": [0]}), tmp_path / "t.parquet")
    run = here("embed", BACKBONE, tmp_path / "t.parquet", "-o",
                   tmp_path / "f.parquet")

    assert_failed(run, 1, "no tensor column 'image'", "nor 'features'",
                  "--tensor-column")


@pytest.mark.parametrize("name, content, words", [
    ("t.parquet", b"PAR1 this is not parquet", ["t.parquet", "Parquet"]),
    ("t.npy", b"\x93NUMPY\x01\x00garbage", ["t.npy", ".npy"]),
    ("t.parquet", b"", ["t.parquet", "empty"]),
    ("t.csv", b"a,b\n1,2\n", ["t.csv", "neither"]),
])
def test_corrupt_input_file(tmp_path, name, content, words, here):
    (tmp_path / name).write_bytes(content)
    run = here("embed", BACKBONE, tmp_path / name, "-o", tmp_path / "f.parquet")

    assert_failed(run, 1, *words)
    no_files_left(tmp_path, "f.parquet")


def test_truncated_npy(tmp_path, here):
    np.save(tmp_path / "x.npy", np.zeros((100, 64), np.float32))
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(data[:-1000])
    run = here("embed", BACKBONE, tmp_path / "x.npy", "-o",
                   tmp_path / "f.parquet")

    assert_failed(run, 1, "x.npy", "shorter than the array", "truncated")
    no_files_left(tmp_path, "f.parquet")


def test_model_with_two_inputs(tmp_path, here):
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"])], "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 6])
         for n in ("a", "b")],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 6])])
    onnx.save(onnx_graph.make_model(graph), str(tmp_path / "twoin.onnx"))
    np.save(tmp_path / "x.npy", np.zeros((4, 6), np.float32))
    run = here("embed", tmp_path / "twoin.onnx", tmp_path / "x.npy", "-o",
               tmp_path / "f.parquet")

    assert_failed(run, 1, "twoin.onnx: the model takes 2 inputs (a, b)",
                  "exactly one input")
    no_files_left(tmp_path, "f.parquet")


def test_model_without_a_linear_layer_names_the_file(tmp_path, here):
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["s"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(np.ones(6, np.float32), "c")])
    onnx.save(onnx_graph.make_model(graph), str(tmp_path / "add.onnx"))
    np.save(tmp_path / "x.npy", np.zeros((4, 6), np.float32))
    run = here("embed", tmp_path / "add.onnx", tmp_path / "x.npy", "-o",
               tmp_path / "f.parquet")

    assert_failed(run, 1, "add.onnx: ", "--layer")


def test_a_model_from_stdin_is_refused_in_one_line(tmp_path):
    from conftest import run_vbsw

    embed = run_vbsw("embed", "-", TEST, "-o", tmp_path / "f.parquet")
    head = run_vbsw("retrain-head", tmp_path / "w.parquet", "--backbone", "-",
                    "-o", tmp_path / "h.onnx")

    for run in (embed, head):
        assert run.code == 2, run.stderr
        assert "-: a model cannot come from stdin" in run.stderr
    no_files_left(tmp_path, "f.parquet")


def test_corrupt_model(tmp_path, here):
    (tmp_path / "m.onnx").write_bytes(b"not a model")
    run = here("embed", tmp_path / "m.onnx", TEST, "-o", tmp_path / "f.parquet")

    assert_failed(run, 1, "m.onnx", "not a valid ONNX model")


@pytest.mark.parametrize("row", [3, 13])
def test_a_backbone_giving_nan_features_is_refused(tmp_path, here, row):
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["s"])], "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 6])])
    onnx.save(onnx_graph.make_model(graph), str(tmp_path / "log.onnx"))
    X = np.ones((20, 6), np.float32)
    X[row, 4] = -1.0  # log(-1) is NaN
    np.save(tmp_path / "x.npy", X)
    run = here("embed", tmp_path / "log.onnx", tmp_path / "x.npy", "--layer",
               "output", "--batch-size", "8", "-o", tmp_path / "f.parquet")

    assert_failed(run, 1, "log.onnx: the backbone gave a non-finite feature "
                  f"(nan) at row {row}, feature 4", after_rows=row >= 8)
    no_files_left(tmp_path, "f.parquet")


@pytest.mark.parametrize("row", [3, 13])
def test_nan_in_input(tmp_path, here, row):
    _, X, _ = digits(20)
    X[row, 5] = np.nan
    np.save(tmp_path / "x.npy", X)
    run = here("embed", BACKBONE, tmp_path / "x.npy", "-o", tmp_path / "f.parquet",
                   "--batch-size", "8")

    # Row 3 is in the first batch: nothing but the error line is printed.
    assert_failed(run, 1, "x.npy", "NaN", f"row {row}", after_rows=row >= 8)
    no_files_left(tmp_path, "f.parquet")


def test_ragged_rows_and_missing_output_folder_print_one_line(tmp_path, here):
    pq.write_table(pa.table({"image": pa.array([[0.5] * 64, [0.5] * 63])}),
                   tmp_path / "t.parquet")
    ragged = here("embed", BACKBONE, tmp_path / "t.parquet", "-o",
                  tmp_path / "f.parquet")
    no_folder = here("embed", BACKBONE, TEST, "-o", tmp_path / "no" / "f.parquet")

    assert_failed(ragged, 1, "t.parquet", "'image'", "different widths")
    assert_failed(no_folder, 1, "-o", "the folder", "does not exist")
    no_files_left(tmp_path, "f.parquet")


def test_a_tensor_column_of_empty_rows_is_refused(tmp_path, here):
    pq.write_table(pa.table({"image": pa.array([[]] * 20,
                                               type=pa.list_(pa.float32()))}),
                   tmp_path / "t.parquet")
    run = here("embed", BACKBONE, tmp_path / "t.parquet", "-o",
               tmp_path / "f.parquet")

    assert_failed(run, 1, "t.parquet: column 'image' has no values per row "
                  "(width 0)")
    no_files_left(tmp_path, "f.parquet")



def test_dev_null_takes_the_output(tmp_path, here):
    run = here("embed", BACKBONE, TEST, "-o", os.devnull)

    assert run.code == 0, run.stderr
    assert run.stdout == b""
    assert f"wrote {os.devnull}" in run.stderr
    assert Path(os.devnull).is_char_device()


def long_digits(path: Path, bad_row: int, bad) -> Path:
    """3,000 digit rows in row groups of 1,000; ``bad_row`` replaced by ``bad``."""
    rows = [list(map(float, x)) for x in np.tile(digits()[1], (9, 1))[:3000]]
    rows[bad_row] = bad
    pq.write_table(pa.table({"image": pa.array(rows)}), path, row_group_size=1000)
    return path


@pytest.mark.parametrize("bad_row", [2000, 2005])
def test_a_ragged_row_in_a_later_batch_is_named_by_its_file_row(tmp_path, here,
                                                                bad_row):
    source = long_digits(tmp_path / "t.parquet", bad_row, [0.5] * 63)
    run = here("embed", BACKBONE, source, "-o", tmp_path / "f.parquet")
    piped = run_vbsw("embed", BACKBONE, "-", "-o", tmp_path / "g.parquet",
                     stdin=source.read_bytes())

    for done in (run, piped):
        assert_failed(done, 1, "different widths",
                      f"(64 in row 0, 63 in row {bad_row})", after_rows=True)
    no_files_left(tmp_path, "f.parquet")


def test_a_null_row_in_a_later_batch_is_named_by_its_file_row(tmp_path, here):
    source = long_digits(tmp_path / "t.parquet", 2003, None)
    run = here("embed", BACKBONE, source, "-o", tmp_path / "f.parquet")

    assert_failed(run, 1, "1 empty (null) row (first: row 2003)", after_rows=True)


@pytest.mark.parametrize("bad_row", [3, 2003])
def test_a_null_inside_a_row_is_named_by_its_file_row(tmp_path, here, bad_row):
    row = [0.5] * 64
    row[10] = None
    source = long_digits(tmp_path / "t.parquet", bad_row, row)
    run = here("embed", BACKBONE, source, "-o", tmp_path / "f.parquet")

    assert_failed(run, 1, "t.parquet", "'image'", "1 missing value inside its "
                  f"lists (first: row {bad_row})", after_rows=bad_row > 1000)
    no_files_left(tmp_path, "f.parquet")


def test_report_and_cuda_notice_follow_the_first_batch(tmp_path, here,
                                                       monkeypatch):
    """The report lines come once a batch has been embedded, notice included."""
    seen = []
    real = core.Backbone.run

    def run(backbone, X):
        seen.append(len(X))
        return real(backbone, X)

    monkeypatch.setattr(core.Backbone, "run", run)
    said = []
    monkeypatch.setattr(cli.Reporter, "say",
                        lambda self, text: said.append((len(seen), text)))
    monkeypatch.setattr(cli.Reporter, "notice",
                        lambda self, text: said.append((len(seen), text)))
    result = here("embed", BACKBONE, TEST, "-o", tmp_path / "f.parquet")

    assert result.code == 0, result.stderr
    reports = [text for n, text in said if not text.startswith(("embedded",
                                                                 "wrote"))]
    assert any(text.startswith("model:") for text in reports)
    assert any(text.startswith("device:") for text in reports)
    assert all(n >= 1 for n, _ in said), said


def test_empty_folder_and_loose_images(tmp_path, here):
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("L", (8, 8)).save(loose / "a.png")

    empty = here("embed", BACKBONE, tmp_path / "empty", "-o",
                     tmp_path / "f.parquet")
    flat = here("embed", BACKBONE, loose, "-o", tmp_path / "f.parquet")

    assert_failed(empty, 1, "empty", "no PNG or JPEG images")
    assert_failed(flat, 1, "loose", "one sub-folder per class")
    no_files_left(tmp_path, "f.parquet")


def test_images_beside_class_folders_are_refused(tmp_path, here):
    root = image_folder(tmp_path / "mixed")
    for name in ("y.png", "b.jpg"):
        (root / name).write_bytes((root / "digit3" / "0.png").read_bytes())
    run = here("embed", BACKBONE, root, "-o", tmp_path / "f.parquet")

    assert_failed(run, 1, "mixed", "2 image(s) lie directly", "(first: b.jpg)",
                  "must sit in class sub-folders")
    no_files_left(tmp_path, "f.parquet")


def test_a_class_folder_without_images_of_its_own_is_refused(tmp_path, here):
    nested = image_folder(tmp_path / "nested")
    (nested / "digit9" / "more").mkdir(parents=True)
    (nested / "digit9" / "more" / "0.png").write_bytes(
        (nested / "digit3" / "0.png").read_bytes())
    stray = image_folder(tmp_path / "stray")
    (stray / "notes").mkdir()
    (stray / "notes" / "readme.txt").write_text("not an image")

    both = image_folder(tmp_path / "both")
    (both / "digit3" / "extra").mkdir()
    (both / "digit3" / "extra" / "9.png").write_bytes(
        (both / "digit3" / "0.png").read_bytes())

    deeper = here("embed", BACKBONE, nested, "-o", tmp_path / "f.parquet")
    empty = here("embed", BACKBONE, stray, "-o", tmp_path / "f.parquet")
    inside = here("embed", BACKBONE, both, "-o", tmp_path / "f.parquet")

    assert_failed(deeper, 1, "nested", "class sub-folder digit9/ holds no PNG",
                  "not in more/")
    assert_failed(empty, 1, "stray", "class sub-folder notes/ holds no PNG",
                  "remove it or add its images")
    assert_failed(inside, 1, "both", "class sub-folder digit3/ has images in its "
                  "folder extra/ too")
    no_files_left(tmp_path, "f.parquet")


def test_undecodable_image_is_named_and_nothing_is_left(tmp_path, here):
    root = image_folder(tmp_path / "images")
    bad = root / "digit7" / "9.png"  # sorted last: earlier batches were written
    bad.write_bytes(b"\x89PNG broken")
    run = here("embed", BACKBONE, root, "-o", tmp_path / "f.parquet",
                   "--batch-size", "2")

    assert_failed(run, 1, str(bad), "cannot decode", "--skip-bad-images",
                  after_rows=True)
    no_files_left(tmp_path, "f.parquet")


def test_skip_bad_images_counts_them(tmp_path, here):
    root = image_folder(tmp_path / "images")
    (root / "digit3" / "0.png").write_bytes(b"broken")
    (root / "digit7" / "x.jpg").write_bytes(b"broken too")
    out = tmp_path / "f.parquet"
    run = here("embed", BACKBONE, root, "-o", out, "--skip-bad-images",
                   "--batch-size", "3")
    table = read_output(out)

    assert run.code == 0, run.stderr
    assert "skipped 2 images" in run.stderr
    assert table.num_rows == 8 - 1
    assert "digit3/0.png" not in table.column("path").to_pylist()
    assert table.column("id").to_pylist() == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("option, words", [
    (["--batch-size", "0"], ["--batch-size 0"]),
    (["--device", "gpu"], ["--device gpu", "auto, cuda, cpu"]),
    (["--input-shape", "1,x"], ["--input-shape 1,x"]),
    (["--std", "0"], ["--std 0", "above 0"]),
    (["-o", "f.npy"], ["-o f.npy", "Parquet"]),
    (["--layer", "nope"], ["--layer nope", "--list-layers"]),
])
def test_usage_errors_exit_2(tmp_path, option, words, here, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["-o", tmp_path / "f.parquet"] if "-o" not in option else []
    run = here("embed", BACKBONE, TEST, *args, *option)

    assert_failed(run, 2, *words)
    assert not (tmp_path / "f.parquet").exists()


@pytest.mark.parametrize("first", [TEST, "npy", BACKBONE])
def test_a_model_given_as_input_says_the_model_comes_first(tmp_path, here,
                                                           first):
    if first == "npy":
        first = _npy(tmp_path, digits(4)[1])
    run = here("embed", first, BACKBONE, "-o", tmp_path / "f.parquet")

    assert_failed(run, 2)
    where = "INPUT is the data to embed" if first == BACKBONE \
        else "the model comes first"
    assert run.stderr.strip() == (
        f"vbsw embed: error: INPUT {BACKBONE} is an ONNX model: {where} (vbsw "
        "embed MODEL.onnx INPUT)")
    no_files_left(tmp_path, "f.parquet")


@pytest.mark.parametrize("kind, option", [
    ("npy", ["--mean", "0.5"]), ("npy", ["--std", "2"]),
    ("npy", ["--image-size", "8x8"]), ("npy", ["--skip-bad-images"]),
    ("parquet", ["--mean", "0.5"]), ("parquet", ["--skip-bad-images"]),
    ("npy", ["--label", "foo"]), ("npy", ["--tensor-column", "foo"]),
    ("npy", ["--id-column", "foo"]), ("images", ["--label-column", "foo"]),
    ("images", ["--tensor-column", "image"]),
])
def test_options_that_cannot_apply_exit_2(tmp_path, kind, option, here):
    inputs = {"npy": lambda: _npy(tmp_path, digits(4)[1]), "parquet": lambda: TEST,
              "images": lambda: image_folder(tmp_path / "images", 1)}
    run = here("embed", BACKBONE, inputs[kind](), "-o", tmp_path / "f.parquet",
               *option)
    named = "--label-column" if option[0] == "--label" else option[0]

    assert_failed(run, 2, named, "applies to")
    no_files_left(tmp_path, "f.parquet")


def test_column_option_on_npy_from_stdin_exits_2(tmp_path):
    data = bytes_io.BytesIO()
    np.save(data, digits(4)[1])
    run = run_vbsw("embed", BACKBONE, "-", "-o", tmp_path / "f.parquet",
                   "--label", "foo", stdin=data.getvalue())

    assert_failed(run, 2, "--label-column foo", "applies to Parquet input only",
                  "a .npy array")
    no_files_left(tmp_path, "f.parquet")


def test_help_shows_a_working_example(here):
    run = here("embed", "--help")

    assert run.code == 0
    assert cli.EXAMPLE in " ".join(run.stdout.decode().split())


def test_an_interrupt_after_rows_went_to_stdout_says_the_stream_is_cut(
        capfdbinary, monkeypatch):
    monkeypatch.setattr(cli, "GROUP_BYTES", 1)
    monkeypatch.setattr(cli, "HOLD_BYTES", 1)
    interrupt_after(monkeypatch, 3)
    run = run_here(capfdbinary, "embed", BACKBONE, TEST, "--batch-size", "8",
                   "-o", "-")

    assert run.code == 130
    assert run.stderr.strip().splitlines()[-1] == (
        "vbsw embed: error: interrupted; the output sent to stdout is incomplete")
