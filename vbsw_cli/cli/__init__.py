"""The ``vbsw`` command line: a thin layer over the library modules.

Each command lives in its own module and registers itself on the shared app
when imported; a run imports only the module of the command it names (all of
them for the help or an unknown name), so no command pays for the others'
imports. ``main`` turns usage errors into one line and exit code 2.
"""

from __future__ import annotations

import importlib
import sys

import typer

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # older typer runs on click itself
    from click.exceptions import ClickException, UsageError

from vbsw_cli import __version__, io
from vbsw_cli.stopping import (ignore_signals, interrupted_code,
                               interrupted_line, stop_cleanly_on_signals,
                               stop_requested)
from vbsw_cli.cli._common import app, stderr

# Command name -> the module under vbsw_cli.cli that registers it, in the
# order the help lists them.
COMMANDS = {"embed": "embed", "weigh": "weigh", "tbs-sample": "tbs",
            "retrain-head": "head", "evaluate": "evaluate"}


def _version(value: bool):
    if value:
        print(f"vbsw {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version,
                                       is_eager=True, help="Print the version.")):
    """Variance based sample weighting and Taylor based sampling, from files."""


def main(argv: list[str] | None = None) -> None:
    """Run the ``vbsw`` command line on ``argv`` (default: ``sys.argv[1:]``)."""
    stop_cleanly_on_signals()
    args = argv if argv is not None else sys.argv[1:]
    io.written.clear()
    try:
        code = _dispatch(args)
    except KeyboardInterrupt:
        code = 130
    except SystemExit:
        ignore_signals()  # the error line is out: the run has ended
        raise
    except Exception:
        if not stop_requested():
            raise
        code = 130  # an interrupt that came out as another error
    if code == 130:  # typer turns every interrupt into this code, silently;
        # interrupted() exits with the code of the signal that stopped the run.
        interrupted(args)
    ignore_signals()
    sys.exit(code if isinstance(code, int) else 0)


def interrupted(args) -> None:
    """The one line every interrupt ends with, wherever it came; exit 128 + the
    signal's number (130 for SIGINT)."""
    stderr.print(interrupted_line(args, partial=io.stdout_started,
                                  written=io.written), markup=False)
    sys.exit(interrupted_code())


def register(args: list[str]) -> None:
    """Import the module of the command ``args`` name, or all of them."""
    named = next((arg for arg in args if not arg.startswith("-")), None)
    modules = [COMMANDS[named]] if named in COMMANDS else COMMANDS.values()
    for module in modules:
        importlib.import_module(f"vbsw_cli.cli.{module}")


def _dispatch(args: list[str]):
    register(args)
    command = typer.main.get_command(app)
    try:
        return command.main(args=args, prog_name="vbsw", standalone_mode=False)
    except UsageError as error:
        _usage_error(error)
    except typer.Abort:  # click turns an interrupt in its own code into this
        raise KeyboardInterrupt
    except ClickException as error:
        stderr.print(f"vbsw: error: {error.format_message()}", markup=False)
        sys.exit(error.exit_code)


def _usage_error(error: UsageError) -> None:
    """One error line, exit 2; ``vbsw`` alone prints its help instead (on
    stderr, exit 2, as click does), which is no error."""
    if type(error).__name__ == "NoArgsIsHelpError":  # click >= 8.2
        stderr.print(error.format_message(), markup=False)
        sys.exit(2)
    where = error.ctx.command_path if error.ctx else "vbsw"
    stderr.print(f"{where}: error: {error.format_message()} (see {where} "
                 "--help)", markup=False)
    sys.exit(2)
