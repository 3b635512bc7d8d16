"""The quadrature on experts with power-law tails: moments whose mass lies far beyond the experts' scale, and
moments that do not exist.

References are closed forms: a pool of order 1/2 of Pareto experts ``k_j z^-(k_j + 1)`` on ``(1, inf)`` is the
mixture of the power laws ``sqrt(k_i k_j) z^-((k_i + k_j) / 2 + 1)``, each of which integrates against ``z^m`` and
``log z`` exactly; the mixture (order 1) has the experts' own moments.
"""

import math
import warnings

import pytest
import torch

import opinionpool
from opinionpool import CustomFamily


def pareto_family(moments: bool = True):
    """Pareto(k) of scale 1 with ``eta = -(k + 1)``, ``T(z) = log z``; without ``moments`` the engine has only
    ``E[T]`` (the one-pool rule), with them it integrates batches (the batched rule)."""
    def shape(eta):
        return -eta[..., 0] - 1

    extra = {}
    if moments:
        extra = {"mean": lambda eta: torch.where(shape(eta) > 1, shape(eta) / (shape(eta) - 1), math.inf),
                 "variance": lambda eta: torch.where(
                     shape(eta) > 2, shape(eta) / ((shape(eta) - 1) ** 2 * (shape(eta) - 2)), math.inf)}
    return CustomFamily(log_normalizer=lambda eta: -torch.log(shape(eta)),
                        sufficient_statistic=lambda z: torch.log(z).unsqueeze(-1),
                        log_base_measure=lambda z: torch.zeros_like(z), num_params=1,
                        natural_domain=lambda eta: eta[..., 0] < -1, support_interval=(1.0, math.inf),
                        name="Pareto" if moments else "Pareto without moments", **extra)


def pareto_pool(shapes, weights, alpha, moments=True):
    family = pareto_family(moments)
    experts = opinionpool.Experts(family, torch.tensor([[-(k + 1.0)] for k in shapes], dtype=torch.float64))
    return opinionpool.NumericalHolderPool(experts, alpha, torch.tensor(weights, dtype=torch.float64))


def half_pool_integral(shapes, weights, power=0, log_power=0):
    """``int_1^inf z^power (log z)^log_power u(z) dz`` for the pool of order 1/2, ``u = (sum_j w_j q_j^(1/2))^2``:
    each pair's power law ``z^-(a + 1)``, ``a`` the mean of the two shapes, gives ``1 / (a - power)`` or, for
    ``log z``, ``1 / a^2``."""
    total = 0.0
    for wi, ki in zip(weights, shapes):
        for wj, kj in zip(weights, shapes):
            a = (ki + kj) / 2
            total += wi * wj * math.sqrt(ki * kj) * (1 / (a - power) if log_power == 0 else 1 / a**2)
    return total


@pytest.mark.parametrize("shapes, weights", [((2.05, 2.05), (0.3, 0.7)), ((2.05, 3.0), (0.3, 0.7)),
                                             ((2.2, 4.5), (0.8, 0.2))])
def test_moments_of_a_pool_of_order_half_of_heavy_tailed_experts(shapes, weights):
    """A Pareto pool of shape near 2 has much of its variance beyond 1e13 of its scale, where the old tail map
    ``x / (1 - x)`` stopped: variance 31.3 +- 0.49 for 37.2 at shape 2.05. Now within its stated error."""
    z0 = half_pool_integral(shapes, weights)
    mean = half_pool_integral(shapes, weights, 1) / z0
    variance = half_pool_integral(shapes, weights, 2) / z0 - mean**2
    est = pareto_pool(shapes, weights, 0.5).estimate(method="quadrature")
    assert abs(float(est.log_normalizer.value) - math.log(z0)) <= float(est.log_normalizer.error)
    assert abs(float(est.mean.value) - mean) <= float(est.mean.error)
    assert abs(float(est.variance.value) - variance) <= float(est.variance.error)
    # and the errors are useful: the remainder beyond the reach is small where the tail is not near the edge
    assert float(est.variance.error) <= 1e-4 * variance


def test_expected_statistic_of_heavy_tailed_experts_by_the_one_pool_rule():
    """Without numeric moments the family goes through the one-pool rule: ``E[log z]`` against its closed form."""
    shapes, weights = (1.1, 2.6), (0.35, 0.65)
    expected = half_pool_integral(shapes, weights, log_power=1) / half_pool_integral(shapes, weights)
    est = pareto_pool(shapes, weights, 0.5, moments=False).estimate(method="quadrature")
    value, error = float(est.expected_statistic.value[0]), float(est.expected_statistic.error[0])
    assert abs(value - expected) <= error <= 1e-9


def test_the_mixture_of_heavy_tailed_experts_has_their_moments():
    """At order 1 the pool is the mixture: its mean and variance are the experts' mixed, here with one expert of
    shape 2.3 whose variance converges slowly (as z^-0.3)."""
    shapes, weights = (2.3, 5.0), (0.6, 0.4)
    second = sum(w * k / (k - 2) for w, k in zip(weights, shapes))
    mean = sum(w * k / (k - 1) for w, k in zip(weights, shapes))
    est = pareto_pool(shapes, weights, 1.0).estimate(method="quadrature")
    assert abs(float(est.mean.value) - mean) <= float(est.mean.error)
    assert abs(float(est.variance.value) - (second - mean**2)) <= float(est.variance.error)


@pytest.mark.parametrize("shapes, alpha", [((1.8, 1.8), 0.5), ((1.5, 3.0), 1.0), ((1.9, 6.0), 0.25)])
def test_an_infinite_variance_is_returned_as_infinite(shapes, alpha):
    """For alpha > 0 the pool's tail is its heaviest expert's: below shape 2 its variance is infinite (it came back
    finite, 52.7 +- 18 at shape 1.8), while its mean stays finite and accurate."""
    est = pareto_pool(shapes, (0.4, 0.6), alpha).estimate(method="quadrature")
    assert float(est.variance.value) == math.inf
    assert math.isfinite(float(est.mean.value)) and float(est.mean.error) < 1e-6


def test_a_negative_order_follows_the_lightest_tail():
    """For alpha < 0 the pool's tail is its lightest expert's: the heavy expert (infinite variance) leaves the
    variance finite. Reference: scipy's quadrature of the harmonic pool ``1 / sum_j (w_j / q_j)`` in ``log z``."""
    from scipy import integrate

    shapes, weights = (1.5, 4.0), (0.5, 0.5)

    def pooled(s, power):  # z^power u(z) dz at z = e^s
        return math.exp((power + 1) * s) / sum(w / (k * math.exp(-(k + 1) * s)) for w, k in zip(weights, shapes))

    z0, z1, z2 = (integrate.quad(pooled, 0, 60, args=(k,), epsabs=0, epsrel=1e-13, limit=200)[0] for k in range(3))
    est = pareto_pool(shapes, weights, -1.0).estimate(method="quadrature")
    variance = z2 / z0 - (z1 / z0) ** 2
    assert abs(float(est.variance.value) - variance) <= float(est.variance.error) + 1e-11 * variance
    assert float(est.variance.error) < 1e-6 * variance


def student_like_family():
    """``q(z) ∝ (1 + z^2)^eta`` on the real line, ``eta < -1/2`` (Cauchy at ``eta = -1``): both tails power laws."""
    def log_normalizer(eta):
        a = -eta[..., 0]
        return 0.5 * math.log(math.pi) + torch.lgamma(a - 0.5) - torch.lgamma(a)

    return CustomFamily(log_normalizer=log_normalizer, sufficient_statistic=lambda z: torch.log1p(z * z).unsqueeze(-1),
                        log_base_measure=lambda z: torch.zeros_like(z), num_params=1,
                        natural_domain=lambda eta: eta[..., 0] < -0.5, support_interval=(-math.inf, math.inf),
                        mean=lambda eta: torch.zeros_like(eta[..., 0]),
                        variance=lambda eta: torch.where(eta[..., 0] < -1.5, 1 / (-2 * eta[..., 0] - 3), math.inf),
                        name="Student-like")


def test_two_heavy_tails():
    """Power laws on both sides: ``eta = -1.6`` has a variance of 5 that converges as ``z^-1.2`` on both sides,
    ``eta = -3`` one of 1/3; the mean 0 either way."""
    family = student_like_family()
    for eta in (-1.6, -3.0):
        experts = opinionpool.Experts(family, torch.tensor([[eta], [eta]], dtype=torch.float64))
        est = opinionpool.NumericalHolderPool(experts, 0.5, torch.tensor([0.3, 0.7], dtype=torch.float64)).estimate(
            method="quadrature")
        assert abs(float(est.mean.value)) <= float(est.mean.error) < 1e-8
        variance = 1 / (-2 * eta - 3)
        assert abs(float(est.variance.value) - variance) <= float(est.variance.error) < 1e-6 * variance


def test_a_mean_whose_two_tails_diverge_is_undefined_and_said_so():
    """A Cauchy pool (``eta = -1``): the two halves of its mean diverge with opposite signs, so the mean is NaN with
    a warning, never silently, and the variance infinite; with ``eta = -1.2`` the mean is 0 and the variance
    infinite. Identical experts pool to themselves: log Z = 0. (The experts' infinite variance placed the panels by
    a quadrature's "finite part" of it, 0 at mean 0: the tails reached 2e-208 and the pool was refused.)"""
    family = student_like_family()

    def estimate(eta):
        experts = opinionpool.Experts(family, torch.tensor([[eta], [eta]], dtype=torch.float64))
        return opinionpool.NumericalHolderPool(experts, 0.5, torch.tensor([0.3, 0.7], dtype=torch.float64)).estimate(
            method="quadrature")

    with pytest.warns(RuntimeWarning, match="mean is undefined"):
        cauchy = estimate(-1.0)
    assert abs(float(cauchy.log_normalizer.value)) <= float(cauchy.log_normalizer.error) < 1e-9
    assert math.isnan(float(cauchy.mean.value)) and float(cauchy.variance.value) == math.inf
    heavy = estimate(-1.2)
    assert abs(float(heavy.mean.value)) <= float(heavy.mean.error) < 1e-9
    assert float(heavy.variance.value) == math.inf


def unnormalisable_pool():
    """A custom family whose stated normaliser and moments are wrong: ``z^eta`` on ``(1, inf)`` with ``eta`` of -0.5
    and -0.7 has no normaliser."""
    family = CustomFamily(log_normalizer=lambda eta: torch.zeros_like(eta[..., 0]),
                          mean=lambda eta: torch.full_like(eta[..., 0], 2.0),
                          variance=lambda eta: torch.ones_like(eta[..., 0]),
                          sufficient_statistic=lambda z: torch.log(z).unsqueeze(-1),
                          log_base_measure=lambda z: torch.zeros_like(z), num_params=1,
                          natural_domain=lambda eta: eta[..., 0] < 0, support_interval=(1.0, math.inf),
                          name="unnormalisable")
    experts = opinionpool.Experts(family, torch.tensor([[-0.5], [-0.7]], dtype=torch.float64))
    return opinionpool.NumericalHolderPool(experts, 0.5, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_a_density_that_cannot_be_normalised_is_refused():
    """A custom family whose stated normaliser and moments are wrong (``z^-1/2`` on ``(1, inf)`` has none) is
    refused by name rather than integrated to a finite number."""
    pool = unnormalisable_pool()
    with pytest.raises(ValueError, match="not normalisable"):
        pool.estimate(method="quadrature")


def test_light_tails_reach_far_without_changing_anything():
    """Gaussian tails vanish long before the mapped tails' reach (1e100 of their scale): no remainder, no NaN from
    points whose squares are large, and the moments of experts far apart within their errors of scipy's adaptive
    quadrature of the same pooled density."""
    from scipy import integrate, stats
    from torch.distributions import Normal

    means, sds, weights, alpha = (-30.0, 2.0), (0.5, 4.0), (0.2, 0.8), 0.7
    experts = Normal(torch.tensor(means, dtype=torch.float64), torch.tensor(sds, dtype=torch.float64))
    est = opinionpool.NumericalHolderPool(experts, alpha, torch.tensor(weights, dtype=torch.float64)).estimate(
        method="quadrature")

    def pooled(z):
        return sum(w * stats.norm.pdf(z, m, s) ** alpha for w, m, s in zip(weights, means, sds)) ** (1 / alpha)

    opts = {"points": [-33.0, -30.0, -27.0, 2.0], "limit": 500, "epsabs": 0, "epsrel": 1e-13}
    z0, m1, m2 = (integrate.quad(lambda z, k=k: z**k * pooled(z), -80, 60, **opts)[0] for k in range(3))
    mean = m1 / z0
    for e, expected in ((est.log_normalizer, math.log(z0)), (est.mean, mean), (est.variance, m2 / z0 - mean**2)):
        assert abs(float(e.value) - expected) <= float(e.error) < 1e-9 * max(1.0, abs(expected))


def test_the_power_mean_of_huge_log_densities_at_a_tiny_order():
    """Far in a Gaussian tail the experts' log-densities reach -1e79; at alpha = 1e-100 the cumulant series applies,
    whose fourth power of the deviations overflowed (NaN: the pool vanished there and a tiny-alpha pool was refused
    as not normalisable). The value is the weighted mean plus alpha Var / 2 (below its rounding here), and the
    derivative in alpha half the weighted variance."""
    from opinionpool.numerical import log_power_mean

    values = torch.tensor([-8.8e78, -3.5e79], dtype=torch.float64)
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    alpha = torch.tensor(1e-100, dtype=torch.float64, requires_grad=True)
    value = log_power_mean(values, weights.log(), alpha)
    (gradient,) = torch.autograd.grad(value, alpha)
    mean = float((weights * values).sum())
    variance = float((weights * (values - mean) ** 2).sum())
    assert float(value) == pytest.approx(mean, rel=1e-15)
    assert float(gradient) == pytest.approx(variance / 2, rel=1e-12)


def test_a_narrow_pool_of_experts_of_very_different_scales_keeps_finite_errors():
    """At alpha = -1 the pool follows the narrow expert while the mapped tails reach 1e100 of the wide one's scale:
    there ``t^2`` overflows where ``u`` is 0 (a remainder of inf and then NaN as the variance's error)."""
    from torch.distributions import Normal

    experts = Normal(torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([1e40, 1e-20], dtype=torch.float64))
    est = opinionpool.NumericalHolderPool(experts, -1.0, torch.tensor([0.5, 0.5], dtype=torch.float64)).estimate(
        method="quadrature")
    for e in (est.log_normalizer, est.mean, est.variance):
        assert math.isfinite(float(e.value)) and math.isfinite(float(e.error))
    assert float(est.variance.error) < 1e-9 * float(est.variance.value)


def test_an_unnormalisable_pool_has_no_cdf():
    """The refusal is not taken for an interval without mass (which the cdf's tail integrals may meet): it raises."""
    pool = unnormalisable_pool()
    with pytest.raises(ValueError, match="not normalisable"):
        pool.cdf(torch.tensor(3.0, dtype=torch.float64))


def test_an_infinite_moment_has_no_gradient():
    """The variance of Paretos of shape 1.8 is infinite: its gradient is NaN (it was the truncated rule's, 3e22),
    while the finite mean's is the exact one (finite differences of the closed form)."""
    params = torch.tensor([[-2.8], [-4.0]], dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([0.4, 0.6], dtype=torch.float64)
    pool = opinionpool.NumericalHolderPool(opinionpool.Experts(pareto_family(), params), 0.5, weights)
    assert float(pool.variance) == math.inf
    (gradient,) = torch.autograd.grad(pool.variance, params)
    assert torch.isnan(gradient).all()
    (gradient,) = torch.autograd.grad(pool.mean, params)

    def mean(shapes):
        return half_pool_integral(shapes, weights.tolist(), 1) / half_pool_integral(shapes, weights.tolist())

    h = 1e-6
    for j in range(2):
        up, down = [1.8, 3.0], [1.8, 3.0]
        up[j] += h
        down[j] -= h
        # eta = -(k + 1): d/d eta = -d/dk
        assert float(gradient[j, 0]) == pytest.approx(-(mean(up) - mean(down)) / (2 * h), rel=1e-6)


def test_an_expert_whose_variance_overflows_is_refused_by_name():
    """A Normal of scale 1e200 has an infinite variance in float64 without a heavy tail: the width from its density
    at the mean (1e200) is beyond what the engine resolves, and it is refused by name (it was a ZeroDivisionError)."""
    from torch.distributions import Normal

    experts = Normal(torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([1e200, 1e199], dtype=torch.float64))
    pool = opinionpool.NumericalHolderPool(experts, -1.0, torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="1e\\+200 wide at its mean"):
        pool.estimate(method="quadrature")


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_an_expert_whose_density_vanishes_carries_no_rounding(alpha):
    """Experts of scales 1e40 and 1e-20 at 0: where the narrow one's density is 0 its log-density's terms (1e120)
    move nothing, yet their rounding was charged in full: log Z = log(1/2) +- 4e104 at alpha = 1/2. The errors now
    cover the closed form and are small."""
    from torch.distributions import Normal

    experts = Normal(torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([1e40, 1e-20], dtype=torch.float64))
    pool = opinionpool.NumericalHolderPool(experts, alpha, torch.tensor([0.5, 0.5], dtype=torch.float64))
    est = pool.estimate(method="quadrature")
    # u = (sum_j 0.5 q_j^alpha)^(1/alpha) is 0.5^(1/alpha) q_j wherever one expert's density dominates, which each
    # does over all but a relative 1e-30 of its own mass: Z = 2 * 0.5^(1/alpha)
    expected = math.log(2 * 0.5 ** (1 / alpha))
    assert abs(float(est.log_normalizer.value) - expected) <= float(est.log_normalizer.error) < 1e-10
    assert float(est.variance.error) < 1e-9 * float(est.variance.value)


def test_the_cdf_far_beyond_the_experts():
    """The tail integral from 1e150 mapped with the experts' scale never left that float, so its power law could
    not be fitted and the pool was refused as not normalisable; the tails of intervals far out now scale with their
    distance from the experts, and their power laws are fitted about the experts' centre."""
    from torch.distributions import Normal

    normal = opinionpool.NumericalHolderPool(Normal(torch.tensor([0.0, 3.0], dtype=torch.float64),
                                                    torch.tensor([1.0, 2.0], dtype=torch.float64)), 2.0,
                                             torch.tensor([0.4, 0.6], dtype=torch.float64))
    pareto = pareto_pool((2.05, 3.0), (0.3, 0.7), 0.5)
    far = torch.tensor([1e101, 1e150, -1e150], dtype=torch.float64)
    assert normal.cdf(far).tolist() == [1.0, 1.0, 0.0]
    values = pareto.cdf(far[:2])
    # 1 - F(z) = sum of the pairs' z^-a, below 1e-200 here
    assert values.tolist() == [1.0, 1.0]


# ------------------------------------------------------------------ forecast scores of pools with infinite variance
def pareto_half_pool_scores(shapes, weights, y):
    """``(crps, cdf)`` at ``y`` of the Pareto pool of order 1/2 from its closed form: ``1 - F(z) = sum_ij b_ij
    z^-a_ij``, ``b_ij = c_ij / (a_ij Z)`` for the pair's power law ``c_ij z^-(a_ij + 1)``; the CRPS is ``(1 - y) +
    int_1^inf S^2`` below the support and ``(y - 1) - 2 int_1^y S + int_1^inf S^2`` on it."""
    z0 = half_pool_integral(shapes, weights)
    laws = [(wi * wj * math.sqrt(ki * kj) / ((ki + kj) / 2) / z0, (ki + kj) / 2)
            for wi, ki in zip(weights, shapes) for wj, kj in zip(weights, shapes)]
    squared = math.fsum(bi * bj / (ai + aj - 1) for bi, ai in laws for bj, aj in laws)
    if y <= 1:
        return (1 - y) + squared, 0.0
    survival_integral = math.fsum(b * (1 - y ** (1 - a)) / (a - 1) for b, a in laws)
    return (y - 1) - 2 * survival_integral + squared, 1 - math.fsum(b * y**-a for b, a in laws)


@pytest.mark.parametrize("shapes, weights", [((1.5, 3.0), (0.4, 0.6)), ((1.2, 1.8), (0.3, 0.7))])
def test_crps_and_pit_of_a_pool_of_infinite_variance(shapes, weights):
    """The forecast tools placed their panels at the mean +- 12 standard deviations, so a pool whose variance is
    infinite raised a ValueError (before the heavy-tail quadrature it had a wrong finite variance, whose panels
    happened to cover it). Its panels now come from the quadrature's nodes: the CRPS and PIT against the closed form,
    from below the support to far in the tail."""
    pool = pareto_pool(shapes, weights, 0.5)
    assert math.isinf(float(pool.variance))
    ys = [0.5, 1.0 + 1e-9, 1.2, 2.0, 10.0, 1e3, 1e8]
    scores = opinionpool.crps(pool, torch.tensor(ys, dtype=torch.float64))
    transforms = opinionpool.pit(pool, torch.tensor(ys, dtype=torch.float64))
    for y, score, transform in zip(ys, scores.tolist(), transforms.tolist()):
        expected_score, expected_cdf = pareto_half_pool_scores(shapes, weights, y)
        assert score == pytest.approx(expected_score, rel=1e-12), y
        assert transform == pytest.approx(expected_cdf, rel=1e-12, abs=1e-15), y
    table = opinionpool.coverage(pool, torch.tensor(ys, dtype=torch.float64), levels=(0.5,))
    assert table.empirical == (pytest.approx(sum(abs(pareto_half_pool_scores(shapes, weights, y)[1] - 0.5) <= 0.25
                                                 for y in ys) / len(ys)),)


@pytest.mark.parametrize("eta", [-1.2, -1.0, -0.8])
def test_crps_and_pit_of_two_sided_power_laws(eta):
    """Identical Student-like experts pool to themselves, a Student t of ``-2 eta - 1`` degrees of freedom and scale
    ``(-2 eta - 1)^(-1/2)``: of infinite variance (-1.2), a Cauchy (-1, whose mean is undefined: no warning about it
    either, since nobody asked for the mean) and without a mean (-0.8). Against scipy's t."""
    stats = pytest.importorskip("scipy.stats")
    integrate = pytest.importorskip("scipy.integrate")
    freedom = -2 * eta - 1
    reference = stats.t(freedom, scale=freedom**-0.5)
    experts = opinionpool.Experts(student_like_family(), torch.tensor([[eta], [eta]], dtype=torch.float64))
    pool = opinionpool.NumericalHolderPool(experts, 0.5, torch.tensor([0.3, 0.7], dtype=torch.float64))
    ys = [-3.0, 0.0, 0.7, 50.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = opinionpool.crps(pool, torch.tensor(ys, dtype=torch.float64))
        transforms = opinionpool.pit(pool, torch.tensor(ys, dtype=torch.float64))
    for y, score, transform in zip(ys, scores.tolist(), transforms.tolist()):
        expected = (integrate.quad(lambda x: reference.cdf(x) ** 2, -math.inf, y, epsabs=0, epsrel=1e-12, limit=500)[0]
                    + integrate.quad(lambda x: reference.sf(x) ** 2, y, math.inf, epsabs=0, epsrel=1e-12, limit=500)[0])
        assert score == pytest.approx(expected, rel=1e-10), y
        assert transform == pytest.approx(reference.cdf(y), rel=1e-12, abs=1e-15), y


def test_a_crps_that_diverges_is_infinite_and_a_batch_is_its_pools():
    """A tail ``1 - F ~ z^-0.4`` (``eta = -0.7``) has an infinite CRPS (``int (1 - F)^2`` diverges) but a PIT; a
    batch of pools of different experts scores each as it scores alone, and its PIT agrees with scipy's quadrature of
    the pool's density, ``(sum_j w_j q_j^(1/2))^2``."""
    integrate = pytest.importorskip("scipy.integrate")
    family = student_like_family()
    divergent = opinionpool.NumericalHolderPool(
        opinionpool.Experts(family, torch.tensor([[-0.7], [-0.7]], dtype=torch.float64)), 0.5, [0.3, 0.7])
    assert math.isinf(float(opinionpool.crps(divergent, torch.tensor(0.5, dtype=torch.float64))))
    assert float(opinionpool.pit(divergent, torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(0.5, rel=1e-12)

    params = torch.tensor([[[-1.2], [-3.0]], [[-1.1], [-1.4]], [[-2.0], [-1.3]]], dtype=torch.float64)
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    pool = opinionpool.NumericalHolderPool(opinionpool.Experts(family, params), 0.5, weights)
    ys = torch.tensor([[-1.0], [0.3], [10.0], [1e4]], dtype=torch.float64)
    scores, transforms = opinionpool.crps(pool, ys), opinionpool.pit(pool, ys)
    for j in range(3):
        alone = opinionpool.NumericalHolderPool(opinionpool.Experts(family, params[j]), 0.5, weights)
        assert torch.allclose(opinionpool.crps(alone, ys[:, 0]), scores[:, j], rtol=1e-13, atol=0)
        etas = params[j, :, 0].tolist()

        def density(z, etas=etas):
            return math.fsum(w * math.exp(0.5 * (eta * math.log1p(z * z) - family.log_normalizer(
                torch.tensor([eta], dtype=torch.float64)).item())) for w, eta in zip(weights.tolist(), etas)) ** 2

        total = integrate.quad(density, -math.inf, math.inf, epsabs=0, epsrel=1e-13, limit=500)[0]
        for i, y in enumerate(ys[:, 0].tolist()):
            if y < 0:
                expected = integrate.quad(density, -math.inf, y, epsabs=0, epsrel=1e-13, limit=500)[0] / total
            else:
                expected = 1 - integrate.quad(density, y, math.inf, epsabs=0, epsrel=1e-13, limit=500)[0] / total
            assert float(transforms[i, j]) == pytest.approx(expected, rel=1e-12, abs=1e-15), (j, y)


@pytest.mark.parametrize("eta", [-3.0, -1.2])
def test_far_quantiles_of_a_power_law_tail(eta):
    """Beyond the outermost node the quantile is bisected on the tail's adaptive mass; towards an infinite end that
    bisection halved a bracket as wide as the nodes' span (1e65 and more on a power-law tail) in ``z``, which left
    1e35: the quantile of 1e-80 of a Student t of 5 degrees of freedom came out at -1.3e14 for -7.0e15. It is now
    halved in the log of the distance; and a quantile beyond the outermost node with mass (1e-200 for 1.4 degrees of
    freedom, -2.9e142) stopped a span of the nodes past it (-2.9e100). Against scipy's t (identical experts pool to
    themselves), to the tail mass's tolerance (1e-11 relative) over the tail's index."""
    stats = pytest.importorskip("scipy.stats")
    freedom = -2 * eta - 1
    reference = stats.t(freedom, scale=freedom**-0.5)
    experts = opinionpool.Experts(student_like_family(), torch.tensor([[eta], [eta]], dtype=torch.float64))
    pool = opinionpool.NumericalHolderPool(experts, 0.5, torch.tensor([0.3, 0.7], dtype=torch.float64))
    levels = [1e-200, 1e-80, 1e-20, 1 - 1e-15]
    for level, quantile in zip(levels, pool.icdf(torch.tensor(levels, dtype=torch.float64)).tolist()):
        expected = reference.ppf(level) if level < 0.5 else reference.isf(1 - level)
        assert quantile == pytest.approx(expected, rel=1e-10), level


@pytest.mark.parametrize("eta", [-0.65, -0.8])
def test_quantiles_of_very_heavy_tails_between_nodes_decades_apart(eta):
    """Tails of index 0.3 and 0.6: the nodes around a quantile lie decades apart, and the 32-point rule between them
    in ``z`` put the quantile 1e-20 of a t of 0.6 degrees of freedom at -1.09e36 for -4.03e32; in ``log|z|`` it is
    exact to rounding. Against scipy's t."""
    stats = pytest.importorskip("scipy.stats")
    freedom = -2 * eta - 1
    reference = stats.t(freedom, scale=freedom**-0.5)
    experts = opinionpool.Experts(student_like_family(), torch.tensor([[eta], [eta]], dtype=torch.float64))
    pool = opinionpool.NumericalHolderPool(experts, 0.5, torch.tensor([0.3, 0.7], dtype=torch.float64))
    levels = [1e-20, 1e-12, 1e-6, 0.02, 0.3, 0.98, 1 - 1e-6, 1 - 1e-12]
    for level, quantile in zip(levels, pool.icdf(torch.tensor(levels, dtype=torch.float64)).tolist()):
        expected = reference.ppf(level) if level < 0.5 else reference.isf(1 - level)
        assert quantile == pytest.approx(expected, rel=1e-10), level


def test_a_float32_pool_of_very_heavy_tails_keeps_its_tails_in_the_crps():
    """A float32 pool's node panels reached the float64 levels (1e-13), whose edges for a tail of index near 1/2 lie
    where the float32 density is 0: the tail beyond them was dropped (7.25 for 8.592; a divergent CRPS finite).
    They now stop at float32's levels, as torch distributions' quantile panels do. Against the float64 pool, itself
    checked against scipy above."""
    family = student_like_family()
    for eta, finite in ((-0.76, True), (-0.7, False)):
        scores = []
        for dtype in (torch.float64, torch.float32):
            experts = opinionpool.Experts(family, torch.tensor([[eta], [eta]], dtype=dtype))
            pool = opinionpool.NumericalHolderPool(experts, 0.5, torch.tensor([0.3, 0.7], dtype=dtype))
            scores.append(float(opinionpool.crps(pool, torch.tensor([-3.0], dtype=dtype))))
        if finite:
            assert scores[0] == pytest.approx(8.592413873277, rel=1e-9)
            assert scores[1] == pytest.approx(scores[0], rel=1e-4)
        else:
            assert scores == [math.inf, math.inf]
