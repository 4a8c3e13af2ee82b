"""The ``vbsw`` command line: a thin layer over the library modules.

Each command lives in its own module and registers itself on the shared app.
``main`` turns usage errors into one line and exit code 2.
"""

from __future__ import annotations

import signal
import sys

import typer

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # older typer runs on click itself
    from click.exceptions import ClickException, UsageError

from vbsw_cli import __version__, io
from vbsw_cli.cli._common import app, stderr
from vbsw_cli.cli import embed, evaluate, head, tbs, weigh  # noqa: F401  (register)


def _version(value: bool):
    if value:
        print(f"vbsw {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version,
                                       is_eager=True, help="Print the version.")):
    """Variance based sample weighting and Taylor based sampling, from files."""


def _interrupt(signum, frame):
    io.request_stop()
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop_cleanly_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP end a run: temporary files are removed.

    The stop is also remembered, so that an interrupt a library swallowed
    still keeps any output from being written.
    """
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            try:
                signal.signal(getattr(signal, name), _interrupt)
            except ValueError:  # not the main thread (an embedding program)
                return


def main(argv: list[str] | None = None) -> None:
    """Run the ``vbsw`` command line on ``argv`` (default: ``sys.argv[1:]``)."""
    io.clear_stop()
    _stop_cleanly_on_signals()
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv if argv is not None else sys.argv[1:],
                            prog_name="vbsw", standalone_mode=False)
    except UsageError as error:
        where = error.ctx.command_path if error.ctx else "vbsw"
        stderr.print(f"{where}: error: {error.format_message()} (see {where} "
                     "--help)", markup=False)
        sys.exit(2)
    except typer.Abort:
        stderr.print("vbsw: interrupted", markup=False)
        sys.exit(130)
    except ClickException as error:
        stderr.print(f"vbsw: error: {error.format_message()}", markup=False)
        sys.exit(error.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
