"""The Q-Sparse scaling law: evaluate it, fit it, and read off the inference-optimal sparsity.

The law (PAPER.md, "Scaling law") models the loss of a sparsely-activated model with ``N`` total
parameters of which a fraction ``S`` of activations is zeroed::

    L(N, S) = E + A(S) / N**alpha,      A(S) = B + C * exp(beta / (1 - S))

At a fixed *activated* parameter count ``N_a = (1 - S) * N`` (what inference pays for), the loss is
``E + g(S) / N_a**alpha`` with ``g(S) = A(S) * (1 - S)**alpha``, so the inference-optimal sparsity
``S*`` minimises ``g`` and does not depend on ``N_a`` or ``E``.

Public API:

* :class:`LawParams` and :data:`PAPER_FULL_PRECISION` (the paper's printed, rounded values);
* :func:`loss` -- the law itself, for scalars, numpy arrays or torch tensors;
* :func:`fit` -- Huber loss on log-residuals, minimised by L-BFGS from a grid of starts;
* :func:`optimal_sparsity` -- ``S*`` from the symbolic derivative of ``g`` (sympy + mpmath);
* :func:`plan` -- total parameters, ``S*`` and predicted losses for a given activated budget;
* :func:`multiplier` -- ``1 / (1 - S)``, total parameters per activated parameter.

A faithful caveat: the paper states ``S* = 45.58%`` for full precision, but its printed (rounded)
parameters give ``S* ≈ 50.2%``. ``S*`` is roughly ``1 - beta/alpha`` and the rounding of
``beta = 0.05`` and ``alpha = 0.10`` alone moves it by several points; see ``docs/scaling.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import mpmath
import numpy as np
import sympy
import torch

__all__ = [
    "LawParams",
    "PAPER_FULL_PRECISION",
    "NoInteriorOptimumError",
    "OptimalSparsity",
    "SparsityPlan",
    "loss",
    "fit",
    "optimal_sparsity",
    "plan",
    "multiplier",
    "DERIVATIVE_TOLERANCE",
]

#: ``optimal_sparsity`` guarantees ``|g'(S*)| / g(S*) <= DERIVATIVE_TOLERANCE`` (see its docstring).
DERIVATIVE_TOLERANCE = 1e-9

# Working precision (decimal digits) of the root finder. Far more than float64 needs, so that the
# answer, once rounded to a float, is the float nearest the true root.
_MP_DPS = 50


@dataclasses.dataclass(frozen=True)
class LawParams:
    """Parameters of ``L(N, S) = E + (B + C*exp(beta/(1-S))) / N**alpha``.

    ``E`` is the irreducible loss, ``alpha`` the exponent of the parameter count, ``B`` and ``C``
    the sparsity-independent and sparsity-dependent scales of ``A(S)``, and ``beta`` how fast the
    sparsity penalty grows. All must be finite with ``E, B >= 0`` and ``C, alpha > 0``,
    ``beta >= 0``; the constructor checks this so that a bad value fails where it is given.
    """

    E: float
    B: float
    C: float
    alpha: float
    beta: float

    def __post_init__(self) -> None:
        lower = {
            "E": (0.0, True),
            "B": (0.0, True),
            "C": (0.0, False),
            "alpha": (0.0, False),
            "beta": (0.0, True),
        }
        for name, (bound, inclusive) in lower.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"LawParams.{name} must be a real number, got {value!r} "
                    f"of type {type(value).__name__}"
                )
            ok = math.isfinite(value) and (value >= bound if inclusive else value > bound)
            if not ok:
                relation = ">=" if inclusive else ">"
                raise ValueError(
                    f"LawParams.{name} must be finite and {relation} {bound:g}, got {value!r}"
                )
            # Store plain floats so that equality, hashing and JSON output do not depend on
            # whether an int or a numpy scalar was passed in.
            object.__setattr__(self, name, float(value))

    def to_dict(self) -> dict[str, float]:
        """The parameters as a plain ``dict`` (JSON-serialisable)."""
        return dataclasses.asdict(self)


#: Full-precision parameters as printed in the paper (rounded to two decimals).
PAPER_FULL_PRECISION = LawParams(E=1.86, B=0.01, C=1.89, alpha=0.10, beta=0.05)


class NoInteriorOptimumError(ValueError):
    """Raised by :func:`optimal_sparsity` when ``g`` has no minimum strictly inside ``(0, 1)``."""


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _first_bad(values: np.ndarray, ok: np.ndarray) -> str:
    """Describe the first offending entry of ``values`` (where ``ok`` is False) for a message."""
    if values.ndim == 0:
        return f"{values.item()!r}"
    index = tuple(int(i) for i in np.argwhere(~ok)[0])
    where = index[0] if len(index) == 1 else index
    return f"{values[index].item()!r} (at index {where})"


def _check_N(values: np.ndarray, name: str = "N") -> None:
    ok = np.isfinite(values) & (values > 0)
    if not ok.all():
        raise ValueError(
            f"{name} (parameter count) must be finite and > 0, got {_first_bad(values, ok)}"
        )


def _check_S(values: np.ndarray, name: str = "S") -> None:
    # NaN fails both comparisons, so it is rejected too.
    ok = (values >= 0) & (values < 1)
    if not ok.all():
        raise ValueError(
            f"{name} (sparsity, the fraction of activations zeroed) must be in [0, 1), "
            f"got {_first_bad(values, ok)}"
        )


def _as_float64(value: Any, name: str) -> np.ndarray:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or an array of numbers, got a bool")
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a number or an array of numbers, got {value!r}") from exc


# --------------------------------------------------------------------------------------------
# The law
# --------------------------------------------------------------------------------------------


def multiplier(S: Any) -> Any:
    """Total parameters per activated parameter at sparsity ``S``: ``1 / (1 - S)``.

    Accepts a float, a numpy array or a torch tensor (and returns the same kind); ``S`` must be in
    ``[0, 1)``.
    """
    if isinstance(S, torch.Tensor):
        _check_S(S.detach().cpu().double().numpy())
        return 1.0 / (1.0 - S)
    s = _as_float64(S, "S")
    _check_S(s)
    out = 1.0 / (1.0 - s)
    return float(out) if out.ndim == 0 else out


def loss(N: Any, S: Any, params: LawParams = PAPER_FULL_PRECISION) -> Any:
    """Predicted loss ``L(N, S) = E + (B + C*exp(beta/(1-S))) / N**alpha``.

    ``N`` (total parameters, > 0) and ``S`` (sparsity, in ``[0, 1)``) broadcast against each other.
    If either is a torch tensor the result is a tensor (differentiable, float64 unless the input is
    already floating point); otherwise it is a numpy array, or a float when both are scalars.
    Raises ``ValueError`` naming the argument, the offending value and the allowed range.
    """
    p = params
    if isinstance(N, torch.Tensor) or isinstance(S, torch.Tensor):
        ref = N if isinstance(N, torch.Tensor) else S
        dtype = ref.dtype if ref.is_floating_point() else torch.float64
        n = torch.as_tensor(N, dtype=dtype, device=ref.device)
        s = torch.as_tensor(S, dtype=dtype, device=ref.device)
        _check_N(n.detach().cpu().double().numpy())
        _check_S(s.detach().cpu().double().numpy())
        a = p.B + p.C * torch.exp(p.beta / (1.0 - s))
        return p.E + a * n.pow(-p.alpha)
    n = _as_float64(N, "N")
    s = _as_float64(S, "S")
    _check_N(n)
    _check_S(s)
    # exp overflows to inf only for S within ~beta/700 of 1, where the loss really is unbounded.
    with np.errstate(over="ignore"):
        out = p.E + (p.B + p.C * np.exp(p.beta / (1.0 - s))) * n ** (-p.alpha)
    return float(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------

#: Default start grid of :func:`fit`. ``E`` is given as fractions of the smallest observed loss
#: (``E`` must lie below every loss, and this keeps the grid meaningful whatever the loss scale);
#: the others are absolute. Spans: exponents from weak (0.05) to strong (0.4) scaling, sparsity
#: penalties from negligible to large, scales over two orders of magnitude.
DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "E": (0.3, 0.6, 0.8, 0.9),
    "B": (1e-3, 0.1, 1.0),
    "C": (0.3, 1.0, 3.0, 10.0),
    "alpha": (0.05, 0.1, 0.2, 0.4),
    "beta": (0.01, 0.03, 0.1, 0.3),
}

_ORDER = ("E", "B", "C", "alpha", "beta")


def _parse_points(points: Iterable[Sequence[float]]) -> tuple[np.ndarray, ...]:
    rows = []
    for i, point in enumerate(points):
        try:
            n, s, obs = (float(v) for v in point)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"points[{i}] must be a triple (N, S, L) of numbers, got {point!r}"
            ) from exc
        rows.append((n, s, obs))
    if len(rows) < len(_ORDER):
        raise ValueError(
            f"fit needs at least {len(_ORDER)} observations (one per parameter), got {len(rows)}"
        )
    data = np.array(rows, dtype=np.float64)
    n, s, obs = data.T
    _check_N(n, "N in points")
    _check_S(s, "S in points")
    ok = np.isfinite(obs) & (obs > 0)
    if not ok.all():
        raise ValueError(
            f"L in points (observed loss) must be finite and > 0, got {_first_bad(obs, ok)}"
        )
    if np.unique(s).size < 3:
        # A(S) has three parameters (B, C, beta) that only S-variation can separate.
        raise ValueError(
            f"fit needs at least 3 distinct sparsities S to separate B, C and beta, "
            f"got {np.unique(s).size}"
        )
    if np.unique(n).size < 2:
        raise ValueError(
            f"fit needs at least 2 distinct N to determine alpha, got {np.unique(n).size}"
        )
    return n, s, obs


def _log_predicted(theta: torch.Tensor, log_n: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log L`` for log-parameters ``theta = log(E, B, C, alpha, beta)`` (last axis).

    Written as nested log-sum-exps, ``log(E + exp(log A - alpha*log N))`` with
    ``log A = logaddexp(log B, log C + beta*x)`` and ``x = 1/(1-S)``, so that no exponential is
    ever taken of a large number: wild trial points of the line search give large but finite
    residuals instead of inf/NaN.
    """
    log_e, log_b, log_c, log_alpha, log_beta = theta.unbind(-1)
    alpha, beta = log_alpha.exp(), log_beta.exp()
    log_a = torch.logaddexp(log_b[..., None], log_c[..., None] + beta[..., None] * x)
    return torch.logaddexp(log_e[..., None], log_a - alpha[..., None] * log_n)


def _objective(
    theta: torch.Tensor, log_n: torch.Tensor, x: torch.Tensor, log_obs: torch.Tensor, delta: float
) -> torch.Tensor:
    """Mean Huber loss of log-residuals, divided by ``delta**2``.

    Dividing by ``delta**2`` does not move the minimum; it only rescales the objective (which
    would otherwise be ~1e-7 for residuals ~delta = 1e-3) to O(1), so that L-BFGS's absolute
    stopping tolerances are meaningful. Batched: ``theta`` may have leading dimensions (one
    objective per row).
    """
    residual = _log_predicted(theta, log_n, x) - log_obs
    huber = torch.nn.functional.huber_loss(
        residual, torch.zeros_like(residual), reduction="none", delta=delta
    )
    return huber.mean(-1) / delta**2


def _lbfgs(
    objective: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, max_iter: int
) -> tuple[float, torch.Tensor]:
    """Run L-BFGS (strong-Wolfe line search) from ``start``; return (final objective, point).

    A non-finite final objective is reported as ``inf`` so that callers can simply keep the
    minimum.
    """
    theta = start.detach().clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        # The objective is O(1) near a good fit (see _objective), so these are relative enough.
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    optimiser.step(closure)
    with torch.no_grad():
        value = float(objective(theta))
    return (value if math.isfinite(value) else math.inf), theta.detach()


def _whitening(
    objective: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor
) -> torch.Tensor:
    """Matrix ``P = V |lambda|^-1/2`` from the eigendecomposition of the Hessian at ``theta``.

    Absolute eigenvalues (the objective may be locally non-convex, e.g. at Huber kinks) floored
    at 1e-12 of the largest, so that P stays finite in directions the data do not constrain at
    all. Falls back to the identity if the Hessian is not finite.
    """
    hessian = torch.autograd.functional.hessian(objective, theta.detach())
    if not torch.isfinite(hessian).all():
        return torch.eye(theta.numel(), dtype=theta.dtype)
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (hessian + hessian.T))
    magnitude = eigenvalues.abs()
    floor = float(magnitude.max()) * 1e-12
    if not floor > 0:
        return torch.eye(theta.numel(), dtype=theta.dtype)
    return eigenvectors / magnitude.clamp_min(floor).sqrt()


def fit(
    points: Iterable[Sequence[float]],
    *,
    delta: float = 1e-3,
    grid: dict[str, Sequence[float]] | None = None,
    n_starts: int = 8,
    explore_iter: int = 60,
    max_iter: int = 300,
    polish_rounds: int = 2,
) -> LawParams:
    """Fit :class:`LawParams` to observations ``(N, S, L)``.

    Minimises the Huber loss (threshold ``delta``) of ``log(predicted L) - log(observed L)`` with
    L-BFGS (float64, strong-Wolfe line search) over the logarithms of ``E, B, C, alpha, beta``:
    optimising logs keeps every parameter positive without constraints and makes the step sizes
    relative, which suits parameters spanning several orders of magnitude.

    Starts come from the Cartesian product of ``grid`` (default :data:`DEFAULT_GRID`; its ``E``
    values are fractions of the smallest observed loss). Running L-BFGS to convergence from all
    of them (1024 by default) would take minutes, so: (1) the objective is evaluated at every
    grid point in one batched call; (2) L-BFGS runs for ``explore_iter`` iterations from each of
    the ``n_starts`` best; (3) the best of those is polished by up to ``polish_rounds`` rounds of
    ``max_iter`` L-BFGS iterations in Hessian-whitened coordinates (see the comment in the code).
    Ties go to the earlier start and every step is deterministic, so the same points always
    give the same result. Typically about a second for a few dozen points.

    Raises ``ValueError`` for malformed or out-of-range observations (``N > 0``, ``S`` in
    ``[0, 1)``, ``L > 0``), fewer than 5 of them, fewer than 3 distinct ``S`` or 2 distinct
    ``N``, or invalid options.

    Note that ``E``, ``B`` and ``C`` trade off against each other (and ``alpha`` against ``E``)
    over a limited range of ``N`` and ``S``: the fitted curve is well determined, individual
    parameters less so.
    """
    if isinstance(delta, bool) or not (
        isinstance(delta, numbers.Real) and math.isfinite(delta) and delta > 0
    ):
        raise ValueError(f"delta (Huber threshold) must be finite and > 0, got {delta!r}")
    if isinstance(n_starts, bool) or not isinstance(n_starts, int) or n_starts < 1:
        raise ValueError(f"n_starts must be an integer >= 1, got {n_starts!r}")
    for name, value, least in (
        ("explore_iter", explore_iter, 1),
        ("max_iter", max_iter, 1),
        ("polish_rounds", polish_rounds, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    n, s, obs = _parse_points(points)

    grid = dict(DEFAULT_GRID if grid is None else grid)
    missing = set(_ORDER) - set(grid)
    extra = set(grid) - set(_ORDER)
    if missing or extra:
        raise ValueError(
            f"grid must have exactly the keys {list(_ORDER)}; missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}"
        )
    for name in _ORDER:
        values = grid[name]
        if len(values) == 0 or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(
                f"grid[{name!r}] must be a non-empty list of finite values > 0, got {values!r}"
            )

    f64 = torch.float64
    # Internally N and x = 1/(1-S) are centred (on the geometric mean of N and the mean of x) and
    # B, C rescaled to match: L = E + (B' + C' e^{beta (x - x0)}) (N/N0)^-alpha with
    # B' = B N0^-alpha and C' = C e^{beta x0} N0^-alpha. Same model, but without centring a
    # change of alpha moves log C' by ~20 (log N ~ 16..23) and the problem is badly conditioned;
    # centred, L-BFGS converges in far fewer iterations.
    log_n0 = float(np.log(n).mean())
    x0 = float((1.0 / (1.0 - s)).mean())
    log_n = torch.as_tensor(np.log(n) - log_n0, dtype=f64)
    x = torch.as_tensor(1.0 / (1.0 - s) - x0, dtype=f64)
    log_obs = torch.as_tensor(np.log(obs), dtype=f64)

    def to_internal(e: float, b: float, c: float, alpha: float, beta: float) -> list[float]:
        return [
            math.log(e),
            math.log(b) - alpha * log_n0,
            math.log(c) + beta * x0 - alpha * log_n0,
            math.log(alpha),
            math.log(beta),
        ]

    e_scale = float(obs.min())  # E's grid values are relative to the smallest loss
    starts = torch.tensor(
        [
            to_internal(e * e_scale, b, c, alpha, beta)
            for e, b, c, alpha, beta in itertools.product(*(grid[name] for name in _ORDER))
        ],
        dtype=f64,
    )
    with torch.no_grad():
        initial = _objective(starts, log_n, x, log_obs, delta)
    # Stable sort: equal objectives keep grid order, part of what makes the fit deterministic.
    order = torch.sort(initial, stable=True).indices[:n_starts]

    def objective(theta: torch.Tensor) -> torch.Tensor:
        return _objective(theta, log_n, x, log_obs, delta)

    # Stage 1 ran above (batched screening). Stage 2: a short L-BFGS run from each of the best
    # starts, enough to tell which basin each one is in.
    best_value, best_theta = math.inf, None
    for index in order.tolist():
        value, theta = _lbfgs(objective, starts[index], explore_iter)
        if value < best_value:  # strict: ties keep the earlier (better screened) start
            best_value, best_theta = value, theta
    if best_theta is None:
        raise RuntimeError("fit: every L-BFGS start ended at a non-finite objective")

    # Stage 3: polish the winner with L-BFGS in Hessian-whitened coordinates. The problem is
    # very ill-conditioned (Hessian eigenvalues spanning ~1e11 on exact synthetic data: B, C and
    # beta, and E and alpha, nearly trade off), and plain L-BFGS crawls along the flat valley for
    # thousands of iterations. With theta = theta0 + V |lambda|^-1/2 z (eigenpairs of the
    # Hessian at theta0) the problem seen by L-BFGS is close to isotropic, and a couple of
    # rounds of a few hundred iterations converge. Each round only accepts an improvement.
    for _ in range(polish_rounds):
        precondition = _whitening(objective, best_theta)
        value, z = _lbfgs(
            lambda z: objective(best_theta + precondition @ z),  # noqa: B023 (called at once)
            torch.zeros_like(best_theta),
            max_iter,
        )
        if not value < best_value:
            break
        best_value, best_theta = value, (best_theta + precondition @ z).detach()

    log_e, log_b, log_c, log_alpha, log_beta = best_theta.tolist()
    alpha, beta = math.exp(log_alpha), math.exp(log_beta)
    return LawParams(
        E=math.exp(log_e),
        B=math.exp(log_b + alpha * log_n0),
        C=math.exp(log_c - beta * x0 + alpha * log_n0),
        alpha=alpha,
        beta=beta,
    )


# --------------------------------------------------------------------------------------------
# Inference-optimal sparsity
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimalSparsity:
    """Result of :func:`optimal_sparsity`.

    ``sparsity`` is ``S*``; ``multiplier`` is ``1/(1-S*)``, total parameters per activated
    parameter; ``g`` is ``g(S*)``; ``derivative`` is ``g'(S*)`` and ``relative_derivative`` is
    ``g'(S*)/g(S*)`` (the derivative of ``log g``), both evaluated at the returned float ``S*``.
    """

    sparsity: float
    multiplier: float
    g: float
    derivative: float
    relative_derivative: float

    def to_dict(self) -> dict[str, float]:
        """The result as a plain ``dict`` (JSON-serialisable)."""
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=1)
def _symbolic_g() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``g`` and ``dg/dS`` built and differentiated once with sympy, lambdified for mpmath.

    Cached because differentiating and lambdifying costs milliseconds while evaluating costs
    microseconds; the parameters stay symbolic so one pair of functions serves every call.
    """
    S, B, C, alpha, beta = sympy.symbols("S B C alpha beta", real=True)
    g = (B + C * sympy.exp(beta / (1 - S))) * (1 - S) ** alpha
    dg = sympy.diff(g, S)
    args = (S, B, C, alpha, beta)
    return sympy.lambdify(args, g, modules="mpmath"), sympy.lambdify(args, dg, modules="mpmath")


def _bisect(f: Callable[[Any], Any], lo: Any, hi: Any, f_lo: Any) -> Any:
    """Root of ``f`` on ``[lo, hi]`` (mpmath numbers, ``f`` changes sign) by bisection.

    Bisection rather than a faster bracketing method because it cannot fail: each step halves
    the bracket whatever the shape of ``f``, and about 133 steps take a bracket of width <= 1 below
    1e-39, far under the float64 resolution of the answer, in a few milliseconds.
    """
    width_goal = mpmath.mpf(10) ** -(_MP_DPS - 10)
    while hi - lo > width_goal:
        mid = (lo + hi) / 2
        f_mid = f(mid)
        if f_mid == 0:
            return mid
        if (f_mid < 0) == (f_lo < 0):
            lo, f_lo = mid, f_mid
        else:
            hi = mid
    return (lo + hi) / 2


def optimal_sparsity(params: LawParams = PAPER_FULL_PRECISION) -> OptimalSparsity:
    """The inference-optimal sparsity ``S*``, minimiser of ``g(S) = A(S) * (1-S)**alpha`` on (0, 1).

    ``g`` is built with sympy and differentiated symbolically; the root of ``g'`` is found with
    mpmath at 50 significant digits by bisection on a sign change of ``g'``.

    Why there is at most one root, and where it is (``u = 1 - S``, ``w(u) = C e^{beta/u} / A``):
    ``d log g / dS = 0`` reads ``alpha * u = beta * w(u)``. With ``B >= 0``, ``w`` lies in (0, 1]
    and decreases as ``u`` grows, while ``alpha * u`` increases, so the two cross at most once, at
    ``u*`` in ``[beta*w(1)/alpha, beta/alpha]``. That crossing is inside (0, 1) -- an interior
    minimum -- exactly when ``alpha > beta * w(1)``, i.e. ``g`` is still decreasing at ``S = 0``.
    Otherwise (including ``beta == 0``, where ``g`` falls all the way to ``S -> 1``) there is no
    interior optimum and :class:`NoInteriorOptimumError` is raised.

    The derivative condition is checked before returning: ``|g'(S*)| / g(S*) <= 1e-9``
    (:data:`DERIVATIVE_TOLERANCE`), evaluated at the float ``S*`` that is returned. Dividing by
    ``g`` makes the check independent of the overall scale of ``B`` and ``C``, which multiplies
    ``g`` and ``g'`` alike; ``S`` itself is already dimensionless and of order one.
    """
    if not isinstance(params, LawParams):
        raise TypeError(f"params must be a LawParams, got {type(params).__name__}")
    p = params
    g_fn, dg_fn = _symbolic_g()
    with mpmath.workdps(_MP_DPS):
        B, C, alpha, beta = (mpmath.mpf(v) for v in (p.B, p.C, p.alpha, p.beta))
        if beta == 0:
            raise NoInteriorOptimumError(
                f"no interior optimum: with beta = 0 the sparsity costs nothing, g(S) = "
                f"(B + C)(1-S)^alpha decreases all the way to S -> 1 (params={p})"
            )
        w1 = C * mpmath.exp(beta) / (B + C * mpmath.exp(beta))
        if alpha <= beta * w1:
            raise NoInteriorOptimumError(
                f"no interior optimum: g(S) = (B + C*exp(beta/(1-S)))*(1-S)^alpha does not "
                f"decrease at S = 0 (needs alpha > beta*C*e^beta/(B + C*e^beta), here "
                f"alpha = {p.alpha:g} <= {float(beta * w1):g}), so the dense model (S = 0) is "
                f"inference-optimal (params={p})"
            )

        def dg(s: Any) -> Any:
            return dg_fn(s, B, C, alpha, beta)

        # Bracket in S from the bounds on u* above, widened by a relative 1e-6 so that the ends
        # are strictly on either side even when they coincide (B = 0 gives u* = beta/alpha).
        u_lo = beta * w1 / alpha * (1 - mpmath.mpf("1e-6"))
        u_hi = beta / alpha * (1 + mpmath.mpf("1e-6"))
        lo = max(mpmath.mpf(0), 1 - u_hi)
        hi = 1 - u_lo
        d_lo, d_hi = dg(lo), dg(hi)
        if not (d_lo <= 0 <= d_hi):
            raise RuntimeError(  # pragma: no cover - excluded by the analysis above
                f"optimal_sparsity: g' has no sign change on [{float(lo)}, {float(hi)}] "
                f"(g' = {float(d_lo):g}, {float(d_hi):g}); params={p}"
            )
        if d_lo == 0:
            root = lo
        elif d_hi == 0:
            root = hi
        else:
            root = _bisect(dg, lo, hi, d_lo)

        s_star = float(root)
        # Re-evaluate at the float that is returned, not at the 50-digit root.
        s_mp = mpmath.mpf(s_star)
        g_value = g_fn(s_mp, B, C, alpha, beta)
        d_value = dg(s_mp)
        relative = d_value / g_value
    if not (0.0 < s_star < 1.0) or abs(float(relative)) > DERIVATIVE_TOLERANCE:
        raise RuntimeError(  # pragma: no cover - a solver failure, not a user error
            f"optimal_sparsity: root finding failed (S = {s_star}, g'/g = {float(relative):g}); "
            f"an optimum this close to S = 1 cannot be represented to the required accuracy "
            f"as a float64 (params={p})"
        )
    return OptimalSparsity(
        sparsity=s_star,
        multiplier=1.0 / (1.0 - s_star),
        g=float(g_value),
        derivative=float(d_value),
        relative_derivative=float(relative),
    )


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SparsityPlan:
    """What the law recommends for a budget of ``activated_params`` parameters per token.

    ``total_params = activated_params / (1 - sparsity)``; ``sparse_loss = L(total_params, S*)``;
    ``dense_loss = L(activated_params, 0)`` (a dense model with the same activated parameters,
    hence the same inference cost); ``loss_reduction = dense_loss - sparse_loss`` (>= 0: by
    construction ``S*`` minimises the loss at a fixed activated count).
    """

    activated_params: float
    total_params: float
    sparsity: float
    multiplier: float
    sparse_loss: float
    dense_loss: float
    loss_reduction: float
    params: LawParams

    def to_dict(self) -> dict[str, Any]:
        """The plan as a plain ``dict`` (JSON-serialisable; ``params`` becomes a nested dict)."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        p = self.params
        return "\n".join(
            [
                f"Q-Sparse plan for {_human(self.activated_params)} activated parameters "
                f"(E={p.E:g}, B={p.B:g}, C={p.C:g}, alpha={p.alpha:g}, beta={p.beta:g})",
                f"  optimal sparsity S*   {self.sparsity:.2%}",
                f"  total parameters      {_human(self.total_params)} "
                f"({self.multiplier:.2f}x the activated)",
                f"  predicted loss sparse {self.sparse_loss:.4f}",
                f"  predicted loss dense  {self.dense_loss:.4f} (same activated parameters)",
                f"  loss reduction        {self.loss_reduction:.4f}",
            ]
        )


def _human(count: float) -> str:
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= threshold:
            return f"{count / threshold:.3g}{suffix}"
    return f"{count:.3g}"


def plan(activated_params: float, params: LawParams = PAPER_FULL_PRECISION) -> SparsityPlan:
    """Size a sparse model for ``activated_params`` parameters activated per token.

    Returns a :class:`SparsityPlan` with the inference-optimal ``S*`` (see
    :func:`optimal_sparsity`), the total parameter count ``N_a / (1 - S*)``, and the predicted
    losses of that sparse model and of a dense model with the same activated parameters.
    """
    n_a = _as_float64(activated_params, "activated_params")
    if n_a.ndim != 0:
        raise ValueError(f"activated_params must be a single number, got shape {n_a.shape}")
    _check_N(n_a, "activated_params")
    n_a_f = float(n_a)
    opt = optimal_sparsity(params)
    total = n_a_f / (1.0 - opt.sparsity)
    sparse = loss(total, opt.sparsity, params)
    dense = loss(n_a_f, 0.0, params)
    return SparsityPlan(
        activated_params=n_a_f,
        total_params=total,
        sparsity=opt.sparsity,
        multiplier=opt.multiplier,
        sparse_loss=sparse,
        dense_loss=dense,
        loss_reduction=dense - sparse,
        params=params,
    )
