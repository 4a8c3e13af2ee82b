"""A stop asked for by a signal: remembered, so that no output follows it.

The handlers raise KeyboardInterrupt, as Ctrl-C does, and remember the stop. A
library can swallow the interrupt (scikit-learn's training loop returns a
half-trained model; pyarrow once did while importing pandas lazily): the
remembered stop still keeps any output from being put in place, and the next
progress step raises again. Light on purpose: installed before the heavy
imports.
"""

from __future__ import annotations

import signal

SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

_stop_requested = False
_stop_signal: int | None = None  # the number of the first signal that stopped


def request_stop(signum: int | None = None) -> None:
    """Remember that the run was told to stop (by signal ``signum``, if one)."""
    global _stop_requested, _stop_signal
    _stop_requested = True
    if _stop_signal is None:
        _stop_signal = signum


def clear_stop() -> None:
    """Forget an earlier stop (a new run in the same process)."""
    global _stop_requested, _stop_signal
    _stop_requested = False
    _stop_signal = None


def stop_requested() -> bool:
    return _stop_requested


def check_stop() -> None:
    """Raise KeyboardInterrupt if a stop was asked for, even if it was lost."""
    if _stop_requested:
        raise KeyboardInterrupt("stop requested")


def interrupted_code() -> int:
    """The exit status of a stopped run, as shells give it: 128 + the signal's
    number (143 for SIGTERM, 129 for SIGHUP); 130, SIGINT's, for Ctrl-C or an
    interrupt that no signal caused."""
    return 128 + (_stop_signal or signal.SIGINT)


def interrupted_line(args, partial: bool = False, written=()) -> str:
    """The line a run stopped by a signal ends with (``args``: the command line).

    ``partial``: data had begun to go to stdout, so the stream there is cut.
    ``written``: the outputs already put in place, whole, before the signal.
    """
    command = args[:1] if args and not args[0].startswith("-") else []
    if partial and "stdout" not in written:
        what = "the output sent to stdout is incomplete"
    elif written:
        what = f"{' and '.join(written)} had been written in full"
    else:
        what = "no output was written"
    return f"{' '.join(['vbsw', *command])}: error: interrupted; {what}"


def ignore_signals() -> None:
    """From the end of a run on: a signal now would stop nothing, only turn a
    finished run's exit status into an interrupt's."""
    for name in SIGNALS:
        if hasattr(signal, name):
            try:
                signal.signal(getattr(signal, name), signal.SIG_IGN)
            except ValueError:  # not the main thread
                return


def _interrupt(signum, frame):
    request_stop(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_cleanly_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP end a run the way Ctrl-C does."""
    for name in SIGNALS:
        if hasattr(signal, name):
            try:
                signal.signal(getattr(signal, name), _interrupt)
            except ValueError:  # not the main thread (an embedding program)
                return
