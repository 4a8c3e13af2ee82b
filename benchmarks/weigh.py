"""Speed, recall and memory of ``vbsw weigh`` against baselines run here.

    python benchmarks/weigh.py            # the full run (about 15 minutes)
    python benchmarks/weigh.py --quick    # smaller sizes, a couple of minutes
    python benchmarks/weigh.py --hard-only  # far outliers, identical rows
    python benchmarks/weigh.py --reproducible-only 200000  # its cost alone

First, inputs that once slowed the exact search down a hundredfold (a few far
outliers; masses of identical rows), against scikit-learn's brute force.

Two kinds of synthetic features, d = 64, k = 20, ten classes:

* clustered: points near an 8-dimensional subspace, in 20 clusters, like the
  embeddings of a trained network;
* isotropic: standard Gaussian, the hard case for graph search.

Baselines, measured in the same run on the same arrays:

* the paper's public reference approach, rewritten here: a k-d tree queried
  one point at a time in a Python loop, then the variance of the neighbours'
  one-hot labels. Its per-query time is measured on a random subset of rows
  and multiplied by N (the tree is always built on all N rows), unless
  ``--full-baseline``;
* hnswlib called directly on the same array with the parameters the command
  chose (build and query only), for the command's overhead.

Every ``vbsw weigh`` figure is the whole command in a fresh process: read
Parquet, search, variance, write Parquet. The child may cache its bytecode, as
an installed command does (PYTHONDONTWRITEBYTECODE, where set, would make it
compile the package on every run). Peak memory is the child's maximum
resident set size. Against the k-d tree loop, the command is timed without
``--check-recall`` and its recall measured in a second run; in the growth
table the timed run includes the recall check on 500 rows. Last, two runs
with ``--reproducible`` and two with ``--no-reproducible``: whether each
pair's outputs are the same bytes, and what the reproducible graphs cost
(the default up to 200,000 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

D, K, CLASSES = 64, 20, 10


# ---------------------------------------------------------------------------
# Data


def clustered(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    latent_dim, n_clusters = 8, 20
    centres = rng.normal(size=(n_clusters, latent_dim)) * 4
    cluster = rng.integers(n_clusters, size=n)
    latent = centres[cluster] + rng.normal(size=(n, latent_dim))
    lift = rng.normal(size=(latent_dim, D)) / np.sqrt(latent_dim)
    X = latent @ lift + 0.05 * rng.normal(size=(n, D))
    y = (cluster + (latent[:, 0] > centres[cluster, 0])) % CLASSES
    return X.astype(np.float32), y.astype(np.int64)


def isotropic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    X = rng.normal(size=(n, D)).astype(np.float32)
    y = (np.floor(X[:, 0] * 2) + np.floor(X[:, 1] * 2)) % CLASSES
    return X, y.astype(np.int64)


def write_parquet(path: Path, X: np.ndarray, y: np.ndarray) -> None:
    values = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])
    pq.write_table(pa.table({"id": np.arange(len(X)), "features": values,
                             "label": y}), path)


# ---------------------------------------------------------------------------
# Baselines


def kd_tree_loop(X, y, rows, k=K):
    """The reference approach: one k-d tree query per point, in Python."""
    from sklearn.neighbors import KDTree

    onehot = np.eye(CLASSES)[y]
    started = time.perf_counter()
    tree = KDTree(X)
    build = time.perf_counter() - started
    variance = np.empty(len(rows))
    started = time.perf_counter()
    for position, i in enumerate(rows):
        _, neighbours = tree.query(X[i:i + 1], k=k)
        variance[position] = onehot[neighbours[0]].var(axis=0, ddof=1).sum()
    per_query = (time.perf_counter() - started) / len(rows)
    return variance, build + per_query * len(X)


def bare_hnswlib(X, M, ef_construction, ef, threads, shards=1, k=K):
    """hnswlib's build and query with the command's parameters: one graph on
    every thread, or (the command's --reproducible) ``shards`` graphs of rows
    r mod shards, each built on one thread side by side, every row searched
    in each and the k nearest kept."""
    import hnswlib
    from concurrent.futures import ThreadPoolExecutor

    def build(rows, on_threads):
        index = hnswlib.Index(space="l2", dim=X.shape[1])
        index.init_index(max_elements=len(rows), M=M,
                         ef_construction=ef_construction, random_seed=0)
        index.add_items(X[rows], rows, num_threads=on_threads)
        index.set_ef(max(ef, k))
        return index

    started = time.perf_counter()
    if shards == 1:
        build(np.arange(len(X)), threads).knn_query(X, k=k, num_threads=threads)
        return time.perf_counter() - started
    parts = [np.arange(s, len(X), shards) for s in range(shards)]
    with ThreadPoolExecutor(shards) as pool:
        indexes = list(pool.map(lambda rows: build(rows, 1), parts))
    found = [index.knn_query(X, k=k, num_threads=threads) for index in indexes]
    labels = np.concatenate([f[0] for f in found], axis=1)
    squared = np.concatenate([f[1] for f in found], axis=1)
    nearest = np.argsort(squared, axis=1, kind="stable")[:, :k]
    np.take_along_axis(labels, nearest, axis=1)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------
# The command


def run_command(path: Path, out: Path, *extra: str) -> dict:
    """Run vbsw weigh in a child; wall time, peak memory and its stderr."""
    script = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "t = time.perf_counter() - t\n"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "import json; print(json.dumps({'s': t, 'rss_kb': r, 'code': p.returncode,"
        " 'stderr': p.stderr}))\n")
    command = [sys.executable, "-m", "vbsw_cli", "weigh", str(path), "--k",
               str(K), "--m", "40", "--weights-only", "-o", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-c", script, *command], env=env,
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    if result["code"] != 0:
        raise SystemExit(f"vbsw weigh failed:\n{result['stderr']}")
    result["recall"] = _field(result["stderr"], "against exact search: ")
    result["search"] = _line(result["stderr"], "search: ")
    return result


def _field(text: str, marker: str) -> float | None:
    if marker not in text:
        return None
    return float(text.split(marker)[1].split()[0])


def _line(text: str, marker: str) -> str:
    for line in text.splitlines():
        if line.startswith(marker):
            return line[len(marker):]
    return ""


def chosen_parameters(out: Path) -> dict:
    record = json.loads(pq.read_schema(out).metadata[b"vbsw"])
    return record["parameters"]["search"]


# ---------------------------------------------------------------------------
# Sections


def against_reference(kind, make, n, sample, folder, rng, full):
    X, y = make(n, rng)
    path, out = folder / f"{kind}_{n}.parquet", folder / f"{kind}_{n}_w.parquet"
    write_parquet(path, X, y)
    command = run_command(path, out)
    checked = run_command(path, out, "--check-recall", "1000")
    command["recall"] = checked["recall"]
    rows = np.arange(n) if full else np.sort(rng.choice(n, sample, replace=False))
    variance, baseline_s = kd_tree_loop(X, y, rows)
    ours = pq.read_table(out).column("local_variance").to_numpy()[rows]
    agree = float(np.isclose(ours, variance, atol=1e-9).mean())
    how = "measured" if full else f"from {len(rows)} timed queries"
    print(f"{kind:9s} N={n:>7,d}  vbsw weigh {command['s']:7.2f} s  "
          f"recall@{K} {command['recall']:.4f}  "
          f"peak {command['rss_kb'] / 1024:6.0f} MB")
    print(f"{'':9s}             search: {command['search']}")
    print(f"{'':9s}             k-d tree loop {baseline_s:9.1f} s ({how})  "
          f"speed-up {baseline_s / command['s']:7.1f}x  same local variance "
          f"on {agree:.1%} of compared rows")
    return command


def overhead(kind, make, n, folder, rng, threads):
    X, y = make(n, rng)
    path, out = folder / f"o_{kind}_{n}.parquet", folder / f"o_{kind}_{n}_w.parquet"
    write_parquet(path, X, y)
    command = run_command(path, out)
    chosen = chosen_parameters(out)
    if chosen["used"] != "hnsw":
        print(f"{kind:9s} N={n:>7,d}  overhead: the command chose exact search "
              f"({chosen.get('reason')}); no hnswlib baseline")
        return
    shards = chosen.get("shards", 1)
    bare = bare_hnswlib(X, chosen["M"], chosen["ef_construction"], chosen["ef"],
                        threads, shards)
    graphs = f"{shards} graphs, " if shards > 1 else ""
    print(f"{kind:9s} N={n:>7,d}  vbsw weigh {command['s']:7.2f} s  bare hnswlib "
          f"({graphs}M={chosen['M']}, ef_construction={chosen['ef_construction']}, "
          f"ef={chosen['ef']}) {bare:7.2f} s  overhead "
          f"{command['s'] / bare - 1:+.1%}")


def growth(sizes, folder, rng):
    previous = None
    for n in sizes:
        X, y = clustered(n, rng)
        path, out = folder / f"g_{n}.parquet", folder / f"g_{n}_w.parquet"
        write_parquet(path, X, y)
        command = run_command(path, out, "--check-recall", "500")
        ratio = "" if previous is None else (
            f"  x{command['s'] / previous[1]:.2f} time for x{n / previous[0]:.0f} rows")
        print(f"clustered N={n:>9,d}  {command['s']:7.2f} s  recall@{K} "
              f"{command['recall']:.4f}  peak {command['rss_kb'] / 1024:6.0f} MB"
              f"  [{command['search']}]{ratio}")
        previous = (n, command["s"])
        path.unlink()
        out.unlink()


def reproducibility(n, folder, rng):
    """Two runs with --reproducible give the same bytes; its cost against one
    graph shared by the threads (--no-reproducible, whose runs differ)."""
    X, y = clustered(n, rng)
    path = folder / "r.parquet"
    write_parquet(path, X, y)
    outs = [folder / f"r_{name}.parquet" for name in ("a", "b", "c", "d")]
    runs = [run_command(path, out, *flag) for out, flag in
            zip(outs, [["--reproducible"]] * 2 + [["--no-reproducible"]] * 2)]
    same = [outs[0].read_bytes() == outs[1].read_bytes(),
            outs[2].read_bytes() == outs[3].read_bytes()]
    for label, pair, equal in (("--reproducible", runs[:2], same[0]),
                               ("--no-reproducible", runs[2:], same[1])):
        times = " / ".join(f"{r['s']:.2f}" for r in pair)
        print(f"clustered N={n:>9,d}  {label:17s} {times} s  two runs "
              f"{'identical' if equal else 'differ'}  [{pair[0]['search']}]")
    best = min(r["s"] for r in runs[:2]) / min(r["s"] for r in runs[2:])
    print(f"--reproducible costs x{best:.2f} the time (best of two each)")
    for file in (path, *outs):
        file.unlink()


def hard_inputs(folder, rng):
    """Inputs that used to slow the exact search down, against scikit-learn's
    brute force on the same array (its k neighbours only: a lower bound)."""
    from sklearn.neighbors import NearestNeighbors

    cases = []
    X = rng.normal(size=(30_000, 8)).astype(np.float32)
    X[:3] *= 1e18
    cases.append(("3 rows at 1e18 among 30,000 x 8", X))
    for n, d in ((50_000, 32), (200_000, 16)):
        X = rng.normal(size=(n, d)).astype(np.float32)
        X[:int(0.95 * n)] = X[0]
        cases.append((f"{n:,} x {d}, 95% identical rows", X[rng.permutation(n)]))
    for label, X in cases:
        path, out = folder / "hard.parquet", folder / "hard_w.parquet"
        write_parquet(path, X, rng.integers(CLASSES, size=len(X)))
        command = run_command(path, out)
        started = time.perf_counter()
        NearestNeighbors(n_neighbors=K, algorithm="brute", n_jobs=-1).fit(
            X).kneighbors(X)
        brute = time.perf_counter() - started
        print(f"{label:36s} vbsw weigh {command['s']:6.2f} s  scikit-learn brute "
              f"force {brute:6.2f} s  ratio {brute / command['s']:5.1f}x  "
              f"[{command['search']}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full-baseline", action="store_true",
                        help="query every point in the k-d tree loop")
    parser.add_argument("--skip-million", action="store_true")
    parser.add_argument("--hard-only", action="store_true",
                        help="only the far outliers and identical rows")
    parser.add_argument("--reproducible-only", type=int, metavar="N",
                        help="only the cost of --reproducible, on N rows")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    threads = len(os.sched_getaffinity(0))
    n_mid = 10_000 if args.quick else 50_000
    print(f"machine: {platform.processor() or platform.machine()}, {threads} "
          f"cores, Python {platform.python_version()}; d={D}, k={K}")

    with tempfile.TemporaryDirectory(prefix="vbsw-bench-") as name:
        folder = Path(name)
        if args.reproducible_only:
            print("\n== --reproducible against the default graph")
            reproducibility(args.reproducible_only, folder, rng)
            return
        print("\n== hard inputs for the exact search")
        hard_inputs(folder, np.random.default_rng(1))  # leaves rng as it was
        if args.hard_only:
            return
        print("\n== against the k-d tree loop (the paper's reference approach)")
        against_reference("clustered", clustered, n_mid, 2000, folder, rng,
                          args.full_baseline)
        against_reference("isotropic", isotropic, n_mid, 200, folder, rng,
                          args.full_baseline)

        print("\n== overhead over hnswlib called directly")
        overhead("clustered", clustered, n_mid, folder, rng, threads)
        if not (args.quick or args.skip_million):
            overhead("clustered", clustered, 1_000_000, folder, rng, threads)

        print("\n== growth with N (clustered)")
        sizes = [10_000, 30_000, 100_000] if args.quick else \
            [10_000, 100_000, 1_000_000]
        if args.skip_million:
            sizes = [s for s in sizes if s < 1_000_000]
        growth(sizes, folder, rng)

        print("\n== --reproducible against the default graph")
        reproducibility(n_mid * 4, folder, rng)


if __name__ == "__main__":
    main()
