"""Taylor based sampling: Df_eps^n, designs, densities, sampling, and the CLI."""

from __future__ import annotations

import itertools
import os
from math import factorial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_vbsw, vectors
from vbsw_cli import io
from vbsw_cli.errors import DataError, UsageError
from vbsw_cli.functions import Function, runge
from vbsw_cli.mixture import Mixture
from vbsw_cli.neighbors import SearchOptions, nearest_neighbours
from vbsw_cli import tbs
from vbsw_cli.weigh import local_variance

SEED = 0


# ---------------------------------------------------------------------------
# Df_eps^n against analytic derivatives


def reference_density(derivative, d, eps, order):
    """Equation (2) summed literally over multi-indices 1 <= |k| <= order.

    derivative(k) returns d^k f at the points, shape (n, outputs), for a
    multi-index k given as a tuple of d non-negative integers.
    """
    total = 0.0
    for k in itertools.product(range(order + 1), repeat=d):
        if not 1 <= sum(k) <= order:
            continue
        eps_k = np.prod([e**ki for e, ki in zip(eps, k)])
        k_factorial = np.prod([factorial(ki) for ki in k])
        total = total + eps_k * (derivative(k) ** 2).sum(axis=1) / k_factorial
    return total


def test_df_of_a_1d_cubic_matches_analytic_derivatives():
    function = Function("cubic", lambda X: 3 * X[:, 0]**3 - 2 * X[:, 0]**2 + X[:, 0])
    x = np.linspace(-1, 1, 9)
    first = (9 * x**2 - 4 * x + 1)[:, None]
    second = (18 * x - 4)[:, None]
    eps = np.array([1e-3])

    for order in (1, 2):
        expected = reference_density(
            lambda k: first if k == (1,) else second, 1, eps, order)
        found = tbs.function_density(function, x[:, None], eps, order=order,
                                     step=np.array([1e-4]))
        np.testing.assert_allclose(found, expected, rtol=1e-6)


def _poly2(X):
    """Two outputs of two inputs, with mixed terms."""
    x, y = X[:, 0], X[:, 1]
    return np.column_stack([x**2 * y + 3 * x * y**2 - y**3 + 2 * x,
                            x * y - 0.5 * x**3])


def _poly2_derivative(X, k):
    x, y = X[:, 0], X[:, 1]
    table = {
        (1, 0): [2 * x * y + 3 * y**2 + 2, y - 1.5 * x**2],
        (0, 1): [x**2 + 6 * x * y - 3 * y**2, x],
        (2, 0): [2 * y, -3 * x],
        (1, 1): [2 * x + 6 * y, np.ones_like(x)],
        (0, 2): [6 * x - 6 * y, np.zeros_like(x)],
    }
    return np.column_stack(table[k])


@pytest.mark.parametrize("order", [1, 2])
def test_df_of_a_2d_polynomial_with_mixed_terms(order):
    X = np.random.default_rng(SEED).uniform(-1, 1, size=(20, 2))
    eps = np.array([1e-3, 5e-3])  # unequal, so eps^k is checked per axis
    expected = reference_density(lambda k: _poly2_derivative(X, k), 2, eps,
                                 order)
    found = tbs.function_density(Function("p", _poly2), X, eps, order=order,
                                 step=np.array([1e-4, 1e-4]))
    np.testing.assert_allclose(found, expected, rtol=1e-6)


def test_finite_difference_hessian_of_the_2d_polynomial():
    X = np.random.default_rng(1).uniform(-1, 1, size=(10, 2))
    _, hessian = tbs.finite_differences(Function("p", _poly2), X,
                                        np.array([1e-3, 2e-3]), order=2)
    np.testing.assert_allclose(hessian[:, 0, 0], _poly2_derivative(X, (2, 0)),
                               atol=1e-5)
    np.testing.assert_allclose(hessian[:, 0, 1], _poly2_derivative(X, (1, 1)),
                               atol=1e-5)
    np.testing.assert_allclose(hessian[:, 1, 0], hessian[:, 0, 1])
    np.testing.assert_allclose(hessian[:, 1, 1], _poly2_derivative(X, (0, 2)),
                               atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), d=st.integers(1, 4))
def test_df_of_random_quadratics(seed, d):
    # f(x) = x^T A x + b.x: gradient 2 A x + b, Hessian 2 A everywhere;
    # central differences are exact for quadratics up to rounding.
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d))
    A = (A + A.T) / 2
    b = rng.normal(size=d)
    X = rng.uniform(-1, 1, size=(6, d))
    eps = rng.uniform(1e-4, 1e-2, size=d)

    def derivative(k):
        k = np.array(k)
        if k.sum() == 1:
            i = int(np.argmax(k))
            return (2 * X @ A[i] + b[i])[:, None]
        i, j = np.flatnonzero(k) if (k == 1).sum() == 2 else [np.argmax(k)] * 2
        return np.full((len(X), 1), 2 * A[i, j])

    function = Function("q", lambda Z: np.einsum("ni,ij,nj->n", Z, A, Z) + Z @ b)
    found = tbs.function_density(function, X, eps, order=2,
                                 step=np.full(d, 1e-3))
    expected = reference_density(derivative, d, eps, 2)
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-12)


def test_given_derivatives_give_the_same_density():
    X = np.random.default_rng(2).uniform(-1, 1, size=(15, 2))
    eps = np.array([1e-3, 1e-3])
    gradient = np.stack([_poly2_derivative(X, (1, 0)),
                         _poly2_derivative(X, (0, 1))], axis=1)
    hessian = tbs.hessian_from_upper([_poly2_derivative(X, (2, 0)),
                                      _poly2_derivative(X, (1, 1)),
                                      _poly2_derivative(X, (0, 2))], 2)
    expected = reference_density(lambda k: _poly2_derivative(X, k), 2, eps, 2)
    np.testing.assert_allclose(tbs.taylor_density(gradient, hessian, eps, 2),
                               expected, rtol=1e-12)


def test_hessian_from_upper_needs_the_full_triangle():
    with pytest.raises(UsageError, match="3 inputs need 6 columns"):
        tbs.hessian_from_upper([np.zeros((2, 1))] * 5, 3)


# ---------------------------------------------------------------------------
# Boxes and initial designs


def test_parse_bounds_text_and_files(tmp_path):
    low, high, names = tbs.parse_bounds("-1:1, 0:10")
    assert low.tolist() == [-1, 0] and high.tolist() == [1, 10] and names is None

    csv = tmp_path / "box.csv"
    csv.write_text("name,low,high\nu0,0,1\nt,0,10\n")
    low, high, names = tbs.parse_bounds(str(csv))
    assert names == ["u0", "t"] and high.tolist() == [1, 10]

    parquet = tmp_path / "box.parquet"
    pq.write_table(pa.table({"low": [0.5], "high": [2.0]}), parquet)
    assert tbs.parse_bounds(str(parquet))[1].tolist() == [2.0]


@pytest.mark.parametrize("text, message", [
    ("-1:1,0", "'0' is not low:high"),
    ("a:b", "'a:b' is not low:high"),
    ("missing.csv", "no such file"),
])
def test_parse_bounds_errors(text, message):
    with pytest.raises(UsageError, match=message):
        tbs.parse_bounds(text)


def test_make_box_errors():
    with pytest.raises(UsageError, match="dimension 2 has low 3 >= high 1"):
        tbs.make_box([0, 3], [1, 1], ["a", "b"])
    with pytest.raises(UsageError, match="1 names for 2 dimensions"):
        tbs.make_box([0, 0], [1, 1], ["a"])


@pytest.mark.parametrize("design", tbs.DESIGNS)
def test_designs_lie_in_the_box(design):
    box = tbs.make_box([-1, 0], [1, 10], ["a", "b"])
    X = tbs.initial_design(box, 16, design, np.random.default_rng(SEED))
    assert X.shape == (16, 2)
    assert box.contains(X).all()


def test_grid_design_and_its_errors():
    box = tbs.make_box([-1], [1], ["x"])
    X = tbs.initial_design(box, 8, "grid", np.random.default_rng(SEED))
    np.testing.assert_allclose(X[:, 0], np.linspace(-1, 1, 8))
    box2 = tbs.make_box([0, 0], [1, 1], ["a", "b"])
    with pytest.raises(UsageError, match="needs m\\*\\*2 points, e.g. 4, 9"):
        tbs.initial_design(box2, 8, "grid", np.random.default_rng(SEED))


def test_lhs_design_puts_one_point_in_each_stratum():
    box = tbs.make_box([0, 0, 0], [1, 1, 1], list("abc"))
    X = tbs.initial_design(box, 10, "lhs", np.random.default_rng(SEED))
    for column in X.T:
        assert sorted(np.floor(column * 10).astype(int)) == list(range(10))


# ---------------------------------------------------------------------------
# Densities from labels (section 6.1)


def test_variance_density_equals_local_variance_and_brute_force():
    rng = np.random.default_rng(SEED)
    U = rng.random((60, 2))
    y = np.sin(6 * U[:, 0]) + U[:, 1] ** 2
    labels = [io.Labels("label", "regression", y[:, None])]

    found = tbs.variance_density(U, labels, 7)
    neighbours = nearest_neighbours(U, 7, include_self=True,
                                    options=SearchOptions(method="exact"))
    np.testing.assert_allclose(found, local_variance(neighbours.indices, labels))

    distances = ((U[:, None, :] - U[None, :, :]) ** 2).sum(axis=2)
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :7]
    np.testing.assert_allclose(found, y[nearest].var(axis=1, ddof=1), atol=1e-12)



def test_variance_density_of_rows_a_graph_misled_is_made_exact(monkeypatch):
    """As in vbsw weigh (step 7): with step 6 switched off, rows led into
    another cluster keep a density only until the largest are searched
    exactly; single-label clusters: every density 0."""
    import vbsw_cli.neighbors as search

    rng = np.random.default_rng(SEED)
    centres = rng.normal(size=(6, 8)) * 30
    cluster = rng.integers(6, size=3000)
    U = centres[cluster] + rng.normal(size=(3000, 8))
    labels = [io.Labels("label", "classification", cluster, list(range(6)))]
    misled = rng.choice(3000, size=20, replace=False)
    real = search.query_index

    def astray(index, X, n_query, ef, options, progress):
        found = real(index, X, n_query, ef, options, progress)
        if found is not None and len(X) == 3000:
            for row in misled:
                other = np.flatnonzero(cluster != cluster[row])[:n_query - 1]
                found[0][row, 1:] = other
                found[1][row, 1:] = np.linalg.norm(X[other] - X[row], axis=1)
        return found

    monkeypatch.setattr(search, "query_index", astray)
    monkeypatch.setattr(search, "provably_short",
                        lambda indices, distances: np.empty(0, np.int64))
    options = SearchOptions(method="hnsw", sample_size=400, threads=1)
    density = tbs.variance_density(U, labels, 7, options=options)
    np.testing.assert_array_equal(density, 0.0)

# ---------------------------------------------------------------------------
# Sampling


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), d=st.integers(1, 3),
       n_components=st.integers(1, 4))
def test_every_sample_lies_in_the_box(seed, d, n_components):
    rng = np.random.default_rng(seed)
    low = rng.uniform(-5, 5, size=d)
    box = tbs.make_box(low, low + rng.uniform(0.01, 10, size=d),
                       [f"x{i}" for i in range(d)])
    X = tbs.initial_design(box, 30, "uniform", rng)
    # Density highest at the box's edge, so many draws fall outside.
    density = np.exp(8 * box.to_unit(X)[:, 0])
    result = tbs.tbs_sample(X, density, box, n_new=200,
                            n_components=n_components, rng=rng)
    assert result.points.shape == (200, d)
    assert box.contains(result.points).all()
    assert result.acceptance <= 1.0


def test_samples_go_where_the_density_is():
    box = tbs.make_box([-1], [1], ["x"])
    rng = np.random.default_rng(SEED)
    X = tbs.initial_design(box, 64, "grid", rng)
    density = tbs.function_density(Function("runge", runge), X, np.array([1e-3]))
    result = tbs.tbs_sample(X, density, box, n_new=2000, n_components=3,
                            rng=rng)
    # Runge is steepest near |x| = 0.2 and flat at the ends.
    assert (np.abs(result.points) < 0.5).mean() > 0.9


def test_same_generator_state_gives_the_same_points():
    box = tbs.make_box([0, 0], [1, 2], ["a", "b"])

    def draw(seed):
        rng = np.random.default_rng(seed)
        X = tbs.initial_design(box, 25, "sobol", rng)
        return tbs.tbs_sample(X, X[:, 0] ** 2 + 0.1, box, n_new=50,
                              n_components=3, rng=rng).points

    np.testing.assert_array_equal(draw(3), draw(3))
    assert not np.array_equal(draw(3), draw(4))


def test_flat_function_falls_back_to_uniform_sampling():
    box = tbs.make_box([0], [2], ["x"])
    X = np.linspace(0, 2, 8)[:, None]
    density = tbs.function_density(Function("c", lambda Z: np.full(len(Z), 3.0)),
                                   X, np.array([1e-3]))
    assert (density == 0).all()
    result = tbs.tbs_sample(X, density, box, n_new=4000, n_components=3,
                            rng=np.random.default_rng(SEED))
    assert result.fallback == "uniform" and "every density is zero" in result.notes[0]
    assert abs(result.points.mean() - 1.0) < 0.05
    np.testing.assert_allclose(result.mixture_density(X), 0.5)


def test_fewer_distinct_points_than_components_reduces_them():
    box = tbs.make_box([0], [1], ["x"])
    X = np.array([[0.2], [0.2], [0.7], [0.9]])
    density = np.array([1.0, 1.0, 2.0, 0.0])
    result = tbs.tbs_sample(X, density, box, n_new=10, n_components=3,
                            rng=np.random.default_rng(SEED))
    assert result.n_components == 2
    assert "only 2 distinct points" in result.notes[0]


def test_rejection_gives_up_below_the_acceptance_floor():
    far = Mixture(np.array([1.0]), np.array([[40.0, 40.0]]),
                  np.array([np.eye(2) * 0.01]))
    with pytest.raises(DataError, match="acceptance below 0.001"):
        tbs.sample_in_unit_box(far, 10, np.random.default_rng(SEED))


@pytest.mark.parametrize("density, message", [
    ([1.0, np.nan, 1.0], "NaN or infinite"),
    ([1.0, -1.0, 1.0], "negative"),
])
def test_bad_densities_are_refused(density, message):
    box = tbs.make_box([0], [1], ["x"])
    with pytest.raises(DataError, match=message):
        tbs.tbs_sample(np.array([[0.1], [0.5], [0.9]]), density, box, n_new=3,
                       n_components=1, rng=np.random.default_rng(SEED))


# ---------------------------------------------------------------------------
# Command line


def _table(run) -> pa.Table:
    assert run.code == 0, run.stderr
    return pq.read_table(pa.BufferReader(run.stdout))


def _one_line_error(run, code, text):
    assert run.code == code, run.stderr
    assert run.stdout == b""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert text in lines[0], lines[0]


def test_cli_runge_writes_points_labels_and_provenance(tmp_path):
    out = tmp_path / "runge.parquet"
    run = run_vbsw("tbs-sample", "--function", "runge", "--initial", "8",
                   "--design", "grid", "--new", "8", "--components", "3",
                   "--include-initial", "-o", out)
    assert run.code == 0, run.stderr
    assert run.stdout == b""
    assert "wrote" in run.stderr
    table = pq.read_table(out)
    assert table.column_names == ["x", "source", "density", "mixture_density",
                                  "f"]
    sources = table.column("source").to_pylist()
    assert sources.count("initial") == 8 and sources.count("tbs") == 8
    x = table.column("x").to_numpy()
    assert ((x >= -1) & (x <= 1)).all()
    np.testing.assert_allclose(table.column("f").to_numpy(), 1 / (1 + 25 * x**2))
    record = io.read_provenance(out)
    assert record["command"] == "tbs-sample"
    assert record["parameters"]["components_used"] == 3


def test_cli_dev_null_takes_the_output():
    run = run_vbsw("tbs-sample", "--function", "runge", "--initial", "8",
                   "--new", "8", "--components", "3", "-o", os.devnull)
    assert run.code == 0, run.stderr
    assert run.stdout == b""
    assert f"wrote {os.devnull}" in run.stderr
    assert Path(os.devnull).is_char_device()


def test_cli_keyword_options_are_taken_in_any_case():
    args = ("tbs-sample", "--initial", "8", "--new", "8", "--components", "2",
            "-o", "-")
    lower = run_vbsw(*args, "--function", "runge", "--design", "grid",
                     "--reg-covar", "auto")
    mixed = run_vbsw(*args, "--function", "Runge", "--design", "GRID",
                     "--reg-covar", "AUTO")
    assert lower.code == 0, lower.stderr
    assert mixed.code == 0, mixed.stderr
    assert mixed.stdout == lower.stdout


def test_cli_same_seed_same_bytes(tmp_path):
    args = ("tbs-sample", "--function", "bateman", "--initial", "64",
            "--design", "lhs", "--new", "20", "--components", "4",
            "--eps", "5e-4")
    first = run_vbsw(*args, "--seed", "7")
    again = run_vbsw(*args, "--seed", "7")
    other = run_vbsw(*args, "--seed", "8")
    assert first.code == 0, first.stderr
    assert first.stdout == again.stdout
    assert _table(first).column("u0") != _table(other).column("u0")
    table = _table(first)
    assert table.column_names[:3] == ["u0", "eta0", "t"]
    assert table.column_names[-2:] == ["u", "eta"]
    t = table.column("t").to_numpy()
    assert ((t >= 0) & (t <= 10)).all()


def test_cli_variance_density_from_labelled_points(tmp_path):
    rng = np.random.default_rng(SEED)
    X = rng.random((40, 2))
    path = tmp_path / "points.parquet"
    pq.write_table(pa.table({"id": np.arange(40), "a": X[:, 0], "b": X[:, 1],
                             "y": np.tanh(10 * (X[:, 0] - 0.5))}), path)
    run = run_vbsw("tbs-sample", path, "--names", "a,b", "--label", "y",
                   "--bounds", "0:1,0:1", "--k", "5", "--new", "30",
                   "--include-initial")
    table = _table(run)
    assert table.num_rows == 70
    assert table.column("id").to_pylist()[:40] == list(range(40))
    expected = tbs.variance_density(X, [io.Labels("y", "regression",
                                                  np.tanh(10 * (X[:, :1] - 0.5)))],
                                    5)
    np.testing.assert_allclose(table.column("density").to_numpy()[:40], expected)
    # The labels of the initial rows are carried; the new rows await theirs.
    assert table.column("y").to_pylist()[:40] == pytest.approx(
        np.tanh(10 * (X[:, 0] - 0.5)).tolist())
    assert table.column("y").null_count == 30


def test_cli_given_derivative_columns(tmp_path):
    X = np.linspace(-1, 1, 12)[:, None]
    path = tmp_path / "points.parquet"
    pq.write_table(pa.table({"x": X[:, 0], "dx": 2 * X[:, 0],
                             "dxx": np.full(12, 2.0)}), path)
    run = run_vbsw("tbs-sample", path, "--names", "x", "--gradient", "dx",
                   "--hessian", "dxx", "--bounds", "-1:1", "--new", "5",
                   "--include-initial", "--eps", "0.01")
    density = _table(run).column("density").to_numpy()[:12]
    np.testing.assert_allclose(density, 0.01 * (2 * X[:, 0])**2 + 1e-4 * 4 / 2)


def test_cli_user_function_from_the_current_folder(tmp_path):
    (tmp_path / "mysim.py").write_text(
        "import numpy as np\n"
        "def f(X):\n    return np.column_stack([X[:, 0] * X[:, 1], X[:, 0]])\n"
        "def bad(X):\n    return X[:, :1].T\n")
    run = run_vbsw("tbs-sample", "--function", "mysim:f", "--bounds", "0:1,0:2",
                   "--initial", "16", "--new", "4", "--label", "p,q",
                   cwd=tmp_path)
    table = _table(run)
    np.testing.assert_allclose(table.column("p").to_numpy(),
                               table.column("x0").to_numpy()
                               * table.column("x1").to_numpy())
    bad = run_vbsw("tbs-sample", "--function", "mysim:bad", "--bounds",
                   "0:1,0:2", "--initial", "16", "-o", "out.parquet",
                   cwd=tmp_path)
    _one_line_error(bad, 1, "returned shape (1, 144) for input of shape (144, 2)")
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("args, code, text", [
    (["--function", "runge", "--initial", "8", "--bounds", "1:-1"], 2,
     "dimension 1 has low 1 >= high -1"),
    (["--function", "runge", "--initial", "8", "--bounds", "0;1"], 2,
     "is not low:high"),
    (["--function", "nosuch_mod:f", "--initial", "8", "--bounds", "0:1"], 2,
     "no module named 'nosuch_mod'"),
    (["--function", "numpy:nosuch", "--initial", "8", "--bounds", "0:1"], 2,
     "has no attribute 'nosuch'"),
    (["--function", "bateman", "--initial", "10", "--design", "grid"], 2,
     "needs m**3 points"),
    (["--function", "runge", "--initial", "8", "--order", "3"], 2,
     "n = 1 or 2"),
    (["--function", "runge"], 2, "give POINTS or --initial N"),
    (["--initial", "8", "--bounds", "0:1"], 2, "give --function"),
    (["--function", "runge", "--initial", "8", "--eps", "1e-3,1e-3"], 2,
     "give one value or 1"),
    (["--function", "runge", "--initial", "8", "--reg-covar", "-1"], 2,
     "--reg-covar -1"),
    (["--function", "runge", "--initial", "8", "--new", "0"], 2,
     "--new 0: must be at least 1"),
    (["--function", "runge", "--initial", "8", "--k", "0"], 2,
     "--k 0: the unbiased variance needs k >= 2"),
    (["--function", "runge", "--initial", "8", "--names", "a,b"], 2,
     "--names: 2 names, but runge takes 1 input(s)"),
    (["--function", "runge", "--initial", "8", "--names", "a,a"], 2,
     "--names a,a: column 'a' is named twice"),
    (["--function", "runge", "--initial", "8", "--label", "f,f"], 2,
     "--label f,f: column 'f' is named twice"),
    (["--function", "runge", "--initial", "8", "--bounds", "1e-320:2e-320"], 2,
     "--bounds: the box's volume is below float64's range"),
])
def test_cli_usage_and_data_errors(tmp_path, args, code, text):
    run = run_vbsw("tbs-sample", *args, "-o", tmp_path / "out.parquet")
    _one_line_error(run, code, text)
    assert not (tmp_path / "out.parquet").exists()


def test_cli_errors_on_points_files(tmp_path):
    path = tmp_path / "points.parquet"
    pq.write_table(pa.table({"x": [0.1, 0.5, 2.0], "y": [1.0, 2.0, 3.0],
                             "features": vectors(np.zeros((3, 2)))}), path)
    out = tmp_path / "out.parquet"
    outside = run_vbsw("tbs-sample", path, "--names", "x", "--label", "y",
                       "--bounds", "0:1", "--k", "2", "-o", out)
    _one_line_error(outside, 1, "1 points lie outside --bounds (first: row 2")
    misspelt = run_vbsw("tbs-sample", path, "--names", "x", "--label", "yy",
                        "--k", "2", "-o", out)
    _one_line_error(misspelt, 1, "no label column 'yy'; did you mean 'y'?")
    big_k = run_vbsw("tbs-sample", path, "--names", "x", "--label", "y",
                     "--k", "5", "-o", out)
    _one_line_error(big_k, 2, "--k 5 is larger than the 3 rows")
    design = run_vbsw("tbs-sample", path, "--names", "x", "--label", "y",
                      "--k", "2", "--design", "sobol", "-o", out)
    _one_line_error(design, 2, "--design draws the initial points when POINTS")
    unknown = run_vbsw("tbs-sample", path, "--names", "x,x9", "--label", "y",
                       "--k", "2", "-o", out)
    _one_line_error(unknown, 1, "points.parquet: no input column 'x9'; did you "
                    "mean 'x'?")  # the data lacks it, as weigh's columns
    assert unknown.stderr.startswith("vbsw tbs-sample: error: --names: ")
    assert not out.exists()


def test_cli_names_a_bad_input_column_an_input(tmp_path):
    path = tmp_path / "points.parquet"
    pq.write_table(pa.table({"a": [0.1, np.nan, 0.3, 0.5], "b": [1.0, 2, 3, 4],
                             "y": [1.0, 2, 3, 4]}), path)
    run = run_vbsw("tbs-sample", path, "--names", "a,b", "--label", "y",
                   "--new", "5", "-o", tmp_path / "out.parquet")
    _one_line_error(run, 1, "points.parquet: input column 'a' has NaN or "
                    "infinite values in 1 row (first: row 1)")
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("args, option, column", [
    (["--label", "x"], "--label", "x"),
    (["--label", "density"], "--label", "density"),
    (["--label", "source"], "--label", "source"),
    (["--names", "source"], "--names", "source"),
    (["--names", "mixture_density"], "--names", "mixture_density"),
])
def test_cli_refuses_a_column_that_would_hold_two_things(tmp_path, args, option,
                                                         column):
    out = tmp_path / "out.parquet"
    run = run_vbsw("tbs-sample", "--function", "runge", "--initial", "4", "--new",
                   "2", "--include-initial", *args, "-o", out)
    _one_line_error(run, 2, f"{option}: column '{column}' would be both")
    assert not out.exists()


def test_cli_refuses_a_carried_label_named_like_a_written_column(tmp_path):
    path = tmp_path / "points.parquet"
    x = np.linspace(0, 1, 12)
    pq.write_table(pa.table({"id": np.arange(12), "x": x,
                             "density": np.sin(5 * x)}), path)
    out = tmp_path / "out.parquet"
    args = ["tbs-sample", path, "--names", "x", "--label", "density", "--k", "3",
            "--new", "2", "-o", out]

    # The label is written either way (null for the new rows), so it clashes
    # either way.
    for flag in (["--include-initial"], []):
        clash = run_vbsw(*args, *flag)
        _one_line_error(clash, 2, "column 'density' would be both the density "
                        "column")
        assert not out.exists()


def test_cli_npy_points_of_another_width_than_the_function_takes(tmp_path):
    path = tmp_path / "points.npy"
    np.save(path, np.full((6, 2), 0.5))
    out = tmp_path / "out.parquet"

    run = run_vbsw("tbs-sample", path, "--function", "runge", "-o", out)

    _one_line_error(run, 2, "runge takes 1 input(s) (x), but")
    assert "points.npy has 2 columns" in run.stderr and not out.exists()


def test_cli_help_shows_the_example_and_the_bateman_domain():
    run = run_vbsw("tbs-sample", "--help")
    assert run.code == 0
    text = " ".join(run.stdout.decode().split())  # undo the help's wrapping
    assert "vbsw tbs-sample --function runge --initial 8" in text
    assert "[0,1] x [0,1] x [0,10]" in text


@pytest.mark.parametrize("where", ["missing folder", "fifo"])
def test_cli_an_output_that_cannot_be_written_is_refused_first(tmp_path, where):
    """Before the function is evaluated (a simulation can take hours), not
    at the write."""
    (tmp_path / "sim.py").write_text(
        "import pathlib\n"
        "def f(X):\n    pathlib.Path('called').touch()\n    return X[:, 0]\n")
    target = tmp_path / "nowhere" / "out.parquet"
    if where == "fifo":
        target = tmp_path / "pipe.parquet"
        os.mkfifo(target)
    run = run_vbsw("tbs-sample", "--function", "sim:f", "--bounds", "0:1",
                   "--initial", "8", "--new", "4", "-o", target, cwd=tmp_path)
    assert run.code in (1, 2)
    assert len(run.stderr.strip().splitlines()) == 1
    assert str(target) in run.stderr
    assert not (tmp_path / "called").exists()
    assert where != "fifo" or target.is_fifo()


def test_points_without_width_in_a_column_ask_for_bounds(tmp_path, rng):
    points = tmp_path / "p.parquet"
    pq.write_table(pa.table({"x0": rng.normal(size=30), "x1": np.ones(30),
                             "label": rng.normal(size=30)}), points)
    run = run_vbsw("tbs-sample", points, "--names", "x0,x1", "--k", "5", "--new",
                   "10", "-o", tmp_path / "n.parquet")
    assert run.code == 1
    assert run.stderr.strip() == (f"vbsw tbs-sample: error: {points}: every point "
                                  "has x1 = 1, so their bounding box has no "
                                  "width there; give the box with --bounds")
    assert not (tmp_path / "n.parquet").exists()


def test_cli_notes_a_finite_difference_step_wide_against_the_box(tmp_path):
    args = ["tbs-sample", "--function", "runge", "--initial", "6", "--new", "2",
            "-o", tmp_path / "out.parquet"]

    narrow = run_vbsw(*args, "--bounds", "0:1e-5")
    wide_step = run_vbsw(*args, "--bounds", "0:1", "--step", "0.2")
    fine = run_vbsw(*args, "--bounds", "0:1")

    assert narrow.code == wide_step.code == fine.code == 0
    assert "note: the step (--eps, as --step is not given) 0.001 is over a " \
           "tenth of the box's width in x (1e-05)" in narrow.stderr
    assert "note: --step 0.2 is over a tenth" in wide_step.stderr
    assert "note:" not in fine.stderr
    huge = run_vbsw(*args, "--bounds", "-1e300:1e300")
    assert "0.001 is below float64's resolution at 1e+300 in x" in huge.stderr


def test_cli_extreme_scales_end_in_one_line_without_warnings(tmp_path):
    (tmp_path / "lin.py").write_text("def f(X):\n    return X[:, 0]\n")
    path = tmp_path / "points.parquet"
    x = np.linspace(0, 1, 20)
    pq.write_table(pa.table({"x": x, "y": np.sin(5 * x) * 1e200}), path)
    out = tmp_path / "out.parquet"

    underflow = run_vbsw("tbs-sample", "--function", "lin:f", "--bounds",
                         "0:1e-300", "--eps", "1e-303", "--initial", "5", "-o",
                         out, cwd=tmp_path)
    overflow = run_vbsw("tbs-sample", path, "--names", "x", "--label", "y",
                        "--k", "5", "-o", out)
    huge_box = run_vbsw("tbs-sample", "--function", "runge", "--bounds",
                        "-1.7e308:1.7e308", "--initial", "5", "-o", out)

    for run in (underflow, overflow):
        _one_line_error(run, 1, "the density has NaN or infinite values")
        assert "Warning" not in run.stderr
    _one_line_error(huge_box, 2, "dimension 1 spans more than the largest float")
    assert not out.exists()


def test_cli_never_overwrites_its_bounds_file(tmp_path):
    bounds = tmp_path / "bounds.parquet"
    pq.write_table(pa.table({"low": [-1.0], "high": [1.0]}), bounds)
    before = bounds.read_bytes()

    for out in (bounds, tmp_path / "." / "bounds.parquet"):
        run = run_vbsw("tbs-sample", "--function", "runge", "--initial", "8",
                       "--bounds", bounds, "-o", out)
        _one_line_error(run, 2, "refusing to overwrite the input file")

    assert bounds.read_bytes() == before


# ---------------------------------------------------------------------------
# A user trial's findings: roles of columns, options that do not apply, and
# the columns written for the new rows

MOON = Path(__file__).resolve().parent.parent / "sample_data" / "double_moon.parquet"


def _gradient_points(tmp_path) -> Path:
    """f(x0, x1) = x0^2 + x1 on [0, 1]^2, its gradient and labels."""
    x = np.random.default_rng(SEED).random((30, 2))
    path = tmp_path / "grad.parquet"
    pq.write_table(pa.table({"id": np.arange(30), "x0": x[:, 0], "x1": x[:, 1],
                             "gx": 2 * x[:, 0], "gy": np.ones(30),
                             "label": x[:, 0]**2 + x[:, 1]}), path)
    return path


@pytest.mark.parametrize("args, options", [
    (["--label", "label"], "--names and --label"),
    ([], "--names and --label (default label)"),
])
def test_cli_refuses_an_input_that_is_also_the_label(tmp_path, args, options):
    out = tmp_path / "out.parquet"
    run = run_vbsw("tbs-sample", MOON, "--names", "x0,x1,label", *args,
                   "--new", "10", "-o", out)
    _one_line_error(run, 2, f"{options}: column 'label' of {MOON} cannot be "
                    "both an input and a label")
    assert not out.exists()


def test_cli_refuses_the_id_as_a_label(tmp_path):
    out = tmp_path / "out.parquet"
    run = run_vbsw("tbs-sample", MOON, "--names", "x0,x1", "--label", "id",
                   "--new", "10", "-o", out)
    _one_line_error(run, 2, "--label id: 'id' is the rows' id, carried to the "
                    "output as such, not a label")
    assert not out.exists()


def test_cli_refuses_an_input_that_is_also_a_derivative(tmp_path):
    path = _gradient_points(tmp_path)
    run = run_vbsw("tbs-sample", path, "--names", "x0,x1", "--gradient",
                   "gx,x1", "--order", "1", "-o", tmp_path / "out.parquet")
    _one_line_error(run, 2, "--names and --gradient: column 'x1' of")
    assert "cannot be both an input and a derivative" in run.stderr


def test_cli_one_gradient_column_for_two_inputs_is_said_first(tmp_path):
    path = _gradient_points(tmp_path)
    run = run_vbsw("tbs-sample", path, "--names", "x0,x1", "--gradient", "gx",
                   "-o", tmp_path / "out.parquet")
    _one_line_error(run, 2, "--gradient: 2 inputs need 2 columns, not 1")
    no_hessian = run_vbsw("tbs-sample", path, "--names", "x0,x1", "--gradient",
                          "gx,gy", "-o", tmp_path / "out.parquet")
    _one_line_error(no_hessian, 2, "--order 2 with --gradient needs --hessian")


@pytest.mark.parametrize("source, option, value, text", [
    ("function", "--k", "5", "--k 5 applies to the local label variance"),
    ("gradient", "--k", "5", "--k 5 applies to the local label variance"),
    ("gradient", "--step", "0.01", "--step 0.01 applies to the finite "
     "differences of --function"),
    ("variance", "--order", "1", "--order 1 applies to Df_eps^n"),
    ("variance", "--eps", "0.01", "--eps 0.01 applies to Df_eps^n"),
    ("variance", "--step", "0.01", "--step 0.01 applies to the finite"),
])
def test_cli_refuses_an_option_that_does_not_apply(tmp_path, source, option,
                                                   value, text):
    out = tmp_path / "out.parquet"
    args = {"function": ["--function", "runge", "--initial", "8"],
            "gradient": [_gradient_points(tmp_path), "--names", "x0,x1",
                         "--gradient", "gx,gy", "--order", "1"],
            "variance": [MOON, "--names", "x0,x1", "--label", "label"]}[source]
    run = run_vbsw("tbs-sample", *args, option, value, "--new", "5", "-o", out)
    _one_line_error(run, 2, text)
    assert "; drop " + option in run.stderr
    assert not out.exists()


def test_cli_a_misspelt_label_beside_gradient_is_refused(tmp_path):
    path = _gradient_points(tmp_path)
    run = run_vbsw("tbs-sample", path, "--names", "x0,x1", "--gradient",
                   "gx,gy", "--order", "1", "--label", "lable", "-o",
                   tmp_path / "out.parquet")
    _one_line_error(run, 1, "no label column 'lable'; did you mean 'label'?")


@pytest.mark.parametrize("include_initial", [False, True])
def test_cli_new_rows_keep_the_label_and_id_columns_to_fill_in(include_initial):
    flag = ["--include-initial"] if include_initial else []
    run = run_vbsw("tbs-sample", MOON, "--names", "x0,x1", "--label", "label",
                   "--new", "20", *flag)
    table = _table(run)
    points = pq.read_table(MOON)
    assert table.column_names == ["id", "x0", "x1", "source", "density",
                                  "mixture_density", "label"]
    assert table.schema.field("label").type == points.schema.field("label").type
    assert table.schema.field("id").type == points.schema.field("id").type
    new = table.filter(pa.compute.equal(table.column("source"), "tbs"))
    assert new.num_rows == 20
    assert new.column("label").null_count == new.column("id").null_count == 20
    # filled in, the new rows go under POINTS
    filled = new.select(["id", "x0", "x1", "label"])
    assert pa.concat_tables([points, filled.cast(points.schema)]).num_rows \
        == points.num_rows + 20


def test_cli_gradient_points_carry_their_labels_for_the_new_rows(tmp_path):
    path = _gradient_points(tmp_path)
    run = run_vbsw("tbs-sample", path, "--names", "x0,x1", "--gradient",
                   "gx,gy", "--order", "1", "--new", "5")
    table = _table(run)
    assert table.column_names[0] == "id" and table.column_names[-1] == "label"
    assert table.column("label").null_count == 5
