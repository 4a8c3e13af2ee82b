"""Cutting an ONNX network before its last layer, and putting a new head back.

The paper's M* is the trained network without its last fully connected layer
(Algorithm 3, line 3); M_f is M* followed by the retrained head (line 6).

* :func:`find_cut` names the tensor to cut at: ``"auto"`` walks back from the
  output over Softmax-like activations to the last linear layer (a Gemm, or a
  MatMul followed by an Add) and returns that layer's input; ``"output"`` keeps
  the whole model (both in any case, unless a tensor has exactly the name
  given); any other value is a tensor name.
* :func:`cut` returns the sub-model whose output is that tensor (M*).
* :func:`merge` joins M* and a head into one model (M_f).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vbsw_cli.errors import DataError, UsageError

# Models we write use an IR version and opset that every onnxruntime since 1.16
# reads (onnx itself may write newer IR versions than onnxruntime accepts).
IR_VERSION = 9
OPSET = 17

# The --layer values that are not tensor names.
LAYER_KEYWORDS = ("auto", "output")

# Element-wise or normalising steps that may follow the last linear layer.
PASS_THROUGH = {"Softmax", "LogSoftmax", "Sigmoid", "Identity", "Dropout"}


@dataclass
class LinearLayer:
    """The last linear layer: ``output = input @ weight + bias``.

    weight : ndarray of shape (n_features, n_outputs); bias : (n_outputs,).
    """

    input: str
    weight: np.ndarray
    bias: np.ndarray


def make_model(graph: onnx.GraphProto, *, opset: int = OPSET,
               metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """A checked model of ``graph`` that onnxruntime can load."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="vbsw")
    model.ir_version = IR_VERSION
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model


def load_model(path: str) -> onnx.ModelProto:
    """Load and check an ONNX model, with one clear error when it is unusable."""
    if path == "-":  # the data may come from stdin, a model never does
        raise UsageError("-: a model cannot come from stdin; give its .onnx "
                         "file")
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file")
    except Exception as error:  # onnx raises several unrelated types
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = first or type(error).__name__
        raise DataError(f"{path}: not a valid ONNX model ({reason})")
    if len(model.graph.output) < 1:
        raise DataError(f"{path}: the model has no output")
    return model


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def last_linear(model: onnx.ModelProto) -> LinearLayer:
    """The linear layer that feeds the model's (first) output."""
    producers, weights = _producers(model), _initializers(model)
    name = model.graph.output[0].name
    node = producers.get(name)
    while node is not None and node.op_type in PASS_THROUGH:
        node = producers.get(node.input[0])
    if node is not None and node.op_type == "Gemm":
        return _gemm_layer(node, weights)
    if node is not None and node.op_type == "Add":
        return _matmul_add_layer(node, producers, weights)
    found = node.op_type if node is not None else "a graph input"
    raise DataError(f"no linear layer (Gemm, or MatMul + Add) feeds the output "
                    f"'{name}' (found {found}); name the cut with --layer, see "
                    "vbsw embed MODEL.onnx --list-layers")


def _node_text(node) -> str:
    """A node as a message names it: its name, or its output when it has none."""
    if node.name:
        return f"'{node.name}'"
    return f"(unnamed, output '{node.output[0]}')" if node.output else "(unnamed)"


def _gemm_layer(node, weights) -> LinearLayer:
    if node.input[1] not in weights:
        raise DataError(f"the last Gemm {_node_text(node)} has no constant weights")
    weight = weights[node.input[1]].astype(np.float64)
    if _attribute(node, "transB", 0):
        weight = weight.T
    weight = weight * _attribute(node, "alpha", 1.0)
    bias = np.zeros(weight.shape[1])
    if len(node.input) > 2 and node.input[2] in weights:
        bias = np.broadcast_to(weights[node.input[2]].astype(np.float64)
                               * _attribute(node, "beta", 1.0), bias.shape).copy()
    if _attribute(node, "transA", 0):
        raise DataError(f"the last Gemm {_node_text(node)} transposes its input; "
                        "name the cut with --layer")
    return LinearLayer(node.input[0], weight, bias)


def _matmul_add_layer(node, producers, weights) -> LinearLayer:
    for position in (0, 1):
        matmul = producers.get(node.input[position])
        bias_name = node.input[1 - position]
        if matmul is None or matmul.op_type != "MatMul":
            continue
        if matmul.input[1] in weights and bias_name in weights:
            weight = weights[matmul.input[1]].astype(np.float64)
            bias = weights[bias_name].astype(np.float64).reshape(-1)
            return LinearLayer(matmul.input[0], weight, bias)
    raise DataError(f"the last Add {_node_text(node)} does not follow a MatMul with "
                    "constant weights; name the cut with --layer")


def find_cut(model: onnx.ModelProto, layer: str = "auto") -> str:
    """The name of the tensor that becomes the feature output."""
    layer = layer_keyword(model, layer)
    if layer == "auto":
        return last_linear(model).input
    if layer == "output":
        return model.graph.output[0].name
    if layer not in _tensor_names(model):
        raise UsageError(f"--layer {layer}: no tensor of that name in the model; "
                         "see vbsw embed MODEL.onnx --list-layers")
    return layer


def layer_keyword(model: onnx.ModelProto, layer: str) -> str:
    """``layer`` in lower case when it is a keyword in another case (AUTO),
    unless a tensor has exactly that name (Output): then it names the tensor."""
    if layer.lower() in LAYER_KEYWORDS and layer not in _tensor_names(model):
        return layer.lower()
    return layer


def has_tensor(model: onnx.ModelProto, name: str) -> bool:
    """Whether a node of the model outputs ``name``, or it is an input."""
    return name in _tensor_names(model)


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    known = {t for node in model.graph.node for t in node.output}
    return known | {i.name for i in model.graph.input}


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Inferred shapes of every named tensor (``None`` for unknown sizes)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = list(inferred.graph.value_info) + list(inferred.graph.output) \
        + list(inferred.graph.input)
    shapes = {}
    for info in infos:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value")
                             else (d.dim_param or None) for d in dims]
    return shapes


def list_layers(model: onnx.ModelProto) -> list[tuple[str, str, list]]:
    """``(tensor, producing op, shape)`` for every node output, in graph order."""
    shapes = tensor_shapes(model)
    return [(out, node.op_type, shapes.get(out))
            for node in model.graph.node for out in node.output if out]


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    constants = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in constants]


def cut(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """The sub-model from the model's inputs to ``tensor`` (the backbone M*)."""
    if tensor == model.graph.output[0].name and len(model.graph.output) == 1:
        return model
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name for v in inferred.graph.value_info} \
        | {o.name for o in inferred.graph.output}
    if tensor not in known:
        # Shape inference could not type it: declare it as float of any shape.
        inferred.graph.value_info.append(
            helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    extractor = onnx.utils.Extractor(inferred)
    body = extractor.extract_model(_graph_inputs(model), [tensor])
    body.metadata_props.extend(model.metadata_props)
    body.ir_version = model.ir_version
    return body


def merge(backbone: onnx.ModelProto, tensor: str, head: onnx.ModelProto
          ) -> onnx.ModelProto:
    """One model: the backbone cut at ``tensor``, flattened, then the head."""
    # cut() returns the backbone itself when nothing is cut: work on a copy.
    body = onnx.ModelProto()
    body.CopyFrom(cut(backbone, tensor))
    taken = _names(body.graph)
    flat = _unused(f"{tensor}__flat", taken)
    flatten = helper.make_node("Flatten", [tensor], [flat], axis=1,
                               name=_unused("vbsw_flatten", taken))
    body.graph.node.append(flatten)
    del body.graph.output[:]
    body.graph.output.append(
        helper.make_tensor_value_info(flat, onnx.TensorProto.FLOAT, None))

    head = _same_opset(head, _opset(body))
    body.ir_version = head.ir_version = min(body.ir_version, head.ir_version)
    head_input = _graph_inputs(head)[0]
    # merge_models copies both models' metadata and refuses a key with two
    # values: the head's entries (what the merged model now outputs) win.
    head_keys = {entry.key for entry in head.metadata_props}
    kept = [entry for entry in body.metadata_props if entry.key not in head_keys]
    del body.metadata_props[:]
    body.metadata_props.extend(kept)
    # A backbone that is itself a merged model holds head/ names already.
    prefix = next(p for p in (f"head{n or ''}/" for n in range(len(taken) + 1))
                  if not any(name.startswith(p) for name in taken))
    merged = onnx.compose.merge_models(body, head, io_map=[(flat, head_input)],
                                       prefix2=prefix)
    onnx.checker.check_model(merged)
    return merged


def _names(graph: onnx.GraphProto) -> set[str]:
    """Every node, tensor and initialiser name of a graph."""
    names = {node.name for node in graph.node}
    names |= {name for node in graph.node for name in (*node.input, *node.output)}
    names |= {t.name for t in (*graph.input, *graph.output, *graph.initializer)}
    return names


def _unused(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``... the first not ``taken``."""
    candidate, number = name, 0
    while candidate in taken:
        number += 1
        candidate = f"{name}_{number}"
    return candidate


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return onnx.defs.onnx_opset_version()


def _same_opset(head: onnx.ModelProto, version: int) -> onnx.ModelProto:
    if _opset(head) == version:
        return head
    from onnx import version_converter

    return version_converter.convert_version(head, version)
