"""``vbsw weigh``: local variance and VBSW weights of every row of a file."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from io import BytesIO
from typing import Annotated, Optional

import numpy as np
import pyarrow as pa
import typer

from vbsw_cli import io
from vbsw_cli.cli._common import (DebugOpt, FeatureColumnsOpt, FeaturesOpt,
                                  LabelOpt, OutputOpt, QuietOpt, Reporter,
                                  SeedOpt, VerboseOpt, command, keyword,
                                  integer_vector_notes, many_classes_notes,
                                  named_errors, resolve_output)
from vbsw_cli.errors import DataError, UsageError
from vbsw_cli.neighbors import (DEFAULT_EF_CONSTRUCTION, DEFAULT_M, METHODS,
                                REPRODUCIBLE_ROWS, SearchOptions, check_k,
                                check_search_options, csr_graph,
                                duplicate_rows, floor_text, refined_distances,
                                thread_count)
from vbsw_cli.weigh import (NORMALIZATIONS, check_label_span, check_m,
                            check_normalization, histogram, weigh)
from vbsw_cli.weigh import standardize as scaled_features

EXAMPLE = ("vbsw weigh sample_data/breast_cancer.parquet --k 35 --m 50 "
           "-o weighted.parquet")


@command("weigh", EXAMPLE, short_of_memory="a smaller input or a smaller --k (the "
         "search holds 32 bytes per row and neighbour)")
def weigh_cli(
    features: Annotated[str, typer.Argument(
        metavar="FEATURES", help="Parquet or .npy file of features, or - for stdin.")],
    k: Annotated[int, typer.Option("--k", help="Neighbourhood size, the point "
                                   "itself included unless --exclude-self.")] = 20,
    m: Annotated[float, typer.Option("--m", help="Ratio of the largest weight to "
                                     "the smallest (>= 1).")] = 40.0,
    output: OutputOpt = None,
    features_column: FeaturesOpt = None,
    feature_columns: FeatureColumnsOpt = None,
    label: LabelOpt = io.DEFAULT_LABEL,
    labels_file: Annotated[Optional[str], typer.Option(
        "--labels", metavar="FILE",
        help="Labels from another file (.npy, or Parquet with the --label "
             "columns), joined on id when both files have one, else row for "
             "row; needed for .npy features.")] = None,
    task: Annotated[str, typer.Option(
        "--task", metavar="auto|classification|regression",
        help="auto: float labels are regression targets, integers, strings and "
             "categories are classes; or force one reading.")
    ] = "auto",
    exclude_self: Annotated[bool, typer.Option(
        "--exclude-self", help="Leave the point out of its own neighbourhood.")
    ] = False,
    normalize: Annotated[str, typer.Option(
        "--normalize", metavar="mean|sum",
        help="mean: weights average 1 (keeps the step size of a mean loss); "
             "sum: weights sum to 1.")] = "mean",
    standardize: Annotated[bool, typer.Option(
        "--standardize", help="Scale each feature to zero mean and unit variance "
        "before the search (off by default: distances then use the features as "
        "given).")] = False,
    search: Annotated[str, typer.Option(
        "--search", metavar="auto|hnsw|exact",
        help="auto: exact below 10,000 rows, else hnswlib with its recall "
             "checked; hnsw; exact.")] = "auto",
    exact: Annotated[bool, typer.Option("--exact", help="Same as --search exact.")
                     ] = False,
    recall: Annotated[float, typer.Option(
        "--recall", help="recall@k that hnswlib must reach on a sample, by "
        "raising ef, else exact search is used.")] = 0.95,
    hnsw_m: Annotated[int, typer.Option("--hnsw-m", help="hnswlib graph degree M.")
                      ] = SearchOptions.M,
    ef_construction: Annotated[int, typer.Option(
        "--ef-construction", help="hnswlib build-time ef.")
    ] = SearchOptions.ef_construction,
    ef: Annotated[Optional[int], typer.Option(
        "--ef", help="hnswlib query-time ef; default: the smallest that reaches "
        "--recall.")] = None,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", help="Threads for the search (default: all cores).")] = None,
    reproducible: Annotated[Optional[bool], typer.Option(
        "--reproducible/--no-reproducible", help="Build hnswlib graphs of "
        "shards of the rows, one thread each, so that runs with the same input, "
        "--seed and --threads give the same output; or one graph on every "
        "thread at once (faster on large inputs, but its neighbours change from "
        f"run to run). Default: reproducible up to {REPRODUCIBLE_ROWS:,} rows.",
        show_default=False)] = None,
    check_recall: Annotated[Optional[int], typer.Option(
        "--check-recall", metavar="N",
        help="Report recall@k against exact search on N sampled rows.")] = None,
    weights_only: Annotated[bool, typer.Option(
        "--weights-only", help="Write only id (or row), local_variance and "
        "weight (an -o .npy output holds the weights alone).")] = False,
    graph: Annotated[Optional[str], typer.Option(
        "--graph", metavar="PATH.npz",
        help="Also write the k-NN graph as a SciPy CSR matrix of distances "
             "(the point itself left out).")] = None,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Weigh each row by the local variance of its neighbours' labels.

    Writes the input rows with two more columns, local_variance and weight
    (eq. 4 of the paper, weights rescaled to [1, m] then normalised), ready for
    vbsw retrain-head.
    """
    reporter = Reporter(verbose=verbose, quiet=quiet)
    timings = {}
    started = time.perf_counter()
    search, task = keyword(search, METHODS), keyword(task, io.TASKS)
    normalize = keyword(normalize, NORMALIZATIONS)
    _validate(k, m, normalize, task, threads, check_recall, graph)
    _refuse_contradictions(exact, search, features_column, feature_columns,
                           features, labels_file)
    options = SearchOptions(method="exact" if exact else search, recall=recall,
                            M=hnsw_m, ef_construction=ef_construction, ef=ef,
                            threads=threads, seed=seed,
                            reproducible=reproducible)
    # Checked again by the search, but here before the file is read, so a
    # misspelt option gets its usage error alone.
    check_search_options(options)
    destination = _checked_outputs(output, graph, features, labels_file)
    kind = io.output_kind(destination)

    read = _read_inputs(features, labels_file, label, features_column,
                        feature_columns, task, weights_only, kind)
    table, X, labels = read.table, read.X, read.labels
    timings["read_s"] = time.perf_counter() - started
    with named_errors(features):
        check_k(k, len(X), not exclude_self)
    with named_errors(read.label_source):
        check_label_span(labels)
    # Said before the search, so a long run shows at once what it works on.
    tasks = ", ".join(f"{c.column}: {c.kind}" for c in labels)
    reporter.say(f"rows {len(X)}, dimensions {X.shape[1]}, k {k}, labels {tasks}")
    for note in read.notes:
        reporter.notice(note)

    with named_errors(features):
        result = weigh(X, labels, k=k, m=m, include_self=not exclude_self,
                       normalization=normalize, scale_features=standardize,
                       search=options, check_recall=check_recall,
                       progress=reporter)
    timings.update(result.timings)

    started = time.perf_counter()
    parameters = {
        "input": features, "labels_file": labels_file, "k": k, "m": m,
        "include_self": not exclude_self, "normalization": normalize,
        "standardize": standardize, "features": read.feature_names,
        "labels": read.label_columns, "tasks": {c.column: c.kind for c in labels},
        "weights_only": weights_only, "graph": graph, "seed": seed,
        "threads": thread_count(threads), "check_recall": check_recall,
        "checked_recall": result.recall,
        "search": {"requested": options.method, "used": result.neighbours.method,
                   **_jsonable(result.neighbours.details)},
    }
    if graph and result.neighbours.method == "hnsw":
        space = scaled_features(X) if standardize else X
        result.neighbours.distances = refined_distances(space, result.neighbours)
    _write_outputs(result, table, destination, kind, graph, weights_only,
                   parameters, [features] + ([labels_file] if labels_file else []),
                   normalize, m, not exclude_self)
    timings["write_s"] = time.perf_counter() - started
    timings["total_s"] = sum(timings.values())

    given = _graph_options_given(ef, hnsw_m, ef_construction)
    _summary(reporter, X, k, result, timings, destination, normalize, ef,
             check_recall, not exclude_self, given, labels,
             graph_path=graph, options=options)


def _refuse_contradictions(exact, search, features_column, feature_columns,
                           features, labels_file) -> None:
    """Options that cannot go together."""
    if exact and search not in ("auto", "exact"):
        raise UsageError(f"--exact contradicts --search {search}; give one")
    if features_column is not None and feature_columns is not None:
        raise UsageError(f"--features {features_column} and --feature-columns "
                         f"{feature_columns}: give one of them")
    if features == io.STDIO and labels_file == io.STDIO:
        raise UsageError("FEATURES and --labels cannot both be - (stdin)")


def _checked_outputs(output, graph, features, labels_file) -> str:
    """The output's destination, with both outputs checked before any read."""
    io.check_output_path(output, "-o")
    io.check_output_path(graph, "--graph")
    sources = [features, labels_file]
    destination = resolve_output(output, features, ".weighted.parquet")
    io.refuse_overwrite(destination, "-o", sources)
    io.refuse_overwrite(graph, "--graph", sources)
    return destination


@dataclass
class _Read:
    """What weigh reads: the rows to write out, the feature matrix and its
    columns, the labels, their columns and the file they came from, and notes
    on how they were read."""

    table: pa.Table
    X: np.ndarray
    feature_names: list[str]
    labels: list
    label_columns: list[str]
    label_source: str
    notes: list[str]


def _read_inputs(features, labels_file, label, features_column,
                 feature_columns, task, weights_only, kind) -> _Read:
    """Features and labels from their files; the input's rows as they go out
    (only the id with --weights-only or a .npy output)."""
    label_names = io.split_names(label, "--label")
    feature_patterns = io.split_names(feature_columns, "--feature-columns")
    table = io.read_table(features)
    io.require_rows(table, features)
    label_table, label_source, notes = _label_table(table, features,
                                                    labels_file, label_names)
    label_columns = io.expand_columns(label_table, label_names, label_source,
                                      "label")
    own = label_columns if labels_file is None else []
    X, feature_names = io.feature_matrix(
        table, features, column=features_column, columns=feature_patterns,
        exclude=[io.ID_COLUMN, *own])
    labels = io.read_labels(label_table, label_source, label_columns, task=task)
    notes += many_classes_notes(labels, len(X))
    notes += integer_vector_notes(label_table, label_columns, task)
    notes += _shadowed(table.column_names, features, weights_only, kind)
    only_id = weights_only or kind == "npy"
    if not only_id:
        notes += _relabelled(table, label_table, label_columns, features)
    table = _output_rows(table, label_table, label_columns, only_id)
    return _Read(table, X, feature_names, labels, label_columns, label_source,
                 notes)


def _write_outputs(result, table, destination, kind, graph, weights_only,
                   parameters, inputs, normalize, m, include_self) -> None:
    """The weighted rows, and the graph where asked: both or neither."""
    with ExitStack() as stack:
        # The graph is renamed into place only after the main output was
        # written.
        if graph:
            _write_graph(result, stack.enter_context(
                io.atomic_output(graph, inputs=inputs)), include_self)
        _write(result, table, destination, kind, weights_only, parameters,
               inputs, normalize, m)


def _validate(k, m, normalize, task, threads, check_recall, graph):
    """Refuse wrong options before any file is read."""
    check_m(m)
    check_normalization(normalize)
    if k < 2:
        raise UsageError(f"--k {k}: the unbiased variance needs k >= 2")
    if task not in io.TASKS:
        raise UsageError(f"--task {task}: choose one of " + ", ".join(io.TASKS))
    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads}: must be at least 1")
    if check_recall is not None and check_recall < 1:
        raise UsageError(f"--check-recall {check_recall}: must be at least 1")
    if graph is not None and not (graph.endswith(".npz")
                                  or io.is_devnull(graph)):
        raise UsageError(f"--graph {graph}: the graph is written as .npz")


def _shadowed(columns, features, weights_only, kind) -> list[str]:
    """Notes on input columns whose names the output gives to other values."""
    if kind == "npy":
        return []
    if weights_only:
        if "row" in columns and io.ID_COLUMN not in columns:
            return [f"the output's 'row' is the row number, not the 'row' column "
                    f"of {io.describe(features)} (name that one '{io.ID_COLUMN}' "
                    "to carry it)"]
        return []
    replaced = [c for c in ("local_variance", "weight") if c in columns]
    if not replaced:
        return []
    names = " and ".join(f"'{c}'" for c in replaced)
    return [f"{names} of {io.describe(features)} replaced by the new values"]


def _relabelled(table, label_table, label_columns, features) -> list[str]:
    """A note where --labels replaces label columns the features file has."""
    if label_table is table:
        return []
    both = [c for c in label_columns if c in table.column_names]
    if not both:
        return []
    names = ", ".join(f"'{c}'" for c in both)
    return [f"{names} of {io.describe(features)} replaced by the --labels "
            "file's, from which the weights come"]


def _output_rows(table, label_table, label_columns, only_id):
    """The columns that go out: id only, or every input column with the
    labels read from another file (in place of the file's own)."""
    if only_id:
        # Free the other columns before the search.
        return table.select([c for c in table.column_names if c == io.ID_COLUMN])
    for column in label_columns:
        if label_table is not table:  # --labels: its labels go out
            if column in table.column_names:
                table = table.drop_columns([column])
            table = table.append_column(column, label_table.column(column))
    return table


def _label_table(table: pa.Table, features: str, labels_file: str | None,
                 label_names: list[str]):
    """The table the labels come from (the features file, or --labels joined
    on id), its name, and notes on how its rows were matched."""
    bare = [io.DEFAULT_FEATURES]
    if labels_file is None:
        if table.column_names == bare and label_names != bare:
            if features != io.STDIO and io.data_kind(features) == "npy":
                raise DataError(f"{io.describe(features)}: an array holds no "
                                "labels; give them with --labels FILE")
            raise DataError(f"{io.describe(features)}: no label column "
                            f"'{label_names[0]}' (the only column is "
                            f"'{bare[0]}'); give the labels with --labels FILE")
        return table, features, []
    other = io.read_table(labels_file, text=True)
    if other.column_names == bare and len(label_names) == 1:
        # A bare array (.npy): its one column is the label.
        other = other.rename_columns(label_names)
    other, notes = io.match_label_rows(table, features, other, labels_file)
    return other, labels_file, notes


def _write(result, table, destination, kind, weights_only, parameters, inputs,
           normalize, m):
    if kind == "npy":
        io.write_array(result.weight, destination, inputs=inputs)
        return
    weight_meta = {b"normalization": normalize.encode(), b"m": str(m).encode()}
    columns = {
        "local_variance": io.from_numpy(result.local_variance),
        "weight": io.from_numpy(result.weight),
    }
    if weights_only:
        keep = table.select([io.ID_COLUMN]) if io.ID_COLUMN in table.column_names \
            else pa.table({"row": io.from_numpy(np.arange(table.num_rows))})
        out = keep
    else:
        out = table.drop_columns([c for c in columns if c in table.column_names])
    for name, values in columns.items():
        field = pa.field(name, pa.float64(),
                         metadata=weight_meta if name == "weight" else None)
        out = out.append_column(field, values)
    record = io.provenance("weigh", parameters)
    out = io.with_provenance(out, record, table.schema.metadata,
                             same_rows=list(columns))
    io.write_table(out, destination, inputs=inputs)


def _write_graph(result, temporary, include_self):
    from scipy.sparse import save_npz

    # Zipped in memory: the zip writer seeks back, which /dev/null only
    # pretends to do.
    buffer = BytesIO()
    # Uncompressed: distances and row numbers shrink little (121 against 144
    # MB for 12 million entries) for 10 s of compression.
    save_npz(buffer, csr_graph(result.neighbours, include_self), compressed=False)
    with open(temporary, "wb") as handle:
        handle.write(buffer.getbuffer())


def _jsonable(details: dict) -> dict:
    """Search details for the metadata: timings left out, and a reason in
    fixed words (``why``) for one with measured figures, so that the same
    seed writes the same bytes."""
    record = {key: (round(value, 4) if isinstance(value, float) else value)
              for key, value in details.items()
              if not key.endswith("_s") and key != "why"}
    if "why" in details:
        record["reason"] = details["why"]
    return record


def _graph_options_given(ef, hnsw_m, ef_construction) -> list[str]:
    """The graph options set away from their defaults, as typed."""
    given = [] if ef is None else [f"--ef {ef}"]
    if hnsw_m != DEFAULT_M:
        given.append(f"--hnsw-m {hnsw_m}")
    if ef_construction != DEFAULT_EF_CONSTRUCTION:
        given.append(f"--ef-construction {ef_construction}")
    return given


def _searched_again(count: int, short: int = 0, largest: int = 0) -> str:
    """The rows searched again after the graph: those it did not lead back to
    themselves, those whose results provably missed nearer rows, and those of
    largest local variance (exactly)."""
    parts = []
    if count:
        parts.append(f"{io.counted(count, 'row')} the graph did not lead back to")
    if short:
        parts.append(f"{io.counted(short, 'row')} whose results provably missed "
                     "nearer rows")
    if largest:
        parts.append(f"{io.counted(largest, 'row')} of largest local variance")
    return f"; searched again: {', '.join(parts)}" if parts else ""


def _alike(labels, n_samples: int) -> str:
    """Why every neighbourhood's labels vary alike, as far as the labels say."""
    if all(len(c.classes) == 1 if c.kind == "classification"
           else np.ptp(c.values, axis=0).max() == 0 for c in labels):
        return "all labels are equal"
    if all(c.kind == "classification" and len(c.classes) == n_samples
           for c in labels):
        return "every row has a class of its own"
    return "the labels vary alike in every neighbourhood"


def _graphs(shards: int) -> str:
    return f"{shards} graphs built on a thread each, " if shards > 1 else ""


def _shared_graph_by_default(neighbours, options) -> bool:
    """Whether the default left a graph shared by several threads in use."""
    return options is not None and options.reproducible is None \
        and neighbours.method == "hnsw" \
        and not neighbours.details.get("reproducible", True) \
        and thread_count(options.threads) > 1


def _summary(reporter, X, k, result, timings, destination, normalize, ef,
             check_recall, include_self, graph_given, labels, *,
             graph_path=None, options=None):
    if reporter.quiet:
        return
    details = result.neighbours.details
    search = result.neighbours.method
    if search == "hnsw":
        again = _searched_again(details.get("searched_again", 0),
                                details.get("proven_short", 0),
                                details.get("largest_exact", 0))
        search += (f" ({_graphs(details.get('shards', 1))}M={details['M']}, "
                   f"ef_construction={details['ef_construction']}, "
                   f"ef={details['ef']}, "
                   f"sample recall {floor_text(details['sample_recall'])}, "
                   f"at least {floor_text(details['sample_recall_low'])}"
                   f"{again})")
    elif "ef" in details:  # a graph was tried: the note below says why not
        search += " (instead of the graph)"
    else:
        search += f" ({details.get('reason', '')})"
    reporter.say(f"search: {search}")
    if graph_given and result.neighbours.method == "exact" \
            and "ef" not in details:  # no graph was tried
        reporter.notice(f"{', '.join(graph_given)} not used: exact search ran")
    elif ef is not None and details.get("ef", ef) != ef \
            and result.neighbours.method == "hnsw":
        reporter.notice(f"--ef {ef} raised to {details['ef']}: hnswlib searches "
                        "with ef at least the neighbours it returns")
    if "reason" in details and result.neighbours.method == "exact" \
            and "ef" in details:
        reporter.notice(f"fell back to exact search: {details['reason']}")
    if "warning" in details:
        reporter.say(f"warning: {details['warning']}")
    if _shared_graph_by_default(result.neighbours, options):
        reporter.notice(f"above {REPRODUCIBLE_ROWS:,} rows one graph is built on "
                        f"{thread_count(options.threads)} threads at once: its "
                        "neighbours, and the weights, can differ from run to "
                        "run (--reproducible makes them the same, about 30% "
                        "slower)")
    if result.recall is not None:
        rows = min(check_recall, len(X))
        reporter.say(f"recall@{k} against exact search: {result.recall:.4f} "
                     f"(on {rows} rows)")
    duplicates, crowded = duplicate_rows(X, result.neighbours, include_self)
    if duplicates:
        distinct = details.get("distinct_rows")
        once = "" if distinct is None else (
            f"; the distinct feature vectors ({distinct:,}) were searched once "
            "each")
        reporter.notice(f"{duplicates:,} rows have a duplicate feature vector "
                        f"among their neighbours (each point is counted once{once})")
        if crowded:
            reporter.notice(f"{io.counted(crowded, 'row')} have more identical "
                            "copies than a neighbourhood holds: which copies "
                            "are its neighbours goes by row number, so identical "
                            "rows can get different weights")
    if result.all_equal:
        covered = k + (0 if include_self else 1) >= len(X)
        why = "every neighbourhood holds every row" if covered \
            else _alike(labels, len(X))
        reporter.notice(f"every local variance is equal ({why}): all weights "
                        "are 1 before normalisation")
    stages = ", ".join(f"{key[:-2]} {value:.2f} s" for key, value in timings.items())
    reporter.say(f"time: {stages}")
    weight = result.weight
    reporter.say(f"weight ({normalize} 1): min {weight.min():.4g}, max "
                 f"{weight.max():.4g}, mean {weight.mean():.4g}")
    for line in histogram(weight):
        reporter.say(line)
    written = "stdout" if destination == "-" else destination
    reporter.say(f"wrote {written}" + (f" and {graph_path}" if graph_path else ""))
