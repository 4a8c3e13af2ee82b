"""Promises every command keeps: help with an example, data alone on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE, run_vbsw

COMMANDS = ["embed", "weigh", "retrain-head", "evaluate", "tbs-sample"]
BACKBONE_FOR_EMPTY = (Path(__file__).resolve().parent.parent / "sample_data"
                      / "digits_backbone.onnx")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_with_an_example(name):
    run = run_vbsw(name, "--help")
    assert run.code == 0, run.stderr
    text = run.stdout.decode()
    assert "Example:" in text and f"vbsw {name}" in text.split("Example:")[1]


def test_a_user_function_that_prints_cannot_corrupt_stdout(tmp_path):
    (tmp_path / "noisy.py").write_text(
        "import numpy as np\n"
        "def f(x):\n"
        "    print('hello from the simulator')\n"
        "    return np.sin(3 * x[:, 0])\n")
    run = run_vbsw("tbs-sample", "--function", "noisy:f", "--bounds", "0:1",
                   "--initial", "16", "--new", "8", "-o", "-", cwd=tmp_path)
    assert run.code == 0, run.stderr
    table = pq.read_table(pa.BufferReader(run.stdout))
    assert table.num_rows == 8
    assert "hello from the simulator" in run.stderr


def test_sigterm_mid_write_leaves_no_file(tmp_path):
    import signal
    import subprocess
    import sys
    import time



    rows = np.random.default_rng(0).random((60_000, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", rows)
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-m", "vbsw_cli", "embed",
         str(SAMPLE / "digits_backbone.onnx"), str(tmp_path / "x.npy"),
         "--batch-size", "4", "-q", "-o", str(out / "f.parquet")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(out.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(out.iterdir()), "the temporary output never appeared"
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert list(out.iterdir()) == []


def test_tbs_takes_npy_points_and_reports_an_exiting_function(tmp_path):

    np.save(tmp_path / "points.npy", np.linspace(-1, 1, 12)[:, None])
    run = run_vbsw("tbs-sample", tmp_path / "points.npy", "--function", "runge",
                   "--new", "6", "-o", "-")
    assert run.code == 0, run.stderr
    table = pq.read_table(pa.BufferReader(run.stdout))
    assert table.column_names[0] == "x" and table.num_rows == 6  # runge's input
    (tmp_path / "quits.py").write_text(
        "import sys\ndef f(x):\n    sys.exit(3)\n")
    run = run_vbsw("tbs-sample", "--function", "quits:f", "--bounds", "0:1",
                   "--initial", "8", "--new", "4", "-o", tmp_path / "o.parquet",
                   cwd=tmp_path)
    assert run.code == 1
    assert "called sys.exit(3)" in run.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o.parquet").exists()


def test_a_builtin_with_the_wrong_number_of_bounds_says_so():
    run = run_vbsw("tbs-sample", "--function", "runge", "--bounds", "0:1,0:1",
                   "--initial", "10", "-o", "-")
    assert run.code == 2
    assert "runge takes 1 input" in run.stderr


def test_verbose_task_line_says_when_the_work_stopped(capsys):
    from vbsw_cli.cli._common import _LineTask

    task = _LineTask("embed", 100)
    task.advance(30)
    task.close()
    assert "embed: 30 in" in capsys.readouterr().err

    task = _LineTask("embed", 100)
    with pytest.raises(RuntimeError):
        try:
            task.advance(40)
            raise RuntimeError("bad row")
        finally:
            task.close()
    err = capsys.readouterr().err
    assert "embed: stopped after 40 of 100" in err
    assert "40 in" not in err


def test_verbose_task_says_how_far_it_got_while_the_work_lasts(capsys,
                                                                 monkeypatch):
    from vbsw_cli.cli import _common

    task = _common._LineTask("embed", 100)
    task.advance(30)  # at once: no line before the period
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(_common, "LINE_SECONDS", 0.0)
    task.advance(20)
    task.advance(1_000)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "embed: 50 of 100", "embed: 1,050 of 100"]
    assert all(line.endswith(" s)") and "/s, " in line for line in lines)
    task.close()


def test_verbose_task_says_it_still_runs_when_the_work_reports_no_step(
        capsys, monkeypatch):
    import time

    from vbsw_cli.cli import _common

    monkeypatch.setattr(_common, "LINE_SECONDS", 0.2)
    task = _common._LineTask("training head, epochs", 80)
    time.sleep(1.0)  # one call that reports nothing until it returns
    task.close()
    time.sleep(0.5)  # closed: no more lines after the last
    lines = capsys.readouterr().err.splitlines()

    assert len(lines) >= 2 and lines[-1].startswith("training head, epochs: 0 in")
    assert all(line.startswith("training head, epochs: 0 of 80 (0/s, ")
               for line in lines[:-1])


def test_a_task_an_error_left_open_stops_its_lines(capsys, monkeypatch):
    import gc
    import time

    from vbsw_cli.cli import _common

    monkeypatch.setattr(_common, "LINE_SECONDS", 0.1)
    task = _common._LineTask("searching", 10)
    time.sleep(0.35)
    del task  # never closed
    gc.collect()
    time.sleep(0.3)
    capsys.readouterr()
    time.sleep(0.4)
    assert capsys.readouterr().err == ""


def test_an_empty_output_path_is_refused_not_taken_for_stdout(tmp_path):
    for command in (["embed", BACKBONE_FOR_EMPTY, tmp_path / "x.npy"],
                    ["tbs-sample", "--function", "runge", "--initial", "4"]):
        np.save(tmp_path / "x.npy", np.zeros((2, 64), np.float32))
        run = run_vbsw(*command, "-o", "")
        assert run.code == 2 and run.stdout == b"", run.stderr
        assert "-o '': give a file name" in run.stderr


def test_a_stop_that_a_library_swallowed_still_writes_nothing(tmp_path):
    from vbsw_cli import io, stopping
    from vbsw_cli.cli._common import Reporter

    target = tmp_path / "out.parquet"
    stopping.request_stop()
    try:
        with pytest.raises(KeyboardInterrupt):
            with io.atomic_output(target) as temporary:
                with open(temporary, "wb") as handle:
                    handle.write(b"half")
        with pytest.raises(KeyboardInterrupt):
            Reporter().task("searching", 10).advance(1)
    finally:
        stopping.clear_stop()
    assert list(tmp_path.iterdir()) == []
    Reporter().task("searching", 10).advance(1)  # cleared: runs on


def test_sigterm_while_training_a_head_writes_no_model(tmp_path):
    import signal
    import subprocess
    import sys
    import time


    # scikit-learn catches the interrupt inside fit and returns a half-trained
    # model; the command must still stop without writing it.
    child = subprocess.Popen(
        [sys.executable, "-m", "vbsw_cli", "retrain-head",
         str(SAMPLE / "breast_cancer.parquet"), "--no-weights", "--epochs",
         "100000", "--tol", "0", "--optimizer", "sgd", "--learning-rate", "1e-5",
         "--batch-size", "8", "-o", str(tmp_path / "head.onnx")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    time.sleep(6)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)

    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert b"interrupted; no output was written" in stderr
    assert list(tmp_path.iterdir()) == []


def test_messages_keep_colons_as_typed(tmp_path):
    run = run_vbsw("weigh", str(tmp_path / "data:smile:v2.parquet"))

    assert run.code == 1
    assert "data:smile:v2.parquet" in run.stderr


@pytest.mark.parametrize("debug", [False, True])
def test_an_interrupt_gives_one_line_and_with_debug_the_traceback(
        tmp_path, capfd, monkeypatch, debug):
    from conftest import run_here
    import vbsw_cli.cli.weigh as weigh_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(weigh_cli, "weigh", interrupted)
    run = run_here(capfd, "weigh", SAMPLE / "breast_cancer.parquet", "-q",
                   "-o", tmp_path / "w.parquet", *(["--debug"] if debug else []))

    assert run.code == 130
    assert run.stderr.strip().splitlines()[-1] == (
        "vbsw weigh: error: interrupted; no output was written")
    assert ("Traceback" in run.stderr) == debug
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_never_lands_in_the_thread_machinery(monkeypatch):
    """Inside threading, concurrent.futures or queue the stop is only
    remembered (an exception there can leave a lock held, and the pool wait
    for ever); a timer raises it once the main thread has left."""
    import concurrent.futures.thread
    import signal
    import threading
    from types import SimpleNamespace

    from vbsw_cli import stopping

    def frame_in(path):
        return SimpleNamespace(f_code=SimpleNamespace(co_filename=path))

    armed = []
    monkeypatch.setattr(signal, "setitimer", lambda which, s: armed.append(s))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    stopping.clear_stop()
    armed.clear()
    try:
        stopping._interrupt(signal.SIGTERM, frame_in(threading.__file__))
        assert stopping.stop_requested() and armed == [stopping.RETRY_SECONDS]
        stopping._retry(signal.SIGALRM,
                        frame_in(concurrent.futures.thread.__file__))
        assert armed == [stopping.RETRY_SECONDS] * 2
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            stopping._retry(signal.SIGALRM, frame_in(__file__))
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            stopping._interrupt(signal.SIGINT, frame_in(__file__))
    finally:
        stopping.clear_stop()

def test_an_interrupt_after_the_outputs_says_they_were_written(
        tmp_path, capfd, monkeypatch):
    from conftest import run_here
    import vbsw_cli.cli.evaluate as evaluate_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    head = tmp_path / "head.onnx"
    run = run_vbsw("retrain-head", SAMPLE / "breast_cancer.parquet", "--no-weights",
                   "--epochs", "20", "-o", head, "-q")
    assert run.code == 0, run.stderr
    monkeypatch.setattr(evaluate_cli, "_print_record", interrupted)
    record, saved = tmp_path / "r.json", tmp_path / "p.parquet"
    run = run_here(capfd, "evaluate", head, SAMPLE / "breast_cancer.parquet",
                   "--json", record, "--save-predictions", saved)

    assert run.code == 130
    assert run.stderr.strip().splitlines()[-1] == (
        f"vbsw evaluate: error: interrupted; {saved} and {record} had been "
        "written in full")
    assert json.loads(record.read_text())["metrics"]
    assert pq.read_table(saved).num_rows == 569


def test_a_signal_after_the_run_ended_changes_nothing(tmp_path):
    """Here at the interpreter's exit: no traceback, the run's own status."""
    script = ("import atexit, os, signal, sys\n"
              "from vbsw_cli.cli import main\n"
              "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
              "main(sys.argv[1:])\n")
    out = tmp_path / "w.parquet"
    done = subprocess.run([sys.executable, "-c", script, "weigh",
                           str(SAMPLE / "breast_cancer.parquet"), "--k", "5",
                           "-q", "-o", str(out)], capture_output=True)
    assert (done.returncode, done.stderr) == (0, b"")
    assert pq.read_table(out).num_rows == 569

@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143),
                                        ("SIGHUP", 129)])
def test_a_signal_exits_with_128_plus_its_number(tmp_path, capfd,
                                                 monkeypatch, name, code):
    import os
    import signal

    from conftest import run_here
    from vbsw_cli import stopping
    import vbsw_cli.cli.weigh as weigh_cli

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, name))

    monkeypatch.setattr(weigh_cli, "weigh", signalled)
    try:
        run = run_here(capfd, "weigh", SAMPLE / "breast_cancer.parquet", "-q",
                       "-o", tmp_path / "w.parquet")
    finally:
        stopping.clear_stop()  # the stop is remembered; later tests run on

    assert run.code == code, run.stderr
    assert run.stderr.strip() == (
        "vbsw weigh: error: interrupted; no output was written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("delay", [0.2, 0.3, 0.45, 0.7])
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_at_any_moment_ends_in_the_one_line(tmp_path, delay, name):
    import signal
    import subprocess
    import sys
    import time


    from conftest import write_features

    rng = np.random.default_rng(0)
    # Rows enough that the exact search (about 2 s on two cores) outlasts the
    # longest delay, so that the signal lands inside the run, not at its exit.
    path = write_features(tmp_path / "f.parquet", rng.normal(size=(60_000, 16)),
                          rng.integers(3, size=60_000))
    out = tmp_path / "out"
    out.mkdir()
    # Start-up, imports, option parsing, reading, searching: wherever it lands.
    # The console script, as users run it (under `python -m`, a signal in the
    # first few tenths of a second can make the exit status SIGINT's).
    script = Path(sys.executable).with_name("vbsw")
    child = subprocess.Popen(
        [str(script), "weigh", str(path), "--exact", "-o", str(out / "w.parquet")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    child.send_signal(getattr(signal, name))
    try:
        _, stderr = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()  # a hung child fails the test, and is not left running
        raise
    lines = stderr.decode().strip().splitlines()

    if child.returncode == 0:  # finished before the signal: a fast machine
        assert (out / "w.parquet").exists()
        return
    assert child.returncode == 128 + getattr(signal, name), stderr
    assert lines[-1] == "vbsw weigh: error: interrupted; no output was written"
    assert "Traceback" not in stderr.decode()
    assert list(out.iterdir()) == []


def _duplicate_label_file(path: Path, tensor: str) -> Path:
    """Sample digits with their label column twice (and the tensor renamed)."""

    table = pq.read_table(SAMPLE / "digits_test.parquet").slice(0, 40)
    columns = [table.column("image"), table.column("label"),
               table.column("label")]
    pq.write_table(pa.Table.from_arrays(columns,
                                        names=[tensor, "label", "label"]), path)
    return path


@pytest.mark.parametrize("name", ["embed", "weigh", "retrain-head", "evaluate"])
def test_every_command_refuses_a_column_named_twice(tmp_path, capfd, name):
    from conftest import run_here

    backbone = SAMPLE / "digits_backbone.onnx"
    tensor = "image" if name in ("embed", "evaluate") else "features"
    data = _duplicate_label_file(tmp_path / "dup.parquet", tensor)
    models = [backbone] if name in ("embed", "evaluate") else []
    out = tmp_path / "out"
    out.mkdir()
    output = {"evaluate": ["--json", out / "o.json"],
              "retrain-head": ["-o", out / "o.onnx"]}.get(
                  name, ["-o", out / "o.parquet"])
    run = run_here(capfd, name, *models, data, *output)

    assert run.code == 1, run.stderr
    assert run.stderr.strip() == (
        f"vbsw {name}: error: {data}: column 'label' appears 2 times; column "
        "names must be unique")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("role", ["features", "labels"])
@pytest.mark.parametrize("name", ["weigh", "evaluate"])
def test_a_single_value_npy_is_refused_as_features_or_labels(tmp_path, capfd,
                                                              name, role):

    from conftest import run_here

    np.save(tmp_path / "one.npy", np.float64(3))
    np.save(tmp_path / "x.npy", np.zeros((10, 64), dtype=np.float32))
    np.save(tmp_path / "y.npy", np.arange(10) % 2)
    data, labels = (("one.npy", "y.npy") if role == "features"
                    else ("x.npy", "one.npy"))
    models = [SAMPLE / "digits_backbone.onnx"] if name == "evaluate" else []
    out = tmp_path / ("o.json" if name == "evaluate" else "o.parquet")
    output = ["--json" if name == "evaluate" else "-o", out]
    run = run_here(capfd, name, *models, tmp_path / data, "--labels",
                   tmp_path / labels, *output)

    assert run.code == 1, run.stderr
    assert run.stderr.strip() == (
        f"vbsw {name}: error: {tmp_path / 'one.npy'}: holds a single value (a "
        "0-dimensional array); expected one row per sample")
    assert not out.exists()


def test_string_labels_in_npy_give_what_they_give_in_parquet(tmp_path, capfd):
    import json


    from conftest import run_here

    table = pq.read_table(SAMPLE / "breast_cancer.parquet")
    names = np.array(["benign", "malignant"])[
        table.column("label").to_numpy().astype(int)]
    np.save(tmp_path / "y.npy", names)
    pq.write_table(pa.table({"label": names}), tmp_path / "y.parquet")
    np.save(tmp_path / "x.npy", np.stack(table.column("features").to_numpy(
        zero_copy_only=False)))
    x = tmp_path / "x.npy"
    results = {}
    for kind in ("npy", "parquet"):
        labels, weighted = tmp_path / f"y.{kind}", tmp_path / f"w-{kind}.parquet"
        head, metrics = tmp_path / f"h-{kind}.onnx", tmp_path / f"e-{kind}.json"
        for args in (("weigh", x, "--labels", labels, "-o", weighted),
                     ("retrain-head", weighted, "-o", head),
                     ("evaluate", head, x, "--labels", labels, "--json",
                      metrics)):
            run = run_here(capfd, *args, "-q")
            assert run.code == 0, run.stderr
        results[kind] = (pq.read_table(weighted), json.loads(metrics.read_text()))

    assert results["npy"][0].column("label").to_pylist() == names.tolist()
    assert results["npy"][0].equals(results["parquet"][0])
    assert results["npy"][1]["metrics"] == results["parquet"][1]["metrics"]


def test_vbsw_alone_prints_the_help_on_stderr_without_an_error(capfd):
    from conftest import run_here

    help_text = run_here(capfd, "--help")
    run = run_here(capfd)  # no arguments at all

    # As click does for a group called without a command: the help on
    # stderr, exit 2 (it did not run anything), and no error line.
    assert run.code == 2 and run.stdout == ""
    assert run.stderr.strip() == help_text.stdout.strip()
    assert run.stderr.startswith("Usage: vbsw [OPTIONS] COMMAND")
    assert "error" not in run.stderr


def _modules_after(args: list[str]) -> set[str]:
    """The vbsw_cli.cli modules a run of ``vbsw ARGS`` imported, in a child."""
    import subprocess
    import sys

    script = ("import sys\nfrom vbsw_cli.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print(' '.join(m for m in sys.modules "
              "if m.startswith('vbsw_cli.cli.')), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script, *args],
                          capture_output=True, text=True, timeout=120)
    return set(done.stderr.strip().splitlines()[-1].split())


def test_a_command_imports_its_own_module_only_and_the_help_lists_all():
    weigh_only = _modules_after(["weigh", "--help"])
    every = _modules_after(["--help"])
    unknown = _modules_after(["weight", "x.parquet"])

    assert "vbsw_cli.cli.weigh" in weigh_only
    assert not weigh_only & {"vbsw_cli.cli.embed", "vbsw_cli.cli.tbs",
                             "vbsw_cli.cli.head", "vbsw_cli.cli.evaluate"}
    names = {f"vbsw_cli.cli.{m}" for m in ("embed", "weigh", "tbs", "head",
                                           "evaluate")}
    assert names <= every and names <= unknown
    help_text = run_vbsw("--help").stdout.decode()
    assert all(name in help_text for name in COMMANDS)


SEEDED = {"weigh": ["x.parquet"], "retrain-head": ["x.parquet"],
          "tbs-sample": ["--function", "runge"],
          "evaluate": ["m.onnx", "x.parquet"]}


@pytest.mark.parametrize("name", SEEDED)
@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**64)])
def test_every_seed_out_of_range_gets_one_line_naming_the_range(capfd, name,
                                                                seed):
    from conftest import run_here

    run = run_here(capfd, name, *SEEDED[name], "--seed", seed)
    assert run.code == 2
    assert run.stderr.strip() == (
        f"vbsw {name}: error: --seed {seed}: must be in [0, 4294967295] "
        f"(scikit-learn's range) (see vbsw {name} --help)")


@pytest.mark.parametrize("name", SEEDED)
def test_every_seed_help_states_the_range(name):
    text = " ".join(run_vbsw(name, "--help").stdout.decode().split())
    assert "0 to 4294967295 (2**32 - 1)" in text
    assert "x>=0" not in text


# Commands reading stdin, each with a file for it; "{}" stands for the output.
ON_STDIN = [
    ("breast_cancer.parquet", ["weigh", "-", "-o", "{}"]),
    ("digits_test.parquet", ["embed", str(SAMPLE / "digits_backbone.onnx"), "-",
                             "-o", "{}"]),
    ("points.parquet", ["tbs-sample", "-", "--names", "a,b", "--label", "y",
                        "--k", "2", "--new", "3", "-o", "{}"]),
]


def _input_file(tmp_path: Path, source: str) -> Path:
    """A copy of a sample file, or a small table of points, in tmp_path."""
    path = tmp_path / source
    if source == "points.parquet":
        pq.write_table(pa.table({"a": [0.1, 0.2, 0.3, 0.5], "b": [1.0, 2, 3, 4],
                                 "y": [1.0, 2, 3, 4]}), path)
    else:
        path.write_bytes((SAMPLE / source).read_bytes())
    return path


@pytest.mark.parametrize("source, args", ON_STDIN)
def test_an_output_that_is_the_file_on_stdin_is_refused(tmp_path, source, args):
    """``vbsw weigh - -o in.parquet < in.parquet`` replaced its input: the
    file behind stdin is an input too."""
    path = _input_file(tmp_path, source)
    before = path.read_bytes()
    with open(path, "rb") as stdin:
        done = subprocess.run([sys.executable, "-m", "vbsw_cli",
                               *[a.format(path) for a in args]],
                              stdin=stdin, capture_output=True)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "refusing to overwrite the input file " \
        "(standard input reads it)" in lines[0]
    assert path.read_bytes() == before


@pytest.mark.parametrize("source, args", [
    *[(source, [a.format("-") for a in args]) for source, args in ON_STDIN],
    ("breast_cancer.parquet", ["weigh", "-"]),  # stdout by default
    ("breast_cancer.parquet", ["weigh", "{}"]),
    ("breast_cancer.parquet", ["weigh", "{}", "-o", "-"]),
    ("digits_test.parquet", ["embed", str(SAMPLE / "digits_backbone.onnx"), "{}",
                             "-o", "-"]),
    ("points.parquet", ["tbs-sample", "{}", "--names", "a,b", "--label", "y",
                        "--k", "2", "--new", "3"]),
])
def test_stdout_that_is_an_input_file_is_refused(tmp_path, source, args):
    """``vbsw weigh - -o - < f.parquet 1<> f.parquet`` and ``vbsw weigh
    f.parquet 1<> f.parquet`` wrote over the file they were reading and left
    it unreadable."""
    import os

    path = _input_file(tmp_path, source)
    before = path.read_bytes()
    same = os.open(path, os.O_RDWR)
    try:
        with open(path, "rb") as stdin:
            done = subprocess.run([sys.executable, "-m", "vbsw_cli",
                                   *[a.format(path) for a in args]],
                                  stdin=stdin, stdout=same, stderr=subprocess.PIPE)
    finally:
        os.close(same)
    lines = done.stderr.decode().strip().splitlines()
    what = f"the input file {path}" if "{}" in args \
        else "the file standard input reads"
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].endswith(
        f"standard output is {what}; refusing to overwrite it (give -o FILE)")
    assert path.read_bytes() == before
