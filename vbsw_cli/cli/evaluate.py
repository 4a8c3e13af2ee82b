"""``vbsw evaluate``: metrics of a model or a predictions file; comparisons."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import numpy as np
import pyarrow as pa
import typer

from vbsw_cli import __version__, io
from vbsw_cli.cli._common import (SEED_RANGE, DebugOpt, FeatureColumnsOpt,
                                  QuietOpt, Reporter, VerboseOpt, command,
                                  keyword, named_errors, seed_in_range, stderr)
from vbsw_cli.errors import DataError, UsageError
from vbsw_cli.evaluate import (CLASSIFICATION_METRICS, LOWER_IS_BETTER,
                               REGRESSION_METRICS, as_probabilities,
                               class_positions, classification_metrics,
                               compare, disagreements, range_notes,
                               data_input, regression_metrics, run_model)

# Each step makes the files the next one reads (a multi-line shell command):
# heads trained on the train split, scored on the held-out test split.
EXAMPLE = " && \\\n  ".join([
    "vbsw embed sample_data/digits_backbone.onnx sample_data/digits_train.parquet "
    "-o train.parquet",
    "vbsw embed sample_data/digits_backbone.onnx sample_data/digits_test.parquet "
    "-o test.parquet",
    "vbsw weigh train.parquet --k 20 --m 40 -o w.parquet",
    "vbsw retrain-head w.parquet --no-weights -o base.onnx",
    "vbsw retrain-head w.parquet -o vbsw.onnx",
    "vbsw evaluate base.onnx test.parquet --run-name baseline --seed 0 "
    "--json base.json",
    "vbsw evaluate vbsw.onnx test.parquet --run-name vbsw --seed 0 "
    "--json vbsw.json",
    "vbsw evaluate --compare base.json vbsw.json"])

# Names that promise data: a record written there would mislead its readers.
DATA_SUFFIXES = (".parquet", ".pq", ".npy", ".npz", ".onnx")

PREDICTION = "prediction"
PROBABILITIES = "probabilities"


@command("evaluate", EXAMPLE)
def evaluate_cli(
    paths: Annotated[Optional[List[str]], typer.Argument(
        metavar="MODEL.onnx DATA | RUN.json...",
        help="A model and labelled data (Parquet or .npy with --labels); with "
        "--compare, run records written by --json.")] = None,
    predictions: Annotated[Optional[str], typer.Option(
        "--predictions", metavar="FILE",
        help="Evaluate a predictions file instead of a model (columns: the "
        "labels, and 'probabilities' and/or 'prediction').")] = None,
    compare_runs: Annotated[bool, typer.Option(
        "--compare", help="Aggregate run records by run name: best, mean ± se, "
        "gain per base model.")] = False,
    reference: Annotated[Optional[str], typer.Option(
        "--reference", metavar="NAME",
        help="With --compare: the run name gains are measured against. "
        "Default: baseline.")] = None,
    features_column: Annotated[Optional[str], typer.Option(
        "--features", metavar="COLUMN", help="The model's input column. "
        "Default: the column(s) a vbsw head was trained on, else 'features', "
        "else the one list column.")] = None,
    feature_columns: FeatureColumnsOpt = None,
    label: Annotated[Optional[str], typer.Option(
        "--label", metavar="A[,B...]",
        help="Label column(s). Default: those a vbsw head was trained on (or "
        "a saved predictions file records), else 'label'.")] = None,
    labels_file: Annotated[Optional[str], typer.Option(
        "--labels", metavar="FILE", help="Labels from another file, joined on "
        "'id' when both files have one, else row for row (with a note when "
        "only one has an 'id').")] = None,
    task: Annotated[str, typer.Option(
        "--task", metavar="auto|classification|regression",
        help="auto: the model's vbsw metadata, else the labels' type.")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Rows per onnxruntime call.")] = 1024,
    json_path: Annotated[Optional[str], typer.Option(
        "--json", "-o", metavar="PATH", help="Write the record (or the "
        "comparison) as JSON to PATH, or - for stdout.")] = None,
    run_name: Annotated[Optional[str], typer.Option(
        "--run-name", metavar="NAME", help="Name of the method, e.g. baseline "
        "or vbsw; runs with one name are aggregated by --compare.")] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", callback=seed_in_range,
        help=f"Seed the model was trained with (recorded), {SEED_RANGE}.")
    ] = None,
    group: Annotated[Optional[str], typer.Option(
        "--group", metavar="ID", help="The base model this run belongs to, "
        "for the gain per model (default: the seed).")] = None,
    save_predictions: Annotated[Optional[str], typer.Option(
        "--save-predictions", metavar="PATH.parquet",
        help="Also write the model's predictions (a file --predictions reads).")
    ] = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Measure a model on labelled data, or compare runs.

    Classification: accuracy, macro F1, log loss. Regression: MSE, RMSE, MAE,
    maximum absolute error (L-infinity), Pearson, Spearman. A table goes to
    stderr, the record to --json.
    """
    reporter = Reporter(verbose=verbose, quiet=quiet)
    paths = list(paths or [])
    task = keyword(task, io.TASKS)
    if task not in io.TASKS:
        raise UsageError(f"--task {task}: choose one of " + ", ".join(io.TASKS))
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    _check_outputs(json_path, save_predictions,
                   paths + [predictions, labels_file])
    if save_predictions and (compare_runs or predictions is not None):
        given = "--compare" if compare_runs else "--predictions"
        raise UsageError(f"--save-predictions saves a model's predictions; "
                         f"with {given} no model runs: drop one of them")
    if compare_runs:
        _compare_mode(paths, predictions, reference or "baseline", json_path,
                      reporter)
        return
    if reference is not None:
        raise UsageError(f"--reference {reference} names the run gains are "
                         "measured against in --compare; without --compare "
                         "drop it")
    if predictions == io.STDIO and labels_file == io.STDIO:
        raise UsageError("--predictions - and --labels -: stdin holds one "
                         "file; give the other a file name")

    if predictions is not None:
        if paths:
            raise UsageError("--predictions FILE takes no MODEL or DATA "
                             "arguments")
        record = _predictions_mode(predictions, label, labels_file, task)
    else:
        _check_model_paths(paths, labels_file)
        record = _model_mode(paths, features_column, feature_columns, label,
                             labels_file, task, batch_size, save_predictions,
                             reporter)
    record.update({"run": run_name, "seed": seed, "group": group,
                   "version": __version__})
    record["notes"] = record.get("notes", []) + range_notes(record["metrics"])
    _write_json(strict_json(record), json_path, paths)
    _print_record(reporter, record)


def _check_model_paths(paths, labels_file) -> None:
    """MODEL.onnx and DATA, the model a file: onnx reads a model from a path."""
    if len(paths) > 2:
        raise UsageError(f"{len(paths)} paths given ({' '.join(paths)}): give "
                         "MODEL.onnx and DATA only")
    if len(paths) != 2:
        raise UsageError("give MODEL.onnx and DATA (or --predictions FILE, "
                         "or --compare RUN.json...)")
    if paths[0] == io.STDIO:
        raise UsageError("MODEL -: the model cannot come from stdin; save it "
                         "to a file (e.g. retrain-head -o head.onnx) and give "
                         "that path (the DATA may be -)")
    if paths[0].lower().endswith(".json"):
        raise UsageError(f"MODEL {paths[0]}: a .json file is a run record, not "
                         "a model; to compare run records, give --compare")
    if paths[1].lower().endswith(".onnx") and not paths[0].lower().endswith(".onnx"):
        raise UsageError(f"DATA {paths[1]} is an ONNX model: the model comes "
                         "first (vbsw evaluate MODEL.onnx DATA)")
    if _data_magic(paths[0]):
        raise UsageError(f"MODEL {paths[0]} holds data, not a model: the model "
                         "comes first (vbsw evaluate MODEL.onnx DATA)")
    if paths[1] == io.STDIO and labels_file == io.STDIO:
        raise UsageError("DATA - and --labels -: stdin holds one file; give "
                         "the other a file name")


def _data_magic(path: str) -> bool:
    """Whether a file starts as Parquet or .npy data do."""
    try:
        return io.data_kind(path) is not None
    except OSError:
        return False  # the model's loading says what is wrong


def _check_outputs(json_path, save_predictions, inputs) -> None:
    """Every output path, before any work: writable, no input, not the same;
    stdout for one of them at most."""
    io.check_output_path(json_path, "--json")
    io.check_output_path(save_predictions, "--save-predictions")
    if save_predictions == io.STDIO and json_path == io.STDIO:
        raise UsageError("--json - and --save-predictions -: stdout takes one "
                         "of them; give the other a file name")
    if save_predictions and save_predictions != io.STDIO and Path(
            save_predictions).suffix.lower() not in (".parquet", ".pq") \
            and not io.is_devnull(save_predictions):
        raise UsageError(f"--save-predictions {save_predictions}: predictions "
                         "are written as .parquet (or - for stdout)")
    io.refuse_overwrite(json_path, "--json", inputs)
    io.refuse_overwrite(save_predictions, "--save-predictions", inputs)
    if json_path and save_predictions and json_path != io.STDIO \
            and not io.is_devnull(json_path):
        if io.same_path(json_path, save_predictions):
            raise UsageError(f"--json {json_path} and --save-predictions "
                             f"{save_predictions}: the same file; give two names")
    if json_path and Path(json_path).suffix.lower() in DATA_SUFFIXES:
        raise UsageError(f"--json {json_path}: the run record is JSON text, not "
                         "data; give it a .json name (predictions go to "
                         "--save-predictions)")


# ---------------------------------------------------------------------------
# A model on data


def _model_mode(paths, features_column, feature_columns, label, labels_file,
                task, batch_size, save_predictions, reporter) -> dict:
    from vbsw_cli.head import read_metadata
    from vbsw_cli.onnx_graph import load_model

    model_path, data_path = paths
    model = load_model(model_path)
    metadata = read_metadata(model) or {}
    recorded_task = metadata.get("task")
    if task == "auto":
        task = recorded_task or "auto"
    elif recorded_task in ("classification", "regression") and task != recorded_task:
        raise UsageError(f"--task {task}: {model_path} is a {recorded_task} "
                         "model (its vbsw metadata says so); drop --task")

    table = io.read_table(data_path)
    io.require_rows(table, data_path)
    label_table, source, notes = _label_table(table, data_path, labels_file)
    label_names = _label_names(label, metadata.get("labels"), label_table,
                               source, notes)
    input_name = data_input(model, model_path).name
    choice = _feature_choice(table, data_path, features_column, feature_columns,
                             metadata, label_names, notes, input_name)
    if features_column is None and feature_columns is None:
        _refuse_embedded(table, data_path, choice.get("column"), model_path,
                         metadata, input_name)
    label_names = io.expand_columns(label_table, label_names, source, "label")
    _check_label_order(label, label_names, metadata.get("labels"), notes)
    notes += _relabelled(table, data_path, label_table, label_names)
    own = label_names if label_table is table else []
    X, used = io.feature_matrix(table, data_path, **choice,
                                exclude=[io.ID_COLUMN, *own])
    labels = io.read_labels(label_table, source, label_names, task=task)

    result = run_model(model, X, name=model_path, batch_size=batch_size,
                       progress=reporter)
    record, frame = _score(result.outputs, labels, metadata, model_path)
    record["notes"] = notes + result.notes + record.get("notes", [])
    record.update({"source": "model", "model": model_path, "data": data_path,
                   "features": used, "n_features": int(X.shape[1]),
                   "model_input": result.input_name,
                   "labels": [c.column for c in labels]})
    if save_predictions:
        _save_predictions(frame, table, labels, label_table, save_predictions,
                          [model_path, data_path], record)
    return record


def _input_column(table: pa.Table, labels: list[str], input_name: str) -> str:
    """The column named as the model's input, else 'features' if present, else
    the only list column that is not a label."""
    if input_name in table.column_names and input_name not in labels:
        return input_name
    if io.DEFAULT_FEATURES in table.column_names:
        return io.DEFAULT_FEATURES
    labels = set(labels)
    listy = [f.name for f in table.schema if f.name not in labels and (
        pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)
        or pa.types.is_large_list(f.type))]
    if len(listy) == 1:
        return listy[0]
    return io.DEFAULT_FEATURES  # feature_matrix names the problem


def _feature_choice(table, name, features_column, feature_columns, metadata,
                    labels, notes, input_name) -> dict:
    """``column=`` or ``columns=`` for io.feature_matrix; notes when the
    choice differs from the columns the head was trained on."""
    columns = io.split_names(feature_columns, "--feature-columns")
    if features_column is not None and feature_columns is not None:
        raise UsageError(f"--features {features_column} and --feature-columns "
                         f"{feature_columns}: give one of them")
    recorded = _recorded_features(metadata)
    given = columns or ([features_column] if features_column else [])
    if given:
        _check_given(given, recorded, feature_columns, notes)
        return {"columns": columns} if columns else {"column": features_column}
    if recorded is None:
        return {"column": _input_column(table, labels, input_name)}
    missing = [c for c in recorded if c not in table.column_names]
    if missing:
        raise DataError(f"{io.describe(name)}: the head was trained on "
                        f"{_shown(recorded)}, and this file has no column "
                        f"'{missing[0]}'; give the features the head takes "
                        "(vbsw embed), or name them with --features or "
                        "--feature-columns")
    if len(recorded) == 1 and _is_list(table.schema.field(recorded[0]).type):
        return {"column": recorded[0]}
    return {"columns": recorded}


def _refuse_embedded(table, name, column, model_path, metadata, input_name
                     ) -> None:
    """A backbone, or a merged model, fed the features vbsw embed made.

    Where the widths agree (8 x 8 digits, 64 features) the model would run
    and score nonsense, so the run stops unless --features asks for it.
    """
    record = io.latest_parameters(table, "embed")
    # A backbone takes only a column embed carried through beside its
    # features (its input data, when carried); any other came from embed's
    # output, whatever its name now (renamed to the model's input too).
    carried = record.get("columns") if record is not None else None
    if record is None or column not in table.column_names \
            or not isinstance(carried, list) or column in carried:
        return  # (a missing column gets its own message from the reading)
    merged = "merged" in metadata
    if not merged and record.get("model_sha256") != io.sha256_of(model_path):
        return
    what = ("a merged model (backbone and head)" if merged
            else "the backbone that made them")
    read = io.describe(record.get("input", "-"))
    raise DataError(f"{io.describe(name)}: column '{column}' holds features "
                    f"made by vbsw embed, and {model_path} is {what}: its input "
                    f"'{input_name}' takes the data embed read ({read}); "
                    f"evaluate it on those, or give --features {column} to "
                    "feed this column anyway")


def _recorded_features(metadata: dict) -> list[str] | None:
    """The feature columns a head was trained on; None for other models and
    merged ones (their input is the backbone's, not the head's)."""
    if "merged" in metadata:
        return None
    used = (metadata.get("trained_on") or {}).get("features")
    if isinstance(used, list) and used and all(isinstance(c, str) for c in used):
        return used
    return None


def _check_given(given, recorded, feature_columns, notes) -> None:
    if recorded is None or given == recorded:
        return
    if sorted(given) == sorted(recorded):
        raise UsageError(f"--feature-columns {feature_columns}: the head was "
                         f"trained on these columns in the order "
                         f"{','.join(recorded)}; give them in that order")
    notes.append(f"the head was trained on {_shown(recorded)}; fed "
                 f"{_shown(given)} as asked")


def _shown(columns: list[str]) -> str:
    if len(columns) == 1:
        return f"column '{columns[0]}'"
    head = ", ".join(columns[:4]) + (", ..." if len(columns) > 4 else "")
    return f"{len(columns)} columns ({head})"


def _is_list(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind)
            or pa.types.is_large_list(kind))


def _label_names(label, recorded, table, source, notes) -> list[str]:
    """--label, else the head's (or saved predictions') labels, else 'label'."""
    if label is not None:
        return io.split_names(label, "--label")
    if not (isinstance(recorded, list) and recorded):
        return [io.DEFAULT_LABEL]
    missing = [c for c in recorded if c not in table.column_names]
    if missing and io.DEFAULT_LABEL in table.column_names:
        notes.append(f"the model was trained to predict {_shown(recorded)}, which "
                     f"{io.describe(source)} lacks: scored against "
                     f"'{io.DEFAULT_LABEL}'")
        return [io.DEFAULT_LABEL]
    return list(recorded)


def _check_label_order(label, names, recorded, notes) -> None:
    """--label against the labels the outputs follow: the same ones in another
    order are refused (each output would be scored against another label's
    column); others are noted."""
    if label is None or not (isinstance(recorded, list) and recorded) \
            or names == recorded:
        return
    if sorted(names) == sorted(recorded):
        raise UsageError(f"--label {label}: the outputs follow the labels in "
                         f"the order {','.join(recorded)}; give them in that "
                         "order")
    notes.append(f"the model was trained to predict {_shown(recorded)}; "
                 f"scored against {_shown(names)} as asked")


def _relabelled(table, name, label_table, names) -> list[str]:
    """A note where the --labels file's columns stand in for the data's own."""
    both = [c for c in names if c in table.column_names]
    if label_table is table or not both:
        return []
    shown = ", ".join(f"'{c}'" for c in both)
    return [f"{shown} of {io.describe(name)} not used: the labels come from "
            "the --labels file"]


def _label_table(table: pa.Table, name: str, labels_file: str | None):
    """The table holding the labels, its name, and notes on how rows match."""
    if labels_file is None:
        return table, name, []
    other = io.read_table(labels_file, text=True)
    if other.column_names in (["values"], ["features"]):
        other = other.rename_columns([io.DEFAULT_LABEL])
    other, notes = io.match_label_rows(table, name, other, labels_file)
    return other, labels_file, notes


def _score(outputs, labels, metadata, name) -> tuple[dict, dict]:
    """Metrics of model outputs against labels; the predictions to save."""
    kinds = {c.kind for c in labels}
    if kinds == {"classification"}:
        if len(labels) != 1:
            raise DataError(f"{io.describe(name)}: classification takes one "
                            "label column")
        return _score_classes(outputs, labels[0], metadata, name)
    Y = np.column_stack([np.asarray(c.values).reshape(len(c.values), -1)
                         for c in labels])
    if outputs.shape[1] != Y.shape[1]:
        raise DataError(f"{name}: the model gives {outputs.shape[1]} outputs per "
                        f"row for {io.counted(Y.shape[1], 'label value')}")
    record = {"task": "regression", "n_samples": len(Y),
              "metrics": regression_metrics(Y, outputs)}
    return record, {PREDICTION: outputs}


def _score_classes(outputs, column, metadata, name) -> tuple[dict, dict]:
    classes = metadata.get("classes")
    notes = []
    if classes is None:
        classes = list(range(max(outputs.shape[1], 2)))
        if not all(isinstance(c, (int, np.integer)) for c in column.classes):
            why = "" if metadata else " (no vbsw metadata)"
            raise DataError(f"{name}: the model names no classes{why}, so the "
                            "labels must be class numbers "
                            f"0..{len(classes) - 1}; '{column.column}' holds "
                            "other values")
    with named_errors(name):
        proba, note = as_probabilities(outputs, len(classes))
    if note:
        notes.append(note)
    positions = class_positions(column.classes, classes, name)
    y_true = positions[column.values]
    record = {"task": "classification", "n_samples": len(y_true),
              "classes": classes,
              "metrics": classification_metrics(y_true, proba), "notes": notes}
    predicted = [classes[i] for i in np.argmax(proba, axis=1)]
    return record, {PROBABILITIES: proba, PREDICTION: predicted,
                    "classes": classes}


def _save_predictions(frame, table, labels, label_table, path, inputs, record):
    columns = {}
    if io.ID_COLUMN in table.column_names:
        columns[io.ID_COLUMN] = table.column(io.ID_COLUMN)
    for column in labels:
        columns[column.column] = label_table.column(column.column)
    out = pa.table(columns) if columns else pa.table({})
    if PROBABILITIES in frame:
        field = pa.field(PROBABILITIES, pa.list_(pa.float64(), len(frame["classes"])),
                         metadata={b"classes": json.dumps(frame["classes"]).encode()})
        out = out.append_column(field, io.fixed_size_list(frame[PROBABILITIES]))
        out = out.append_column(PREDICTION, pa.array(frame[PREDICTION]))
    else:
        values = frame[PREDICTION]
        array = pa.array(values[:, 0]) if values.shape[1] == 1 \
            else io.fixed_size_list(values)
        # Which label column each output predicts, in order.
        labelled = pa.field(PREDICTION, array.type, metadata={
            b"labels": json.dumps([c.column for c in labels]).encode()})
        out = out.append_column(labelled, array)
    provenance = io.provenance("evaluate", {
        "model": inputs[0], "data": inputs[1], "metrics": record["metrics"],
        "labels": [column.column for column in labels]})
    io.write_table(io.with_provenance(out, provenance, table.schema.metadata),
                   path, inputs=inputs)


# ---------------------------------------------------------------------------
# A predictions file


def _predictions_mode(path, label, labels_file, task) -> dict:
    table = io.read_table(path)
    io.require_rows(table, path)
    label_table, source, notes = _label_table(table, path, labels_file)
    recorded = ((io.read_provenance(table) or {}).get("parameters") or {}
                ).get("labels")
    names = _label_names(label, recorded, label_table, source, notes)
    _check_label_order(label, names, recorded, notes)
    notes += _relabelled(table, path, label_table, names)
    labels = io.read_labels(label_table, source, names, task=task)
    kinds = {c.kind for c in labels}
    if kinds == {"classification"} and len(labels) == 1:
        record = _predicted_classes(table, path, labels[0])
    else:
        record = _predicted_values(table, path, labels)
    record["notes"] = notes + record.get("notes", [])
    record.update({"source": "predictions", "predictions": path})
    return record


def _predicted_classes(table, path, column) -> dict:
    has_proba = PROBABILITIES in table.column_names
    if not has_proba and PREDICTION not in table.column_names:
        raise DataError(io.missing_column_message(table, PROBABILITIES, path,
                                                  "prediction")
                        + f"; a classification predictions file needs "
                        f"'{PROBABILITIES}' or '{PREDICTION}'")
    if has_proba:
        proba = io.list_column_matrix(table.column(PROBABILITIES), path,
                                      PROBABILITIES).astype(np.float64)
        io.check_finite(proba, path, PROBABILITIES, "prediction")
        with named_errors(path):
            classes = _proba_classes(table, proba.shape[1], column)
            proba, note = as_probabilities(proba, len(classes))
        y_true = class_positions(column.classes, classes, path)[column.values]
        notes = [note] if note else []
        if PREDICTION in table.column_names:
            notes += _disagreement_notes(table.column(PREDICTION), proba, classes)
        return {"task": "classification", "n_samples": len(y_true),
                "classes": classes, "notes": notes,
                "metrics": classification_metrics(y_true, proba)}
    predicted = io.read_labels(table, path, [PREDICTION],
                               task="classification")[0]
    classes = sorted(set(column.classes) | set(predicted.classes), key=_sort_key)
    y_true = class_positions(column.classes, classes, path)[column.values]
    y_pred = class_positions(predicted.classes, classes, path)[predicted.values]
    return {"task": "classification", "n_samples": len(y_true),
            "classes": classes, "notes": ["no probabilities: no log loss"],
            "metrics": classification_metrics(y_true, y_pred=y_pred)}


def _disagreement_notes(prediction, proba, classes) -> list[str]:
    """A note when the 'prediction' column is not the most probable class."""
    differ = disagreements(proba, classes, prediction.to_pylist())
    if not differ:
        return []
    return [f"scored from '{PROBABILITIES}'; '{PREDICTION}' is not its most "
            f"probable class on {differ} of {len(proba)} rows"]


def _sort_key(value):
    return (str(type(value)), value)


def _proba_classes(table, width, column) -> list:
    """The class of each probability: the field's metadata, else the labels."""
    metadata = table.schema.field(PROBABILITIES).metadata or {}
    if b"classes" in metadata:
        classes = json.loads(metadata[b"classes"])
        if len(classes) != width:
            raise DataError(f"'{PROBABILITIES}' names {len(classes)} classes in "
                            f"its metadata but holds {io.counted(width, 'value')} "
                            "per row")
        return classes
    if all(isinstance(c, (int, np.integer)) for c in column.classes):
        return list(range(max(width, 2)))
    raise DataError(f"'{PROBABILITIES}' has no 'classes' metadata, so the labels "
                    "must be class numbers (the position of each probability)")


def _predicted_values(table, path, labels) -> dict:
    prediction = io.column_or_error(table, PREDICTION, path, "prediction")
    if pa.types.is_floating(prediction.type) or pa.types.is_integer(prediction.type):
        P = prediction.to_numpy().astype(np.float64)[:, None]
    else:
        P = io.list_column_matrix(prediction, path, PREDICTION).astype(np.float64)
    io.check_finite(P, path, PREDICTION, "prediction")
    Y = np.column_stack([np.asarray(c.values, np.float64).reshape(len(P), -1)
                         for c in labels])
    with named_errors(path):
        metrics = regression_metrics(Y, P)
    return {"task": "regression", "n_samples": len(Y), "metrics": metrics}


# ---------------------------------------------------------------------------
# Comparisons


def _compare_mode(paths, predictions, reference, json_path, reporter) -> None:
    if predictions is not None:
        raise UsageError("--compare and --predictions cannot be combined")
    if not paths:
        raise UsageError("--compare: give the run records (RUN.json ...)")
    _refuse_twice(paths)
    records = []
    for path in paths:
        records += _read_records(path)
    result = strict_json(compare(records, reference=reference))
    _write_json(result, json_path, paths)
    _print_comparison(reporter, result)


def _refuse_twice(paths: list[str]) -> None:
    """A record file given twice (a glob and its own name) would count its
    runs twice."""
    for i, path in enumerate(paths):
        earlier = [other for other in paths[:i] if other == path or (
            io.STDIO not in (path, other) and io.same_path(path, other))]
        if earlier:
            raise UsageError(f"--compare: {path} is given twice (as "
                             f"{earlier[0]}); its runs would count twice")


def _read_records(path: str) -> list[dict]:
    try:
        if path == io.STDIO:
            data = json.loads(sys.stdin.buffer.read().decode("utf-8"))
        else:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a JSON run record ({error})")
    items = data if isinstance(data, list) else [data]
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("metrics"), dict):
            raise DataError(f"{path}: a run record needs a 'metrics' object "
                            "(write records with vbsw evaluate --json)")
    return items


# ---------------------------------------------------------------------------
# Output


def _write_json(data: dict, path: str | None, inputs) -> None:
    if path is None:
        return
    text = json.dumps(data, indent=2, default=_plain, allow_nan=False) + "\n"
    if path == io.STDIO:
        io.write_stdout(text.encode())
        return
    with io.atomic_output(path, inputs=inputs) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)


def strict_json(value):
    """The value with NaN and infinities as None (null): strict JSON."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _number(value) -> str:
    """Four decimals, or four significant digits in scientific notation for
    values too large or too small to read that way."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(float(value))
    if value != 0 and not 1e-3 <= abs(value) < 1e5:
        return f"{value:.3e}"
    return f"{value:.4f}"


def _print_record(reporter, record) -> None:
    if reporter.quiet:
        return
    from rich.table import Table

    names = CLASSIFICATION_METRICS if record["task"] == "classification" \
        else REGRESSION_METRICS
    title = f"{record.get('run') or 'run'}: {record['task']}, " \
        f"{record['n_samples']} rows"
    table = Table(title=title, title_justify="left")
    for name in names:
        if name in record["metrics"]:
            table.add_column(name, justify="right")
    table.add_row(*[_number(record["metrics"][n]) for n in names
                    if n in record["metrics"]])
    if record.get("source") == "model":
        reporter.say(f"model input '{record['model_input']}' <- "
                     f"{_shown(record['features'])} of {record['data']} "
                     f"({io.counted(record['n_features'], 'value')} per row); "
                     f"labels {', '.join(record['labels'])}")
    stderr.print(table)
    undefined = [n for n in names if n in record["metrics"]
                 and record["metrics"][n] is None]
    if undefined:
        reporter.notice(f"{', '.join(undefined)} undefined (a label or predicted "
                        "column is constant): n/a here, null in the JSON")
    for note in record.get("notes", []):
        reporter.notice(note)


def _print_comparison(reporter, result) -> None:
    if reporter.quiet:
        return
    from rich.table import Table

    table = Table(title="best, mean ± se per run name", title_justify="left")
    table.add_column("metric")
    names = list(result["runs"])
    for name in names:
        table.add_column(f"{name} (n={_count(result['runs'][name])})",
                         justify="right")
    gained = list(result["gains"])
    for name in gained:
        table.add_column(f"gain per model: {name}", justify="right")
    metrics = []
    for name in names:
        metrics += [m for m in result["runs"][name] if m not in metrics]
    for metric in metrics:
        arrow = " (lower better)" if metric in LOWER_IS_BETTER else ""
        cells = [_cell(result["runs"][n].get(metric)) for n in names]
        cells += [_cell(result["gains"][n].get(metric)) for n in gained]
        table.add_row(metric + arrow, *cells)
    stderr.print(table)
    if not gained:
        reporter.notice(f"no runs named '{result['reference']}': no gains "
                        "(set --reference)")


def _count(summaries: dict) -> int:
    return max((s.get("n", 0) for s in summaries.values()), default=0)


def _cell(summary: dict | None) -> str:
    if not summary or summary.get("best") is None:
        return "-"
    se = summary.get("se")
    spread = f" ± {_number(se)}" if se is not None else ""
    return f"{_number(summary['best'])}, {_number(summary['mean'])}{spread}"
