"""``python -m vbsw_cli`` and the ``vbsw`` console script."""

import sys


def run() -> None:
    """Import the command line and run it; Ctrl-C while importing is one line."""
    try:
        from vbsw_cli.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("vbsw: interrupted\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
