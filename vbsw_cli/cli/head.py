"""``vbsw retrain-head``: a new last layer trained on weighted features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import pyarrow as pa
import typer

from vbsw_cli import io
from vbsw_cli.cli._common import (DebugOpt, FeatureColumnsOpt, FeaturesOpt,
                                  LabelOpt, QuietOpt, Reporter, SeedOpt,
                                  VerboseOpt, command, keyword,
                                  integer_vector_notes, many_classes_notes,
                                  named_errors, resolve_output)
from vbsw_cli.errors import DataError, UsageError

# The head module imports onnx, which takes a second: only when the command runs.
OPTIMIZERS = ("adam", "sgd", "lbfgs")
WEIGHT_COLUMN = "weight"  # the column vbsw weigh writes

EXAMPLE = ("vbsw weigh sample_data/breast_cancer.parquet --k 35 --m 50 -o w.parquet"
           " && vbsw retrain-head w.parquet --hidden 30 -o head.onnx")


@command("retrain-head", EXAMPLE)
def retrain_head_cli(
    features: Annotated[str, typer.Argument(
        metavar="FEATURES", help="Parquet file of features, labels and weights "
        "(from vbsw weigh), or - for stdin.")],
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", metavar="PATH.onnx",
        help="The head as ONNX, or - for stdout. Default: stdout unless it is a "
        "terminal, else <input stem>.head.onnx.")] = None,
    features_column: FeaturesOpt = None,
    feature_columns: FeatureColumnsOpt = None,
    label: LabelOpt = io.DEFAULT_LABEL,
    task: Annotated[str, typer.Option(
        "--task", metavar="auto|classification|regression",
        help="auto: float labels are regression targets; integers, strings and "
        "categories are classes.")] = "auto",
    weight_column: Annotated[Optional[str], typer.Option(
        "--weight-column", metavar="COLUMN", help="Per-row weights. Default: "
        "weight.")] = None,
    no_weights: Annotated[bool, typer.Option(
        "--no-weights", help="Ignore the weights: the unweighted baseline.")
    ] = False,
    hidden: Annotated[int, typer.Option(
        "--hidden", metavar="N", help="One hidden ReLU layer of N units (0: a "
        "linear head).")] = 0,
    optimizer: Annotated[str, typer.Option(
        "--optimizer", metavar="|".join(OPTIMIZERS),
        help="adam or sgd (mini-batches), or lbfgs (full batch).")] = "adam",
    learning_rate: Annotated[Optional[float], typer.Option(
        "--learning-rate", "--lr", help="Initial step size (adam, sgd). "
        "Default: 1e-3.")] = None,
    epochs: Annotated[int, typer.Option(
        "--epochs", help="Most passes over the data (lbfgs: iterations).")] = 200,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Rows per step (adam, sgd). Default: 256.")] = None,
    l2: Annotated[float, typer.Option(
        "--l2", help="L2 penalty on the weights (scikit-learn's alpha).")] = 1e-4,
    momentum: Annotated[Optional[float], typer.Option(
        "--momentum", help="sgd momentum (Nesterov when > 0). Default: 0.9; "
        "sgd only.")] = None,
    tol: Annotated[float, typer.Option(
        "--tol", help="Stop when the loss has not improved by this for 10 "
        "epochs; 0 runs every epoch (adam, sgd; lbfgs still stops when it "
        "can make no progress).")] = 1e-4,
    no_standardize: Annotated[bool, typer.Option(
        "--no-standardize", help="Train on the features as they are (default: "
        "scaled to zero mean and unit variance, folded into the exported head).")
    ] = False,
    backbone: Annotated[Optional[str], typer.Option(
        "--backbone", metavar="MODEL.onnx",
        help="Also write one merged model: this backbone cut at --layer, then "
        "the new head.")] = None,
    layer: Annotated[Optional[str], typer.Option(
        "--layer", metavar="auto|output|NAME",
        help="Where to cut the --backbone, as in vbsw embed. Default: the "
        "tensor the features were embedded at (their provenance), if the "
        "backbone has it, else auto.")
    ] = None,
    merged_output: Annotated[Optional[str], typer.Option(
        "--merged-output", metavar="PATH.onnx",
        help="The merged model. Default: <head stem>.merged.onnx beside the head "
        "(with the head on stdout, give this).")] = None,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Train a new last layer (head) on weighted features and write it as ONNX.

    The head is trained by scikit-learn (softmax or logistic regression, least
    squares, or one hidden ReLU layer with --hidden) with each row's loss
    multiplied by its weight. With --backbone, a second file holds one model:
    the backbone cut before its last layer, then the new head. --features
    (default 'features') and --feature-columns exclude each other.
    """
    from vbsw_cli.head import (HeadOptions, head_to_onnx, merge_with_backbone,
                               train_head)

    reporter = Reporter(verbose=verbose, quiet=quiet)
    task, optimizer = keyword(task, io.TASKS), keyword(optimizer, OPTIMIZERS)
    steps = {"learning_rate": learning_rate, "batch_size": batch_size,
             "momentum": momentum}
    _refuse_unused(optimizer, steps, backbone, layer)
    if no_weights and weight_column is not None:
        raise UsageError(f"--weight-column {weight_column} and --no-weights: "
                         "the baseline reads no weights; drop one of them")
    weight_column = weight_column or WEIGHT_COLUMN
    options = HeadOptions(hidden=hidden, optimizer=optimizer, epochs=epochs,
                          l2=l2, tol=tol, standardize=not no_standardize,
                          seed=seed, **{name: value for name, value
                                        in steps.items() if value is not None})
    options.check()
    if task not in io.TASKS:
        raise UsageError(f"--task {task}: choose one of " + ", ".join(io.TASKS))
    columns = _feature_choice(features_column, feature_columns)
    label_names = io.split_names(label, "--label")
    destination, merged_path = _output_paths(output, merged_output, features,
                                             backbone)
    backbone_model = _backbone(backbone, layer)

    table = io.read_table(features)
    io.require_rows(table, features)
    label_columns = io.expand_columns(table, label_names, features, "label")
    weighted = [] if no_weights else [weight_column]
    if weighted and weight_column in [*label_columns, io.ID_COLUMN]:
        role = "the id" if weight_column == io.ID_COLUMN else "a label"
        raise UsageError(f"--weight-column {weight_column}: '{weight_column}' is "
                         f"also {role}; a column has one role")
    X, used = io.feature_matrix(table, features, column=features_column,
                                columns=columns,
                                exclude=[io.ID_COLUMN, *label_columns, *weighted])
    labels = io.read_labels(table, features, label_columns, task=task)
    for note in many_classes_notes(labels, len(X)) + \
            integer_vector_notes(table, label_columns, task) + \
            _other_backbone(table, backbone):
        reporter.notice(note)
    weight = None if no_weights else _weights(table, features, weight_column)
    given = layer
    layer = _cut_layer(backbone_model, layer, table)
    _check_cut(backbone_model, backbone, layer, X.shape[1])
    if backbone_model is not None:
        reporter.say(_cut_text(backbone_model, given, layer))

    with named_errors(features):
        head = train_head(X, labels, weight, options=options, progress=reporter)
    record = {"input": features, "features": used,
              "weight_column": None if no_weights else weight_column,
              "upstream": upstream_records(table)}
    model = head_to_onnx(head, extra_metadata={"trained_on": record})
    merged = None
    if backbone_model is not None:
        with named_errors(backbone):
            merged = merge_with_backbone(backbone_model, model, layer or "auto")

    inputs = [features] + ([backbone] if backbone else [])
    _write_models(model, destination, merged, merged_path, inputs)
    _summary(reporter, head, X, labels, weight, destination, merged_path)


# The optimizers each step option applies to.
STEP_OPTIONS = {"learning_rate": ("--learning-rate", ("adam", "sgd")),
                "batch_size": ("--batch-size", ("adam", "sgd")),
                "momentum": ("--momentum", ("sgd",))}


def _refuse_unused(optimizer, steps: dict, backbone, layer) -> None:
    """Options that would be silently ignored: a step option the optimizer
    does not use (--momentum without sgd, --learning-rate and --batch-size
    with lbfgs), --layer without --backbone."""
    for name, value in steps.items():
        option, users = STEP_OPTIONS[name]
        if value is not None and optimizer not in users:
            raise UsageError(f"{option} {value:g} applies to --optimizer "
                             f"{' or '.join(users)} only, not --optimizer "
                             f"{optimizer}; drop one of them")
    if layer is not None and backbone is None:
        raise UsageError(f"--layer {layer} needs --backbone MODEL.onnx (it says "
                         "where to cut the backbone); drop --layer or add "
                         "--backbone")


def _backbone(path: str | None, layer: str | None):
    """The --backbone model, loaded and its --layer found before any work."""
    if path is None:
        return None
    from vbsw_cli.onnx_graph import find_cut, load_model

    from vbsw_cli.head import read_metadata

    model = load_model(path)
    metadata = read_metadata(model) or {}
    if "task" in metadata and "merged" not in metadata:
        raise DataError(f"--backbone {path} is a head written by vbsw "
                        "retrain-head, not a backbone; give the model the "
                        "features were embedded with (vbsw embed's MODEL)")
    with named_errors(path):
        find_cut(model, layer or "auto")
    return model


def _cut_layer(model, layer: str | None, table: pa.Table) -> str | None:
    """--layer; else the tensor the features were embedded at, where the
    backbone has one of that name (a merged model whose head has a hidden
    layer of the features' width would be cut there by auto); else auto."""
    if model is None or layer is not None:
        return layer
    from vbsw_cli.onnx_graph import has_tensor

    embedded = io.latest_parameters(table, "embed") or {}
    tensor = embedded.get("tensor")
    if isinstance(tensor, str) and has_tensor(model, tensor):
        return tensor
    return "auto"


def _cut_text(model, given: str | None, layer: str) -> str:
    """Where the backbone is cut, and why there."""
    from vbsw_cli.onnx_graph import find_cut

    tensor = find_cut(model, layer)
    why = ("--layer" if given is not None else "auto: the input of its last "
           "linear layer; the features' provenance names no tensor of this "
           "backbone" if layer == "auto" else "where the features were embedded")
    return f"backbone cut at '{tensor}' ({why})"


def _other_backbone(table: pa.Table, path: str | None) -> list[str]:
    """A note where the features were embedded from another model file."""
    embedded = io.latest_parameters(table, "embed") if path else None
    if not embedded or not embedded.get("model_sha256") \
            or embedded["model_sha256"] == io.sha256_of(path):
        return []
    return [f"the features were embedded from {embedded.get('model')}, another "
            f"file than --backbone {path}: the merged model is right only if "
            "its cut gives the same features (it is cut at the tensor they were "
            "embedded at where it has one of that name)"]


def _check_cut(model, path, layer, n_features: int) -> None:
    """Refuse, before training, a backbone cut the head could not follow."""
    if model is None:
        return
    from vbsw_cli.head import backbone_cut

    with named_errors(path):
        backbone_cut(model, layer or "auto", n_features)


def _feature_choice(features_column, feature_columns) -> list[str]:
    """The --feature-columns names; refused beside an explicit --features."""
    columns = io.split_names(feature_columns, "--feature-columns")
    if features_column is not None and feature_columns is not None:
        raise UsageError(f"--features {features_column} and --feature-columns "
                         f"{feature_columns}: give one of them")
    return columns


def _output_paths(output, merged_output, source, backbone):
    """Both output paths, checked before any work (folders, inputs, clashes)."""
    io.check_output_path(output, "-o")
    io.check_output_path(merged_output, "--merged-output")
    destination = _head_path(output, source)
    merged_path = _merged_path(merged_output, destination, backbone)
    inputs = [source] + ([backbone] if backbone else [])
    io.refuse_overwrite(destination, "-o", inputs)
    if merged_path is not None:
        io.refuse_overwrite(merged_path, "--merged-output", inputs)
        if destination != io.STDIO and not io.is_devnull(destination) \
                and io.same_path(destination, merged_path):
            raise UsageError(f"-o {destination} and --merged-output "
                             f"{merged_path}: the same file; give two names")
    return destination, merged_path


def _head_path(output: str | None, source: str) -> str:
    destination = resolve_output(output, source, ".head.onnx")
    if destination != io.STDIO and not _onnx_path(destination):
        raise UsageError(f"-o {destination}: the head is written as .onnx")
    return destination


def _onnx_path(path: str) -> bool:
    """A model output: a .onnx file, or the null device (a smoke check)."""
    return Path(path).suffix.lower() == ".onnx" or io.is_devnull(path)


def upstream_records(table: pa.Table) -> list[dict]:
    """Every provenance record of the input, oldest first (its whole history)."""
    metadata = table.schema.metadata or {}
    records = json.loads(metadata.get(io.HISTORY_KEY, b"[]"))
    own = io.read_provenance(table)
    return records + ([own] if own else [])


def _merged_path(merged_output, destination, backbone) -> str | None:
    if backbone is None:
        if merged_output:
            raise UsageError("--merged-output needs --backbone MODEL.onnx")
        return None
    if merged_output is None:
        if destination == io.STDIO:
            raise UsageError("the head goes to stdout (-o - or a pipe): with "
                             "--backbone, name the merged model with "
                             "--merged-output PATH.onnx, or give -o PATH.onnx")
        if io.is_devnull(destination):  # a smoke check: no file beside it
            return destination
        head = Path(destination)
        return str(head.with_name(head.stem + ".merged.onnx"))
    if not _onnx_path(merged_output):
        raise UsageError(f"--merged-output {merged_output}: write it as .onnx")
    return merged_output


def _weights(table: pa.Table, name: str, column: str) -> np.ndarray:
    if column not in table.column_names:
        message = io.missing_column_message(table, column, name, "weight")
        raise DataError(message + "; run vbsw weigh first, or train the "
                        "baseline with --no-weights")
    values = table.column(column)
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise DataError(f"{io.describe(name)}: weight column '{column}' holds "
                        f"{values.type}, expected numbers")
    io.refuse_nulls(values, name, f"weight column '{column}'")
    weight = values.to_numpy().astype(np.float64)
    io.check_finite(weight, name, column, "weight")
    if (weight < 0).any():
        raise DataError(f"{io.describe(name)}: weight column '{column}' has "
                        f"negative values (first: row {int(np.argmax(weight < 0))})")
    if weight.sum() <= 0:
        raise DataError(f"{io.describe(name)}: every value of weight column "
                        f"'{column}' is 0")
    return weight


def _write_models(model, destination, merged, merged_path, inputs) -> None:
    """Both files, or neither: the merged model is written first, then removed
    again if the head cannot be written."""
    if merged is not None:
        _save(merged, merged_path, inputs)
    try:
        _save(model, destination, inputs)
    except BaseException:
        if merged is not None and Path(merged_path).exists():
            Path(merged_path).unlink()
        raise


def _save(model, path: str, inputs) -> None:
    data = model.SerializeToString()
    if path == io.STDIO:
        io.write_stdout(data)
        return
    with io.atomic_output(path, inputs=inputs) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)


def _summary(reporter, head, X, labels, weight, destination, merged_path):
    if reporter.quiet:
        return
    n_samples, n_features = X.shape
    shape = f"{n_features} -> {head.options.hidden} (ReLU) -> " \
        if head.options.hidden else f"{n_features} -> "
    outputs = len(head.classes) if head.classes else sum(head.n_outputs)
    kind = "softmax" if head.task == "classification" and outputs > 2 else (
        "sigmoid" if head.task == "classification" else "linear")
    reporter.say(f"rows {n_samples}, head {shape}{outputs} ({kind}), "
                 f"{'weighted' if weight is not None else 'unweighted'}, "
                 f"{head.options.optimizer}")
    reporter.say(f"trained {io.counted(head.epochs_run, 'epoch')} in "
                 f"{head.seconds:.2f} s; "
                 f"training {_fit_text(head, X, labels)}")
    if not head.converged and head.options.tol > 0:
        reporter.notice(_still_falling(head, n_samples))
    reporter.say(f"wrote {'stdout' if destination == '-' else destination}"
                 + (f" and {merged_path}" if merged_path else ""))


def _still_falling(head, n_samples: int) -> str:
    """The note on a run stopped by --epochs, with the options that help it:
    lbfgs takes no --learning-rate; small data (all rows one batch, so one
    step an epoch) may need far more epochs, or lbfgs."""
    epochs, optimizer = head.epochs_run, head.options.optimizer
    if optimizer == "lbfgs":
        return (f"the loss was still falling after "
                f"{io.counted(epochs, 'iteration')} of lbfgs; raise --epochs")
    text = f"the loss was still falling after {io.counted(epochs, 'epoch')}"
    if n_samples > head.options.batch_size:
        return text + "; raise --epochs or --learning-rate"
    return (f"{text}, only {epochs} {optimizer} steps (all {n_samples} rows in "
            "one batch); raise --epochs or --learning-rate, or try --optimizer "
            "lbfgs (suits small data)")


def _fit_text(head, X, labels) -> str:
    if head.task == "classification":
        accuracy = float(np.mean(head.predict(X) == labels[0].values))
        return f"accuracy {accuracy:.4f}"
    Y = np.column_stack([np.asarray(c.values).reshape(len(X), -1) for c in labels])
    return f"MSE {float(np.mean((head.predict(X) - Y) ** 2)):.4g}"
