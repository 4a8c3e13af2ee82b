"""Built-in functions, the Bateman closed form, and loading user functions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from vbsw_cli.errors import DataError, UsageError
from vbsw_cli.functions import (BUILT_INS, Function, bateman, evaluate,
                                load_function)


def _ode(_, y, sigma=-0.45, speed=1.0):
    u, eta = y
    return [speed * sigma * eta * u, speed * sigma * eta * u]


@pytest.mark.parametrize("u0, eta0", [(0.3, 0.7), (0.9, 0.1), (0.5, 0.5),
                                      (0.0, 0.4), (0.6, 0.0), (1.0, 1.0),
                                      (0.5, 0.5 + 1e-9)])
def test_bateman_closed_form_matches_solve_ivp(u0, eta0):
    times = np.linspace(0, 10, 11)
    solution = solve_ivp(_ode, (0, 10), [u0, eta0], t_eval=times, rtol=1e-11,
                         atol=1e-13, method="DOP853")
    X = np.column_stack([np.full_like(times, u0), np.full_like(times, eta0),
                         times])
    np.testing.assert_allclose(bateman(X), solution.y.T, atol=1e-9)


def test_bateman_general_sigma_matches_solve_ivp():
    times = np.array([0.0, 1.0, 4.0])
    solution = solve_ivp(lambda t, y: _ode(t, y, sigma=-1.2, speed=2.0), (0, 4),
                         [0.8, 0.3], t_eval=times, rtol=1e-11, atol=1e-13)
    X = np.column_stack([np.full(3, 0.8), np.full(3, 0.3), times])
    np.testing.assert_allclose(bateman(X, sigma=-1.2, speed=2.0), solution.y.T,
                               atol=1e-9)


def test_built_in_values_and_domains():
    x = np.array([[-1.0], [0.0], [0.2]])
    np.testing.assert_allclose(evaluate(BUILT_INS["runge"], x)[:, 0],
                               [1 / 26, 1.0, 0.5])
    np.testing.assert_allclose(evaluate(BUILT_INS["tanh"], x)[:, 0], np.tanh(x[:, 0]))
    assert BUILT_INS["runge"].bounds.tolist() == [[-1.0, 1.0]]
    assert BUILT_INS["bateman"].input_names == ["u0", "eta0", "t"]
    assert BUILT_INS["bateman"].output_names == ["u", "eta"]


def test_load_from_a_module_in_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "mysim_tbs.py").write_text(
        "import numpy as np\ndef f(X):\n    return X.sum(axis=1)\n")
    monkeypatch.chdir(tmp_path)
    function = load_function("mysim_tbs:f")
    np.testing.assert_allclose(evaluate(function, np.ones((3, 2)))[:, 0], 2.0)


def test_load_from_a_file(tmp_path):
    path = tmp_path / "sim.py"
    path.write_text("def g(X):\n    return X * 2\n")
    function = load_function(f"{path}:g")
    assert evaluate(function, np.ones((4, 3))).shape == (4, 3)


@pytest.mark.parametrize("spec, message", [
    ("nosuchmodule_tbs:f", "no module named 'nosuchmodule_tbs'"),
    ("numpy:nosuchname", "has no attribute 'nosuchname'"),
    ("numpy:pi", "is a float, not a function"),
    ("sine", "give a built-in"),
    ("/no/such/file.py:f", "no such file"),
])
def test_load_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        load_function(spec)


@pytest.mark.parametrize("call, message", [
    (lambda X: X[:2, 0], r"returned shape \(2,\) for input of shape \(5, 1\)"),
    (lambda X: np.ones((5, 2, 2)), r"returned shape \(5, 2, 2\)"),
    (lambda X: np.full(len(X), np.nan), "NaN or infinite"),
    (lambda X: 1 / 0, "failed on an array of shape .5, 1.: ZeroDivisionError: "
     "division by zero$"),
    (lambda X: ["a"] * 5, "returned list, expected an array of numbers"),
    (lambda X: np.full(len(X), "a"), "returned ndarray of <U1, expected"),
])
def test_evaluate_errors(call, message):
    with pytest.raises(DataError, match=message):
        evaluate(Function("bad", call), np.zeros((5, 1)))


@pytest.mark.parametrize("call", [lambda X: 1 / 0,
                                  lambda X: np.full(len(X), np.nan)])
def test_only_finite_differences_are_said_to_reach_past_the_box(call):
    """The note on --step belongs to the stencil's points, not to points
    drawn inside the box."""
    note = r"\(finite differences evaluate it up to --step outside the box\)$"
    with pytest.raises(DataError, match=note):
        evaluate(Function("bad", call), np.zeros((5, 1)), stencil=True)
    with pytest.raises(DataError) as raised:
        evaluate(Function("bad", call), np.zeros((5, 1)))
    assert "--step" not in str(raised.value)
