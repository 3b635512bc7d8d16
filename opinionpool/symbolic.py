r"""Exponential families declared with sympy.

A user writes the density :math:`h(z)\exp(\eta^\top T(z) - A(\eta))` as sympy expressions; the library
derives :math:`\nabla A` and :math:`\nabla^2 A` symbolically, lambdifies everything to torch, and
returns a family usable wherever the built-in ones are (affinities, exact pools, moment matching,
the numerical engine). :meth:`SymbolicFamily.verify` checks the declaration: that the density
integrates to one and that :math:`\nabla A = E[T]`, symbolically where sympy can integrate and by
30-digit ``mpmath`` quadrature where it cannot.

>>> import sympy as sp, torch
>>> z, eta = sp.symbols("z eta", real=True)
>>> exponential = SymbolicFamily(z, [eta], [z], -sp.log(-eta), support=(0, sp.oo), domain=[eta < 0])
>>> report = exponential.verify([(-2,), (-sp.Rational(1, 3),)])
>>> report.passed
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mpmath
import sympy as sp
import torch
from sympy.printing.pytorch import TorchPrinter

from .families.custom import CustomFamily

__all__ = ["SymbolicFamily", "VerificationReport", "Check", "to_torch"]


class _Printer(TorchPrinter):
    """torch printer that also writes ``polygamma(n, x)``, ``besseli(n, x)``, ``gamma(x)``, ``erfc(x)``, ``Max`` and
    ``Min`` with their arguments printed for torch (mapped in ``_TORCH_FUNCTIONS``; sympy's own printer leaves
    ``besseli`` and its argument as plain text, names a ``torch.special.gamma`` that does not exist, has no
    ``erfc``, and writes ``Max(0, x)`` as ``torch.max(0, x)``, which raises)."""

    def _print_polygamma(self, expr):
        order, argument = expr.args
        return f"polygamma({self._print(order)}, {self._print(argument)})"

    def _print_besseli(self, expr):
        order, argument = expr.args
        return f"besseli({self._print(order)}, {self._print(argument)})"

    def _print_gamma(self, expr):
        return f"gamma({self._print(expr.args[0])})"

    def _print_erfc(self, expr):
        return f"erfc({self._print(expr.args[0])})"

    def _print_Max(self, expr):  # torch.max takes no plain number beside a tensor, nor more than two arguments
        return f"maximum({', '.join(self._print(a) for a in expr.args)})"

    def _print_Min(self, expr):
        return f"minimum({', '.join(self._print(a) for a in expr.args)})"


def _gamma(x):
    """Gamma from ``lgamma`` (log of its absolute value) with its sign: negative on ``(-1, 0)``, ``(-3, -2)``, ..."""
    negative = (x < 0) & (torch.floor(x).remainder(2) == 1)
    return torch.where(negative, -1.0, 1.0).to(x.dtype) * torch.lgamma(x).exp()


def _elementwise(combine):
    """``combine`` (``torch.maximum``, ``torch.minimum``) over any number of tensors and numbers, broadcast."""
    def reduce(*values):
        like = next((v for v in values if isinstance(v, torch.Tensor)), None)
        tensors = [torch.as_tensor(v, dtype=None if like is None else like.dtype,
                                   device=None if like is None else like.device) for v in values]
        out = tensors[0]
        for other in tensors[1:]:
            out = combine(out, other)
        return out

    return reduce


#: below |x| = n + _SERIES_MARGIN, I_n(x) from its power series, of positive terms, summed to _SERIES_TERMS terms
_SERIES_MARGIN, _SERIES_TERMS = 20.0, 80


def _besseli(order, x: torch.Tensor) -> torch.Tensor:
    """The modified Bessel function ``I_n(x)`` of integer order ``n >= 0``, differentiable: torch's ``i0`` and ``i1``,
    and for higher orders the power series ``sum_k (x/2)^(2k+n) / (k! (k+n)!)`` where ``|x| < n + 20`` (every term
    positive up to the sign of ``x^n``) and the upward recurrence ``I_(m+1) = I_(m-1) - 2m / x I_m`` beyond, where
    it is stable. The recurrence alone cancels next to 0 (``I_2(1e-5)`` 3.5e-4 off, ``I_2(1e-7)`` 6.6 %)."""
    n = int(order)
    if n <= 1:
        return (torch.special.i0, torch.special.i1)[n](x)
    x = torch.as_tensor(x)
    wide = x.to(torch.float64)  # (the series' terms in float32 lose digits to the cancellation of their logs)
    limit = n + _SERIES_MARGIN
    near = wide.abs() < limit
    # the series in log space, at a stand-in where x is 0 (I_n(0) = 0, and log 0 would make the gradient NaN)
    zero = wide == 0
    small = torch.where(near & ~zero, wide, 1.0)
    k = torch.arange(_SERIES_TERMS, dtype=torch.float64, device=x.device)
    log_terms = (2 * k + n) * torch.log(small.abs() / 2).unsqueeze(-1) - torch.lgamma(k + 1) - torch.lgamma(k + n + 1)
    series = torch.where(zero, 0.0, torch.exp(log_terms).sum(-1) * torch.sign(small) ** n)
    large = torch.where(near, limit, wide)  # (the recurrence divides by x)
    below, current = torch.special.i0(large), torch.special.i1(large)
    for m in range(1, n):
        below, current = current, below - 2 * m / large * current
    return torch.where(near, series, current).to(x.dtype)


_TORCH_FUNCTIONS = {
    "polygamma": lambda n, x: torch.special.polygamma(int(n), x),
    "besseli": _besseli,
    "gamma": _gamma,
    "erfc": torch.special.erfc,
    "maximum": _elementwise(torch.maximum),
    "minimum": _elementwise(torch.minimum),
}


def _numbers_as_floats(expr: sp.Expr) -> sp.Expr:
    """``expr`` with every real constant sub-expression (``log(2 pi)``, ``sqrt(2)``, ``besseli(0, 1)``) evaluated to a
    float: torch's functions take tensors, and ``torch.log(6.28...)`` raised at the family's first use."""
    def constant(e):
        return e.is_number and not e.is_Atom and e.is_real is True

    return expr.replace(constant, lambda e: sp.Float(e.evalf(30), 30))


def _integer_bessel_orders(expr: sp.Expr) -> sp.Expr:
    """``expr``, whose every ``besseli(n, x)`` must have an integer order (torch's :func:`_besseli` computes those;
    mapping another order to an integer one would be silently wrong), with ``I_-n`` written ``I_n``."""
    def checked(order, x):
        if not order.is_integer:
            raise ValueError(f"besseli of order {order} has no torch counterpart (torch has orders 0 and 1; "
                             "other integer orders are computed from them)")
        return sp.besseli(abs(int(order)), x)

    return expr.replace(sp.besseli, checked)


def to_torch(symbols: Sequence[sp.Symbol], expr: sp.Expr):
    """Lambdify ``expr`` to a torch function of tensors for ``symbols`` that broadcasts constants.

    The returned function takes one tensor per symbol and returns a tensor of their broadcast shape.
    """
    expr = _numbers_as_floats(_integer_bessel_orders(sp.sympify(expr)))
    function = sp.lambdify(list(symbols), expr, modules=[_TORCH_FUNCTIONS, "torch"],
                           printer=_Printer({"strict": False}))

    def evaluate(*tensors):
        out = function(*tensors)
        reference = torch.broadcast_tensors(*tensors)[0] if len(tensors) > 1 else tensors[0]
        out = torch.as_tensor(out, dtype=reference.dtype if reference.is_floating_point() else None,
                              device=reference.device)
        return out.expand(torch.broadcast_shapes(out.shape, reference.shape))

    return evaluate


@dataclass(frozen=True)
class Check:
    """One check of :meth:`SymbolicFamily.verify`."""

    name: str
    point: tuple
    method: str
    value: float
    expected: float
    passed: bool


@dataclass(frozen=True)
class VerificationReport:
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def __str__(self) -> str:
        lines = [f"{'ok  ' if c.passed else 'FAIL'} {c.name} at eta={c.point} ({c.method}): {c.value:.17g} "
                 f"vs {c.expected:.17g}" for c in self.checks]
        return "\n".join(lines)


class SymbolicFamily(CustomFamily):
    r"""A scalar continuous exponential family :math:`h(z)\exp(\eta^\top T(z) - A(\eta))` from sympy.

    Args:
        variable: the sympy symbol ``z``.
        natural_params: the symbols ``eta_1 .. eta_p``.
        sufficient_statistic: ``T_1(z) .. T_p(z)``.
        log_normalizer: ``A(eta)``.
        log_base_measure: ``log h(z)`` (default 0).
        support: ``(lower, upper)`` of ``z`` (sympy numbers, ``sp.oo`` allowed).
        domain: sympy relations in the natural parameters that define the natural parameter space.
        sampler: optional ``(eta, sample_shape) -> samples`` (needed only to sample pools).
        name: used in messages.
        mean, variance: optional expressions in the natural parameters for the mean and variance of ``z`` (the
            numerical engine places its quadrature with them); by default, when ``z`` itself is one of the
            statistics, the matching entries of ``gradient`` and ``hessian``. ``verify`` checks them by integration.

    ``A``'s gradient and Hessian are derived symbolically (``gradient``, ``hessian``).
    """

    def __init__(self, variable: sp.Symbol, natural_params: Sequence[sp.Symbol], sufficient_statistic, log_normalizer,
                 log_base_measure=0, support=(-sp.oo, sp.oo), domain: Sequence = (), sampler=None,
                 name: str = "symbolic family", mean=None, variance=None):
        self.variable = variable
        self.natural_symbols = tuple(natural_params)
        self.statistic_exprs = tuple(sp.sympify(t) for t in sufficient_statistic)
        if len(self.statistic_exprs) != len(self.natural_symbols):
            raise ValueError(f"sufficient_statistic has {len(self.statistic_exprs)} entries but natural_params has "
                             f"{len(self.natural_symbols)}; they must pair up")
        self.log_normalizer_expr = sp.sympify(log_normalizer)
        self.log_base_measure_expr = sp.sympify(log_base_measure)
        stray = self.log_normalizer_expr.free_symbols - set(self.natural_symbols)
        if stray:
            raise ValueError(f"log_normalizer may only depend on natural_params, but uses {sorted(map(str, stray))}")
        self.support = tuple(sp.sympify(s) for s in support)
        self.domain_exprs = tuple(domain)
        self.gradient = tuple(sp.diff(self.log_normalizer_expr, e) for e in self.natural_symbols)
        self.hessian = sp.hessian(self.log_normalizer_expr, self.natural_symbols)

        etas = self.natural_symbols
        a_fn = to_torch(etas, self.log_normalizer_expr)
        grad_fns = [to_torch(etas, g) for g in self.gradient]
        stat_fns = [to_torch([variable], t) for t in self.statistic_exprs]
        log_h_fn = to_torch([variable], self.log_base_measure_expr)
        domain_fns = [to_torch(etas, c) for c in self.domain_exprs]
        self._gradient_fn = lambda natural: torch.stack([g(*natural.unbind(-1)) for g in grad_fns], dim=-1)
        self._log_normalizer_fn, self._statistic_fns, self._log_base_measure_fn = a_fn, stat_fns, log_h_fn

        def natural_domain(natural):
            inside = torch.isfinite(a_fn(*natural.unbind(-1))) & torch.isfinite(natural).all(-1)
            for condition in domain_fns:
                inside = inside & condition(*natural.unbind(-1)).to(torch.bool)
            return inside

        self.mean_expr = self.variance_expr = None
        if variable in self.statistic_exprs:
            k = self.statistic_exprs.index(variable)
            self.mean_expr, self.variance_expr = self.gradient[k], self.hessian[k, k]
        for what, expr in (("mean", mean), ("variance", variance)):
            if expr is not None:
                expr = sp.sympify(expr)
                stray = expr.free_symbols - set(self.natural_symbols)
                if stray:
                    raise ValueError(f"{what} may only depend on natural_params, but uses {sorted(map(str, stray))}")
                setattr(self, f"{what}_expr", expr)
        mean = variance = None
        self._moment_fns = {}  # what the family runs for each given or derived moment, for verify
        if self.mean_expr is not None:
            mean_fn = self._moment_fns["mean"] = to_torch(etas, self.mean_expr)
            mean = lambda natural: mean_fn(*natural.unbind(-1))  # noqa: E731
        if self.variance_expr is not None:
            var_fn = self._moment_fns["variance"] = to_torch(etas, self.variance_expr)
            variance = lambda natural: var_fn(*natural.unbind(-1))  # noqa: E731
        super().__init__(
            log_normalizer=lambda natural: a_fn(*natural.unbind(-1)),
            sufficient_statistic=lambda value: torch.stack([t(value) for t in stat_fns], dim=-1),
            log_base_measure=log_h_fn,
            num_params=len(etas), event_shape=(), natural_domain=natural_domain, mean=mean, variance=variance,
            sampler=sampler, support_interval=(float(self.support[0]), float(self.support[1])), name=name,
            base_measure_natural=None if variable in self.log_base_measure_expr.free_symbols else [0.0] * len(etas))

    def __repr__(self):
        return f"SymbolicFamily(name={self.name!r}, natural_params={self.natural_symbols})"

    def mean_parameters(self, natural: torch.Tensor) -> torch.Tensor:
        """The symbolic gradient of ``A`` (differentiable: used by the Newton inverse and its gradient)."""
        return self._gradient_fn(natural)

    # ------------------------------------------------------------------ verification
    def density_expr(self, point) -> sp.Expr:
        """The normalised density at natural parameters ``point`` as a sympy expression in ``z``."""
        values = dict(zip(self.natural_symbols, (sp.nsimplify(p) for p in point)))
        exponent = sum(v * t for v, t in zip(values.values(), self.statistic_exprs))
        return sp.exp(self.log_base_measure_expr + exponent - self.log_normalizer_expr.subs(values))

    def verify(self, points, *, symbolic: bool = True, rtol: float = 1e-15, dps: int = 30,
               raise_on_failure: bool = True) -> VerificationReport:
        """Check at each natural parameter ``point`` (inside ``domain``) that the density integrates to
        one, that ``gradient`` equals ``E[T(z)]``, and that the torch functions the family runs give the same
        gradient, ``A``, mean and variance in float64 (to 1e-12), and the same ``T`` and ``log h`` at three points of
        the support; and that the family's mean and variance of ``z`` (given or derived; a variance given without a
        mean about the density's own) are those of the density.

        Integrals are tried symbolically first (``symbolic=True``) and computed by ``mpmath.quad`` at
        ``dps`` digits where sympy leaves them unevaluated. A failed check raises ``ValueError`` naming
        the check, the parameter point and the values (``raise_on_failure=False`` returns the report).
        """
        checks = []
        for point in points:
            point = tuple(point)
            if len(point) != len(self.natural_symbols):
                raise ValueError(f"verify: point {point} needs {len(self.natural_symbols)} natural parameters")
            values = dict(zip(self.natural_symbols, (sp.nsimplify(p) for p in point)))
            for condition in self.domain_exprs:
                if not bool(condition.subs(values)):
                    raise ValueError(f"verify: point eta={point} is outside the natural parameter space ({condition})")
            # a family without a declared domain: outside the space its normaliser is not a finite real number, and
            # the density's integral diverges (sympy's search for a Gamma's at eta = -3/2 did not return)
            normaliser = sp.N(self.log_normalizer_expr.subs(values), dps)
            if not (normaliser.is_real and normaliser.is_finite):
                raise ValueError(f"verify: point eta={point} is outside the natural parameter space: the log-normaliser "
                                 f"{self.log_normalizer_expr} is {normaliser} there, not a finite real number")
            density = self.density_expr(point)
            around = self._location(values, dps)
            total, method = self._integral(density, symbolic, dps, around)
            checks.append(Check("normalisation", point, method, float(total), 1.0, abs(total - 1) <= rtol))
            expected = [(f"dA/deta_{index + 1} = E[{stat}]", stat, sp.N(grad.subs(values), dps))
                        for index, (stat, grad) in enumerate(zip(self.statistic_exprs, self.gradient))]
            z = self.variable
            if self.mean_expr is not None:
                mean = sp.N(self.mean_expr.subs(values), dps)
                expected.append(("mean = E[z]", z, mean))
            elif self.variance_expr is not None:  # a variance given alone is checked about the density's own mean
                mean = sp.N(self._integral(z * density, symbolic, dps, around)[0], dps)
            if self.variance_expr is not None:
                expected.append(("variance = E[(z - mean)^2]", (z - mean) ** 2,
                                 sp.N(self.variance_expr.subs(values), dps)))
            for name, statistic, target in expected:
                value, method = self._integral(statistic * density, symbolic, dps, around)
                checks.append(Check(name, point, method, float(value), float(target),
                                    abs(value - target) <= rtol * (1 + abs(target))))
            checks.extend(self._translation_checks(point, values, dps))
        report = VerificationReport(tuple(checks))
        if raise_on_failure and not report.passed:
            failed = [c for c in report.checks if not c.passed]
            raise ValueError(f"{self.name}: verification failed:\n" + "\n".join(
                f"  {c.name} at eta={c.point} ({c.method}): got {c.value:.17g}, expected {c.expected:.17g}"
                for c in failed))
        return report

    def _translation_checks(self, point, values, dps):
        """The torch functions the family runs for ``A``, its gradient, its mean and variance (at ``point``), ``T`` and
        ``log h`` (at three points of the support) against sympy's values, to 1e-12 in float64 (its rounding
        allowed): a translation that raises or differs fails its check."""
        def check(name, where, function, args, expr):
            expected = float(sp.N(expr, dps))
            try:
                value = float(function(*(torch.tensor(float(a), dtype=torch.float64) for a in args)))
            except Exception as error:  # a translation that cannot run is a failed check, reported with the rest
                return Check(f"{name} ({type(error).__name__}: {error})", where, "torch float64", float("nan"),
                             expected, False)
            return Check(name, where, "torch float64", value, expected,
                         abs(value - expected) <= 1e-12 * (1 + abs(expected)))

        checks = [check("torch A", point, self._log_normalizer_fn, point, self.log_normalizer_expr.subs(values))]
        for what, function in self._moment_fns.items():
            checks.append(check(f"torch {what}", point, function, point,
                                getattr(self, f"{what}_expr").subs(values)))
        for index, grad in enumerate(self.gradient):
            checks.append(check(f"torch dA/deta_{index + 1}", point,
                                lambda *eta, index=index: self._gradient_fn(torch.stack(eta))[index], point,
                                grad.subs(values)))
        z = self.variable
        for at in self._support_points():
            checks.append(check(f"torch log h at z={at}", point, self._log_base_measure_fn, (at,),
                                self.log_base_measure_expr.subs(z, at)))
            for index, (stat, function) in enumerate(zip(self.statistic_exprs, self._statistic_fns)):
                checks.append(check(f"torch T_{index + 1} at z={at}", point, function, (at,), stat.subs(z, at)))
        return checks

    def _support_points(self):
        """Three points inside the support (its quartiles where it is finite)."""
        lower, upper = self.support
        if lower.is_finite and upper.is_finite:
            return [lower + (upper - lower) * sp.Rational(k, 4) for k in (1, 2, 3)]
        if lower.is_finite:
            return [lower + sp.Rational(1, 2), lower + 1, lower + 3]
        if upper.is_finite:
            return [upper - 3, upper - 1, upper - sp.Rational(1, 2)]
        return [sp.Integer(-1), sp.Rational(1, 2), sp.Integer(2)]

    def _location(self, values, dps):
        """The density's mean and standard deviation at ``values`` (floats), or None where the family has no mean and
        variance or they are not finite and real there: they only place the quadrature's breakpoints."""
        if self.mean_expr is None or self.variance_expr is None:
            return None
        mean, variance = (sp.N(expr.subs(values), dps) for expr in (self.mean_expr, self.variance_expr))
        if not (mean.is_real and variance.is_real and mean.is_finite and variance.is_finite and variance > 0):
            return None
        return mean, sp.sqrt(variance)

    def _integral(self, integrand: sp.Expr, symbolic: bool, dps: int, around=None):
        """The integral of ``integrand`` over the support: sympy's where it finds one (``symbolic``), else mpmath's
        quadrature, split at the mean and at 2 and 8 standard deviations from it where ``around`` gives them (over
        the whole half-line, mpmath saw no mass in an inverse Gaussian of mean 1e4 and standard deviation 100)."""
        z = self.variable
        lower, upper = self.support
        if symbolic:
            try:
                result = sp.integrate(integrand, (z, lower, upper), conds="none")
            except (NotImplementedError, ValueError, TypeError):
                result = None
            if result is not None and not result.has(sp.Integral) and result.is_number:
                value = sp.N(result, dps)
                if value.is_real:
                    return value, "symbolic"
        with mpmath.workdps(dps):
            f = sp.lambdify(z, integrand, modules="mpmath")
            ends = [mpmath.mpf(sp.N(lower, dps)) if lower.is_finite else -mpmath.inf,
                    mpmath.mpf(sp.N(upper, dps)) if upper.is_finite else mpmath.inf]
            if around is not None:
                mean, sd = (mpmath.mpf(x) for x in around)
                ends[1:1] = [x for x in (mean + k * sd for k in (-8, -2, 0, 2, 8)) if ends[0] < x < ends[-1]]
            value = mpmath.quad(f, ends)
            return sp.Float(value, dps), f"mpmath quadrature ({dps} digits)"
