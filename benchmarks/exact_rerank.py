"""The exact search's float64 re-rank: large k with many features, before and
after a change, against scikit-learn's brute force, in the same run.

    python benchmarks/exact_rerank.py                  # against main
    python benchmarks/exact_rerank.py --before HEAD~1  # against another revision
    python benchmarks/exact_rerank.py --common         # 50,000 x 64, k = 20 too

"before" is ``vbsw_cli/exact.py`` as of a git revision, loaded beside the
working one; both search the same arrays (standard normal float32), timed
alternately, best of ``--repeats``, and their neighbours are compared (rows
and distances). The brute force is ``NearestNeighbors(algorithm="brute")``
on every core.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = [(1000, 5000, 999), (1000, 5000, 20), (1000, 64, 999), (5000, 2048, 100)]
COMMON = (50_000, 64, 20)


def module_at(revision: str):
    """``vbsw_cli/exact.py`` as of ``revision``, as a module of its own."""
    source = subprocess.run(["git", "show", f"{revision}:vbsw_cli/exact.py"],
                            cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    folder = Path(tempfile.mkdtemp())
    (folder / "exact_before.py").write_text(source)
    spec = importlib.util.spec_from_file_location("exact_before",
                                                  folder / "exact_before.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["exact_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def seconds(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def brute(X: np.ndarray, k: int):
    from sklearn.neighbors import NearestNeighbors

    search = NearestNeighbors(n_neighbors=k, algorithm="brute", n_jobs=-1).fit(X)
    distances, indices = search.kneighbors(X)
    return indices, distances


def compare(case, before, after, repeats: int, threads: int, with_brute: bool):
    n, d, k = case
    X = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    times = {"before": [], "after": [], "brute": []}
    found = {}
    for _ in range(repeats):
        for name, module in [("before", before), ("after", after)]:
            took, found[name] = seconds(lambda m=module: m.exact_neighbours(
                X, k, threads=threads))
            times[name].append(took)
        if with_brute:
            times["brute"].append(seconds(lambda: brute(X, k))[0])
    same_rows = np.array_equal(found["before"][0], found["after"][0])
    gap = np.max(np.abs(found["before"][1] - found["after"][1])
                 / np.maximum(found["before"][1], 1e-300))
    best = {name: min(t) for name, t in times.items() if t}
    line = (f"{n:>6} x {d:<5} k = {k:<4} before {best['before']:7.3f} s  "
            f"after {best['after']:7.3f} s")
    if with_brute:
        line += f"  sklearn brute {best['brute']:6.3f} s"
    print(line + f"  same rows: {same_rows}, largest relative distance gap "
          f"{gap:.1e}", flush=True)
    print("        all times: " + "; ".join(
        f"{name} " + " ".join(f"{t:.3f}" for t in values)
        for name, values in times.items() if values), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--common", action="store_true",
                        help="also 50,000 x 64, k = 20 (no brute force)")
    parser.add_argument("--common-only", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import vbsw_cli.exact as after

    before = module_at(args.before)
    print(f"threads {args.threads}, best of {args.repeats}; before = "
          f"{args.before}", flush=True)
    if not args.common_only:
        for case in CASES:
            compare(case, before, after, args.repeats, args.threads, True)
    if args.common or args.common_only:
        compare(COMMON, before, after, args.repeats, args.threads, False)


if __name__ == "__main__":
    main()
