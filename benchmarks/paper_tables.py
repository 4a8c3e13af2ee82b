"""The paper's Table 3 / Table 4 protocol on this machine, beside its figures.

    python benchmarks/paper_tables.py [--quick]

* Double moon (Table 3): the 300 points of sample_data/double_moon.parquet for
  training; 1,000 fresh points from the same generator (make_moons, noise 0.1,
  random_state 1) for testing, since the paper names no test set. One hidden
  layer of 4 ReLU units, plain SGD (no momentum, as Keras' default), learning
  rate 1e-3, batch 100, 10,000 epochs, VBSW m = 100, k = 20 (Appendix B).
  The same nets are also fitted by lbfgs to convergence (not the paper's
  optimiser), and with the learning rate times the mean raw weight.
* Breast cancer (Table 3): sample_data/breast_cancer.parquet split 80/20
  (stratified, split seed 0, the same split for every run); one hidden layer of
  30 units, Adam, learning rate 5e-2, full batch (455), m = 50, k = 35. The
  paper ran 250,000 epochs; this runs 5,000 (1,000 with --quick).
* Digits backbone (Table 4's protocol, on the 8x8 digits instead of MNIST):
  sample_data/digits_backbone.onnx cut before its last layer, VBSW (m = 40,
  k = 20, MNIST's values) in its feature space, a new linear head trained with
  Adam, learning rate 1e-3, batch 25, 25 epochs, against heads trained without
  weights and against the backbone itself (acc(M) of the gain per model).
  Skipped, saying why, when the backbone file is missing.

Weights come from ``vbsw_cli.weigh.weigh`` on the training rows only, normalised
to mean 1; features are standardised for training (the head's default; the
scaling is part of the exported model). The baseline and the VBSW run of one
seed start from the same initial weights, so the gain per model pairs them by
seed. Every model is evaluated through its exported ONNX file. Nothing is tuned:
the settings above are the paper's, reduced in seeds and epochs to fit two
shared cores. Figures are test accuracy in percent.

Last, the time to retrain a head on 50,000 x 64 features with 10 classes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vbsw_cli.evaluate import (as_probabilities, classification_metrics,  # noqa: E402
                               compare, run_model)
from vbsw_cli.head import HeadOptions, head_to_onnx, train_head  # noqa: E402
from vbsw_cli.io import Labels  # noqa: E402
from vbsw_cli.weigh import weigh  # noqa: E402

SAMPLE = ROOT / "sample_data"

# Table 3 and Table 4 of the paper: (best, mean, se) in percent.
PAPER = {
    "double moon": {"vbsw": (99.4, 94.44, 0.78), "baseline": (99.0, 92.06, 0.66)},
    "breast cancer": {"vbsw": (99.12, 97.6, 0.34),
                      "baseline": (98.25, 97.5, 0.11)},
    "digits (MNIST row)": {"vbsw": (99.09, 98.87, 0.01),
                           "baseline": (98.99, 98.84, 0.01),
                           "gain": (0.15, 0.03, 0.01)},
}


def labels_of(y: np.ndarray) -> list[Labels]:
    classes, codes = np.unique(y, return_inverse=True)
    return [Labels("label", "classification", codes, classes.tolist())]


def accuracy(model, X: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of an ONNX model, run as vbsw evaluate runs it."""
    outputs = run_model(model, X).outputs
    proba, _ = as_probabilities(outputs, max(outputs.shape[1], 2))
    return classification_metrics(y, proba)["accuracy"]


def protocol(X_train, y_train, X_test, y_test, *, k, m, options, seeds,
             paper_step=False):
    """Baseline and VBSW heads over seeds; run records for compare().

    ``paper_step`` adds both runs again with the learning rate multiplied by
    the mean raw weight (1 / the smallest mean-1 weight): the step the paper's
    code took by feeding raw weights in [1, m] to a batch-mean loss.
    """
    weight = weigh(X_train, labels_of(y_train), k=k, m=m).weight
    runs = [("baseline", None, 1.0), ("vbsw", weight, 1.0)]
    if paper_step:
        factor = 1.0 / weight.min()
        runs += [(f"baseline lr x{factor:.0f}", None, factor),
                 (f"vbsw lr x{factor:.0f}", weight, factor)]
    records = []
    for seed in seeds:
        for run, w, factor in runs:
            settings = HeadOptions(**{**options.__dict__, "seed": seed,
                                      "learning_rate": options.learning_rate
                                      * factor})
            head = train_head(X_train, labels_of(y_train), w, options=settings)
            score = accuracy(head_to_onnx(head), X_test, y_test)
            records.append({"run": run, "seed": seed,
                            "metrics": {"accuracy": 100 * score}})
    return records


def double_moon(quick: bool) -> list[dict]:
    from sklearn.datasets import make_moons

    table = pq.read_table(SAMPLE / "double_moon.parquet")
    X = np.column_stack([table.column("x0"), table.column("x1")])
    y = table.column("label").to_numpy()
    X_test, y_test = make_moons(n_samples=1000, noise=0.1, random_state=1)
    options = HeadOptions(hidden=4, optimizer="sgd", learning_rate=1e-3,
                          batch_size=100, epochs=2_000 if quick else 10_000,
                          momentum=0.0, tol=0.0)
    seeds = range(3 if quick else 10)
    return protocol(X, y, X_test, y_test, k=20, m=100,
                    options=options, seeds=seeds, paper_step=True)


def double_moon_converged(quick: bool) -> list[dict]:
    """The same nets and weights, fitted to convergence by lbfgs: separates
    what the weights do from how fast plain SGD gets there."""
    from sklearn.datasets import make_moons

    table = pq.read_table(SAMPLE / "double_moon.parquet")
    X = np.column_stack([table.column("x0"), table.column("x1")])
    y = table.column("label").to_numpy()
    X_test, y_test = make_moons(n_samples=1000, noise=0.1, random_state=1)
    options = HeadOptions(hidden=4, optimizer="lbfgs", epochs=2_000)
    return protocol(X, y, X_test, y_test, k=20, m=100, options=options,
                    seeds=range(3 if quick else 10))


def breast_cancer(quick: bool) -> list[dict]:
    from sklearn.model_selection import train_test_split

    table = pq.read_table(SAMPLE / "breast_cancer.parquet")
    X = np.asarray(table.column("features").to_pylist())
    y = table.column("label").to_numpy()
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.2, stratify=y, random_state=0)
    options = HeadOptions(hidden=30, optimizer="adam", learning_rate=5e-2,
                          batch_size=len(X_train),
                          epochs=1_000 if quick else 5_000, tol=0.0)
    seeds = range(3 if quick else 10)
    return protocol(X_train, y_train, X_test, y_test, k=35,
                    m=50, options=options, seeds=seeds)


def digits(quick: bool, path: Path) -> list[dict] | str:
    from vbsw_cli.onnx_graph import cut, find_cut, load_model

    if not path.exists():
        return (f"{path} is missing (it comes with vbsw embed's sample "
                "backbone); skipped")
    backbone = load_model(str(path))
    body = cut(backbone, find_cut(backbone, "auto"))
    data = {}
    for part in ("train", "test"):
        table = pq.read_table(SAMPLE / f"digits_{part}.parquet")
        images = np.asarray(table.column("image").to_pylist(), np.float32)
        data[part] = (images, run_model(body, images).outputs,
                      table.column("label").to_numpy())
    images, features, y_train = data["train"]
    test_images, test_features, y_test = data["test"]
    base = 100 * accuracy(backbone, test_images, y_test)
    options = HeadOptions(optimizer="adam", learning_rate=1e-3, batch_size=25,
                          epochs=25)
    records = protocol(features, y_train, test_features, y_test,
                       k=20, m=40, options=options,
                       seeds=range(3 if quick else 10))
    for record in records:
        record["group"] = "backbone"
    records.append({"run": "backbone", "group": "backbone",
                    "metrics": {"accuracy": base}})
    return records


def speed() -> tuple[float, int, float]:
    """Seconds to train the default head on 50,000 x 64 features, 10 classes."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 64))
    y = rng.integers(0, 10, 50_000)
    X = (centres[y] + rng.normal(scale=1.5, size=(50_000, 64))).astype(np.float32)
    weight = rng.uniform(1, 40, len(y))
    weight /= weight.mean()
    started = time.perf_counter()
    head = train_head(X, labels_of(y), weight)
    seconds = time.perf_counter() - started
    return seconds, head.epochs_run, float(np.mean(head.predict(X) == y))


def show(name: str, records: list[dict], reference: str = "baseline") -> None:
    result = compare(records, reference=reference)
    print(f"\n{name}: test accuracy %, best, mean ± se (n runs)")
    paper = PAPER.get(name, {})
    for run, summaries in result["runs"].items():
        s = summaries["accuracy"]
        print(f"  {run:<16} ours  {_triple(s)} (n={s['n']})"
              + (f"   paper {_paper(paper[run])}" if run in paper else ""))
    for run, gains in result["gains"].items():
        g = gains["accuracy"]
        print(f"  gain per model, {run} over {reference}: {_triple(g)} "
              f"({g['n_models']} models)"
              + (f"   paper {_paper(paper['gain'])}"
                 if "gain" in paper and run == "vbsw" else ""))


def _triple(s: dict) -> str:
    se = f" ± {s['se']:.2f}" if s.get("se") is not None else ""
    return f"{s['best']:.2f}, {s['mean']:.2f}{se}"


def _paper(values: tuple) -> str:
    return f"{values[0]:.2f}, {values[1]:.2f} ± {values[2]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 seeds and fewer epochs (about a minute)")
    parser.add_argument("--backbone", type=Path,
                        default=SAMPLE / "digits_backbone.onnx",
                        help="the digits backbone (default: %(default)s)")
    arguments = parser.parse_args()
    quick = arguments.quick
    started = time.perf_counter()
    print(f"mode: {'quick' if quick else 'full'}; seeds 0..{2 if quick else 9}")

    begun = time.perf_counter()
    records = double_moon(quick)
    show("double moon", [r for r in records if " lr x" not in r["run"]])
    scaled = [{**r, "run": r["run"].split(" ")[0]} for r in records
              if " lr x" in r["run"]]
    factor = next(r["run"] for r in records if " lr x" in r["run"]).split("x")[1]
    show(f"double moon, learning rate x{factor} (the paper code's step)", scaled)
    show("double moon, trained to convergence (lbfgs, 2,000 iterations; not "
         "the paper's optimiser)", double_moon_converged(quick))
    print(f"  ({time.perf_counter() - begun:.1f} s)")

    begun = time.perf_counter()
    show("breast cancer", breast_cancer(quick))
    print(f"  ({time.perf_counter() - begun:.1f} s)")

    begun = time.perf_counter()
    records = digits(quick, arguments.backbone)
    if isinstance(records, str):
        print(f"\ndigits backbone: {records}")
    else:
        show("digits (MNIST row)", records, reference="backbone")
        heads = [{**r, "group": None} for r in records if r["run"] != "backbone"]
        show("digits heads", heads)
        print(f"  ({time.perf_counter() - begun:.1f} s)")

    seconds, epochs, train_accuracy = speed()
    print(f"\nretrain a linear head, 50,000 x 64 features, 10 classes, weighted, "
          f"defaults (adam, batch 256): {seconds:.2f} s for {epochs} epochs "
          f"({seconds / epochs:.3f} s per epoch), training accuracy "
          f"{100 * train_accuracy:.1f}%")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
