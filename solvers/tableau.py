"""Butcher tableaux as validated data.

A method is a :class:`ButcherTableau`, not a subclass. Every tableau carries its dense output
as a polynomial per stage: the state at ``t + theta * dt`` is
``y + dt * sum_i w_i(theta) k_i`` with ``w_i(theta) = sum_k dense[i, k] * theta**(k+1)``.

Adaptive tableaux are stored in first-same-as-last (FSAL) form: their last stage evaluates
the vector field at the new state, so it doubles as the next step's first stage and as the
end-point slope of the interpolant.

References:
    Hairer, Norsett, Wanner, "Solving Ordinary Differential Equations I", 2nd ed., 1993,
    sections II.1-II.6 (tableaux, embedded pairs, dense output, Hermite interpolation).
    Dormand, Prince, "A family of embedded Runge-Kutta formulae", J. Comput. Appl. Math. 1980.
    Bogacki, Shampine, "A 3(2) pair of Runge-Kutta formulas", Appl. Math. Lett. 1989.
    Tsitouras, "Runge-Kutta pairs of order 5(4) satisfying only the first column
    simplifying assumption", Comput. Math. Appl. 2011.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction as Fr

import numpy as np

from solvers.errors import SolverInputError


@dataclass(frozen=True, eq=False)  # identity hash: tableaux key the coefficient cache
class ButcherTableau:
    """An explicit Runge-Kutta method.

    Attributes:
        name: method name used by ``odeint(method=...)``.
        c: nodes, shape (S,).
        a: strictly lower-triangular coupling matrix, shape (S, S).
        b: weights of the propagated solution, shape (S,).
        order: order of the propagated solution.
        b_err: ``b - b_hat`` (the embedded error estimator), shape (S,); None for fixed step.
        err_order: exponent order used by the step-size controller (adaptive only).
        dense: dense-output polynomial coefficients, shape (S, degree); row i gives w_i.
        fsal: the last stage is f(t + dt, y_new).
    """

    name: str
    c: np.ndarray
    a: np.ndarray
    b: np.ndarray
    order: int
    b_err: np.ndarray | None = None
    err_order: int = 0
    dense: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    fsal: bool = False

    def __post_init__(self) -> None:
        s = len(self.c)
        if self.a.shape != (s, s) or self.b.shape != (s,):
            raise SolverInputError(f"tableau {self.name}: a must be ({s},{s}) and b ({s},)")
        if np.any(np.triu(self.a) != 0):
            raise SolverInputError(f"tableau {self.name}: only explicit methods are supported")
        if not np.allclose(self.a.sum(axis=1), self.c, atol=1e-12):
            raise SolverInputError(f"tableau {self.name}: row sums of a must equal c")
        if not np.isclose(self.b.sum(), 1.0, atol=1e-12):
            raise SolverInputError(f"tableau {self.name}: weights b must sum to 1")
        if self.b_err is not None and not np.isclose(self.b_err.sum(), 0.0, atol=1e-12):
            raise SolverInputError(f"tableau {self.name}: error weights must sum to 0")
        if self.fsal and not (self.c[-1] == 1.0 and np.allclose(self.a[-1], self.b)):
            raise SolverInputError(f"tableau {self.name}: FSAL needs a[-1] == b and c[-1] == 1")
        if self.dense.shape[0] != s or not np.allclose(self.dense.sum(axis=1), self.b):
            raise SolverInputError(f"tableau {self.name}: dense output must reach b at theta=1")

    @property
    def adaptive(self) -> bool:
        """Whether the method has an embedded error estimator."""
        return self.b_err is not None

    @property
    def stages(self) -> int:
        """Number of stages S (including the FSAL stage)."""
        return len(self.c)

    def dense_weights(self, theta: float) -> np.ndarray:
        """Stage weights w(theta), shape (S,), of the dense output at ``t + theta*dt``."""
        powers = theta ** np.arange(1, self.dense.shape[1] + 1)
        return self.dense @ powers


def _arr(rows: list) -> np.ndarray:
    return np.array([[float(v) for v in r] for r in rows]) if rows and isinstance(
        rows[0], list) else np.array([float(v) for v in rows])


def _lower(rows: list[list], s: int) -> np.ndarray:
    """Pad the ragged rows of the a matrix (row i has i entries) to an (S, S) array."""
    a = np.zeros((s, s))
    for i, row in enumerate(rows):
        a[i + 1, : len(row)] = [float(v) for v in row]
    return a


def _poly(coeffs_low_to_high: list[float]) -> np.ndarray:
    """Return polynomial coefficients theta^1..theta^deg (constant term must vanish)."""
    assert abs(coeffs_low_to_high[0]) < 1e-14
    return np.asarray(coeffs_low_to_high[1:], dtype=float)


def _hermite_dense(b: np.ndarray) -> np.ndarray:
    """Cubic Hermite dense output through y0, y1, f0 = k_1 and f1 = k_S (FSAL methods).

    y(theta) = y0 + h01(theta) (y1 - y0) + dt h10(theta) f0 + dt h11(theta) f1, written as
    stage weights. Third-order accurate (Hairer-Norsett-Wanner II.6).
    """
    s = len(b)
    dense = np.zeros((s, 3))
    dense += np.outer(b, [0.0, 3.0, -2.0])  # h01 = 3 th^2 - 2 th^3
    dense[0] += [1.0, -2.0, 1.0]  # h10 = th - 2 th^2 + th^3
    dense[-1] += [0.0, -1.0, 1.0]  # h11 = th^3 - th^2
    return dense


def _fixed(name: str, c: list, a_rows: list[list], b: list, order: int) -> ButcherTableau:
    s = len(c)
    b_arr = _arr(b)
    return ButcherTableau(
        name=name, c=_arr(c), a=_lower(a_rows, s), b=b_arr, order=order,
        dense=np.outer(b_arr, [1.0]),  # replaced by Hermite interpolation in the engine
    )


def _fsal(name: str, c: list, a_rows: list[list], b: list, b_hat: list, order: int,
          err_order: int, dense: np.ndarray | None = None) -> ButcherTableau:
    """An adaptive FSAL tableau; a_rows excludes the FSAL row, which is b."""
    s = len(c)
    b_arr, b_hat_arr = _arr(b), _arr(b_hat)
    return ButcherTableau(
        name=name, c=_arr(c), a=_lower([*a_rows, b[:-1]], s), b=b_arr, order=order,
        b_err=b_arr - b_hat_arr, err_order=err_order,
        dense=_hermite_dense(b_arr) if dense is None else dense, fsal=True,
    )


# ---- fixed-step methods -------------------------------------------------------------------

EULER = _fixed("euler", [0], [], [1], order=1)
MIDPOINT = _fixed("midpoint", [0, Fr(1, 2)], [[Fr(1, 2)]], [0, 1], order=2)
RK4 = _fixed(
    "rk4", [0, Fr(1, 2), Fr(1, 2), 1],
    [[Fr(1, 2)], [0, Fr(1, 2)], [0, 0, 1]],
    [Fr(1, 6), Fr(1, 3), Fr(1, 3), Fr(1, 6)], order=4,
)
RK38 = _fixed(  # Kutta's 3/8 rule: torchdiffeq's "rk4"
    "rk38", [0, Fr(1, 3), Fr(2, 3), 1],
    [[Fr(1, 3)], [Fr(-1, 3), 1], [1, -1, 1]],
    [Fr(1, 8), Fr(3, 8), Fr(3, 8), Fr(1, 8)], order=4,
)

# ---- adaptive methods ---------------------------------------------------------------------

ADAPTIVE_HEUN = _fsal(
    "adaptive_heun", [0, 1, 1], [[1]], [Fr(1, 2), Fr(1, 2), 0], [1, 0, 0],
    order=2, err_order=2,
)
BOSH3 = _fsal(
    "bosh3", [0, Fr(1, 2), Fr(3, 4), 1],
    [[Fr(1, 2)], [0, Fr(3, 4)]],
    [Fr(2, 9), Fr(1, 3), Fr(4, 9), 0], [Fr(7, 24), Fr(1, 4), Fr(1, 3), Fr(1, 8)],
    order=3, err_order=3,
)

_DP_B = [Fr(35, 384), 0, Fr(500, 1113), Fr(125, 192), Fr(-2187, 6784), Fr(11, 84), 0]


def _dopri5_dense() -> np.ndarray:
    """Hairer's fourth-order continuous extension of Dormand-Prince 5(4), as stage weights.

    y(theta) = y0 + theta (r2 + (1-theta) (r3 + theta (r4 + (1-theta) r5))) with
    r2 = dt sum b_i k_i, r3 = dt k_1 - r2, r4 = r2 - dt k_7 - r3, r5 = dt sum d_i k_i
    (Hairer-Norsett-Wanner II.6; the d_i are Shampine's).
    """
    b = _arr(_DP_B)
    d = _arr([Fr(-12715105075, 11282082432), 0, Fr(87487479700, 32700410799),
              Fr(-10690763975, 1880347072), Fr(701980252875, 199316789632),
              Fr(-1453857185, 822651844), Fr(69997945, 29380423)])
    e1, e7 = np.eye(7)[0], np.eye(7)[6]
    r2, r5 = b, d
    r3 = e1 - r2
    r4 = r2 - e7 - r3
    P = np.polynomial.polynomial
    th, one_m = [0.0, 1.0], [1.0, -1.0]
    basis = [th, P.polymul(th, one_m), P.polymul(P.polymul(th, th), one_m),
             P.polymul(P.polymul(th, th), P.polymul(one_m, one_m))]
    dense = np.zeros((7, 4))
    for r, poly in zip((r2, r3, r4, r5), basis):
        coeffs = np.asarray(poly, dtype=float)
        dense += np.outer(r, np.pad(_poly(list(coeffs)), (0, 4 - (len(coeffs) - 1))))
    return dense


DOPRI5 = _fsal(
    "dopri5", [0, Fr(1, 5), Fr(3, 10), Fr(4, 5), Fr(8, 9), 1, 1],
    [[Fr(1, 5)], [Fr(3, 40), Fr(9, 40)], [Fr(44, 45), Fr(-56, 15), Fr(32, 9)],
     [Fr(19372, 6561), Fr(-25360, 2187), Fr(64448, 6561), Fr(-212, 729)],
     [Fr(9017, 3168), Fr(-355, 33), Fr(46732, 5247), Fr(49, 176), Fr(-5103, 18656)]],
    _DP_B,
    [Fr(5179, 57600), 0, Fr(7571, 16695), Fr(393, 640), Fr(-92097, 339200), Fr(187, 2100),
     Fr(1, 40)],
    order=5, err_order=5, dense=_dopri5_dense(),
)

_TS_C = [0, 0.161, 0.327, 0.9, 0.9800255409045097, 1, 1]
_TS_B = [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742,
         -3.290069515436081, 2.324710524099774, 0]
_TS_BERR = [0.001780011052226, 0.000816434459657, -0.007880878010262, 0.144711007173263,
            -0.582357165452555, 0.458082105929187, -1 / 66]


def _tsit5_dense() -> np.ndarray:
    """Tsitouras' fourth-order dense output polynomials b_i(theta) (Tsitouras 2011, table 2)."""
    P = np.polynomial.polynomial
    th2 = [0.0, 0.0, 1.0]

    def roots(scale: float, *rs: float) -> np.ndarray:
        poly = np.array([scale])
        for r in rs:
            poly = P.polymul(poly, [-r, 1.0])
        return poly

    polys = [
        P.polymul(P.polymul([0.0, -1.0530884977290216], [-1.3299890189751412, 1.0]),
                  [0.7139816917074209, -1.4364028541716351, 1.0]),
        P.polymul([0.0, 0.0, 0.1017], [1.2949852507374631, -2.1966568338249754, 1.0]),
        P.polymul([0.0, 0.0, 2.490627285651252793],
                  [1.57803468208092486, -2.38535645472061657, 1.0]),
        P.polymul(th2, roots(-16.54810288924490272, 1.21712927295533244, 0.61620406037800089)),
        P.polymul(th2, roots(47.37952196281928122, 1.203071208372362603, 0.658047292653547382)),
        P.polymul(th2, roots(-34.87065786149660974, 1.2, 0.666666666666666667)),
        P.polymul(th2, roots(2.5, 1.0, 0.6)),
    ]
    return np.stack([np.pad(_poly(list(p)), (0, 4 - (len(p) - 1))) for p in polys])


def _tsit5() -> ButcherTableau:
    s = 7
    a = _lower([
        [0.161],
        [-0.008480655492356989, 0.335480655492357],
        [2.897153057105493, -6.359448489975075, 4.3622954328695815],
        [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525],
        [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
         -0.028269050394068383],
        _TS_B[:-1],
    ], s)
    b = np.array(_TS_B)
    b[-2] += 1.0 - b.sum()  # published weights are rounded to 16 digits: make sums exact
    a[-1, :-1] = b[:-1]
    c = a.sum(axis=1)
    assert np.allclose(c, _TS_C, atol=1e-14)
    c[-1] = 1.0
    b_err = np.array(_TS_BERR)
    b_err[-2] -= b_err.sum()
    dense = _tsit5_dense()
    dense[:, -1] += b - dense.sum(axis=1)  # absorb rounding so w(1) == b exactly
    return ButcherTableau("tsit5", c=c, a=a, b=b, order=5, b_err=b_err, err_order=5,
                          dense=dense, fsal=True)


TSIT5 = _tsit5()

METHODS: dict[str, ButcherTableau] = {
    t.name: t for t in (EULER, MIDPOINT, RK4, RK38, ADAPTIVE_HEUN, BOSH3, DOPRI5, TSIT5)
}


def get_tableau(method: str) -> ButcherTableau:
    """Look up a method by name.

    Raises:
        SolverInputError: for an unknown name; the message lists the valid ones.
    """
    try:
        return METHODS[method]
    except KeyError:
        raise SolverInputError(
            f"unknown method {method!r}; choose one of {sorted(METHODS)}") from None
