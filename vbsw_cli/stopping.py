"""A stop asked for by a signal: remembered, so that no output follows it.

The handlers raise KeyboardInterrupt, as Ctrl-C does, and remember the stop. A
library can swallow the interrupt (scikit-learn's training loop returns a
half-trained model; pyarrow once did while importing pandas lazily): the
remembered stop still keeps any output from being put in place, and the next
stage to start (or progress step) raises again, as a head's training does
before its one scikit-learn call. Light on purpose: installed before the heavy
imports.

No interrupt is raised inside the thread machinery of the standard library
(threading, concurrent.futures, queue): an exception there can leave one of
its locks held, and the thread pool then waits for its workers for ever (a
SIGTERM at 0.7 s into an exact search once hung so). The stop is remembered,
and a timer raises it once the main thread is back in other code.
"""

from __future__ import annotations

import os
import signal

SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

# Code an interrupt must not land in (see above), and how soon it is tried
# again once it did.
MACHINERY = tuple(os.sep + part for part in (
    "threading.py", os.path.join("concurrent", "futures", ""), "queue.py"))
RETRY_SECONDS = 0.02

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
    _cancel_retry()


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
    _cancel_retry()
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
    _cancel_retry()
    _handle_signals(signal.SIG_IGN)


def _interrupt(signum, frame):
    request_stop(signum)
    if _in_machinery(frame):
        _retry_soon()
        return
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _in_machinery(frame) -> bool:
    """Whether the main thread was stopped inside the thread machinery."""
    name = frame.f_code.co_filename if frame is not None else ""
    return any(part in name for part in MACHINERY)


def _retry_soon() -> None:
    """Raise the remembered stop a moment later (SIGALRM), outside the
    machinery."""
    signal.signal(signal.SIGALRM, _retry)
    signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)


def _retry(signum, frame):
    if not _stop_requested:
        return
    if _in_machinery(frame):
        signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)
        return
    raise KeyboardInterrupt(signal.Signals(_stop_signal or signal.SIGINT).name)


def _cancel_retry() -> None:
    """No retry pending: a SIGALRM at the interpreter's exit would kill it."""
    if not hasattr(signal, "setitimer"):
        return
    try:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if signal.getsignal(signal.SIGALRM) is _retry:
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def stop_cleanly_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP end a run the way Ctrl-C does."""
    _handle_signals(_interrupt)


def _handle_signals(handler) -> None:
    """``handler`` for each of SIGNALS this system has."""
    for name in SIGNALS:
        if hasattr(signal, name):
            try:
                signal.signal(getattr(signal, name), handler)
            except ValueError:  # not the main thread (an embedding program)
                return
