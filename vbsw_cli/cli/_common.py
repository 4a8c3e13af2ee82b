"""What every command shares: the app, options, messages, progress, errors."""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import time
import traceback
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

try:  # as in vbsw_cli.cli: typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:
    from click.exceptions import UsageError as ClickUsageError

from vbsw_cli import io, stopping
from vbsw_cli.errors import DataError, UsageError, VbswError

app = typer.Typer(
    name="vbsw",
    help="Variance based sample weighting and Taylor based sampling, from files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

stderr = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False,
                 markup=False)


@contextmanager
def named_errors(path: str):
    """Start the core's data errors with the file they are about: the core is
    given arrays, not file names."""
    try:
        yield
    except DataError as error:
        raise DataError(f"{io.describe(path)}: {error}") from error


# ---------------------------------------------------------------------------
# Options shared by several commands, defined once.

OutputOpt = Annotated[Optional[str], typer.Option(
    "--output", "-o", metavar="PATH",
    help="Output file, or - for stdout. Default: stdout unless it is a "
         "terminal, else a file named after the input.")]
FeaturesOpt = Annotated[str, typer.Option(
    "--features", metavar="COLUMN",
    help="The list column that holds the feature vectors.")]
FeatureColumnsOpt = Annotated[Optional[str], typer.Option(
    "--feature-columns", metavar="A,B,...",
    help="Several numeric feature columns instead: names or patterns such as "
         "'pixel_*', comma-separated.")]
LabelOpt = Annotated[str, typer.Option(
    "--label", metavar="A[,B...]",
    help="Label column(s); several columns make a multi-output target.")]
# scikit-learn's (and numpy's legacy) seeds are 32-bit: one range everywhere.
MAX_SEED = 2**32 - 1
SEED_RANGE = f"0 to {MAX_SEED} (2**32 - 1)"


def seed_in_range(value: int | None) -> int | None:
    """Refuse a --seed out of range while parsing, one line for both ends."""
    if value is not None and not 0 <= value <= MAX_SEED:
        raise ClickUsageError(f"--seed {value}: must be in [0, {MAX_SEED}] "
                              "(scikit-learn's range)")
    return value


SeedOpt = Annotated[int, typer.Option(
    "--seed", callback=seed_in_range,
    help=f"Seed of every random choice, {SEED_RANGE}.")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Report progress even when stderr is not a terminal.")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", help="Print nothing on stderr but errors.")]
DebugOpt = Annotated[bool, typer.Option(
    "--debug", help="Show the full traceback of an error.")]


def keyword(value: str | None, choices) -> str | None:
    """An option's keyword in any case as ``choices`` spell it (EXACT is
    exact); any other value as given, for the check that names the choices."""
    if value is not None and value.lower() in choices:
        return value.lower()
    return value


# ---------------------------------------------------------------------------
# Errors


def command(name: str, example: str, *, short_of_memory: str = "a smaller input",
            **settings):
    """Register a command whose errors become one line and an exit code.

    ``example`` is appended to the help text, so every ``--help`` shows one;
    ``short_of_memory`` is what to try when memory runs out.
    """
    def register(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            debug = kwargs.get("debug", False)
            try:
                with io.stdout_for_data():
                    return function(*args, **kwargs)
            except BrokenPipeError:
                # The reader went away (`| head`): stop quietly, as shell tools do.
                raise typer.Exit(141)
            except VbswError as error:
                if debug:
                    raise
                fail(name, str(error), error.exit_code)
            except KeyboardInterrupt:
                if debug:  # where it stopped, then the usual line and code
                    traceback.print_exc()
                raise  # main() prints the one line for every interrupt
            except MemoryError:
                if debug:
                    raise
                fail(name, f"out of memory; try {short_of_memory}", 1)
            except (typer.Exit, typer.Abort):
                raise
            except Exception as error:  # a bug: one line unless --debug
                if stopping.stop_requested():
                    # An interrupt inside a library (a module being imported)
                    # can come out as another error.
                    raise KeyboardInterrupt from error
                if debug:
                    raise
                fail(name, f"unexpected {type(error).__name__}: {error} "
                     "(rerun with --debug for the traceback)", 1)

        doc = inspect.cleandoc(function.__doc__ or "")
        # \b keeps click from re-wrapping the example into a broken command.
        wrapper.__doc__ = f"{doc}\n\n\b\nExample:\n  {example}"
        return app.command(name, **settings)(wrapper)
    return register


def fail(name: str, message: str, code: int):
    """Print one error line and exit."""
    stderr.print(f"vbsw {name}: error: {message}", markup=False)
    raise typer.Exit(code)


# ---------------------------------------------------------------------------
# Output paths


def resolve_output(output: str | None, source: str, suffix: str) -> str:
    """The output path: as given; stdout for a pipe; else beside the input name.

    A terminal never receives binary data: without ``-o`` the output goes to
    ``<input name><suffix>`` in the current folder.
    """
    if output == "":  # an empty variable in a script: never stdout by chance
        io.check_output_path(output, "-o")
    if output:
        return output
    if not sys.stdout.isatty():
        return "-"
    if source == "-":
        raise UsageError("stdout is a terminal: give -o PATH (or pipe the output)")
    return Path(source).stem + suffix


# More than MANY_CLASSES classes with fewer than ROWS_PER_CLASS rows a class,
# on average, look like the integer values of a numeric target.
MANY_CLASSES, ROWS_PER_CLASS = 20, 10


def many_classes_notes(labels, n_samples: int) -> list[str]:
    """A note for each class label that looks like a numeric target read as
    classes (see MANY_CLASSES)."""
    return [f"label column '{column.column}' has {len(column.classes):,} "
            f"classes for {n_samples:,} rows; if these are numbers to "
            "regress, use --task regression"
            for column in labels if column.kind == "classification"
            and len(column.classes) > MANY_CLASSES
            and len(column.classes) * ROWS_PER_CLASS > n_samples]


def integer_vector_notes(table, columns, task: str) -> list[str]:
    """A note for each label column of integer vectors read as regression
    targets (a 2-D integer .npy of labels, say): integers alone are classes,
    so the reading may surprise."""
    import pyarrow as pa

    notes = []
    for column in columns:
        kind = table.schema.field(column).type
        if task != "auto" or not (pa.types.is_list(kind)
                                  or pa.types.is_large_list(kind)
                                  or pa.types.is_fixed_size_list(kind)):
            continue
        inner = kind.value_type
        if pa.types.is_integer(inner) or pa.types.is_boolean(inner):
            what = "booleans" if pa.types.is_boolean(inner) else "integers"
            notes.append(f"label column '{column}' holds vectors of {what}: "
                         "read as regression targets, one per position (classes "
                         "take one label per row)")
    return notes


# ---------------------------------------------------------------------------
# Progress and messages


class Reporter:
    """Progress bars on a terminal, plain lines with -v, nothing otherwise."""

    def __init__(self, *, verbose: bool = False, quiet: bool = False):
        self.quiet = quiet
        self.bars = not quiet and sys.stderr.isatty()
        self.lines = not quiet and not self.bars and verbose

    def task(self, description: str, total: int | None):
        # A stage starts: a stop a library swallowed earlier (pyarrow's lazy
        # import of pandas once did) ends the run here, not after the stage.
        io.check_stop()
        if self.bars:
            return _BarTask(description, total)
        if self.lines:
            return _LineTask(description, total)
        return _Silent()

    def say(self, text: str) -> None:
        if not self.quiet:
            stderr.print(text, markup=False)

    def notice(self, text: str) -> None:
        if not self.quiet:
            stderr.print(f"note: {text}", markup=False)


class _Silent:
    def advance(self, amount: int = 1) -> None:
        io.check_stop()

    def close(self) -> None:
        pass


# Seconds between two progress lines with -v (no terminal).
LINE_SECONDS = 10.0


class _LineTask:
    """Plain progress lines: one every LINE_SECONDS while the work lasts (from
    a timer too, for work that cannot report its steps, such as a head's
    training in one scikit-learn call), and one at the end."""

    def __init__(self, description: str, total: int | None):
        self.description, self.total, self.done = description, total, 0
        self.started = self.said = time.perf_counter()
        self.stopped = threading.Event()
        # The timer holds the task weakly: a task an error left open stops
        # its lines once it is gone.
        threading.Thread(target=_beat, args=(weakref.ref(self), self.stopped,
                                             LINE_SECONDS),
                         daemon=True, name="vbsw-progress").start()

    def advance(self, amount: int = 1) -> None:
        io.check_stop()
        self.done += amount
        if time.perf_counter() - self.said >= LINE_SECONDS:
            self._say()

    def _say(self) -> None:
        now = time.perf_counter()
        self.said = now
        of = f" of {self.total:,}" if self.total else ""
        rate = self.done / (now - self.started)
        stderr.print(f"{self.description}: {self.done:,}{of} "
                     f"({rate:,.0f}/s, {now - self.started:.0f} s)", markup=False)

    def close(self) -> None:
        self.stopped.set()
        seconds = time.perf_counter() - self.started
        # Closed from a `finally` while an error propagates: the work stopped.
        if sys.exc_info()[0] is not None:
            of = f" of {self.total}" if self.total else ""
            stderr.print(f"{self.description}: stopped after {self.done}{of} "
                         f"({seconds:.2f} s)", markup=False)
            return
        stderr.print(f"{self.description}: {self.done} in {seconds:.2f} s",
                     markup=False)


def _beat(task_ref, stopped: threading.Event, period: float) -> None:
    """A line every ``period`` seconds that the task says nothing, until it
    is closed or gone."""
    while not stopped.wait(period):
        task = task_ref()
        if task is None:
            return
        if time.perf_counter() - task.said >= period:
            task._say()
        del task


class _BarTask:
    def __init__(self, description: str, total: int | None):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress,
                                   ProgressColumn, TextColumn,
                                   TimeElapsedColumn)
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task):
                speed = task.finished_speed or task.speed
                return Text(f"{speed:,.0f} rows/s" if speed else "")

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                                 console=stderr, transient=True)
        self.progress.start()
        self.id = self.progress.add_task(description, total=total)

    def advance(self, amount: int = 1) -> None:
        io.check_stop()
        self.progress.advance(self.id, amount)

    def close(self) -> None:
        self.progress.stop()
