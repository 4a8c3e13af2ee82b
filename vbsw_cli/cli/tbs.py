"""``vbsw tbs-sample``: Taylor based sampling, new inputs where f is steep."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import numpy as np
import pyarrow as pa
import typer

from vbsw_cli import io
from vbsw_cli.cli._common import (DebugOpt, OutputOpt, QuietOpt, Reporter,
                                  SeedOpt, VerboseOpt, command, keyword,
                                  resolve_output)
from vbsw_cli.errors import DataError, UsageError
from vbsw_cli.functions import BUILT_INS, Function, evaluate, load_function
from vbsw_cli.neighbors import SearchOptions
from vbsw_cli import tbs

EXAMPLE = ("vbsw tbs-sample --function runge --initial 8 --design grid "
           "--new 8 --components 3 --eps 1e-3 --include-initial "
           "-o runge_tbs.parquet")


@command("tbs-sample", EXAMPLE)
def tbs_cli(
    points: Annotated[Optional[str], typer.Argument(
        metavar="[POINTS]",
        help="Parquet file of existing points (columns --names), with labels "
             "or derivative columns when there is no --function. Without it, "
             "--initial points are drawn.")] = None,
    function: Annotated[Optional[str], typer.Option(
        "--function", metavar="NAME|MODULE:FUNC",
        help="runge (1/(1+25x^2) on [-1,1]), tanh (on [-3,3]), bateman "
             "(M = 1, sigma_a = sigma_r = -0.45, v = 1; inputs u0, eta0, t on "
             "[0,1] x [0,1] x [0,10]; outputs u, eta), or package.module:name "
             "or file.py:name of a vectorised function, (n, d) array in, (n,) "
             "or (n, outputs) out.")] = None,
    bounds: Annotated[Optional[str], typer.Option(
        "--bounds", metavar="LOW:HIGH,...|FILE",
        help="The box: one low:high per input, comma-separated, or a .csv / "
             ".parquet file with columns low, high (and name), one row per "
             "input. Default: the built-in's domain, else the points' "
             "bounding box.")] = None,
    names: Annotated[Optional[str], typer.Option(
        "--names", metavar="A,B,...",
        help="Input column names (default: the bounds file's or the "
             "built-in's, else x0, x1, ...; a Parquet POINTS file needs "
             "--names or --bounds).")] = None,
    initial: Annotated[Optional[int], typer.Option(
        "--initial", metavar="N", help="Initial points to draw when POINTS is "
        "not given.")] = None,
    design: Annotated[Optional[str], typer.Option(
        "--design", metavar="uniform|grid|lhs|sobol",
        help="Initial design: uniform (the default); grid (N = m^d, ends "
             "included); lhs (Latin hypercube); sobol (scrambled; balanced "
             "for N a power of 2).")] = None,
    new: Annotated[int, typer.Option(
        "--new", metavar="N'", help="Points to draw by TBS.")] = 100,
    order: Annotated[Optional[int], typer.Option(
        "--order", metavar="1|2", help="n of Df_eps^n (eq. 2), mixed second "
        "derivatives included; with --function or --gradient. Default: 2."
    )] = None,
    eps: Annotated[Optional[str], typer.Option(
        "--eps", metavar="E[,E...]", help="eps of eq. (2): one value, or one "
        "per input; with --function or --gradient. Default: 1e-3.")] = None,
    step: Annotated[Optional[str], typer.Option(
        "--step", metavar="H[,H...]", help="Finite-difference step of "
        "--function (default: --eps); f is evaluated up to this far outside "
        "the box.")] = None,
    gradient: Annotated[Optional[str], typer.Option(
        "--gradient", metavar="COLUMNS", help="Given first derivatives: one "
        "column per input (numbers, or lists with one value per output).")
    ] = None,
    hessian: Annotated[Optional[str], typer.Option(
        "--hessian", metavar="COLUMNS", help="Given second derivatives for "
        "--order 2: the upper triangle row by row, d(d+1)/2 columns: "
        "(1,1),(1,2),...,(1,d),(2,2),...")] = None,
    label: Annotated[Optional[str], typer.Option(
        "--label", metavar="A[,B...]",
        help="Without --function: the label columns of POINTS (default: "
             "label), written with null for the new rows; without --gradient "
             "too, their local variance (eq. 4) is the density. With "
             "--function: the names of the label columns written (default: "
             "the built-in's, else label or label_0, label_1, ...).")] = None,
    k: Annotated[Optional[int], typer.Option(
        "--k", metavar="<int>", help="Neighbourhood size of the local label "
        "variance, the point itself included; without --function and "
        "--gradient. Default: 20.")] = None,
    components: Annotated[int, typer.Option(
        "--components", help="Gaussians in the mixture.")] = 3,
    reg_covar: Annotated[str, typer.Option(
        "--reg-covar", metavar="auto|X",
        help="Added to each covariance's diagonal, in unit-box coordinates. "
             "auto: h^2/12 with h = N^(-1/d), the variance of one point's "
             "cell; 1e-6 is scikit-learn's default.")] = "auto",
    include_initial: Annotated[bool, typer.Option(
        "--include-initial", help="Also write the initial points "
        "(source = initial).")] = False,
    output: OutputOpt = None,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Draw new inputs where the function is steep (Taylor based sampling).

    The density at the initial points is Df_eps^n of eq. (2) (finite
    differences of --function, or --gradient/--hessian columns), or the local
    label variance of eq. (4) (--label). A Gaussian mixture is fitted to the
    points weighted by it (weighted EM), and --new points are drawn from it,
    those outside the box redrawn. The output has the input columns, source
    (initial or tbs), density (at the initial points), mixture_density, and
    the labels: computed with --function, else those of POINTS (null for the
    new rows, to fill in), and POINTS' id (null for the new rows).
    """
    reporter = Reporter(verbose=verbose, quiet=quiet)
    function = keyword(function, BUILT_INS)
    io.split_names(names, "--names")  # refuses a name given twice
    io.split_names(label, "--label")
    if points and design is not None:
        raise UsageError("--design draws the initial points when POINTS is not "
                         "given; give one of them")
    design = keyword(design or "uniform", tbs.DESIGNS)
    given = {"--k": k, "--order": order, "--eps": eps, "--step": step}
    k, order, eps = _with_defaults(k, order, eps)
    plan = _plan(points, function, gradient, hessian, label, initial, order,
                 new, components, k)
    _refuse_unused(plan, given)
    reg = _reg_covar(reg_covar)
    destination = resolve_output(output, points or "tbs_sample", ".tbs.parquet")
    if destination != "-" and io.output_kind(destination) != "parquet":
        raise UsageError(f"-o {destination}: tbs-sample writes Parquet")
    io.check_output_path(destination, "-o")
    inputs = [path for path in (points, bounds)
              if path and (path == io.STDIO or os.path.isfile(path))]
    io.refuse_overwrite(destination, "-o", inputs)
    rng = np.random.default_rng(seed)
    fn = load_function(function) if function else None

    box, table, X = _inputs(points, fn, bounds, names, initial, design, rng)
    _refuse_clash(box.names, _label_names(fn, label) if fn else [])
    label_columns = _label_columns(plan, table, points, label)
    _refuse_two_roles(box.names, _names_from(names, fn, box.names), points,
                      _roles(plan, table, points, label_columns, label,
                             gradient, hessian))
    with np.errstate(all="ignore"):  # a non-finite density is refused below
        density = _density(plan, fn, table, points, X, box, eps, step, order,
                           gradient, hessian, label_columns, k, seed)
    if plan == "function":
        _note_steps(reporter, box, step, eps)
    sampling = tbs.tbs_sample(X, density, box, n_new=new,
                              n_components=components, rng=rng, reg_covar=reg)

    out = _output_table(box, X, density, sampling, fn, label, table,
                        _carried(table, label_columns), include_initial)
    parameters = _parameters(plan, points, function, box, initial, design, new,
                             order, eps, step, k, components, sampling,
                             include_initial, seed)
    record = io.provenance("tbs-sample", parameters)
    upstream = table.schema.metadata if table is not None else None
    io.write_table(io.with_provenance(out, record, upstream), destination,
                   inputs=inputs)
    _summary(reporter, plan, X, density, sampling, destination)


# ---------------------------------------------------------------------------
# Options


def _plan(points, function, gradient, hessian, label, initial, order, new,
          components, k) -> str:
    """Which density source the options ask for; refuse contradictions."""
    tbs.check_order(order)
    if k < 2:  # checked whatever the source: a bad value is never silent
        raise UsageError(f"--k {k}: the unbiased variance needs k >= 2")
    if new < 1:
        raise UsageError(f"--new {new}: must be at least 1")
    if components < 1:
        raise UsageError(f"--components {components}: must be at least 1")
    if function and gradient:
        raise UsageError("--function and --gradient: give one source of "
                         "derivatives, not both")
    if hessian and not gradient:
        raise UsageError("--hessian needs --gradient")
    if hessian and order == 1:
        raise UsageError("--hessian is used only with --order 2")
    if points and initial is not None:
        raise UsageError("--initial draws points when POINTS is not given; "
                         "give one of them")
    if function:
        if not points and initial is None:
            raise UsageError("--function: give POINTS or --initial N")
        return "function"
    if not points:
        raise UsageError("give --function, or POINTS with --gradient or "
                         "--label")
    if gradient:
        # --order 2 without --hessian is refused once the gradient columns
        # are counted (_given_density): a wrong count is said first.
        return "derivatives"
    return "variance"


DEFAULT_K, DEFAULT_ORDER, DEFAULT_EPS = 20, 2, "1e-3"


def _with_defaults(k, order, eps):
    """--k, --order and --eps, their defaults where not given."""
    return (DEFAULT_K if k is None else k,
            DEFAULT_ORDER if order is None else order,
            DEFAULT_EPS if eps is None else eps)


# The density sources each option applies to, and what the messages call
# them: an option given for another source would be silently ignored.
APPLIES_TO = {
    "--k": (("variance",), "the local label variance (POINTS with labels, "
            "no --function or --gradient)"),
    "--order": (("function", "derivatives"),
                "Df_eps^n (--function or --gradient)"),
    "--eps": (("function", "derivatives"),
              "Df_eps^n (--function or --gradient)"),
    "--step": (("function",), "the finite differences of --function"),
}
SOURCES = {"function": "Df_eps^n by finite differences of --function",
           "derivatives": "Df_eps^n from the --gradient columns",
           "variance": "the local label variance (--label)"}


def _refuse_unused(plan: str, given: dict) -> None:
    """Refuse an option given that the density source does not use."""
    for option, value in given.items():
        users, what = APPLIES_TO[option]
        if value is not None and plan not in users:
            raise UsageError(f"{option} {value} applies to {what} only; the "
                             f"density here is {SOURCES[plan]}; drop {option}")


def _reg_covar(text: str) -> float | None:
    if text.lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or value < 0:
        raise UsageError(f"--reg-covar {text}: give auto or a number >= 0")
    return value


def _numbers(text: str, d: int, option: str) -> np.ndarray:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"{option} {text}: expected numbers, comma-separated")
    return tbs.per_dimension(values, d, option)


# ---------------------------------------------------------------------------
# Inputs


def _inputs(points, fn: Function | None, bounds, names, initial, design, rng):
    """The box, the points table (or None) and the points X (n, d)."""
    low = high = file_names = None
    if bounds:
        low, high, file_names = tbs.parse_bounds(bounds)
    elif fn is not None and fn.bounds is not None:
        low, high = fn.bounds[:, 0], fn.bounds[:, 1]
    chosen = _given_names(names, file_names, fn, low, bounds)

    table = None
    if points:
        table, chosen = _named_points(io.read_table(points), points, chosen,
                                      _names_from(names, fn, chosen))
        io.require_rows(table, points)
        if names:
            _require_columns(table, chosen, points)
        if chosen is None:
            if low is None:
                raise UsageError("--names: name the input columns of "
                                 f"{io.describe(points)}")
            chosen = [f"x{i}" for i in range(len(low))]
        X, _ = io.feature_matrix(table, points, columns=chosen, role="input")
        X = X.astype(np.float64)
        if low is None:
            low, high = X.min(axis=0), X.max(axis=0)
            _refuse_flat(low, high, chosen, points)
    elif low is None:
        raise UsageError("--bounds: give the box (low:high per input)")
    chosen = chosen or [f"x{i}" for i in range(len(low))]
    box = tbs.make_box(low, high, chosen)
    if table is None:
        X = tbs.initial_design(box, initial, design, rng)
    _check_inside(box, X, points)
    return box, table, X


def _given_names(names, file_names, fn: Function | None, low, bounds
                 ) -> list[str] | None:
    """The input names given (--names, the bounds file's, the function's),
    checked against the box's dimensions where the function gave the box."""
    chosen = io.split_names(names) or file_names
    if chosen and not bounds and low is not None and len(chosen) != len(low):
        raise UsageError(f"--names: {len(chosen)} names, but {fn.name} takes "
                         f"{len(low)} input(s)")
    if not chosen and fn is not None and fn.input_names:
        chosen = fn.input_names
        if low is not None and len(chosen) != len(low):
            raise UsageError(f"--bounds: {len(low)} dimensions, but {fn.name} "
                             f"takes {len(chosen)} input(s) "
                             f"({', '.join(chosen)})")
    return chosen


def _names_from(names, fn: Function | None, chosen) -> str:
    """Where the input names came from, for the messages about them."""
    if names:
        return "--names"
    if fn is not None and chosen is fn.input_names:
        return fn.name
    return "--bounds"


def _require_columns(table, chosen, points) -> None:
    """Every column --names gives is in the points file."""
    missing = [name for name in chosen if name not in table.column_names]
    if missing:
        raise DataError("--names: " + io.missing_column_message(
            table, missing[0], points, "input"))


def _named_points(table, points, chosen, given: str):
    """A bare array (.npy) of points as one named column per input; ``given``
    says where the names came from (--names, --bounds or the function)."""
    if table.column_names != [io.DEFAULT_FEATURES]:
        return table, chosen
    X, _ = io.feature_matrix(table, points)
    names = chosen or [f"x{i}" for i in range(X.shape[1])]
    if len(names) != X.shape[1] and given.startswith("--"):
        raise UsageError(f"{given}: {io.counted(len(names), 'name')} for the "
                         f"{io.counted(X.shape[1], 'column')} of "
                         f"{io.describe(points)}")
    if len(names) != X.shape[1]:
        raise UsageError(f"{given} takes {len(names)} input(s) "
                         f"({', '.join(names)}), but {io.describe(points)} has "
                         f"{X.shape[1]} columns")
    return pa.table({name: X[:, i] for i, name in enumerate(names)}), names


def _refuse_flat(low, high, names, points) -> None:
    """Refuse a bounding box of the points with no width in some column."""
    flat = np.flatnonzero(low >= high)
    if len(flat):
        raise DataError(f"{io.describe(points)}: every point has {names[flat[0]]} "
                        f"= {low[flat[0]]:g}, so their bounding box has no width "
                        "there; give the box with --bounds")


def _check_inside(box, X, points):
    if X.shape[1] != len(box.low):
        raise DataError(f"{X.shape[1]} input columns for a box of "
                        f"{len(box.low)} dimensions")
    outside = ~box.contains(X)
    if outside.any():
        first = int(np.argmax(outside))
        raise DataError(f"{io.describe(points)}: {int(outside.sum())} points lie "
                        f"outside --bounds (first: row {first}, "
                        f"{X[first].tolist()})")


def _label_columns(plan, table, points, label) -> list[str]:
    """The label columns of POINTS: those whose local variance is the
    density, or those carried beside given derivatives (there the default
    label only when POINTS has it)."""
    if plan == "function":
        return []
    wanted = io.split_names(label)
    if not wanted and plan == "derivatives" \
            and io.DEFAULT_LABEL not in table.column_names:
        return []
    columns = io.expand_columns(table, wanted or [io.DEFAULT_LABEL], points,
                                "label")
    if io.ID_COLUMN in columns:
        raise UsageError(f"--label {label}: '{io.ID_COLUMN}' is the rows' id, "
                         "carried to the output as such, not a label; name the "
                         "label columns")
    return columns


def _roles(plan, table, points, label_columns, label, gradient, hessian
           ) -> dict[str, list[str]]:
    """The columns of POINTS read as labels or derivatives, by option."""
    option = "--label" if label else f"--label (default {io.DEFAULT_LABEL})"
    roles = {option: label_columns}
    if plan == "derivatives":
        for name, text in (("--gradient", gradient), ("--hessian", hessian)):
            roles[name] = io.expand_columns(table, io.split_names(text),
                                            points, "derivative")
    return roles


def _refuse_two_roles(inputs, names_from, points, roles) -> None:
    """No input column of POINTS is also read as a label or derivative."""
    for option, columns in roles.items():
        both = [column for column in columns if column in inputs]
        if both:
            role = "a label" if option.startswith("--label") else "a derivative"
            raise UsageError(f"{names_from} and {option}: column '{both[0]}' of "
                             f"{io.describe(points)} cannot be both an input "
                             f"and {role}; name it in one of them")


def _density(plan, fn, table, points, X, box, eps, step, order, gradient,
             hessian, label_columns, k, seed) -> np.ndarray:
    d = X.shape[1]
    if plan == "variance":
        labels = io.read_labels(table, points, label_columns)
        return tbs.variance_density(box.to_unit(X), labels, k,
                                    options=SearchOptions(seed=seed))
    eps_values = _numbers(eps, d, "--eps")
    if plan == "function":
        steps = _numbers(step, d, "--step") if step else None
        return tbs.function_density(fn, X, eps_values, order=order, step=steps)
    return _given_density(table, points, d, eps_values, order, gradient,
                          hessian)


def _given_density(table, points, d, eps, order, gradient, hessian
                   ) -> np.ndarray:
    """Df_eps^n from the --gradient and --hessian columns; a wrong count of
    gradient columns is said before a missing --hessian."""
    first = _derivative_columns(table, points, gradient, "--gradient")
    if len(first) != d:
        raise UsageError(f"--gradient: {d} inputs need {d} columns, not "
                         f"{len(first)}")
    if order == 2 and not hessian:
        raise UsageError("--order 2 with --gradient needs --hessian (or use "
                         "--order 1)")
    second = None
    if order == 2:
        second = tbs.hessian_from_upper(
            _derivative_columns(table, points, hessian, "--hessian"), d)
    return tbs.taylor_density(np.stack(first, axis=1), second, eps, order)


# A finite-difference step over this share of the box's width looks past the
# function's detail there: a note says so.
WIDE_STEP = 0.1


def _note_steps(reporter, box, step, eps) -> None:
    """Say where the finite-difference step is wide against the box, or too
    small to move its values in float64."""
    option, text = ("--step", step) if step else ("--eps", eps)
    steps = _numbers(text, len(box.names), option)
    given = "--step" if step else "the step (--eps, as --step is not given)"
    wide = np.flatnonzero(steps > WIDE_STEP * box.width)
    values = np.maximum(np.abs(box.low), np.abs(box.high))
    lost = np.flatnonzero(values + steps / 2 == values)
    if len(wide):
        i = int(wide[0])
        reporter.notice(f"{given} {steps[i]:g} is over a tenth of the box's "
                        f"width in {box.names[i]} ({box.width[i]:g}): the finite "
                        "differences see past its detail; give a smaller --step")
    if len(lost):
        i = int(lost[0])
        reporter.notice(f"{given} {steps[i]:g} is below float64's resolution at "
                        f"{values[i]:g} in {box.names[i]}: the finite "
                        "differences there are 0; give a larger --step")


def _derivative_columns(table, points, text, option) -> list[np.ndarray]:
    columns = io.expand_columns(table, io.split_names(text), points, "derivative")
    values = []
    for column in columns:
        matrix = io.list_column_matrix(table.column(column), points, column)
        matrix = matrix.astype(np.float64)
        io.check_finite(matrix, points, column, "derivative")
        values.append(matrix)
    widths = {v.shape[1] for v in values}
    if len(widths) > 1:
        raise DataError(f"{io.describe(points)}: {option} columns hold different "
                        "numbers of outputs")
    return values


# ---------------------------------------------------------------------------
# Output


def _output_table(box, X, density, sampling, fn, label, table, carried,
                  include_initial) -> pa.Table:
    n_new = len(sampling.points)
    rows = [sampling.points]
    sources = ["tbs"] * n_new
    densities = [None] * n_new
    if include_initial:
        rows.insert(0, X)
        sources = ["initial"] * len(X) + sources
        densities = density.tolist() + densities
    all_points = np.concatenate(rows)

    columns = {}
    labels = _labels(fn, all_points, label) if fn is not None else {}
    _refuse_clash(box.names, [*labels, *(c for c in carried
                                          if c != io.ID_COLUMN)],
                  with_id=io.ID_COLUMN in carried)
    if io.ID_COLUMN in carried:
        columns[io.ID_COLUMN] = _with_nulls(table, io.ID_COLUMN, n_new,
                                            include_initial)
    for i, name in enumerate(box.names):
        columns[name] = pa.array(all_points[:, i])
    columns["source"] = pa.array(sources, pa.string())
    columns["density"] = pa.array(densities, pa.float64())
    columns["mixture_density"] = pa.array(sampling.mixture_density(all_points))
    columns.update(labels)
    for name in carried:
        if name != io.ID_COLUMN:
            columns[name] = _with_nulls(table, name, n_new, include_initial)
    return pa.table(columns)


def _carried(table, label_columns) -> list[str]:
    """Columns of POINTS written with the output, null for the new rows: id,
    and the labels when they come from the file, so the simulator's results
    for the new rows can be filled in and the rows appended to POINTS."""
    if table is None:
        return []
    names = [io.ID_COLUMN] if io.ID_COLUMN in table.column_names else []
    return names + list(label_columns)


def _with_nulls(table, column, n_new, include_initial) -> pa.Array:
    """The column's type, null for the new rows, after the initial rows'
    values when they are written."""
    values = table.column(column).combine_chunks()
    nulls = pa.nulls(n_new, values.type)
    return pa.concat_arrays([values, nulls]) if include_initial else nulls


# The columns tbs-sample writes beside the inputs and labels.
WRITTEN = ("source", "density", "mixture_density")


def _refuse_clash(inputs: list[str], labels: list[str], with_id=False) -> None:
    """No output column may hold two things (one would silently replace the
    other): the inputs, the columns written, the labels and a carried id."""
    roles: dict[str, str] = {}
    named = [*((name, "an input (--names)") for name in inputs),
             *((name, f"the {name} column written") for name in WRITTEN),
             *(((io.ID_COLUMN, "the id carried"),) if with_id else ()),
             *((name, "a label (--label)") for name in labels)]
    for name, role in named:
        if name in roles:
            option = "--label" if "--label" in role else "--names"
            raise UsageError(f"{option}: column {name!r} would be both "
                             f"{roles[name]} and {role}; rename one")
        roles[name] = role


def _label_names(fn: Function, label: str | None, n_outputs: int | None = None
                 ) -> list[str]:
    """The names the function's outputs are written under (those known before
    it runs when ``n_outputs`` is None)."""
    names = io.split_names(label) or fn.output_names
    if names or n_outputs is None:
        return names or []
    return [io.DEFAULT_LABEL] if n_outputs == 1 \
        else [f"{io.DEFAULT_LABEL}_{i}" for i in range(n_outputs)]


def _labels(fn: Function, X: np.ndarray, label: str | None) -> dict:
    values = evaluate(fn, X)
    n_outputs = values.shape[1]
    names = _label_names(fn, label, n_outputs)
    if len(names) != n_outputs:
        raise UsageError(f"--label: {len(names)} names for the {n_outputs} "
                         f"outputs of {fn.name}")
    return {name: pa.array(values[:, i]) for i, name in enumerate(names)}


def _parameters(plan, points, function, box, initial, design, new, order, eps,
                step, k, components, sampling, include_initial, seed) -> dict:
    parameters = {
        "input": points, "density": plan, "function": function,
        "bounds": {n: [float(lo), float(hi)] for n, lo, hi
                   in zip(box.names, box.low, box.high)},
        "initial": initial, "design": design if not points else None,
        "new": new, "components_requested": components,
        "components_used": sampling.n_components,
        "reg_covar": sampling.reg_covar, "fallback": sampling.fallback,
        "acceptance": round(sampling.acceptance, 6),
        "include_initial": include_initial, "seed": seed,
    }
    if plan == "variance":
        parameters["k"] = k
    else:
        parameters.update(order=order, eps=eps)
    if plan == "function":
        parameters["step"] = step or eps
    if sampling.mixture is not None:
        parameters["mixture_converged"] = sampling.mixture.converged
        parameters["mixture_iterations"] = sampling.mixture.n_iter
    return parameters


def _summary(reporter, plan, X, density, sampling, destination):
    for note in sampling.notes:
        reporter.notice(note)
    if reporter.quiet:
        return
    kind = {"function": "Df_eps^n (finite differences)",
            "derivatives": "Df_eps^n (given derivatives)",
            "variance": "local label variance"}[plan]
    reporter.say(f"initial points {len(X)}, dimensions {X.shape[1]}, density "
                 f"{kind}: min {density.min():.4g}, max {density.max():.4g}")
    if sampling.mixture is not None:
        state = "converged" if sampling.mixture.converged else "NOT converged"
        reporter.say(f"mixture: {sampling.n_components} components, "
                     f"{state} in {sampling.mixture.n_iter} EM steps, "
                     f"reg_covar {sampling.reg_covar:.3g}")
    reporter.say(f"new points {len(sampling.points)}, acceptance in the box "
                 f"{sampling.acceptance:.3f}")
    reporter.say(f"wrote {'stdout' if destination == '-' else destination}")
