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
    Prince, Dormand, "High order embedded Runge-Kutta formulae", J. Comput. Appl. Math. 7,
    1981 (RK8(7)13M, our ``dopri8``).
    Fehlberg, "Low-order classical Runge-Kutta formulas with stepsize control and their
    application to some heat transfer problems", NASA TR R-315, 1969 (RK1(2), ``fehlberg2``).
    Butcher, "Numerical Methods for Ordinary Differential Equations", 3rd ed., 2016, ch. 3
    (rooted trees and the order conditions that validate every tableau here).

Every tableau is checked when it is built: besides the shapes and row sums, its weights must
satisfy the order conditions of its stated order (and the embedded weights those of one order
less), so a mistyped coefficient fails at import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fractions import Fraction as Fr
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from solvers.errors import SolverInputError

if TYPE_CHECKING:
    from solvers.implicit import ImplicitTableau

#: The order conditions are checked to this accuracy (the published coefficients of tsit5
#: and dopri8 are 16-20 digit approximations).
ORDER_TOL = 1e-10

Tree = tuple  # a rooted tree: the sorted tuple of the subtrees at its root (() is one node)


@cache
def rooted_trees(n: int) -> tuple[Tree, ...]:
    """All rooted trees with n nodes (1, 1, 2, 4, 9, 20, 48, 115 for n = 1..8)."""
    if n == 1:
        return ((),)
    found: set[Tree] = set()
    for sizes in _partitions(n - 1, n - 1):
        for children in _products([rooted_trees(k) for k in sizes]):
            found.add(tuple(sorted(children)))
    return tuple(sorted(found))


def _partitions(n: int, largest: int) -> list[tuple[int, ...]]:
    """The partitions of n into parts of at most ``largest``, largest part first."""
    if n == 0:
        return [()]
    return [(k, *rest) for k in range(min(n, largest), 0, -1) for rest in _partitions(n - k, k)]


def _products(choices: list[tuple[Tree, ...]]) -> list[tuple[Tree, ...]]:
    out: list[tuple[Tree, ...]] = [()]
    for options in choices:
        out = [(*prefix, t) for prefix in out for t in options]
    return out


def tree_order(tree: Tree) -> int:
    """Number of nodes of a rooted tree."""
    return 1 + sum(tree_order(t) for t in tree)


def tree_density(tree: Tree) -> int:
    """Butcher's density gamma(tree): the order times the densities of the subtrees."""
    g = tree_order(tree)
    for t in tree:
        g *= tree_density(t)
    return g


def elementary_weights(tree: Tree, a: np.ndarray) -> np.ndarray:
    """The elementary weights of the stages: one for the leaf, prod_j (a @ Phi(subtree_j))."""
    phi = np.ones(a.shape[0])
    for t in tree:
        phi = phi * (a @ elementary_weights(t, a))
    return phi


def order_residual(a: np.ndarray, b: np.ndarray, order: int, theta: float = 1.0) -> float:
    """max over the trees with at most ``order`` nodes of |b . Phi(tree) - theta^r / gamma|.

    Zero (to rounding) exactly when y0 + h sum_i b_i k_i matches the Taylor series of the
    solution at t + theta*h to that order (Butcher 2016, ch. 3); with theta < 1, b holds
    dense-output weights. Works for implicit (full) a as well.
    """
    worst = 0.0
    for r in range(1, order + 1):
        for tree in rooted_trees(r):
            worst = max(worst, abs(float(b @ elementary_weights(tree, a))
                                   - theta**r / tree_density(tree)))
    return worst


def check_order(name: str, what: str, a: np.ndarray, b: np.ndarray, order: int) -> None:
    """Raise a SolverInputError unless weights b reach ``order`` (see :func:`order_residual`)."""
    residual = order_residual(a, b, order)
    if not residual < ORDER_TOL:
        raise SolverInputError(f"tableau {name}: {what} miss the order-{order} conditions "
                               f"(residual {residual:.2e})")


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
        check_order(self.name, "weights b", self.a, self.b, self.order)
        if self.b_err is not None:
            check_order(self.name, "embedded weights b - b_err", self.a, self.b - self.b_err,
                        self.order - 1)

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
# Names and meanings follow torchdiffeq: its "rk4" is Kutta's 3/8 rule, "heun2" the explicit
# trapezoidal rule, "heun3" Heun's third-order method (Hairer-Norsett-Wanner I, II.1).

EULER = _fixed("euler", [0], [], [1], order=1)
MIDPOINT = _fixed("midpoint", [0, Fr(1, 2)], [[Fr(1, 2)]], [0, 1], order=2)
HEUN2 = _fixed("heun2", [0, 1], [[1]], [Fr(1, 2), Fr(1, 2)], order=2)
HEUN3 = _fixed(
    "heun3", [0, Fr(1, 3), Fr(2, 3)], [[Fr(1, 3)], [0, Fr(2, 3)]],
    [Fr(1, 4), 0, Fr(3, 4)], order=3,
)


def _rk38(name: str) -> ButcherTableau:
    """Kutta's 3/8 rule (Kutta 1901; Hairer-Norsett-Wanner I, II.1)."""
    return _fixed(name, [0, Fr(1, 3), Fr(2, 3), 1], [[Fr(1, 3)], [Fr(-1, 3), 1], [1, -1, 1]],
                  [Fr(1, 8), Fr(3, 8), Fr(3, 8), Fr(1, 8)], order=4)


RK4 = _rk38("rk4")  # torchdiffeq's "rk4"
RK38 = _rk38("rk38")  # the same method under its own name
RK4_CLASSIC = _fixed(  # the classic Runge-Kutta method (what our "rk4" used to be)
    "rk4_classic", [0, Fr(1, 2), Fr(1, 2), 1],
    [[Fr(1, 2)], [0, Fr(1, 2)], [0, 0, 1]],
    [Fr(1, 6), Fr(1, 3), Fr(1, 3), Fr(1, 6)], order=4,
)

# ---- adaptive methods ---------------------------------------------------------------------

ADAPTIVE_HEUN = _fsal(
    "adaptive_heun", [0, 1, 1], [[1]], [Fr(1, 2), Fr(1, 2), 0], [1, 0, 0],
    order=2, err_order=2,
)
# Fehlberg's RK1(2), propagating its order-2 solution as torchdiffeq does. In FSAL form it
# has a fourth stage, f(t + h, y_new); torchdiffeq reuses its third, f at the order-1
# solution, as the next step's first stage instead (2 evaluations per step to our 3; its
# adaptive_heun likewise reuses f at the Euler predictor, 1 to our 2).
FEHLBERG2 = _fsal(
    "fehlberg2", [0, Fr(1, 2), 1, 1],
    [[Fr(1, 2)], [Fr(1, 256), Fr(255, 256)]],
    [Fr(1, 512), Fr(255, 256), Fr(1, 512), 0], [Fr(1, 256), Fr(255, 256), 0, 0],
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

# Prince and Dormand's RK8(7)13M (1981), with the FSAL stage that makes it 14 stages here, as
# in torchdiffeq: c, a and the weights are the paper's rational approximations.
_DP8_C = [0, Fr(1, 18), Fr(1, 12), Fr(1, 8), Fr(5, 16), Fr(3, 8), Fr(59, 400), Fr(93, 200),
          Fr(5490023248, 9719169821), Fr(13, 20), Fr(1201146811, 1299019798), 1, 1, 1]
_DP8_A: list[list] = [
    [Fr(1, 18)],
    [Fr(1, 48), Fr(1, 16)],
    [Fr(1, 32), 0, Fr(3, 32)],
    [Fr(5, 16), 0, Fr(-75, 64), Fr(75, 64)],
    [Fr(3, 80), 0, 0, Fr(3, 16), Fr(3, 20)],
    [Fr(29443841, 614563906), 0, 0, Fr(77736538, 692538347), Fr(-28693883, 1125000000),
     Fr(23124283, 1800000000)],
    [Fr(16016141, 946692911), 0, 0, Fr(61564180, 158732637), Fr(22789713, 633445777),
     Fr(545815736, 2771057229), Fr(-180193667, 1043307555)],
    [Fr(39632708, 573591083), 0, 0, Fr(-433636366, 683701615), Fr(-421739975, 2616292301),
     Fr(100302831, 723423059), Fr(790204164, 839813087), Fr(800635310, 3783071287)],
    [Fr(246121993, 1340847787), 0, 0, Fr(-37695042795, 15268766246),
     Fr(-309121744, 1061227803), Fr(-12992083, 490766935), Fr(6005943493, 2108947869),
     Fr(393006217, 1396673457), Fr(123872331, 1001029789)],
    [Fr(-1028468189, 846180014), 0, 0, Fr(8478235783, 508512852), Fr(1311729495, 1432422823),
     Fr(-10304129995, 1701304382), Fr(-48777925059, 3047939560), Fr(15336726248, 1032824649),
     Fr(-45442868181, 3398467696), Fr(3065993473, 597172653)],
    [Fr(185892177, 718116043), 0, 0, Fr(-3185094517, 667107341), Fr(-477755414, 1098053517),
     Fr(-703635378, 230739211), Fr(5731566787, 1027545527), Fr(5232866602, 850066563),
     Fr(-4093664535, 808688257), Fr(3962137247, 1805957418), Fr(65686358, 487910083)],
    [Fr(403863854, 491063109), 0, 0, Fr(-5068492393, 434740067), Fr(-411421997, 543043805),
     Fr(652783627, 914296604), Fr(11173962825, 925320556), Fr(-13158990841, 6184727034),
     Fr(3936647629, 1978049680), Fr(-160528059, 685178525), Fr(248638103, 1413531060), 0],
]
_DP8_B = [Fr(14005451, 335480064), 0, 0, 0, 0, Fr(-59238493, 1068277825),
          Fr(181606767, 758867731), Fr(561292985, 797845732), Fr(-1041891430, 1371343529),
          Fr(760417239, 1151165299), Fr(118820643, 751138087), Fr(-528747749, 2220607170),
          Fr(1, 4), 0]
_DP8_B_HAT = [Fr(13451932, 455176623), 0, 0, 0, 0, Fr(-808719846, 976000145),
              Fr(1757004468, 5645159321), Fr(656045339, 265891186),
              Fr(-3867574721, 1518517206), Fr(465885868, 322736535),
              Fr(53011238, 667516719), Fr(2, 45), 0, 0]


def continuous_extension(a: np.ndarray, b: np.ndarray, order: int,
                         degree: int) -> np.ndarray:
    """Dense-output weights of ``order`` for an FSAL tableau, from its order conditions.

    The weights w_i(theta) = sum_k dense[i, k] theta^(k+1), k < ``degree``, are the solution
    of the linear conditions
      * order: sum_i w_i(theta) Phi_i(tree) = theta^r / gamma(tree) for every theta and every
        tree with r <= ``order`` nodes (one equation per tree and power of theta);
      * w(1) = b (the interpolant ends at y1) and w'(1) = e_S (its slope there is the FSAL
        stage f(t1, y1), so the dense output is C^1 across steps)
    that minimises the integral over [0, 1] of the sum of squares of the order+1 residuals
    (the interpolant's leading error coefficients), by the null-space method.

    Raises:
        SolverInputError: if the conditions have no solution of that degree.
    """
    s = len(b)
    ones, powers = np.ones(degree), np.arange(1, degree + 1)
    rows, rhs = [], []
    for r in range(1, order + 1):
        for tree in rooted_trees(r):
            phi = elementary_weights(tree, a)
            for k in range(1, degree + 1):
                rows.append(np.kron(phi, np.eye(degree)[k - 1]))
                rhs.append(1.0 / tree_density(tree) if k == r else 0.0)
    for i in range(s):
        e_i = np.eye(s)[i]
        rows += [np.kron(e_i, ones), np.kron(e_i, powers)]
        rhs += [b[i], 1.0 if i == s - 1 else 0.0]
    cons, target = np.array(rows), np.array(rhs)
    x0 = np.linalg.lstsq(cons, target, rcond=None)[0]
    _, sv, vt = np.linalg.svd(cons)
    null = vt[int((sv > 1e-9 * sv[0]).sum()):].T
    nodes, quad = np.polynomial.legendre.leggauss(degree + 2)  # exact for the squared error
    theta, quad = (nodes + 1) / 2, quad / 2
    err_rows, err_rhs = [], []
    for tree in rooted_trees(order + 1):
        phi = elementary_weights(tree, a)
        for th, w in zip(theta, quad):
            err_rows.append(np.sqrt(w) * np.kron(phi, th ** powers))
            err_rhs.append(np.sqrt(w) * th ** (order + 1) / tree_density(tree))
    err, err_target = np.array(err_rows), np.array(err_rhs)
    z = np.linalg.lstsq(err @ null, err_target - err @ x0, rcond=1e-9)[0]
    x = x0 + null @ z
    if not np.abs(cons @ x - target).max() < ORDER_TOL:
        raise SolverInputError(f"no continuous extension of order {order} and degree {degree}")
    dense = x.reshape(s, degree)
    dense[:, -1] += b - dense.sum(axis=1)  # w(1) == b exactly
    return dense


def _dopri8() -> ButcherTableau:
    """dopri8 with our own order-5 dense output (:func:`continuous_extension`, degree 6).

    The 1981 paper gives no dense output, and the 14 stages admit none of order 6 (its
    conditions are inconsistent at any degree), so order 5 (local error O(h^6)) is the most
    without extra stages. torchdiffeq interpolates its dopri8 with a quartic through a
    midpoint value (local error O(h^5)).
    """
    hermite = _fsal("dopri8", _DP8_C, _DP8_A, _DP8_B, _DP8_B_HAT, order=8, err_order=8)
    return dataclasses.replace(
        hermite, dense=continuous_extension(hermite.a, hermite.b, order=5, degree=6))


DOPRI8 = _dopri8()

METHODS: dict[str, ButcherTableau] = {
    t.name: t for t in (EULER, MIDPOINT, HEUN2, HEUN3, RK4, RK38, RK4_CLASSIC, ADAPTIVE_HEUN,
                        FEHLBERG2, BOSH3, DOPRI5, TSIT5, DOPRI8)
}


def get_tableau(method: str) -> ButcherTableau | ImplicitTableau:
    """Look up a method by name: an explicit one of :data:`METHODS`, or an implicit one of
    :data:`solvers.implicit.IMPLICIT_METHODS`.

    Raises:
        SolverInputError: for an unknown name; the message lists the valid ones.
    """
    from solvers.implicit import IMPLICIT_METHODS  # here: solvers.implicit imports this module

    tab: ButcherTableau | ImplicitTableau | None = METHODS.get(method)
    if tab is None:
        tab = IMPLICIT_METHODS.get(method)
    if tab is None:
        raise SolverInputError(
            f"unknown method {method!r}; choose one of {sorted(METHODS)} (explicit) or "
            f"{sorted(IMPLICIT_METHODS)} (implicit)")
    return tab
