"""Retraining the last layer on weighted features (Algorithm 3, line 6).

The head is a small network trained by scikit-learn's ``MLPClassifier`` or
``MLPRegressor``: no hidden layer (a linear layer: softmax regression, logistic
regression for two classes, or least squares for real targets), or one hidden
ReLU layer (``hidden``), which is also Algorithm 2's small model on raw features.

How the weights enter the fit: scikit-learn multiplies each row's loss (cross
entropy, or half the squared error) by its weight and divides each batch's sum
by the batch's weight sum. It divides the L2 term by that sum too, so the scale
of the weights would scale the effective ``l2``; the weights are therefore
rescaled to mean 1 before training. Their overall scale then changes nothing:
the mean-1 normalisation of ``vbsw weigh``, raw weights in [1, m] and the same
weights times 1e-8 train the same head (to rounding). All weights equal give
exactly the unweighted fit.

Features (and regression targets) are standardised before training by default,
with the unweighted mean and standard deviation so that a weighted and an
unweighted head see the same inputs; the scaling is folded into the exported
weights, so the ONNX head takes the features as they are.

The ONNX head (``Gemm`` [``Relu``, ``Gemm``], then ``Softmax`` or ``Sigmoid``
for classes, nothing for real targets) is built here with :mod:`onnx.helper`;
its metadata property ``vbsw`` holds the task, the class names and the label
columns as JSON.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vbsw_cli import __version__
from vbsw_cli.errors import DataError, UsageError
from vbsw_cli.io import Labels
from vbsw_cli.onnx_graph import find_cut, make_model, merge, tensor_shapes
from vbsw_cli.progress import NullProgress, Progress
from vbsw_cli.stopping import check_stop

OPTIMIZERS = ("adam", "sgd", "lbfgs")
METADATA_KEY = "vbsw"
INPUT_NAME = "features"
PROBABILITIES = "probabilities"
PREDICTION = "prediction"

# Training stops when the loss has not improved by ``tol`` for this many epochs
# (scikit-learn's default). With ``tol = 0`` the patience is the epoch count, so
# adam and sgd run every epoch asked for (a loss that merely stops falling would
# otherwise end the run after 10 epochs without strict improvement).
PATIENCE = 10

# A final loss this many times the first epoch's is a diverged run (with
# minibatches the loss wanders, but not tenfold upwards).
DIVERGED = 10

# scikit-learn's random_state accepts seeds in [0, 2**32 - 1].
MAX_SEED = 2**32 - 1

# Backbone metadata keys move under this prefix in the merged model: they
# describe the backbone's own training (its accuracy, its seed), not M_f.
BACKBONE_PREFIX = "backbone."


@dataclass
class HeadOptions:
    """How the head is trained. Defaults suit a head on backbone features."""

    hidden: int = 0
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    epochs: int = 200
    batch_size: int = 256
    l2: float = 1e-4
    momentum: float = 0.9
    tol: float = 1e-4
    standardize: bool = True
    seed: int = 0

    def check(self) -> None:
        """Refuse values no trainer accepts, naming the option."""
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer {self.optimizer}: choose one of "
                             + ", ".join(OPTIMIZERS))
        _at_least(self.hidden, 0, "--hidden")
        _at_least(self.epochs, 1, "--epochs")
        _at_least(self.batch_size, 1, "--batch-size")
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UsageError(f"--learning-rate {self.learning_rate}: must be > 0")
        if not (np.isfinite(self.l2) and self.l2 >= 0):
            raise UsageError(f"--l2 {self.l2}: must be >= 0")
        if not (0 <= self.momentum <= 1):
            raise UsageError(f"--momentum {self.momentum}: must be in [0, 1]")
        if not (np.isfinite(self.tol) and self.tol >= 0):
            raise UsageError(f"--tol {self.tol}: must be >= 0")
        if not (0 <= self.seed <= MAX_SEED):
            raise UsageError(f"--seed {self.seed}: must be in [0, {MAX_SEED}] "
                             "(scikit-learn's range)")


def _at_least(value: int, smallest: int, option: str) -> None:
    if value < smallest:
        raise UsageError(f"{option} {value}: must be at least {smallest}")


@dataclass
class Head:
    """A trained head and what is needed to export and explain it.

    ``scaler`` and ``target_scaler`` are ``(mean, scale)`` pairs (or ``None``)
    applied before the estimator and undone after it.
    """

    task: str
    estimator: object
    n_features: int
    label_columns: list[str]
    classes: list | None = None
    n_outputs: list[int] = field(default_factory=list)
    scaler: tuple[np.ndarray, np.ndarray] | None = None
    target_scaler: tuple[np.ndarray, np.ndarray] | None = None
    options: HeadOptions = field(default_factory=HeadOptions)
    converged: bool = True
    seconds: float = 0.0

    @property
    def epochs_run(self) -> int:
        return int(self.estimator.n_iter_)

    def _inputs(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if self.scaler is None:
            return X
        mean, scale = self.scaler
        return ((X - mean) / scale).astype(np.float32)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n_samples, n_classes), in class order."""
        if self.task != "classification":
            raise UsageError("predict_proba needs a classification head")
        return self.estimator.predict_proba(self._inputs(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class codes (n_samples,) or real predictions (n_samples, n_outputs)."""
        if self.task == "classification":
            return np.argmax(self.predict_proba(X), axis=1)
        Y = self.estimator.predict(self._inputs(X)).reshape(len(X), -1)
        if self.target_scaler is not None:
            mean, scale = self.target_scaler
            Y = Y * scale + mean
        return Y

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(weight (n_in, n_out), bias (n_out,))`` per layer, scalings folded."""
        layers = [(np.asarray(W, np.float64), np.asarray(b, np.float64))
                  for W, b in zip(self.estimator.coefs_,
                                  self.estimator.intercepts_)]
        if self.scaler is not None:
            # ((x - mean) / scale) @ W + b  ==  x @ (W / scale) + (b - ...)
            mean, scale = self.scaler
            W, b = layers[0]
            W = W / scale[:, None]
            layers[0] = (W, b - mean @ W)
        if self.target_scaler is not None:
            mean, scale = self.target_scaler
            W, b = layers[-1]
            layers[-1] = (W * scale, b * scale + mean)
        return layers

    def metadata(self) -> dict:
        """What a reader of the ONNX head needs: task, classes, label columns."""
        options = {key: getattr(self.options, key)
                   for key in self.options.__dataclass_fields__}
        return {"task": self.task, "classes": self.classes,
                "labels": self.label_columns, "n_outputs": self.n_outputs,
                "n_features": self.n_features, "hidden": self.options.hidden,
                "training": options, "version": __version__}


# ---------------------------------------------------------------------------
# Training


def train_head(X: np.ndarray, labels: list[Labels],
               weight: np.ndarray | None = None, *,
               options: HeadOptions | None = None,
               progress: Progress | None = None) -> Head:
    """Train a new last layer on features, each row weighted.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features).
    labels : one classification column, or one or more regression columns,
        from :func:`vbsw_cli.io.read_labels`.
    weight : ndarray of shape (n_samples,), non-negative, of any scale (they
        are rescaled to mean 1), or ``None`` for the unweighted baseline.
    options : training settings (:class:`HeadOptions`).

    Returns
    -------
    Head holding the fitted estimator.
    """
    options = options or HeadOptions()
    options.check()
    progress = progress or NullProgress()
    X = np.asarray(X, dtype=np.float32)
    task, target, classes, widths = _target(labels)
    weight = _checked_weight(weight, len(X))

    head = Head(task, None, X.shape[1], [c.column for c in labels], classes,
                widths, options=options)
    if options.standardize:
        head.scaler = _scaling(X)
        if task == "regression":
            head.target_scaler = _scaling(target)
            target = (target - head.target_scaler[0]) / head.target_scaler[1]

    head.estimator = _estimator(task, options)
    check_stop()  # one scikit-learn call: a stop lost before it waits for it
    # scikit-learn trains in one call: the epochs run are counted at its end.
    task_bar = progress.task("training head, epochs", options.epochs)
    started = time.perf_counter()
    head.converged = _fit(head.estimator, head._inputs(X), target, weight,
                          options.learning_rate)
    head.seconds = time.perf_counter() - started
    task_bar.advance(head.epochs_run)
    task_bar.close()
    return head


def _target(labels: list[Labels]):
    """``(task, y, classes, widths)`` from label columns."""
    if not labels:
        raise UsageError("--label: name at least one label column")
    kinds = {c.kind for c in labels}
    if len(kinds) > 1:
        raise DataError("label columns mix classes and real values; train one "
                        "head per task")
    if "classification" in kinds:
        if len(labels) > 1:
            raise DataError("a classification head takes one label column, got "
                            + ", ".join(c.column for c in labels))
        column = labels[0]
        if len(column.classes) < 2:
            raise DataError(f"label column '{column.column}' has a single class "
                            f"({column.classes[0]!r}); a classifier needs two")
        return "classification", column.values, list(column.classes), \
            [len(column.classes)]
    blocks = [np.asarray(c.values, np.float64).reshape(len(c.values), -1)
              for c in labels]
    Y = np.column_stack(blocks)
    return "regression", Y, None, [b.shape[1] for b in blocks]


def _checked_weight(weight, n_samples: int) -> np.ndarray | None:
    if weight is None:
        return None
    weight = np.asarray(weight, dtype=np.float64).reshape(-1)
    if len(weight) != n_samples:
        raise DataError(f"{len(weight)} weights for {n_samples} rows")
    if not np.isfinite(weight).all():
        first = int(np.argmax(~np.isfinite(weight)))
        raise DataError(f"weight column has NaN or infinite values (first: row "
                        f"{first})")
    if (weight < 0).any():
        first = int(np.argmax(weight < 0))
        raise DataError(f"weight column has negative values (first: row {first})")
    if weight.sum() <= 0:
        raise DataError("every weight is 0; nothing to train on")
    return mean_one(weight)


def mean_one(weight: np.ndarray) -> np.ndarray:
    """Non-negative weights, not all 0, rescaled to mean 1 at any finite scale
    (first by the largest, so that neither the sum nor the mean overflows)."""
    weight = weight / weight.max()
    return weight / weight.mean()


def _scaling(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unweighted column means and standard deviations (1 where constant)."""
    A = np.asarray(A, dtype=np.float64)
    scale = A.std(axis=0)
    scale[scale == 0] = 1.0
    return A.mean(axis=0), scale


def _estimator(task: str, options: HeadOptions):
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    kind = MLPClassifier if task == "classification" else MLPRegressor
    hidden = (options.hidden,) if options.hidden else ()
    return kind(hidden_layer_sizes=hidden, activation="relu",
                solver=options.optimizer, alpha=options.l2,
                batch_size=options.batch_size,
                learning_rate_init=options.learning_rate,
                max_iter=options.epochs, momentum=options.momentum,
                nesterovs_momentum=options.momentum > 0, tol=options.tol,
                n_iter_no_change=_patience(options), shuffle=True,
                random_state=options.seed)


def _patience(options: HeadOptions) -> int:
    """Epochs without improvement before stopping: all of them at tol 0."""
    return options.epochs if options.tol == 0 else PATIENCE


def _fit(estimator, X, y, weight, learning_rate: float) -> bool:
    """Fit; return whether the optimiser converged before the last epoch.
    Refuse a run that diverged: its weights left float64, or its loss ended
    DIVERGED times above the first epoch's."""
    from sklearn.exceptions import ConvergenceWarning

    if estimator.__class__.__name__ == "MLPRegressor" and y.shape[1] == 1:
        y = y[:, 0]
    diverged = (f"training diverged at --learning-rate {learning_rate:g}; "
                "lower it")
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
        warnings.simplefilter("always", ConvergenceWarning)
        try:
            estimator.fit(X, y, sample_weight=weight)
        except ValueError as error:
            if "non-finite" in str(error):
                raise DataError(f"{diverged} (the weights left float64's "
                                "range)") from error
            raise
    losses = getattr(estimator, "loss_curve_", [])
    if losses and not (np.isfinite(losses[-1])
                       and losses[-1] <= DIVERGED * losses[0]):
        raise DataError(f"{diverged} (the loss went from {losses[0]:.4g} in the "
                        f"first epoch to {losses[-1]:.4g})")
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)


# ---------------------------------------------------------------------------
# ONNX


def head_to_onnx(head: Head, *, extra_metadata: dict | None = None
                 ) -> onnx.ModelProto:
    """The head as an ONNX model: input ``features``, float32 (N, n_features).

    Output ``probabilities`` (N, n_classes) for classes, ``prediction``
    (N, n_outputs) for real targets.
    """
    nodes, initializers = [], []
    current = INPUT_NAME
    layers = head.layers()
    for position, (W, b) in enumerate(layers):
        current = _gemm(nodes, initializers, current, W, b, position)
        if position < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"relu_{position}"],
                                          name=f"relu_{position}"))
            current = f"relu_{position}"

    if head.task == "classification":
        output, width = PROBABILITIES, len(head.classes)
        _class_output(nodes, initializers, current, len(layers[-1][1]))
    else:
        output, width = PREDICTION, len(layers[-1][1])
        nodes.append(helper.make_node("Identity", [current], [output],
                                      name="prediction"))

    graph = helper.make_graph(
        nodes, "vbsw_head",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                       ["N", head.n_features])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", width])],
        initializers)
    metadata = {**head.metadata(), **(extra_metadata or {})}
    return make_model(graph, metadata={METADATA_KEY: json.dumps(metadata)})


def _gemm(nodes, initializers, source, W, b, position) -> str:
    weight, bias, out = f"W{position}", f"b{position}", f"linear_{position}"
    initializers.append(numpy_helper.from_array(W.astype(np.float32), weight))
    initializers.append(numpy_helper.from_array(b.astype(np.float32), bias))
    nodes.append(helper.make_node("Gemm", [source, weight, bias], [out],
                                  name=f"gemm_{position}"))
    return out


def _class_output(nodes, initializers, logits: str, width: int) -> None:
    """Softmax over classes, or for one logistic unit ``[1 - p, p]``."""
    if width > 1:
        nodes.append(helper.make_node("Softmax", [logits], [PROBABILITIES],
                                      axis=1, name="softmax"))
        return
    initializers.append(numpy_helper.from_array(np.ones((1, 1), np.float32),
                                                "one"))
    nodes += [
        helper.make_node("Sigmoid", [logits], ["p1"], name="sigmoid"),
        helper.make_node("Sub", ["one", "p1"], ["p0"], name="complement"),
        helper.make_node("Concat", ["p0", "p1"], [PROBABILITIES], axis=1,
                         name="probabilities"),
    ]


def merge_with_backbone(backbone: onnx.ModelProto, head_model: onnx.ModelProto,
                        layer: str = "auto") -> onnx.ModelProto:
    """M_f: the backbone cut at ``layer`` (as in ``vbsw embed``), then the head.

    The cut tensor is flattened per row; its width must equal the head's input.
    The merged model's ``vbsw`` metadata is the head's, with ``merged`` (the
    cut tensor) added; the backbone's own keys move under ``backbone.``.
    """
    expected = head_model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    tensor = backbone_cut(backbone, layer, expected)
    merged = merge(_prefixed(backbone), tensor, _marked_merged(head_model, tensor))
    _check_loads(merged)
    return merged


def _check_loads(model: onnx.ModelProto) -> None:
    """Refuse a merged model that onnxruntime cannot load: onnx's checker
    passes models it refuses (two nodes of one name, once), and loading it
    is the user's next step."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(model.SerializeToString(),
                             providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime's own error types
        first = str(error).strip().splitlines()[0] if str(error).strip() else \
            type(error).__name__
        raise DataError(f"the merged model would not load in onnxruntime "
                        f"({first}); nothing was written") from error


def backbone_cut(backbone: onnx.ModelProto, layer: str, n_features: int) -> str:
    """The tensor where ``layer`` cuts the backbone, refused when its flat width
    (where the shapes tell it) is not ``n_features``, the head's input: a check
    that needs no head, so it can run before training."""
    tensor = find_cut(backbone, layer)
    width = _flat_width(backbone, tensor)
    if width is not None and width != n_features:
        raise DataError(f"the backbone's tensor '{tensor}' has {width} features "
                        f"per row, the head takes {n_features}; give the model "
                        "the features were embedded with, cut with the --layer "
                        "used then")
    return tensor


def _prefixed(backbone: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose metadata keys start with ``backbone.``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(backbone)
    entries = [(e.key, e.value) for e in copy.metadata_props]
    del copy.metadata_props[:]
    for key, value in entries:
        if not key.startswith(BACKBONE_PREFIX):
            key = BACKBONE_PREFIX + key
        copy.metadata_props.add(key=key, value=value)
    return copy


def _marked_merged(head_model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """A copy of the head whose metadata says it follows a backbone cut."""
    copy = onnx.ModelProto()
    copy.CopyFrom(head_model)
    metadata = read_metadata(copy) or {}
    metadata["merged"] = {"cut": tensor}
    for entry in copy.metadata_props:
        if entry.key == METADATA_KEY:
            entry.value = json.dumps(metadata)
    return copy


def _flat_width(model: onnx.ModelProto, tensor: str) -> int | None:
    shape = tensor_shapes(model).get(tensor)
    if not shape or any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
        return None
    return int(np.prod(shape[1:]))


def read_metadata(model: onnx.ModelProto) -> dict | None:
    """The ``vbsw`` metadata of a head or merged model, if it has one."""
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            try:
                return json.loads(entry.value)
            except json.JSONDecodeError:
                return None
    return None
