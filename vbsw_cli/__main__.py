"""``python -m vbsw_cli`` and the ``vbsw`` console script."""

import sys

from vbsw_cli.stopping import (interrupted_code, interrupted_line,
                               stop_cleanly_on_signals, stop_requested)


def run() -> None:
    """Run the command line; a signal during the imports still ends in one line."""
    stop_cleanly_on_signals()
    try:
        from vbsw_cli.cli import interrupted, main
    except BaseException as error:
        # An interrupt inside an import can come out as another error.
        if not (isinstance(error, KeyboardInterrupt) or stop_requested()):
            raise
        sys.stderr.write(interrupted_line(sys.argv[1:]) + "\n")
        sys.exit(interrupted_code())
    try:
        main()
    except KeyboardInterrupt:  # between a handler and main's own try
        interrupted(sys.argv[1:])


if __name__ == "__main__":
    run()
