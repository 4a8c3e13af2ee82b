"""Tables 1 and 2 of the paper: basic (uniform) sampling against TBS.

Table 1 (Runge and tanh, the paper's protocol): N = 8 grid points, N' = 8
more drawn uniformly (BS) or by TBS (n = 2, 3 components, eps = 1e-3); an MLP
with one hidden layer of 8 ReLU units trained by Adam (scikit-learn's
MLPRegressor, learning rate 1e-3, full batch) on the 16 points; errors on
1,000 uniform test points; 40 repeats. L2 is the root mean squared error
(the paper's L2 cannot be the MSE: its L-infinity would be smaller than
sqrt(MSE)), L-infinity the largest absolute error.

Table 2 (Bateman, M = 1), reduced to fit two shared cores: N = N' = 1,000
instead of 25,000, 3,000 epochs instead of 40,000, 10 repeats instead of 50,
10,000 test points instead of 50,000; the network (2 x 32 ReLU, Adam, full
batch), eps = 5e-4, n = 2 and 10 components are the paper's. L2 is the MSE as
in the paper, L-infinity the largest absolute error over points and outputs.

Every figure is mean +- 1.96 standard deviation / sqrt(repeats), the 95%
confidence interval of the mean. Within a repeat both samplings share the
network's initial weights. Run: python benchmarks/tbs_tables.py [--quick].
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPRegressor
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vbsw_cli import tbs  # noqa: E402
from vbsw_cli.functions import BUILT_INS, evaluate  # noqa: E402

PAPER_1 = {  # (L2, Linf) as (mean, half-width), in the table's units
    "runge": {"BS": ((1.45, 0.62), (5.31, 0.86)),
              "TBS": ((1.13, 0.73), (3.87, 0.48))},
    "tanh": {"BS": ((1.39, 0.67), (2.75, 0.78)),
             "TBS": ((0.95, 0.50), (2.25, 0.61))},
}
UNITS_1 = {"runge": (1e-2, 1e-2), "tanh": (1e-1, 1e-1)}
PAPER_2 = {"BS": ((1.22, 0.13), (5.28, 0.47)), "TBS": ((1.14, 0.15), (2.96, 0.37))}
UNITS_2 = (1e-4, 1e-1)


def box_of(name):
    function = BUILT_INS[name]
    return function, tbs.make_box(function.bounds[:, 0], function.bounds[:, 1],
                                  function.input_names)


def train(X, Y, hidden, epochs, seed):
    model = MLPRegressor(hidden_layer_sizes=hidden, activation="relu",
                         solver="adam", learning_rate_init=1e-3,
                         batch_size=len(X), max_iter=epochs, tol=0.0,
                         n_iter_no_change=epochs + 1, alpha=0.0,
                         random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, Y if Y.shape[1] > 1 else Y[:, 0])
    return model


def errors(model, X_test, Y_test):
    """(RMSE, MSE, L-infinity) on the test points."""
    predicted = model.predict(X_test).reshape(Y_test.shape)
    difference = predicted - Y_test
    mse = float((difference**2).mean())
    return np.sqrt(mse), mse, float(np.abs(difference).max())


def tbs_points(function, box, X, n_new, eps, components, rng, reg_covar=None):
    density = tbs.function_density(function, X, np.full(X.shape[1], eps), order=2)
    return tbs.tbs_sample(X, density, box, n_new=n_new, n_components=components,
                          rng=rng, reg_covar=reg_covar).points


def repeat(name, r, *, n, n_new, design, eps, components, hidden, epochs,
           X_test, Y_test, variants):
    function, box = box_of(name)
    rng = np.random.default_rng(1000 + r)
    X0 = tbs.initial_design(box, n, design, rng)
    sets = {"BS": np.concatenate([X0, tbs.initial_design(box, n_new, "uniform",
                                                          rng)])}
    for label, reg in variants.items():
        sets[label] = np.concatenate([X0, tbs_points(function, box, X0, n_new, eps,
                                                     components, rng, reg)])
    out = {}
    for label, X in sets.items():
        model = train(X, evaluate(function, X), hidden, epochs, seed=r)
        out[label] = errors(model, X_test, Y_test)
    return out


def run_table(name, repeats, X_test, **settings):
    function, _ = box_of(name)
    Y_test = evaluate(function, X_test)
    results = {}
    for r in range(repeats):
        for label, pair in repeat(name, r, X_test=X_test, Y_test=Y_test,
                                  **settings).items():
            results.setdefault(label, []).append(pair)
    return {label: np.array(values) for label, values in results.items()}


def interval(values):
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0
    return values.mean(), half


METRICS = {"RMSE": 0, "MSE": 1, "Linf": 2}


def report(title, results, paper, units, l2_name, extra=None):
    """Measured L2 (l2_name) and Linf beside the paper's; extra: one more
    measured metric (name, unit) without a paper figure."""
    print(f"\n{title}")
    header = f"  {'sampling':<14}{l2_name + ' measured':>20}{'paper':>15}"
    header += f"{'Linf measured':>20}{'paper':>15}"
    if extra:
        header += f"{extra[0] + ' (x' + format(extra[1], 'g') + ')':>22}"
    print(header)
    for label, values in results.items():
        line = f"  {label:<14}"
        reference = paper.get(label)
        for column, (metric, unit) in enumerate(zip((l2_name, "Linf"), units)):
            mean, half = interval(values[:, METRICS[metric]] / unit)
            line += f"{mean:11.2f} +- {half:5.2f}"
            line += (f"{reference[column][0]:9.2f} +- {reference[column][1]:4.2f}"
                     if reference else f"{'-':>15}")
        if extra:
            mean, half = interval(values[:, METRICS[extra[0]]] / extra[1])
            line += f"{mean:13.2f} +- {half:5.2f}"
        print(line)
    base = results["BS"]
    for label, values in results.items():
        if label != "BS":
            wins = (values[:, 2] < base[:, 2]).mean()
            ratio = values[:, 2].mean() / base[:, 2].mean()
            print(f"  {label}: Linf / BS Linf = {ratio:.3f}; lower Linf than BS "
                  f"in {wins:.0%} of paired repeats")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="few repeats and epochs: a smoke run, not figures")
    args = parser.parse_args(argv)
    quick = args.quick
    started = time.perf_counter()

    repeats_1, epochs_1 = (5, 1000) if quick else (40, 5000)
    test_rng = np.random.default_rng(12345)
    for name in ("runge", "tanh"):
        _, box = box_of(name)
        X_test = tbs.initial_design(box, 1000, "uniform", test_rng)
        results = run_table(name, repeats_1, X_test, n=8, n_new=8, design="grid",
                            eps=1e-3, components=3, hidden=(8,), epochs=epochs_1,
                            variants={"TBS": None, "TBS reg 1e-6": 1e-6})
        unit = UNITS_1[name]
        report(f"Table 1, f = {name} (x{unit[0]:g}), {repeats_1} repeats, "
               f"{epochs_1} epochs", results, PAPER_1[name], unit, "RMSE",
               extra=("MSE", unit[0]))

    repeats_2, epochs_2, n_2, test_2 = ((3, 300, 300, 2000) if quick
                                        else (10, 3000, 1000, 10_000))
    _, box = box_of("bateman")
    X_test = tbs.initial_design(box, test_2, "uniform", test_rng)
    results = run_table("bateman", repeats_2, X_test, n=n_2, n_new=n_2,
                        design="uniform", eps=5e-4, components=10,
                        hidden=(32, 32), epochs=epochs_2,
                        variants={"TBS": None})
    report(f"Table 2 (reduced), Bateman M = 1, N = N' = {n_2}, {repeats_2} "
           f"repeats, {epochs_2} epochs, {test_2} test points (MSE x1e-4, "
           "Linf x1e-1)", results, PAPER_2, UNITS_2, "MSE")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    with threadpool_limits(1):
        main()
