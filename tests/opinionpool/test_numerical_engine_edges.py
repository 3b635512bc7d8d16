"""Edge cases of the numerical engine, each against an independent float64 scipy quadrature."""

import math

import pytest
import torch
from scipy import integrate, special
from torch.distributions import Gamma, Independent, MultivariateNormal, Normal, Poisson, Uniform, VonMises

import opinionpool
from opinionpool import CustomFamily
from tests.opinionpool.test_custom_family import gamma_family

ALPHA = 0.3


def power_mean(densities, weights, alpha):
    return sum(w * q**alpha for w, q in zip(weights, densities)) ** (1 / alpha)


def log_power_mean(log_densities, weights, alpha):
    """``log M_alpha`` from the experts' log-densities (no underflow in the tails)."""
    return special.logsumexp([alpha * lq for lq in log_densities], b=weights) / alpha


def quad_pool(u, lower, upper, points=None, functions=()):
    """``log Z`` and ``E_pool[f]`` for each ``f`` of ``functions``, by scipy quad."""
    kw = dict(epsabs=0, epsrel=1e-12, limit=400)
    if points is not None:
        kw["points"] = points
    z = integrate.quad(u, lower, upper, **kw)[0]
    return math.log(z), [integrate.quad(lambda x, f=f: u(x) * f(x), lower, upper, **kw)[0] / z for f in functions]


def von_mises_density(loc, kappa):
    # i0e: I0(k) e^-k, so that exp(k (cos - 1)) / (2 pi i0e(k)) = exp(k cos) / (2 pi I0(k)) without overflow
    return lambda z: math.exp(kappa * (math.cos(z - loc) - 1)) / (2 * math.pi * special.i0e(kappa))


def test_von_mises_entropy_and_kl_at_a_numerical_alpha():
    """The entropy's and the statistic's integrands were mixed up for circular experts (a broadcast error)."""
    experts = [(0.3, 2.0), (-1.0, 0.7)]
    pool = opinionpool.holder([VonMises(torch.tensor(m, dtype=torch.float64), torch.tensor(k, dtype=torch.float64))
                               for m, k in experts], alpha=ALPHA)
    assert isinstance(pool, opinionpool.NumericalHolderPool)
    densities = [von_mises_density(m, k) for m, k in experts]

    def u(z):
        return power_mean([q(z) for q in densities], (0.5, 0.5), ALPHA)

    # torch's VonMises.log_prob approximates log I0 (to about 1e-7): the reference takes other's own log-density
    other = VonMises(torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    log_z, (mean_log_u, mean_log_other) = quad_pool(
        u, -math.pi, math.pi,
        functions=(lambda z: math.log(u(z)), lambda z: float(other.log_prob(torch.tensor(z, dtype=torch.float64)))))
    entropy = log_z - mean_log_u
    kl = mean_log_u - log_z - mean_log_other
    estimate = pool.entropy_estimate()
    assert abs(float(estimate.value) - entropy) < 1e-9
    assert float(estimate.error) < 1e-6
    assert abs(float(pool.entropy()) - entropy) < 1e-9
    result = pool.kl_estimate(other)
    assert abs(float(result.value) - kl) < 1e-9


LOCS = ((0.0, 0.5, 1.0), (-1.0, 2.0, 0.3))


@pytest.mark.parametrize("other_loc", [(0.0, 1.0, 2.0), ((0.0,), (1.0,))], ids=["batch (3,)", "batch (2, 1)"])
def test_kl_quadrature_broadcasts_a_smaller_batch_of_other(other_loc):
    locs = torch.tensor(LOCS, dtype=torch.float64)
    pool = opinionpool.holder([Normal(locs, 1.0), Normal(-locs, 2.0)], alpha=ALPHA)
    other_loc = torch.tensor(other_loc, dtype=torch.float64)
    result = pool.kl_estimate(Normal(other_loc, 1.5), method="quadrature")
    assert result.value.shape == (2, 3)
    other_locs = other_loc.expand(2, 3)
    for i in range(2):
        for j in range(3):
            m, r = LOCS[i][j], float(other_locs[i, j])

            def log_u(z, m=m):
                return log_power_mean((-0.5 * (z - m) ** 2 - 0.5 * math.log(2 * math.pi),
                                       -0.5 * ((z + m) / 2) ** 2 - math.log(2) - 0.5 * math.log(2 * math.pi)),
                                      (0.5, 0.5), ALPHA)

            log_z, (mean_log_u, mean_log_r) = quad_pool(
                lambda z: math.exp(log_u(z)), -math.inf, math.inf,
                functions=(log_u, lambda z, r=r: -0.5 * ((z - r) / 1.5) ** 2 - math.log(1.5)
                           - 0.5 * math.log(2 * math.pi)))
            assert abs(float(result.value[i, j]) - (mean_log_u - log_z - mean_log_r)) < 1e-9


def test_kl_quadrature_rejects_a_wider_batch_of_other():
    pool = opinionpool.holder([Normal(torch.tensor(LOCS), 1.0), Normal(-torch.tensor(LOCS), 2.0)], alpha=ALPHA)
    with pytest.raises(ValueError, match=r"other must .*batch_shape=\(4,\)"):
        pool.kl_estimate(Normal(torch.zeros(4), 1.0), method="quadrature")


@pytest.mark.parametrize("method", ["quadrature", "importance"])
def test_kl_is_infinite_where_other_misses_part_of_the_pool(method):
    """KL(pool || other) is +inf, exactly, where other has no density on part of the pool's mass. It came back NaN
    from the quadrature (0 * -inf in the rule) and as inf +- NaN from the importance samples. The second pool lies
    inside other's support to float64's resolution, so its KL is log(2 a) - H(pool)."""
    pool = opinionpool.holder([Normal(torch.zeros(2, dtype=torch.float64), 1.0),
                               Normal(torch.ones(2, dtype=torch.float64), 2.0)], alpha=0.5,
                              weights=torch.tensor([0.3, 0.7], dtype=torch.float64))
    half_width = torch.tensor([1.0, 1e3], dtype=torch.float64)
    other = Uniform(-half_width, half_width, validate_args=False)
    result = pool.kl_estimate(other, method=method, num_samples=20_000)
    assert float(result.value[0]) == math.inf and float(result.error[0]) == 0.0
    log_z, (mean_log_u,) = quad_pool(lambda z: power_mean((math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
                                                        math.exp(-(z - 1) ** 2 / 8) / math.sqrt(8 * math.pi)),
                                                       (0.3, 0.7), 0.5),
                                  -math.inf, math.inf, functions=(lambda z: log_power_mean(
                                      (-z * z / 2 - 0.5 * math.log(2 * math.pi),
                                       -(z - 1) ** 2 / 8 - 0.5 * math.log(8 * math.pi)), (0.3, 0.7), 0.5),))
    expected = mean_log_u - log_z + math.log(2e3)
    assert math.isfinite(float(result.error[1]))
    assert abs(float(result.value[1]) - expected) <= max(4 * float(result.error[1]), 1e-9)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_kl_to_an_other_whose_support_misses_part_of_the_pool_is_infinite(alpha):
    """other.log_prob was called on the pool's whole support: a validated Exponential raised there, an unvalidated
    one gave its formula's value (a finite KL, 1.469, where it is +inf), an unvalidated Gamma NaN. Points outside
    other.support now count as -inf without calling it; inside, nothing changes."""
    from torch.distributions import Exponential, kl_divergence

    pool = opinionpool.holder([Normal(0.0, 1.0), Normal(3.0, 0.4)], alpha=alpha, weights=[0.3, 0.7])
    for other in (Exponential(1.0), Exponential(1.0, validate_args=False), Gamma(2.0, 1.0, validate_args=False)):
        assert float(kl_divergence(pool, other)) == math.inf
    wide = Uniform(-50.0, 50.0)  # covers the pool's mass to float64's resolution: log 100 - H(pool)
    log_z, (mean_log_u,) = quad_pool(lambda z: power_mean((math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
                                                        math.exp(-(z - 3) ** 2 / 0.32) / math.sqrt(0.32 * math.pi)),
                                                       (0.3, 0.7), alpha),
                                  -math.inf, math.inf, functions=(lambda z: log_power_mean(
                                      (-z * z / 2 - 0.5 * math.log(2 * math.pi),
                                       -(z - 3) ** 2 / 0.32 - 0.5 * math.log(0.32 * math.pi)), (0.3, 0.7), alpha),))
    assert float(kl_divergence(pool, wide)) == pytest.approx(mean_log_u - log_z + math.log(100.0), abs=1e-8)
    # a batch of validated others, one of which holds none of the pool's points: each element scored on its own
    # support (the stand-in drawn for the empty one leaves the random state as it was)
    state = torch.get_rng_state()
    batched = kl_divergence(pool.expand((2,)), Uniform(torch.tensor([100.0, -50.0]), torch.tensor([100.5, 50.0])))
    assert torch.equal(state, torch.get_rng_state())
    assert float(batched[0]) == math.inf and float(batched[1]) == pytest.approx(float(kl_divergence(pool, wide)),
                                                                              abs=1e-8)


@pytest.mark.parametrize("method", ["grid", "importance"])
def test_kl_names_an_other_of_the_wrong_shape_on_every_path(method):
    """An other of another event shape, or of a batch wider than the pool's, raised torch's shape errors (or, for
    a wider batch on these paths, a KL of the wrong shape) without naming other."""
    experts = MultivariateNormal(torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
    pool = opinionpool.holder(experts, alpha=0.5, weights=torch.tensor([0.3, 0.7]))
    with pytest.raises(ValueError, match=r"other must have the pool's event shape \(2,\), got event_shape=\(3,\)"):
        pool.kl_estimate(MultivariateNormal(torch.zeros(3), torch.eye(3)), method=method)
    with pytest.raises(ValueError, match=r"other must .*batch_shape=\(4,\)"):
        pool.kl_estimate(MultivariateNormal(torch.zeros(4, 2), torch.eye(2)), method=method)


@pytest.mark.parametrize("batched", [False, True], ids=["one pool", "a batch of pools"])
def test_custom_family_with_mean_but_no_variance(batched):
    shapes = ((2.0, 1.0), (3.5, 2.0))
    params = torch.tensor([[a - 1, -b] for a, b in shapes], dtype=torch.float64)
    fam = gamma_family(support_interval=(0.0, math.inf))
    pool = opinionpool.holder(fam.expert(params.expand(2, 2, 2) if batched else params), alpha=ALPHA)

    def u(z):
        return power_mean([b**a * z ** (a - 1) * math.exp(-b * z) / math.gamma(a) for a, b in shapes], (0.5, 0.5),
                          ALPHA)

    log_z, (mean, second) = quad_pool(u, 0, math.inf, functions=(lambda z: z, lambda z: z * z))
    expected = torch.tensor([log_z, mean, second - mean * mean], dtype=torch.float64)
    got = torch.stack([pool.log_normalizer, pool.mean, pool.variance]).reshape(3, -1)
    torch.testing.assert_close(got, expected.unsqueeze(-1).expand_as(got), rtol=1e-10, atol=0)


def test_custom_experts_without_mean_far_from_the_origin_raise_a_clear_error():
    """A narrow expert far from 0 is missed by scipy's quad over the whole line (mass 0), which raised a
    ZeroDivisionError: a ValueError now names the family and the expert and says how to help the engine."""
    fam = CustomFamily(lambda e: -e[..., 0] ** 2 / (4 * e[..., 1]) - 0.5 * torch.log(-2 * e[..., 1]),
                       lambda z: torch.stack((z, z * z), -1),
                       lambda z: torch.full_like(z, -0.5 * math.log(2 * math.pi)),
                       num_params=2, natural_domain=lambda e: e[..., 1] < 0, support_interval=(-math.inf, math.inf),
                       name="user Normal")
    experts = ((30.0, 0.1), (30.1, 0.2))
    with pytest.raises(ValueError, match="user Normal: quadrature found no mass .* give the family a `mean`"):
        opinionpool.holder(fam.expert(torch.tensor([[m / s**2, -0.5 / s**2] for m, s in experts],
                                                   dtype=torch.float64)), alpha=ALPHA).log_normalizer


@pytest.mark.parametrize("case", ["gamma quadrature", "normal quadrature", "2-D grid"])
def test_float32_pools_state_errors_that_cover_their_rounding(case):
    """A float32 pool is computed in float64 and returned in float32: its errors include that rounding (they were
    the float64 rule's, 1e-12, against 5e-7 of rounding), and its weights, which sum to one only to float32's
    rounding, are renormalised (log Z moved by log(sum) / alpha, 3e-8 here, 16 ulps)."""
    def experts(dtype):
        if case == "gamma quadrature":
            return Gamma(torch.tensor([2.0, 5.0], dtype=dtype), torch.tensor([1.0, 3.0], dtype=dtype))
        if case == "normal quadrature":
            return Normal(torch.tensor([400.0, 403.0], dtype=dtype), torch.tensor([1.0, 2.5], dtype=dtype))
        return Independent(Normal(torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=dtype),
                                  torch.tensor([[1.0, 2.0], [0.5, 1.0]], dtype=dtype)), 1)

    method = case.split()[-1]
    weights = torch.tensor([0.3, 0.7], dtype=torch.float32)
    single = opinionpool.holder(experts(torch.float32), alpha=0.7, weights=weights).estimate(method=method)
    double = opinionpool.holder(experts(torch.float64), alpha=0.7, weights=weights.double()).estimate(method=method)
    for name in ("log_normalizer", "mean", "variance"):
        value, error = getattr(single, name)
        assert value.dtype == torch.float32
        off = (value.double() - getattr(double, name).value).abs()
        assert bool((off <= error.double()).all()), (name, off, error)


def test_the_gradient_in_alpha_at_the_log_linear_pool():
    """At alpha = 0 the power mean took the geometric branch without alpha, so a fit of alpha started there saw a
    gradient of 0 and never moved. d/dalpha log M_alpha = Var_w(l) / 2 at 0 (its series), and the pool's log density
    follows its finite differences."""
    from opinionpool.numerical import log_power_mean

    log_values = torch.tensor([0.3, -1.2, 2.0, -math.inf], dtype=torch.float64)
    log_weights = torch.log(torch.tensor([0.2, 0.5, 0.3, 0.0], dtype=torch.float64))  # the last expert absent
    alpha = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    value = log_power_mean(log_values, log_weights, alpha)
    (gradient,) = torch.autograd.grad(value, alpha)
    mean = 0.2 * 0.3 + 0.5 * -1.2 + 0.3 * 2.0
    assert value.item() == pytest.approx(mean, rel=1e-15)
    variance = 0.2 * (0.3 - mean) ** 2 + 0.5 * (-1.2 - mean) ** 2 + 0.3 * (2.0 - mean) ** 2
    assert gradient.item() == pytest.approx(variance / 2, rel=1e-14)
    h = 1e-6
    finite = (log_power_mean(log_values, log_weights, h) - log_power_mean(log_values, log_weights, -h)) / (2 * h)
    assert gradient.item() == pytest.approx(finite.item(), rel=1e-8)
    # an expert of density zero at the point: the log-linear pool is -inf there, no NaN in the gradient
    zero = log_power_mean(log_values, torch.log(torch.tensor([0.2, 0.5, 0.2, 0.1], dtype=torch.float64)), alpha)
    assert zero.item() == -math.inf and torch.autograd.grad(zero, alpha)[0].item() == 0.0
    # the pool's log density: its log-normaliser's gradient in alpha at 0 too
    experts = Normal(torch.tensor([[-1.5, 1.5]], dtype=torch.float64), torch.tensor([[1.0, 0.6]], dtype=torch.float64))
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    y = torch.tensor([0.1, -0.4, 0.7], dtype=torch.float64).unsqueeze(-1)
    score = opinionpool.NumericalHolderPool(experts, alpha, weights, validate_args=False).log_prob(y).mean()
    (gradient,) = torch.autograd.grad(score, alpha)
    h = 1e-5
    finite = (opinionpool.NumericalHolderPool(experts, h, weights).log_prob(y).mean()
              - opinionpool.NumericalHolderPool(experts, -h, weights).log_prob(y).mean()) / (2 * h)
    assert gradient.item() == pytest.approx(finite.item(), rel=1e-6)


@pytest.mark.parametrize("alpha", [1e-6, 1e-16, 1e-20, 1e-100, -1e-18])
def test_the_gradient_in_a_tiny_alpha(alpha):
    """The small-alpha form log1p(S) / alpha was differentiated as it stands, whose two terms of size |l| / alpha
    cancel: the log-normaliser's gradient was 8 at alpha = 1e-16 and 32768 at 1e-20 for 2.0034. Reference: the
    derivative of the power mean at 40 digits beyond alpha's (mpmath), and the pool's finite differences at alpha = 1e-6."""
    import mpmath

    from opinionpool.numerical import log_power_mean

    log_values = torch.tensor([-3.0, -40.0, -2.5], dtype=torch.float64)
    weights = [0.2, 0.5, 0.3]
    tensor = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    value = log_power_mean(log_values, torch.log(torch.tensor(weights, dtype=torch.float64)), tensor)
    (gradient,) = torch.autograd.grad(value, tensor)
    with mpmath.workdps(40 + round(-math.log10(abs(alpha)))):  # 40 digits beyond alpha's own
        def power_mean(a):
            terms = (mpmath.mpf(w) * mpmath.exp(a * mpmath.mpf(v)) for w, v in zip(weights, [-3, -40, -2.5]))
            return mpmath.log(sum(terms)) / a

        assert value.item() == pytest.approx(float(power_mean(mpmath.mpf(alpha))), rel=1e-15)
        assert gradient.item() == pytest.approx(float(mpmath.diff(power_mean, mpmath.mpf(alpha))), rel=1e-12)
    experts = Normal(torch.tensor([0.0, 3.0], dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64))
    pool = opinionpool.NumericalHolderPool(experts, tensor, torch.tensor([0.3, 0.7], dtype=torch.float64))
    (gradient,) = torch.autograd.grad(pool.log_normalizer, tensor)
    h = 1e-6  # the derivative hardly moves between 1e-6 and 0 (its change is of order alpha times the next cumulant)
    finite = (opinionpool.NumericalHolderPool(experts, h, torch.tensor([0.3, 0.7])).log_normalizer
              - opinionpool.NumericalHolderPool(experts, -h, torch.tensor([0.3, 0.7])).log_normalizer) / (2 * h)
    assert gradient.item() == pytest.approx(finite.item(), rel=1e-5)


@pytest.mark.parametrize("alpha", [9.99e-4, 1e-3, 2e-3, 1e-2])
def test_float32_pools_of_small_alpha_integrate_to_one(alpha):
    """Above 1e-3 the power mean took logsumexp's form, whose float32 rounding is divided by alpha: the pool's
    density integrated to 1 - 1.5e-5 at alpha = 1e-3 (5e-8 just below it). Reference: scipy's quadrature of the
    float32 pool's density."""
    loc = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5], dtype=torch.float32)
    scale = torch.tensor([1.0, 0.7, 1.3, 0.9, 1.1], dtype=torch.float32)
    pool = opinionpool.holder(Normal(loc, scale), alpha, torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25]))
    mass = integrate.quad(lambda z: math.exp(pool.log_prob(torch.tensor(z, dtype=torch.float32)).item()), -30, 30,
                          points=[0.0], limit=200)[0]
    assert mass == pytest.approx(1.0, abs=1e-6)


def test_enumeration_errors_with_an_outcome_of_probability_zero_and_far_from_zero():
    """An expert of probability zero at an outcome made every error NaN (its term size inf or NaN, times a mass of
    zero), which the bracket check let through; the mean's error was the log-normaliser's rounding times (1 +
    |mean|)^2 (49171 for Poisson rates of 1e6) and E T's the bare rounding (3 times too small). References: exact
    sums in mpmath."""
    import mpmath
    from torch.distributions import Bernoulli, Categorical, Poisson

    for pool in (opinionpool.holder(Bernoulli(probs=torch.tensor([0.0, 0.3], dtype=torch.float64)), -1.0),
                 opinionpool.holder(Bernoulli(probs=torch.tensor([0.0, 0.3], dtype=torch.float64)), 0.5),
                 opinionpool.holder(Categorical(probs=torch.tensor([[0.0, 0.3, 0.7], [0.2, 0.3, 0.5]],
                                                                   dtype=torch.float64)), 2.0)):
        estimate = pool.estimate()
        for part in (estimate.log_normalizer, estimate.mean):
            if part is not None:
                assert torch.isfinite(part.error).all() and (part.error < 1e-12).all()
    rates = (1e6, 1.001e6)
    pool = opinionpool.holder(Poisson(torch.tensor(rates, dtype=torch.float64)), 2.0)
    estimate = pool.estimate()
    with mpmath.workdps(40):
        lo, hi = int(1e6 - 8000), int(1.001e6 + 8000)
        u = [mpmath.sqrt(sum(mpmath.mpf(0.5) * mpmath.exp(2 * (k * mpmath.log(r) - r - mpmath.loggamma(k + 1)))
                             for r in rates)) for k in range(lo, hi)]
        total = mpmath.fsum(u)
        mean = mpmath.fsum(k * v for k, v in zip(range(lo, hi), u)) / total
    error = abs(estimate.mean.value.item() - float(mean))
    assert error <= estimate.mean.error.item() <= 1e-3  # was 49171


def test_an_expert_of_infinite_mean_is_named_as_such():
    """A family whose mean is infinite for an expert (a Pareto of shape 0.6) was told to "give the family a `mean`",
    which it has."""
    shape = lambda eta: -eta[..., 0] - 1  # noqa: E731
    pareto = CustomFamily(log_normalizer=lambda eta: -torch.log(-eta[..., 0] - 1),
                          sufficient_statistic=lambda z: torch.log(z).unsqueeze(-1),
                          log_base_measure=lambda z: torch.zeros_like(z), num_params=1,
                          natural_domain=lambda eta: eta[..., 0] < -1,
                          mean=lambda eta: torch.where(shape(eta) > 1, shape(eta) / (shape(eta) - 1), math.inf),
                          variance=lambda eta: torch.where(shape(eta) > 2, shape(eta) / ((shape(eta) - 1) ** 2
                                                                                         * (shape(eta) - 2)), math.inf),
                          support_interval=(1.0, math.inf), name="Pareto")
    experts = opinionpool.Experts(pareto, torch.tensor([[-1.6], [-1.6]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"Pareto: an expert's mean is infinite \(params=\[-1.6\]\)"):
        opinionpool.NumericalHolderPool(experts, 2.0, torch.tensor([0.5, 0.5], dtype=torch.float64)).estimate()


def test_the_power_means_gradient_in_alpha_stays_finite_for_widely_spread_log_densities():
    """The cumulant series, computed where it is not used, overflowed float32 for log densities spread by 1e10
    (inf - inf): a NaN gradient in alpha through the form that was used; at alpha = 0 the variance's overflow made
    the value itself NaN (0 * inf). References: finite differences (float64), and the geometric mean's value."""
    from opinionpool.numerical import log_power_mean

    log_values = torch.tensor([[-1.0, -1e10], [-1.0, -2.0]], dtype=torch.float32)
    log_weights = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float32))
    alpha = torch.tensor(0.5, requires_grad=True)
    (gradient,) = torch.autograd.grad(log_power_mean(log_values, log_weights, alpha).sum(), alpha)
    wide = log_values.double()
    h = 1e-6
    finite = ((log_power_mean(wide, log_weights.double(), 0.5 + h) - log_power_mean(wide, log_weights.double(),
                                                                                    0.5 - h)) / (2 * h)).sum()
    assert gradient.item() == pytest.approx(finite.item(), rel=1e-4)
    zero = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    spread = torch.tensor([[1e200, -1e200]], dtype=torch.float64)
    value = log_power_mean(spread, torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64)), zero)
    assert value.item() == 0.0 and torch.isfinite(torch.autograd.grad(value.sum(), zero)[0])


@pytest.mark.parametrize("alpha", [1e-8, 0.5])
def test_the_power_mean_under_vmap_equals_the_batched_call(alpha):
    """Choosing the cumulant form read the values (bool of a tensor), which torch.func.vmap cannot."""
    from opinionpool.numerical import log_power_mean

    g = torch.Generator().manual_seed(0)
    log_values = torch.randn(5, 3, generator=g, dtype=torch.float64)
    log_weights = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    mapped = torch.func.vmap(lambda row: log_power_mean(row, log_weights, alpha))(log_values)
    torch.testing.assert_close(mapped, log_power_mean(log_values, log_weights, alpha), rtol=1e-15, atol=0)


@pytest.mark.parametrize("alpha", [-2.0, -0.5])
def test_enumeration_errors_of_a_normaliser_below_the_smallest_float(alpha):
    """Poisson experts of rates 1 and 1e4 pool, at alpha < 0, to a normaliser near e^-6500, below float64's range:
    the relative tail bound was 0 / 0 and every stated error NaN (and with it the check of the certified bracket);
    the log-linear pool's entropy too. Against the sum over 0 ... 30000 of the pool's unnormalised masses from
    scipy's log-pmfs, with asymmetric weights: finite errors that cover the difference."""
    import numpy as np
    from scipy.special import logsumexp
    from scipy.stats import poisson

    rates, weights = (1.0, 1e4), (0.375, 0.625)
    z = np.arange(30001)
    logs = np.stack([poisson.logpmf(z, rate) for rate in rates])
    log_u = logsumexp(np.log(weights)[:, None] + alpha * logs, axis=0) / alpha
    log_z = logsumexp(log_u)
    mean = float(np.exp(logsumexp(log_u, b=z) - log_z))
    experts = Poisson(torch.tensor(rates, dtype=torch.float64))
    estimate = opinionpool.holder(experts, alpha=alpha, weights=torch.tensor(weights, dtype=torch.float64)).estimate()
    assert log_z < -745
    for value, want in ((estimate.log_normalizer, log_z), (estimate.mean, mean)):
        assert math.isfinite(float(value.error)), value
        assert abs(float(value.value) - want) <= float(value.error) + 1e-12 * abs(want), (value, want)
    entropy = opinionpool.holder(experts, alpha=0.0).entropy_estimate()
    assert math.isfinite(float(entropy.error)) and math.isfinite(float(entropy.value))


def test_an_enumeration_beyond_its_limit_is_refused_before_the_work(monkeypatch):
    """Poisson experts of rate 1e12 enumerate 1e8 points (about 20 GB across the passes: the process was killed
    for memory). ``MAX_ENUMERATED`` values (points x pools x experts) at most, else a ValueError that says how
    many; here with the limit lowered around a small pool's count (every point in 0 ... about 10 600, two experts,
    two pools)."""
    import opinionpool.numerical as numerical

    experts = Poisson(torch.tensor([[1.0, 1e4], [2.0, 9e3]], dtype=torch.float64))
    expected = opinionpool.holder(experts, alpha=-0.5).log_normalizer
    values = numerical.enumerate_support(opinionpool.family_of(experts), opinionpool.as_experts(experts).params,
                                         torch.zeros(2), -0.5)[0]
    count = values.shape[0] * 2 * 2
    monkeypatch.setattr(numerical, "MAX_ENUMERATED", count)
    assert torch.equal(opinionpool.holder(experts, alpha=-0.5).log_normalizer, expected)  # at the limit: as before
    monkeypatch.setattr(numerical, "MAX_ENUMERATED", count - 1)
    with pytest.raises(ValueError, match=rf"support spans {values.shape[0]} points \(from 0 to 1\d{{4}}\), for 2 "
                                         rf"pool\(s\) of 2 Poisson experts: {count} values, more than "
                                         r"opinionpool.numerical.MAX_ENUMERATED"):
        opinionpool.holder(experts, alpha=-0.5).log_normalizer


@pytest.mark.parametrize("seed", [1, 2])
def test_importance_log_normalizer_states_its_rounding(seed):
    """Two experts 30 sd apart at alpha = 2: the weights u / p are nearly constant, their spread nearly 0, and the
    stated error (under 2 ulps) missed the rounding of the weights' logs and their sum (16 ulps off). Truth: the
    pool's normaliser is sqrt(1/2) per expert, log Z = log(2) / 2 (the cross terms are below e^-112)."""
    double = torch.float64
    experts = Normal(torch.tensor([0.0, 30.0], dtype=double), torch.tensor([1.0, 1.0], dtype=double))
    pool = opinionpool.holder(experts, alpha=2.0, weights=torch.tensor([0.5, 0.5], dtype=double))
    estimate = pool.estimate(method="importance", seed=seed).log_normalizer
    assert abs(float(estimate.value) - 0.5 * math.log(2)) <= float(estimate.error) < 1e-12
