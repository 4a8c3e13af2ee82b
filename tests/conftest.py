"""Shared test helpers: run the real console script, make small files."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"


@dataclass
class Run:
    code: int
    stdout: bytes
    stderr: str


def run_vbsw(*args: str, stdin: bytes | None = None, cwd: Path | None = None,
             timeout: float = 300) -> Run:
    """Run ``vbsw ARGS`` in a child process; stdout and stderr kept apart."""
    done = subprocess.run([sys.executable, "-m", "vbsw_cli", *map(str, args)],
                          input=stdin if stdin is not None else b"",
                          capture_output=True, cwd=cwd, timeout=timeout)
    return Run(done.returncode, done.stdout, done.stderr.decode())


def run_here(capture, *args) -> Run:
    """``vbsw ARGS`` in this process, so the imports are paid once.

    ``capture`` is pytest's capfd or capfdbinary fixture: stdout and stderr
    are captured at the file descriptors, apart. stderr comes back as text.
    """
    import signal

    from vbsw_cli import stopping
    from vbsw_cli.cli import main

    stopping.clear_stop()  # a stop left by an earlier in-process test
    # main() sets the handlers, and ignores the signals once the run ends.
    handlers = {name: signal.getsignal(getattr(signal, name))
                for name in stopping.SIGNALS}
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as done:
        code = done.code or 0
    finally:
        for name, handler in handlers.items():
            signal.signal(getattr(signal, name), handler)
    out, err = capture.readouterr()
    return Run(code, out, err.decode() if isinstance(err, bytes) else err)


def vectors(X: np.ndarray) -> pa.FixedSizeListArray:
    X = np.ascontiguousarray(X)
    return pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])


def write_features(path: Path, X: np.ndarray, y, *, ids=None, **extra) -> Path:
    """A Parquet file with id, features (fixed-size list) and label."""
    columns = {"id": np.arange(len(X)) if ids is None else ids,
               "features": vectors(X), "label": y, **extra}
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)
