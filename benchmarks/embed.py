"""Benchmark ``vbsw embed`` against a bare onnxruntime loop, in the same run.

    python benchmarks/embed.py                 # modest sizes, about two minutes
    python benchmarks/embed.py --device cuda   # on a machine with a CUDA GPU

For two backbones - the sample digits CNN and a larger random-weight CNN
(N x 3 x 32 x 32, built by sample_data/train_backbone.py with onnx.helper, so
no torch is needed) - it measures rows/s of

* bare: ``session.run`` over slices of an in-memory array, the same cut model,
  batch size and provider: the floor any tool pays;
* core: :func:`vbsw_cli.embed.embed` over the same rows stored as ``.npy``
  (memory-mapped, reshaped, checked, cast), features consumed but not written;
* bare+: the bare loop as a script in a fresh process, which pays the same
  first-call costs (kernel set-up, memory arena growth) as the command;
* layout: the bare loop in the command's CPU layout (``cpu_layout()``: two
  batches side by side, each on half the cores), to tell the layout's speed
  apart from what the command adds;
* command: the whole ``vbsw embed X.npy -o out.parquet`` in a child process,
  from its own timing line (reading, embedding, writing row groups) and from
  the wall clock (which adds Python start-up and model loading).

It prints the overhead of core against bare and of the command against bare+
(target: at most 10%),
and the command's peak resident memory (VmHWM) at two row counts,
which should be the same: the input is memory-mapped and the output streamed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa

# The first pa.array() call imports pyarrow's pandas shim (about 0.3 s): pay
# it here, not inside the core's timed loop.
pa.array(np.arange(1))

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vbsw_cli import embed as core  # noqa: E402
from vbsw_cli import onnx_graph  # noqa: E402

DIGITS = ROOT / "sample_data" / "digits_backbone.onnx"
# Runs the vbsw console entry point and prints the process's peak resident set
# (VmHWM) at exit. ru_maxrss of a child would count the benchmark's own memory
# at fork time; VmHWM starts afresh at exec.
PEAK_WRAPPER = """
import atexit, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("peak_kib", line.split()[1], file=sys.stderr)
atexit.register(peak)
from vbsw_cli.cli import main
main(sys.argv[1:])
"""


def large_backbone_model() -> onnx.ModelProto:
    """The random-weight backbone from the sample script (no torch needed)."""
    spec = importlib.util.spec_from_file_location(
        "train_backbone", ROOT / "sample_data" / "train_backbone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.large_backbone()


def rows_of(shape: tuple[int, ...], n_rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n_rows, *shape), dtype=np.float32)


def cut_model(model_path: str) -> tuple[onnx.ModelProto, str]:
    """The backbone cut where --layer auto cuts it, and the cut tensor."""
    model = onnx_graph.load_model(model_path)
    tensor = onnx_graph.find_cut(model, "auto")
    return onnx_graph.cut(model, tensor), tensor


def timed_loop(session, tensor: str, X: np.ndarray, batch_size: int) -> float:
    """rows/s of plain session.run calls over X."""
    name = session.get_inputs()[0].name
    started = time.perf_counter()
    for start in range(0, len(X), batch_size):
        session.run([tensor], {name: X[start:start + batch_size]})
    return len(X) / (time.perf_counter() - started)


def bare_loop(model_path: str, X: np.ndarray, batch_size: int, device: str
              ) -> float:
    """rows/s of plain session.run calls over the cut model.

    onnxruntime's default session on the provider asked for: every core on one
    batch at a time, as a user's own loop would run it.
    """
    import onnxruntime as ort

    body, tensor = cut_model(model_path)
    providers = [core.CPU] if device == "cpu" else [core.CUDA, core.CPU]
    session = ort.InferenceSession(body.SerializeToString(), providers=providers)
    return timed_loop(session, tensor, X, batch_size)


BARE_SCRIPT = """
import sys, time
import numpy as np
import onnxruntime as ort
model, npy, tensor, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
providers = sys.argv[5].split(",")
session = ort.InferenceSession(model, providers=providers)
name = session.get_inputs()[0].name
X = np.load(npy)
started = time.perf_counter()
for start in range(0, len(X), batch_size):
    session.run([tensor], {name: X[start:start + batch_size]})
print(len(X) / (time.perf_counter() - started))
"""


def bare_child(model_path: str, npy: Path, batch_size: int, device: str,
               folder: Path) -> float:
    """rows/s of a bare onnxruntime script in a fresh process, like the command.

    The command pays a fresh process's first calls (kernel set-up, memory
    arena growth); this baseline pays them too.
    """
    body, tensor = cut_model(model_path)
    cut = folder / "cut.onnx"
    onnx.save(body, str(cut))
    providers = {"cpu": "CPUExecutionProvider"}.get(
        device, "CUDAExecutionProvider,CPUExecutionProvider")
    done = subprocess.run([sys.executable, "-c", BARE_SCRIPT, str(cut), str(npy),
                           tensor, str(batch_size), providers],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def core_loop(model_path: str, npy: Path, batch_size: int, device: str) -> float:
    """rows/s of the core generator over a memory-mapped .npy."""
    backbone = core.load_backbone(model_path, device=device)
    source = core.open_input(str(npy), backbone)
    started = time.perf_counter()
    n_rows = sum(len(b.features) for b in core.embed(backbone, source,
                                                     batch_size=batch_size))
    return n_rows / (time.perf_counter() - started)


def writing_alone(model_path: str, npy: Path, out: Path, batch_size: int,
                  device: str) -> float:
    """rows/s of the command's Parquet writer alone, on features made beforehand.

    What writing costs when nothing else runs: on a machine whose cores are all
    busy with inference, this is time the command cannot hide.
    """
    from vbsw_cli.cli.embed import write_features

    backbone = core.load_backbone(model_path, device=device)
    source = core.open_input(str(npy), backbone)
    batches = list(core.embed(backbone, source, batch_size=batch_size))
    n_rows = sum(len(b.features) for b in batches)
    started = time.perf_counter()
    write_features(iter(batches), source, str(out), {}, inputs=[])
    return n_rows / (time.perf_counter() - started)


def layout_loop(model_path: str, X: np.ndarray, batch_size: int) -> float:
    """rows/s of bare session.run calls in the command's CPU layout.

    The command runs ``cpu_layout()`` batches side by side, each on its share
    of the cores (two batches of one thread on two cores); this loop does the
    same with no reading, checking or writing, so it tells the layout's own
    speed apart from what the command adds.
    """
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime as ort

    body, tensor = cut_model(model_path)
    in_flight, threads = core.cpu_layout()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(body.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    starts = range(0, len(X), batch_size)
    run = lambda s: session.run([tensor], {name: X[s:s + batch_size]})  # noqa: E731
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(run, starts[:in_flight]))  # first-call costs
        started = time.perf_counter()
        list(pool.map(run, starts))
    return len(X) / (time.perf_counter() - started)


def thread_scaling(model_path: str, X: np.ndarray, batch_size: int) -> float:
    """rows/s of the bare loop on one onnxruntime thread (CPU only)."""
    import onnxruntime as ort

    body, tensor = cut_model(model_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(body.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    timed_loop(session, tensor, X[:batch_size], batch_size)  # first-call costs
    return timed_loop(session, tensor, X, batch_size)


def command(model_path: str, npy: Path, out: Path, batch_size: int, device: str
            ) -> tuple[float, float, float]:
    """(rows/s from its own timing line, rows/s by wall clock, peak RSS MiB)."""
    n_rows = np.load(npy, mmap_mode="r").shape[0]
    args = [sys.executable, "-c", PEAK_WRAPPER, "embed", model_path, str(npy),
            "-o", str(out), "--batch-size", str(batch_size), "--device", device]
    started = time.perf_counter()
    done = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          cwd=ROOT)
    wall = time.perf_counter() - started
    stderr = done.stderr.decode()
    if done.returncode != 0:
        raise SystemExit(f"vbsw embed failed:\n{stderr}")
    own = re.search(r"in ([0-9.]+) s \(", stderr)
    peak = re.search(r"peak_kib (\d+)", stderr)
    return (n_rows / float(own.group(1)), n_rows / wall,
            int(peak.group(1)) / 1024)


def benchmark(name: str, model_path: str, shape, n_rows: int, batch_size: int,
              device: str, folder: Path, repeat: int) -> dict:
    X = rows_of(shape, n_rows)
    npy = folder / f"{name}.npy"
    np.save(npy, X)
    runs = []
    # Interleaved repeats, best of each: the machine is shared and noisy.
    for _ in range(repeat):
        bare = bare_loop(model_path, X, batch_size, device)
        in_core = core_loop(model_path, npy, batch_size, device)
        fresh = bare_child(model_path, npy, batch_size, device, folder)
        own, wall, peak = command(model_path, npy, folder / f"{name}.parquet",
                                  batch_size, device)
        writing = writing_alone(model_path, npy, folder / "alone.parquet",
                                batch_size, device)
        cpu = device == "cpu"
        one = thread_scaling(model_path, X, batch_size) if cpu else float("nan")
        layout = layout_loop(model_path, X, batch_size) if cpu else float("nan")
        runs.append((bare, in_core, fresh, own, wall, peak, writing, one, layout))
    best = [max(column) for column in zip(*runs)]
    return dict(zip(("bare", "core", "fresh", "own", "wall", "peak", "writing",
                     "one_thread", "layout"), best), name=name, rows=n_rows)


def memory(name: str, model_path: str, shape, counts, batch_size: int,
           device: str, folder: Path) -> list[tuple[int, float]]:
    """Peak RSS of the command at each row count (input as .npy on disk)."""
    peaks = []
    for n_rows in counts:
        npy = folder / f"{name}_{n_rows}.npy"
        np.save(npy, rows_of(shape, n_rows, seed=1))
        _, _, peak = command(model_path, npy, folder / "memory.parquet",
                             batch_size, device)
        peaks.append((n_rows, peak))
        npy.unlink()
    return peaks


def overhead(tool: float, bare: float) -> str:
    return f"{100 * (bare / tool - 1):+.1f}%"


def report(results: list[dict], peaks: dict, batch_size: int, device: str) -> None:
    print(f"\nvbsw embed vs bare onnxruntime, batch {batch_size}, device {device}, "
          f"{os.cpu_count()} cores (rows/s, best of the repeats)")
    print(f"{'backbone':<8} {'rows':>7} {'bare':>8} {'core':>8} {'core ovh':>8}"
          f"   {'bare+':>8} {'command':>8} {'cmd ovh':>8} {'wall':>8}"
          f"  {'peak MiB':>8}")
    for r in results:
        print(f"{r['name']:<8} {r['rows']:>7} {r['bare']:>8,.0f} {r['core']:>8,.0f} "
              f"{overhead(r['core'], r['bare']):>8}   {r['fresh']:>8,.0f} "
              f"{r['own']:>8,.0f} {overhead(r['own'], r['fresh']):>8} "
              f"{r['wall']:>8,.0f}  {r['peak']:>8.0f}")
    print("bare: session.run loop in this process; core: vbsw_cli.embed.embed over "
          "the .npy, in this process;\nbare+: the bare loop as a script in a fresh "
          "process; command: vbsw embed's own timing line (read, embed, write);\n"
          "wall: the command by the wall clock, with start-up and model loading;\n"
          "ovh = baseline rate / tool rate - 1 (extra time per row; target <= 10%)")
    in_flight, threads = core.cpu_layout()
    print(f"\nthe command's CPU layout: {in_flight} batches in flight, {threads} "
          "onnxruntime thread(s) each; measured apart:")
    for r in results:
        share = r["bare"] / r["writing"]
        print(f"{r['name']:<8} bare loop in that layout {r['layout']:>10,.0f} "
              f"rows/s ({overhead(r['layout'], r['bare'])} against the bare "
              f"loop); onnxruntime on 1 thread {r['one_thread']:,.0f} rows/s "
              f"vs {r['bare']:,.0f} on {os.cpu_count()} (x"
              f"{r['bare'] / r['one_thread']:.2f})")
        print(f"{'':<8} writing Parquet alone {r['writing']:>10,.0f} rows/s "
              f"({1e6 / r['writing']:.2f} us/row) = {share:+.0%} of the bare "
              "inference time")
    print("the writer's work has to fit beside inference that fills the cores: "
          "the command's\noverhead is at least about the writing share "
          "divided by the core count")
    for name, rows in peaks.items():
        shown = ", ".join(f"{n:,} rows: {p:.0f} MiB" for n, p in rows)
        ratio = rows[-1][1] / rows[0][1]
        print(f"peak memory of the command, {name}: {shown} (ratio {ratio:.2f} "
              f"for {rows[-1][0] // rows[0][0]}x the rows)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000,
                        help="rows for the digits backbone")
    parser.add_argument("--large-rows", type=int, default=4_000,
                        help="rows for the large backbone")
    parser.add_argument("--memory-rows", type=int, nargs=2,
                        default=(50_000, 1_000_000),
                        help="two row counts for the flat-memory check (digits)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2,
                        help="interleaved repeats; the best of each is shown")
    parser.add_argument("--device", default="cpu", choices=core.DEVICES)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vbsw-bench-") as temporary:
        folder = Path(temporary)
        large = folder / "large_backbone.onnx"
        onnx.save(large_backbone_model(), str(large))
        results = [
            benchmark("digits", str(DIGITS), (1, 8, 8), args.rows,
                      args.batch_size, args.device, folder, args.repeat),
            benchmark("large", str(large), (3, 32, 32), args.large_rows,
                      args.batch_size, args.device, folder, args.repeat),
        ]
        peaks = {"digits": memory("digits", str(DIGITS), (1, 8, 8),
                                  args.memory_rows, args.batch_size, args.device,
                                  folder)}
    report(results, peaks, args.batch_size, args.device)


if __name__ == "__main__":
    main()
