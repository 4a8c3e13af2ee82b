"""Metrics of a model on labelled data, and comparisons of runs (Tables 1-7).

* :func:`run_model` runs an ONNX model with onnxruntime on the CPU, in batches,
  each row reshaped to the model's declared input shape.
* :func:`as_probabilities` reads a model's output as class probabilities.
* :func:`classification_metrics` (accuracy, macro F1, log loss) and
  :func:`regression_metrics` (MSE, RMSE, MAE, maximum absolute error - the
  paper's L-infinity -, Pearson, Spearman) are plain numpy.
* :func:`compare` groups run records by name and gives the paper's table form:
  best, mean +- standard error, and the gain per base model (Table 4):
  ``g = max_i metric(M_f^i) - metric(M)`` over the runs of one base model M.

Multi-output regression metrics average over the outputs (Pearson and
Spearman are means of the per-output correlations), except the maximum
absolute error, which is the largest over every row and output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vbsw_cli.errors import DataError, UsageError
from vbsw_cli.progress import NullProgress, Progress, chunks

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "log_loss")
REGRESSION_METRICS = ("mse", "rmse", "mae", "max_abs_error", "pearson",
                      "spearman")
LOWER_IS_BETTER = {"log_loss", "mse", "rmse", "mae", "max_abs_error"}

# Probabilities are clipped to [EPS, 1] before the log, as scikit-learn does
# for float64, so a confident wrong answer costs about 36 nats, not infinity.
EPS = np.finfo(np.float64).eps

# Rows whose outputs sum to 1 within this are probabilities; others are logits.
SUM_TOLERANCE = 1e-3

# onnx.TensorProto element types (numbers, so that importing this module does
# not import onnx, which costs a second at every command's start).
ONNX_FLOATS = {1: np.float32, 11: np.float64, 10: np.float16}
ONNX_INTEGERS = {7: np.int64, 6: np.int32}


# ---------------------------------------------------------------------------
# Running a model


@dataclass
class ModelOutput:
    """outputs : ndarray of shape (n_samples, n_outputs); notes for the user."""

    outputs: np.ndarray
    input_name: str
    output_name: str
    notes: list[str] = field(default_factory=list)


def run_model(model, X: np.ndarray, *, name: str = "model",
              batch_size: int = 1024, progress: Progress | None = None
              ) -> ModelOutput:
    """Run the model's first output on the rows of X, in batches.

    Parameters
    ----------
    model : a loaded ONNX model with one data input.
    X : ndarray of shape (n_samples, n_values); each row is reshaped to the
        model's declared input shape (without the batch axis).
    name : the model's file name, for messages.

    Returns
    -------
    ModelOutput whose outputs have shape (n_samples, n_outputs).
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    import onnxruntime as ort

    progress = progress or NullProgress()
    info = data_input(model, name)
    X = _shaped(X, info, name)
    notes = []
    fixed = _fixed_batch(info)
    if fixed is not None:
        batch_size = fixed
        if len(X) % fixed:
            notes.append(f"the model takes batches of exactly {fixed} rows: the "
                         f"last batch was padded with {fixed - len(X) % fixed} "
                         "copies of its last row, their outputs dropped")
    try:
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own untyped errors
        raise DataError(f"{name}: onnxruntime cannot load the model "
                        f"({_first_line(error)})")
    output = session.get_outputs()[0].name
    task = progress.task("evaluating", len(X))
    parts = []
    for start, stop in chunks(len(X), batch_size):
        batch = _padded(X[start:stop], fixed)
        result = _run_batch(session, info.name, output, batch, name)
        parts.append(result[:stop - start])
        task.advance(stop - start)
    task.close()
    outputs = np.concatenate(parts).reshape(len(X), -1).astype(np.float64)
    _check_outputs(outputs, name)
    return ModelOutput(outputs, info.name, output, notes)


def _fixed_batch(info) -> int | None:
    """The input's batch size when the model fixes it (e.g. 1 or 8), else None."""
    dims = info.type.tensor_type.shape.dim
    if len(dims) < 1 or not dims[0].HasField("dim_value") or dims[0].dim_value < 1:
        return None
    return int(dims[0].dim_value)


def _padded(batch: np.ndarray, size: int | None) -> np.ndarray:
    """The batch filled up to ``size`` rows with copies of its last row."""
    if size is None or len(batch) == size:
        return batch
    filler = np.repeat(batch[-1:], size - len(batch), axis=0)
    return np.concatenate([batch, filler])


def _check_outputs(outputs: np.ndarray, name: str) -> None:
    """Refuse NaN or infinite outputs: no metric of them means anything."""
    bad = ~np.isfinite(outputs).all(axis=1)
    if bad.any():
        raise DataError(f"{name}: the model gave NaN or infinite outputs for "
                        f"{int(bad.sum())} of {len(outputs)} rows (first: row "
                        f"{int(np.argmax(bad))})")


def data_input(model, name: str):
    """The model's one data input (initialisers listed as inputs are not)."""
    constants = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in constants]
    if len(inputs) != 1:
        raise DataError(f"{name}: the model takes {len(inputs)} inputs; "
                        "vbsw evaluate runs models with one input")
    return inputs[0]


def _shaped(X: np.ndarray, info, name: str) -> np.ndarray:
    """X cast to the input's type and reshaped to its declared shape."""
    kind = info.type.tensor_type.elem_type
    X = np.asarray(X)
    if kind in ONNX_FLOATS:
        X = X.astype(ONNX_FLOATS[kind])
    elif kind in ONNX_INTEGERS and np.array_equal(X, np.round(X)):
        X = X.astype(ONNX_INTEGERS[kind])
    else:
        import onnx

        type_name = onnx.TensorProto.DataType.Name(kind)
        raise DataError(f"{name}: input '{info.name}' takes {type_name} tensors, "
                        f"the data holds {X.dtype} values that do not fit")
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in info.type.tensor_type.shape.dim]
    return X.reshape(_row_shape(dims, X.shape[1], info.name, name, len(X)))


def _row_shape(dims, width, input_name, name, n_samples) -> tuple:
    if not dims:
        return (n_samples, width)
    rest = dims[1:]
    unknown = [i for i, d in enumerate(rest) if d is None]
    known = int(np.prod([d for d in rest if d is not None])) if rest else 1
    shown = "x".join(str(d) if d is not None else "?" for d in dims)
    if len(unknown) > 1 or (not rest and width != 1):
        raise DataError(f"{name}: cannot fit rows of {width} values to the "
                        f"input '{input_name}' of shape {shown}")
    if unknown:
        if width % known:
            raise DataError(f"{name}: rows of {width} values do not fit the "
                            f"input '{input_name}' of shape {shown}")
        rest = [d if d is not None else width // known for d in rest]
    elif known != width:
        raise DataError(f"{name}: the input '{input_name}' takes {known} values "
                        f"per row (shape {shown}), the data has {width}")
    return (n_samples, *rest)


def _run_batch(session, input_name, output, batch, name) -> np.ndarray:
    try:
        result = session.run([output], {input_name: batch})[0]
    except Exception as error:  # shape or type errors surface only here
        raise DataError(f"{name}: the model failed on the data "
                        f"({_first_line(error)})")
    return np.asarray(result).reshape(len(batch), -1)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[-1][:200] if text else type(error).__name__


# ---------------------------------------------------------------------------
# Reading outputs as predictions


def as_probabilities(outputs: np.ndarray, n_classes: int
                     ) -> tuple[np.ndarray, str | None]:
    """Class probabilities from model outputs, and a note when converted.

    outputs : ndarray of shape (n_samples, n_classes), or (n_samples, 1) for a
        single logistic unit (probability of the second class).
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.shape[1] == 1 and n_classes <= 2:
        p = outputs[:, 0]
        if p.min() < 0 or p.max() > 1:
            return _stack_binary(1 / (1 + np.exp(-p))), \
                "one output outside [0, 1]: read as a logit (sigmoid applied)"
        return _stack_binary(p), None
    if outputs.shape[1] != n_classes:
        raise DataError(f"the model gives {outputs.shape[1]} outputs per row for "
                        f"{n_classes} classes")
    sums = outputs.sum(axis=1)
    if outputs.min() >= 0 and np.all(np.abs(sums - 1) <= SUM_TOLERANCE):
        return outputs / sums[:, None], None
    return softmax(outputs), "outputs are not probabilities: softmax applied"


def _stack_binary(p: np.ndarray) -> np.ndarray:
    return np.column_stack([1 - p, p])


def softmax(Z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits, shape (n_samples, n_classes)."""
    Z = Z - Z.max(axis=1, keepdims=True)
    E = np.exp(Z)
    return E / E.sum(axis=1, keepdims=True)


def class_positions(label_classes: list, model_classes: list, name: str
                    ) -> np.ndarray:
    """For each label class, its position among the model's classes."""
    where = {_key(c): i for i, c in enumerate(model_classes)}
    missing = [c for c in label_classes if _key(c) not in where]
    if missing:
        shown = ", ".join(repr(c) for c in missing[:5])
        raise DataError(f"{name}: labels {shown} are not among the model's "
                        f"{len(model_classes)} classes")
    return np.array([where[_key(c)] for c in label_classes], dtype=np.int64)


def disagreements(proba: np.ndarray, classes: list, predicted: list) -> int:
    """Rows whose predicted class is not among the most probable ones.

    proba : ndarray of shape (n_samples, n_classes), columns in ``classes``
        order. predicted : one class name per row (None or an unknown class
        counts as a disagreement).
    """
    where = {_key(c): i for i, c in enumerate(classes)}
    position = np.array([where.get(_key(p), -1) if p is not None else -1
                         for p in predicted], dtype=np.int64)
    known = position >= 0
    picked = proba[np.arange(len(proba)), np.where(known, position, 0)]
    most = picked >= proba.max(axis=1)
    return int(np.sum(~(known & most)))


def _key(value):
    """Compare 3 and 3.0 and '3' from JSON as the same class name."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)) or (
            isinstance(value, (float, np.floating)) and float(value).is_integer()):
        return str(int(value))
    return str(value)


# ---------------------------------------------------------------------------
# Metrics


def classification_metrics(y_true: np.ndarray, proba: np.ndarray | None = None,
                           y_pred: np.ndarray | None = None) -> dict:
    """Accuracy, macro F1 and (with probabilities) log loss.

    Parameters
    ----------
    y_true : ndarray of shape (n_samples,) of class positions.
    proba : ndarray of shape (n_samples, n_classes), rows summing to 1.
    y_pred : ndarray of shape (n_samples,); default the argmax of ``proba``.

    Macro F1 averages over the classes present in ``y_true`` or ``y_pred``,
    as scikit-learn's ``f1_score(average="macro")`` does.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    if y_pred is None:
        y_pred = np.argmax(proba, axis=1)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    metrics = {"accuracy": float(np.mean(y_true == y_pred)),
               "macro_f1": macro_f1(y_true, y_pred)}
    if proba is not None:
        metrics["log_loss"] = log_loss(y_true, proba)
    return metrics


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean of per-class F1 (0 for a class never right)."""
    present = np.union1d(y_true, y_pred)
    n = int(present.max()) + 1
    true_positive = np.bincount(y_true[y_true == y_pred], minlength=n)[present]
    predicted = np.bincount(y_pred, minlength=n)[present]
    actual = np.bincount(y_true, minlength=n)[present]
    denominator = predicted + actual
    f1 = np.where(denominator > 0, 2 * true_positive / np.maximum(denominator, 1),
                  0.0)
    return float(f1.mean())


def log_loss(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log probability of the true class (clipped at EPS)."""
    proba = np.asarray(proba, dtype=np.float64)
    picked = proba[np.arange(len(y_true)), y_true]
    return float(-np.mean(np.log(np.clip(picked, EPS, 1.0))))


def regression_metrics(Y_true: np.ndarray, Y_pred: np.ndarray) -> dict:
    """MSE, RMSE, MAE, maximum absolute error, Pearson and Spearman.

    Y_true, Y_pred : ndarrays of shape (n_samples, n_outputs) (or (n_samples,)).
    RMSE is the square root of the mean of the per-output MSEs. Correlations
    are ``None`` when an output is constant in the labels or the predictions.
    Every metric is computed on values scaled by a power of two, so it is
    right at any finite scale; one whose value lies beyond float64's range is
    ``inf`` (or 0 below it), never a wrong number.
    """
    Y_true = np.asarray(Y_true, dtype=np.float64).reshape(len(Y_true), -1)
    Y_pred = np.asarray(Y_pred, dtype=np.float64).reshape(len(Y_pred), -1)
    if Y_true.shape != Y_pred.shape:
        raise DataError(f"{Y_pred.shape[1]} predicted outputs per row for "
                        f"{Y_true.shape[1]} label outputs")
    error, shift = _scaled_error(Y_true, Y_pred)
    mean_square = float(np.mean(error ** 2))
    return {"mse": _times_two_to(mean_square, 2 * shift),
            "rmse": _times_two_to(math.sqrt(mean_square), shift),
            "mae": _times_two_to(float(np.mean(np.abs(error))), shift),
            "max_abs_error": _times_two_to(float(np.max(np.abs(error))), shift),
            "pearson": _mean_correlation(Y_true, Y_pred, rank=False),
            "spearman": _mean_correlation(Y_true, Y_pred, rank=True)}


def _scaled_error(Y_true, Y_pred) -> tuple[np.ndarray, int]:
    """``(E, k)`` with ``Y_pred - Y_true == E * 2**k`` and max |E| in [0.5, 1).

    The difference of two finite floats can overflow by at most a factor 2,
    so it is then taken of the halves.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        error, shift = Y_pred - Y_true, 0
    if not np.isfinite(error).all():
        error, shift = Y_pred / 2 - Y_true / 2, 1
    unit, exponent = unit_scaled(error)
    return unit, shift + exponent


def unit_scaled(values: np.ndarray) -> tuple[np.ndarray, int]:
    """``(v, k)`` with ``values == v * 2**k`` and max |v| in [0.5, 1) (or all 0).

    Scaling by a power of two is exact, so nothing is lost but the overflow
    and underflow of squares and products of large or tiny values."""
    largest = float(np.max(np.abs(values))) if values.size else 0.0
    if largest == 0:
        return values, 0
    exponent = math.frexp(largest)[1]
    return np.ldexp(values, -exponent), exponent


def _times_two_to(value: float, exponent: int) -> float:
    """``value * 2**exponent``: inf above float64's range, 0 below it."""
    with np.errstate(over="ignore", under="ignore"):
        return float(np.ldexp(value, exponent))


def range_notes(metrics: dict) -> list[str]:
    """Notes on metrics whose true value lies outside float64's range."""
    notes = []
    beyond = [name for name, value in metrics.items()
              if value is not None and math.isinf(value)]
    if beyond:
        notes.append(f"{', '.join(beyond)} beyond float64's range (above "
                     "1.8e308): inf in the table, null in the JSON")
    if metrics.get("mse") == 0 and (metrics.get("rmse") or 0) > 0:
        notes.append("mse below float64's smallest value (about 5e-324): "
                     "rounded to 0")
    return notes


def _mean_correlation(Y_true, Y_pred, *, rank: bool) -> float | None:
    from scipy.stats import rankdata

    values = []
    for a, b in zip(Y_true.T, Y_pred.T):
        if rank:
            a, b = rankdata(a), rankdata(b)
        values.append(pearson(a, b))
    if any(v is None for v in values):
        return None
    return float(np.mean(values))


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two vectors; ``None`` if either is constant.

    Each vector is scaled by a power of two before and after centring, so the
    sums of squares neither overflow nor underflow at any finite scale.
    """
    a, b = _centred(a), _centred(b)
    if a is None or b is None:
        return None
    scale = math.sqrt(float(a @ a) * float(b @ b))
    return float(np.clip((a @ b) / scale, -1.0, 1.0))


def _centred(values: np.ndarray) -> np.ndarray | None:
    """Values minus their mean, scaled to max |value| in [0.5, 1); ``None``
    when they are all equal."""
    values = np.asarray(values, dtype=np.float64)
    if np.all(values == values[0]):
        return None
    values = unit_scaled(values)[0]
    return unit_scaled(values - values.mean())[0]


# ---------------------------------------------------------------------------
# Comparing runs


def compare(records: list[dict], *, reference: str = "baseline") -> dict:
    """Aggregate run records into the paper's table form.

    Parameters
    ----------
    records : dicts with ``run`` (the method's name), ``metrics`` and
        optionally ``group`` (the base model; default: the ``seed``).
    reference : the run name gains are measured against.

    Returns
    -------
    ``{"runs": {name: {metric: {best, mean, se, n}}}, "gains": {name: {metric:
    {best, mean, se, n_models}}}, "reference": reference}``. Gains count an
    improvement as positive, also for metrics where lower is better.
    """
    if not records:
        raise UsageError("--compare: give at least one run record")
    by_name: dict[str, list[dict]] = {}
    for record in records:
        by_name.setdefault(str(record.get("run") or "run"), []).append(record)
    for name, group in by_name.items():
        _one_task(name, group)
    runs = {name: _summaries(group) for name, group in by_name.items()}
    gains = {}
    if reference in by_name:
        for name, group in by_name.items():
            if name != reference:
                gains[name] = _gains(group, by_name[reference])
    return {"reference": reference, "runs": runs, "gains": gains}


def _one_task(name: str, records: list[dict]) -> None:
    """Refuse a run name whose records mix classification and regression."""
    tasks = sorted({str(r["task"]) for r in records if r.get("task")})
    if len(tasks) > 1:
        counts = ", ".join(f"{sum(r.get('task') == t for r in records)} {t}"
                           for t in tasks)
        raise DataError(f"--compare: the runs named '{name}' mix tasks ({counts}); "
                        "give each task its own --run-name")


def _metric_names(records: list[dict]) -> list[str]:
    names: list[str] = []
    for record in records:
        names += [m for m in record.get("metrics", {}) if m not in names]
    return names


def _summaries(records: list[dict]) -> dict:
    out = {}
    for metric in _metric_names(records):
        values = [r["metrics"].get(metric) for r in records]
        out[metric] = summary([v for v in values if v is not None],
                              lower_is_better=metric in LOWER_IS_BETTER)
    return out


def summary(values: list[float], *, lower_is_better: bool = False) -> dict:
    """best, mean, standard error (std with ddof 1 over sqrt(n)) and n."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return {"best": None, "mean": None, "se": None, "n": 0}
    best = values.min() if lower_is_better else values.max()
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return {"best": float(best), "mean": float(values.mean()), "se": se, "n": n}


def _group(record: dict):
    group = record.get("group")
    return group if group is not None else record.get("seed")


def _gains(records: list[dict], reference: list[dict]) -> dict:
    """Per base model: best run of this method minus the reference's mean."""
    out = {}
    for metric in _metric_names(records):
        lower = metric in LOWER_IS_BETTER
        base = _by_group(reference, metric)
        mine = _by_group(records, metric)
        gains = []
        for group, values in mine.items():
            if group is None or group not in base:
                continue
            best = min(values) if lower else max(values)
            gain = best - np.mean(base[group])
            gains.append(-gain if lower else gain)
        out[metric] = {**summary(gains), "n_models": len(gains)}
        out[metric].pop("n")
    return out


def _by_group(records: list[dict], metric: str) -> dict:
    groups: dict = {}
    for record in records:
        value = record.get("metrics", {}).get(metric)
        if value is not None:
            groups.setdefault(_key(_group(record)) if _group(record) is not None
                              else None, []).append(float(value))
    return groups
