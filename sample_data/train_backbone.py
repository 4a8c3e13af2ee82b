"""Train the sample backbone on the digits and export it to ONNX.

    pip install torch==2.13.0          # dev-only: never a vbsw dependency
    python sample_data/train_backbone.py
    python sample_data/train_backbone.py --large /tmp/large_backbone.onnx

The network is a small LeNet-like CNN (input N x 1 x 8 x 8 float32, the
``image`` column of digits_train.parquet reshaped row-major):

    conv 3x3 (1 -> 16) + ReLU, conv 3x3 (16 -> 32) + ReLU, max-pool 2x2,
    flatten (512), linear 512 -> 64 + ReLU  (the penultimate layer: 64 features),
    linear 64 -> 10                          (the last layer: logits)

The model ends in the logits (no Softmax), so ``vbsw embed --layer auto`` cuts
before the last Gemm and returns the 64 ReLU features. Training is seeded and
runs on one CPU thread in a few seconds; the script prints the test accuracy on
digits_test.parquet and writes digits_backbone.onnx beside itself with a
dynamic batch dimension (opset 17, IR version 9 so onnxruntime loads it).

``--large PATH`` writes a bigger convolutional backbone with random weights
instead (input N x 3 x 32 x 32), for benchmarks/embed.py. It is built with
onnx.helper alone, so :func:`large_backbone` works without torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
SEED = 0
IR_VERSION = 9  # what onnxruntime >= 1.16 reads; see vbsw_cli.onnx_graph
OPSET = 17
EPOCHS = 40
BATCH = 64


# ---------------------------------------------------------------------------
# The trained digits backbone (needs torch)


def load_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as (n, 1, 8, 8) float32 and labels as (n,) int64."""
    table = pq.read_table(HERE / name)
    flat = np.stack(table.column("image").to_numpy(zero_copy_only=False))
    images = flat.astype(np.float32).reshape(-1, 1, 8, 8)
    return images, table.column("label").to_numpy().astype(np.int64)


def build_network():
    from collections import OrderedDict

    import torch.nn as nn

    # Named layers give readable tensor names in the ONNX graph
    # (/fc1/Gemm_output_0, /act3/Relu_output_0, ...) for --layer NAME.
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("act1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("act2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(32 * 4 * 4, 64)), ("act3", nn.ReLU()),
        ("fc2", nn.Linear(64, 10)),
    ]))


def train(images: np.ndarray, labels: np.ndarray):
    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    network = build_network()
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    X, y = torch.from_numpy(images), torch.from_numpy(labels)
    order = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        for rows in torch.randperm(len(X), generator=order).split(BATCH):
            optimiser.zero_grad()
            loss_fn(network(X[rows]), y[rows]).backward()
            optimiser.step()
    return network.eval()


def accuracy(network, images: np.ndarray, labels: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        logits = network(torch.from_numpy(images)).numpy()
    return float((logits.argmax(axis=1) == labels).mean())


def export(network, path: Path, test_accuracy: float) -> None:
    import torch

    example = torch.zeros(1, 1, 8, 8)
    torch.onnx.export(network, (example,), str(path), input_names=["image"],
                      output_names=["logits"], opset_version=OPSET,
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    model = onnx.load(str(path))
    model.ir_version = IR_VERSION
    model.producer_name = "vbsw sample_data/train_backbone.py"
    for key, value in {"dataset": "sklearn digits, digits_train.parquet",
                       "test_accuracy": f"{test_accuracy:.4f}",
                       "seed": str(SEED)}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def check_export(network, path: Path, images: np.ndarray) -> float:
    """Largest difference between onnxruntime and torch on ``images``."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": images})[0]
    with torch.no_grad():
        want = network(torch.from_numpy(images)).numpy()
    return float(np.abs(got - want).max())


def digits_backbone(path: Path) -> None:
    train_images, train_labels = load_split("digits_train.parquet")
    test_images, test_labels = load_split("digits_test.parquet")
    network = train(train_images, train_labels)
    test_accuracy = accuracy(network, test_images, test_labels)
    export(network, path, test_accuracy)
    difference = check_export(network, path, test_images)
    print(f"train accuracy {accuracy(network, train_images, train_labels):.4f}, "
          f"test accuracy {test_accuracy:.4f} ({len(test_labels)} images)")
    print(f"wrote {path} ({path.stat().st_size} bytes); onnxruntime matches "
          f"torch within {difference:.2e}")


# ---------------------------------------------------------------------------
# A larger random-weight backbone (onnx.helper only, no torch)


def _conv(name, source, channels_in, channels_out, rng, nodes, weights):
    scale = np.sqrt(2.0 / (channels_in * 9))
    w = (rng.standard_normal((channels_out, channels_in, 3, 3)) * scale)
    weights += [numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"),
                numpy_helper.from_array(np.zeros(channels_out, np.float32),
                                        f"{name}.bias")]
    nodes += [helper.make_node("Conv", [source, f"{name}.weight", f"{name}.bias"],
                               [f"{name}.out"], pads=[1, 1, 1, 1], name=name),
              helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"],
                               name=f"{name}.relu")]
    return f"{name}.relu"


def _linear(name, source, n_in, n_out, rng, nodes, weights, relu):
    w = rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)
    weights += [numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"),
                numpy_helper.from_array(np.zeros(n_out, np.float32),
                                        f"{name}.bias")]
    nodes.append(helper.make_node("Gemm", [source, f"{name}.weight",
                                           f"{name}.bias"], [f"{name}.out"],
                                  transB=1, name=name))
    if not relu:
        return f"{name}.out"
    nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"],
                                  name=f"{name}.relu"))
    return f"{name}.relu"


def large_backbone(*, size: int = 32, width: int = 32, features: int = 256,
                   seed: int = SEED) -> onnx.ModelProto:
    """A random-weight CNN: N x 3 x size x size -> 10 logits.

    Three 3x3 convolutions (3 -> width -> 2 width -> 4 width channels, two
    2x2 max-pools), a linear layer to ``features`` (+ ReLU), a last Gemm to 10.
    """
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    x = _conv("conv1", "image", 3, width, rng, nodes, weights)
    x = _conv("conv2", x, width, 2 * width, rng, nodes, weights)
    nodes.append(helper.make_node("MaxPool", [x], ["pool1"], kernel_shape=[2, 2],
                                  strides=[2, 2]))
    x = _conv("conv3", "pool1", 2 * width, 4 * width, rng, nodes, weights)
    nodes += [helper.make_node("MaxPool", [x], ["pool2"], kernel_shape=[2, 2],
                               strides=[2, 2]),
              helper.make_node("Flatten", ["pool2"], ["flat"], axis=1)]
    n_flat = 4 * width * (size // 4) ** 2
    x = _linear("fc1", "flat", n_flat, features, rng, nodes, weights, relu=True)
    x = _linear("fc2", x, features, 10, rng, nodes, weights, relu=False)
    nodes.append(helper.make_node("Identity", [x], ["logits"]))
    graph = helper.make_graph(
        nodes, "large_backbone",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                       ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["batch", 10])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="vbsw sample_data/train_backbone.py")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE / "digits_backbone.onnx",
                        help="where the trained digits backbone goes")
    parser.add_argument("--large", type=Path, metavar="PATH",
                        help="write the random-weight large backbone here instead")
    args = parser.parse_args(argv)
    if args.large:
        onnx.save(large_backbone(), str(args.large))
        print(f"wrote {args.large} ({args.large.stat().st_size} bytes)")
        return
    digits_backbone(args.output)


if __name__ == "__main__":
    sys.exit(main())
