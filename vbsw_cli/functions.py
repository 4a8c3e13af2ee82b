"""Functions whose derivatives drive Taylor based sampling.

A function takes an ndarray of shape (n_samples, n_inputs) and returns one of
shape (n_samples,) or (n_samples, n_outputs). Three are built in, each with
its domain; any other is imported from ``package.module:name`` (or
``path/to/file.py:name``).

Built-ins:

* ``runge``: f(x) = 1 / (1 + 25 x^2) on [-1, 1] (paper section 2.3.1);
* ``tanh``: f(x) = tanh(x) on [-3, 3], a domain holding both flat tails and the
  steep middle (the paper does not state its domain);
* ``bateman``: the Bateman system of section 2.3.2 with M = 1,
  du/dt = v s_a eta u, deta/dt = v s_r eta u, s_a = s_r = -0.45, v = 1,
  inputs (u0, eta0, t) on [0, 1] x [0, 1] x [0, 10], outputs (u(t), eta(t)).

Closed form of the Bateman system. With s_a = s_r = s and a = v s,
d(u - eta)/dt = 0, so c = u0 - eta0 is conserved and eta' = a eta (eta + c).
This is a Bernoulli equation: 1/eta satisfies a linear one, which gives

    eta(t) = eta0 / (1 - a t u0 E(-a c t)),
    u(t)   = u0   / (1 - a t eta0 E(a c t)),      E(z) = (e^z - 1) / z,

with E(0) = 1 (scipy's ``exprel``), so c = 0 needs no special case. For a < 0,
t >= 0 and u0, eta0 >= 0 both denominators are at least 1: no cancellation.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from vbsw_cli.errors import DataError, UsageError

SIGMA = -0.45   # sigma_a = sigma_r in the paper's M = 1 case
SPEED = 1.0     # v


@dataclass
class Function:
    """A vectorised function and what is known about it.

    bounds : ndarray of shape (n_inputs, 2) with (low, high) rows, or None.
    """

    name: str
    call: Callable[[np.ndarray], np.ndarray]
    bounds: np.ndarray | None = None
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)


def runge(X: np.ndarray) -> np.ndarray:
    """1 / (1 + 25 x^2); X of shape (n, 1), returns shape (n,)."""
    x = np.asarray(X, dtype=np.float64)[:, 0]
    return 1.0 / (1.0 + 25.0 * x**2)


def tanh(X: np.ndarray) -> np.ndarray:
    """tanh(x); X of shape (n, 1), returns shape (n,)."""
    return np.tanh(np.asarray(X, dtype=np.float64)[:, 0])


def bateman(X: np.ndarray, sigma: float = SIGMA, speed: float = SPEED
            ) -> np.ndarray:
    """(u(t), eta(t)) of the M = 1 Bateman system, shape (n, 2).

    X : ndarray of shape (n, 3), columns u0, eta0, t.
    """
    X = np.asarray(X, dtype=np.float64)
    u0, eta0, t = X[:, 0], X[:, 1], X[:, 2]
    a = speed * sigma
    c = u0 - eta0
    from scipy.special import exprel  # imported here: scipy costs every start

    eta = eta0 / (1.0 - a * t * u0 * exprel(-a * c * t))
    u = u0 / (1.0 - a * t * eta0 * exprel(a * c * t))
    return np.column_stack([u, eta])


BUILT_INS = {
    "runge": Function("runge", runge, np.array([[-1.0, 1.0]]), ["x"], ["f"]),
    "tanh": Function("tanh", tanh, np.array([[-3.0, 3.0]]), ["x"], ["f"]),
    "bateman": Function("bateman", bateman,
                        np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 10.0]]),
                        ["u0", "eta0", "t"], ["u", "eta"]),
}


def load_function(spec: str) -> Function:
    """A built-in by name, or ``module:attribute`` imported from the path.

    The current folder is searched first, so ``--function mysim:run`` finds
    ``./mysim.py``. Errors name the option and what is missing (exit 2).
    """
    if spec in BUILT_INS:
        return BUILT_INS[spec]
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"--function {spec}: give a built-in ("
                         + ", ".join(BUILT_INS) + ") or package.module:name")
    module = _import(module_name, spec)
    call = getattr(module, attribute, None)
    if call is None:
        raise UsageError(f"--function {spec}: module '{module_name}' has no "
                         f"attribute '{attribute}'")
    if not callable(call):
        raise UsageError(f"--function {spec}: '{attribute}' is a "
                         f"{type(call).__name__}, not a function")
    return Function(spec, call)


def _import(module_name: str, spec: str):
    try:
        if module_name.endswith(".py"):
            return _import_file(module_name, spec)
        sys.path.insert(0, os.getcwd())
        try:
            return importlib.import_module(module_name)
        finally:
            sys.path.remove(os.getcwd())
    except ModuleNotFoundError as error:
        raise UsageError(f"--function {spec}: no module named '{error.name}'")
    except UsageError:
        raise
    except Exception as error:  # the user's module failed while importing
        raise UsageError(f"--function {spec}: importing '{module_name}' failed: "
                         f"{type(error).__name__}: {error}")


def _import_file(path: str, spec: str):
    if not os.path.isfile(path):
        raise UsageError(f"--function {spec}: no such file {path}")
    name = "vbsw_user_" + os.path.splitext(os.path.basename(path))[0]
    loader = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


STENCIL_NOTE = (" (finite differences evaluate it up to --step outside the "
                "box)")


def evaluate(function: Function, X: np.ndarray, *, stencil: bool = False
             ) -> np.ndarray:
    """Call the function and check what comes back.

    X : ndarray of shape (n_samples, n_inputs).
    stencil : X holds finite-difference points, up to --step outside the box
        (said in the messages of a failure).
    Returns an ndarray of shape (n_samples, n_outputs), float64. A wrong shape,
    non-numeric or non-finite values, or an exception raise ``DataError``.
    """
    try:
        raw = function.call(X)
    except SystemExit as error:  # a simulator wrapper that exits
        raise DataError(f"function {function.name} called sys.exit({error.code}) "
                        f"on an array of shape {X.shape}")
    except Exception as error:
        raise DataError(f"function {function.name} failed on an array of shape "
                        f"{X.shape}: {type(error).__name__}: {error}"
                        + (STENCIL_NOTE if stencil else ""))
    try:
        values = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        kind = getattr(raw, "dtype", None)
        what = f"{type(raw).__name__} of {kind}" if kind is not None \
            else type(raw).__name__
        raise DataError(f"function {function.name} returned {what}, expected "
                        "an array of numbers")
    if values.ndim == 1 and len(values) == len(X):
        values = values[:, None]
    if values.ndim != 2 or len(values) != len(X):
        raise DataError(f"function {function.name} returned shape "
                        f"{values.shape} for input of shape {X.shape}; expected "
                        f"({len(X)},) or ({len(X)}, n_outputs)")
    if not np.isfinite(values).all():
        bad = int(np.argmax(~np.isfinite(values).all(axis=1)))
        raise DataError(f"function {function.name} returned NaN or infinite "
                        f"values (first at input {X[bad].tolist()})"
                        + (STENCIL_NOTE if stencil else ""))
    return values
