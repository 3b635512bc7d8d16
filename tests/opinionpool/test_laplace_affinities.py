"""The Bhattacharyya and Chernoff coefficients of diagonal Laplace experts (``log_bhattacharyya(...,
family="laplace")``) and the Hellinger pool's pairwise mass (``hellinger_pairwise_mass``), against quadrature in
float64 and at 50 digits: unequal scales, asymmetric weights, experts far apart and nearly equal, tiny and huge
scales, float32, gradients."""

import itertools
import math

import mpmath
import pytest
import torch
from scipy import integrate

import opinionpool.functional as opf
from opinionpool.functional import _laplace_log_chernoff

F64 = torch.float64


def quadrature_log_chernoff(loc_p, logvar_p, loc_q, logvar_q, a, digits=50):
    """``log int p^a q^(1 - a)`` of two 1-D Laplace densities by mpmath's quadrature at ``digits`` digits, on
    pieces split at the locations and at a few scales around them (the integrand's kinks and its decay)."""
    with mpmath.workdps(digits):
        loc_p, loc_q, a = mpmath.mpf(loc_p), mpmath.mpf(loc_q), mpmath.mpf(a)
        b_p, b_q = mpmath.sqrt(mpmath.exp(mpmath.mpf(logvar_p)) / 2), mpmath.sqrt(mpmath.exp(mpmath.mpf(logvar_q)) / 2)

        def integrand(x):
            return mpmath.exp(a * (-mpmath.log(2 * b_p) - abs(x - loc_p) / b_p)
                              + (1 - a) * (-mpmath.log(2 * b_q) - abs(x - loc_q) / b_q))

        lo, hi = min(loc_p, loc_q), max(loc_p, loc_q)
        width = min(b_p / a, b_q / (1 - a))  # the narrower decay
        points = sorted({lo - 100 * width, lo - 10 * width, lo - width, lo, hi, hi + width, hi + 10 * width,
                         hi + 100 * width} | {lo + (hi - lo) * k / 16 for k in range(1, 16)})
        total = mpmath.quad(integrand, [-mpmath.inf] + points + [mpmath.inf])
        return float(mpmath.log(total))


def scipy_log_chernoff(loc_p, logvar_p, loc_q, logvar_q, a):
    """The same integral by scipy's adaptive quadrature in float64 (a second, independent reference)."""
    b_p, b_q = math.sqrt(math.exp(logvar_p) / 2), math.sqrt(math.exp(logvar_q) / 2)

    def integrand(x):
        return math.exp(a * (-math.log(2 * b_p) - abs(x - loc_p) / b_p)
                        + (1 - a) * (-math.log(2 * b_q) - abs(x - loc_q) / b_q))

    span = 80 * max(b_p, b_q)
    value = integrate.quad(integrand, min(loc_p, loc_q) - span, max(loc_p, loc_q) + span,
                           points=sorted((loc_p, loc_q)), limit=500, epsabs=0, epsrel=1e-13)[0]
    return math.log(value)


# (loc_p, logvar_p, loc_q, logvar_q): unequal scales, equal scales, same location, nearly equal experts, far apart,
# and scales 0.1 % apart (the closed form's t = R Delta (1 - e^-g) about 5e-4 and 1.4e-3, each side of its series)
CASES = [(0.3, 0.2, -1.1, 1.5), (2.0, -1.0, -0.5, -1.0), (0.0, 0.5, 0.0, -0.5), (1.0, 0.0, 1.0 + 1e-7, 1e-8),
         (0.0, -3.0, 1.0, 2.0), (-4.0, 1.0, 30.0, 0.0), (0.0, 0.0, 0.0, 0.0), (5.0, 3.0, 5.001, 3.0),
         (0.0, 0.0, 1.0, 0.001), (0.0, 0.0, 1.0, 0.004)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("a", [0.5, 0.1, 0.3, 0.75, 0.95])
def test_chernoff_coefficient_against_quadrature(case, a):
    got = float(_laplace_log_chernoff(*(torch.tensor(v, dtype=F64) for v in case), a))
    expected = quadrature_log_chernoff(*case, a)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-14)
    assert got == pytest.approx(scipy_log_chernoff(*case, a), rel=1e-9, abs=1e-12)
    assert got <= 0  # Hölder's inequality: int p^a q^(1 - a) <= 1


def test_bhattacharyya_of_diagonal_experts_sums_the_coordinates_and_broadcasts():
    loc_p = torch.tensor([[0.3, 2.0, 0.0], [-4.0, 5.0, 1.0]], dtype=F64)
    logvar_p = torch.tensor([[0.2, -1.0, 0.5], [1.0, 3.0, 0.0]], dtype=F64)
    loc_q = torch.tensor([-1.1, -0.5, 0.0], dtype=F64)  # broadcast over the batch of 2
    logvar_q = torch.tensor([1.5, -1.0, -0.5], dtype=F64)
    got = opf.log_bhattacharyya(loc_p, logvar_p, loc_q, logvar_q, family="laplace")
    assert got.shape == (2,)
    for row in range(2):
        expected = sum(quadrature_log_chernoff(float(loc_p[row, d]), float(logvar_p[row, d]), float(loc_q[d]),
                                               float(logvar_q[d]), 0.5) for d in range(3))
        assert float(got[row]) == pytest.approx(expected, rel=1e-12)
    # symmetric, and the Gaussian family is another quantity (the default)
    swapped = opf.log_bhattacharyya(loc_q, logvar_q, loc_p, logvar_p, family="laplace")
    torch.testing.assert_close(swapped, got, rtol=1e-14, atol=0)
    assert not torch.allclose(opf.log_bhattacharyya(loc_p, logvar_p, loc_q, logvar_q), got, rtol=1e-2)


def test_order_and_arguments_swap():
    """C_a(p, q) = C_(1 - a)(q, p), the two rates exchanged."""
    args = [torch.tensor(v, dtype=F64) for v in (0.7, -2.0, -1.3, 1.0)]
    forward = _laplace_log_chernoff(*args, 0.2)
    backward = _laplace_log_chernoff(args[2], args[3], args[0], args[1], 0.8)
    assert float(forward) == pytest.approx(float(backward), rel=1e-14)


@pytest.mark.parametrize("log_factor", [-300.0, -40.0, 40.0, 300.0])
def test_tiny_and_huge_scales(log_factor):
    """The coefficient is invariant under x -> c x (locations times c, log-variances plus 2 log c): standard
    deviations of about e^-300 and e^300 give the unscaled value computed by quadrature, with no overflow of a
    rate ``1 / b``."""
    factor = math.exp(log_factor)
    for case in CASES[:6]:
        loc_p, logvar_p, loc_q, logvar_q = case
        scaled = [torch.tensor(v, dtype=F64) for v in (loc_p * factor, logvar_p + 2 * log_factor, loc_q * factor,
                                                         logvar_q + 2 * log_factor)]
        got = float(_laplace_log_chernoff(*scaled, 0.5))
        assert got == pytest.approx(quadrature_log_chernoff(*case, 0.5), rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("a", [0.5, 0.3])
def test_nearly_equal_experts_keep_the_digits_of_their_small_coefficient(a):
    """log C of order 1e-12 to 1e-16 (locations 1e-6 scales apart, log-variances 1e-6 or 1e-7 apart, at scales e^0
    to e^10), relative to mpmath's quadrature at 50 digits: not the absolute 1e-16 that terms of order one leave;
    identical experts give exactly 0 at every scale (log C <= 0 always)."""
    cases = [(0.0, 0.0, 2e-6, 0.0), (0.0, 3.0, 1e-5, 3.0 + 1e-7), (5.0, 20.0, 5.001, 20.0), (0.0, -1.0, 0.0, -1.0 + 1e-6)]
    for case in cases:
        got = float(_laplace_log_chernoff(*(torch.tensor(v, dtype=F64) for v in case), a))
        assert got == pytest.approx(quadrature_log_chernoff(*case, a), rel=1e-6, abs=0)
    for logvar in (-600.0, -30.0, 0.0, 30.0, 600.0):
        same = torch.tensor([1.5, logvar, 1.5, logvar], dtype=F64)
        assert float(_laplace_log_chernoff(*same, a)) == 0.0


def test_far_apart_experts_keep_their_digits():
    """Equal scales b at distance Delta: BC = (1 + Delta / (2 b)) e^(-Delta / (2 b)) (the integral of
    e^(-|x| / (2b) - |x - Delta| / (2b)) / (2b) on the three pieces), of log -4999.99 at Delta = 10^4 b and -5e10 at
    10^11 b, where the coefficient itself underflows to 0."""
    for distance in (1e4, 1e11):
        logvar = math.log(2.0)  # b = 1
        got = float(opf.log_bhattacharyya(torch.tensor([0.0], dtype=F64), torch.tensor([logvar], dtype=F64),
                                          torch.tensor([distance], dtype=F64), torch.tensor([logvar], dtype=F64),
                                          family="laplace"))
        assert got == pytest.approx(math.log1p(distance / 2) - distance / 2, rel=1e-14)
    # locations whose difference overflows: -inf, not NaN, and a zero gradient
    for dtype, big in ((F64, 1e308), (torch.float32, 3e38)):
        loc = torch.tensor([-big, big], dtype=dtype, requires_grad=True)
        logvar = torch.zeros(2, dtype=dtype, requires_grad=True)
        value = _laplace_log_chernoff(loc[0], logvar[0], loc[1], logvar[1], 0.5)
        assert value.item() == -math.inf
        value.backward()
        assert bool((loc.grad == 0).all() and (logvar.grad == 0).all())


@pytest.mark.parametrize("case", CASES)
def test_float32_matches_float64(case):
    exact = quadrature_log_chernoff(*case, 0.5)
    got = float(_laplace_log_chernoff(*(torch.tensor(v, dtype=torch.float32) for v in case), 0.5))
    assert got == pytest.approx(exact, rel=1e-5, abs=1e-6)


def test_float32_extreme_scales_stay_finite_and_accurate():
    """Scales e^-40 and e^+40 in float32, rates up to e^40 and distances up to 1e27 scales, where the variances and
    their inverses overflow float32 (3.4e38)."""
    cases = [(0.0, -80.0, 1e-17, -80.0), (0.0, 80.0, 1e17, 80.0), (0.0, -80.0, 1.0, 80.0), (0.0, -80.0, 1e10, -80.0)]
    for case in cases:
        got = float(_laplace_log_chernoff(*(torch.tensor(v, dtype=torch.float32) for v in case), 0.5))
        exact = float(_laplace_log_chernoff(*(torch.tensor(v, dtype=F64) for v in case), 0.5))
        assert not math.isnan(got)
        assert got == pytest.approx(exact, rel=1e-5, abs=1e-5)


def test_gradients_against_finite_differences():
    """gradcheck in float64, also at coinciding locations and equal scales (the closed form's safe branches) and
    with experts far apart; the gradient at those points is finite."""
    points = [(0.3, 0.2, -1.1, 1.5), (1.0, -0.5, 1.0, 0.7), (2.0, 0.4, -3.0, 0.4), (0.0, 0.0, 0.0, 0.0),
              (0.0, 0.0, 40.0, 1.0), (1.0, 0.0, 1.0 + 1e-5, 1e-6)]
    for point in points:
        for a in (0.5, 0.3):
            inputs = [torch.tensor([v], dtype=F64, requires_grad=True) for v in point]
            assert torch.autograd.gradcheck(lambda *x, a=a: _laplace_log_chernoff(*x, a), inputs)
            _laplace_log_chernoff(*inputs, a).sum().backward()
            assert all(bool(torch.isfinite(x.grad).all()) for x in inputs)


def test_unknown_family_is_rejected():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="family must be one of .* got 'cauchy'"):
        opf.log_bhattacharyya(x, x, x, x, family="cauchy")
    with pytest.raises(ValueError, match="family must be one of .* got 'cauchy'"):
        opf.hellinger_pairwise_mass(x, x, family="cauchy")


# the Hellinger pool's pairwise mass: three experts, a batch of 2, latent 1 (so quadrature is cheap)
LOC = torch.tensor([[[-1.0], [0.0]], [[0.4], [2.0]], [[3.0], [0.1]]], dtype=F64)
LOGVAR = torch.tensor([[[math.log(0.5)], [0.0]], [[math.log(2.0)], [1.0]], [[math.log(0.1)], [-0.5]]], dtype=F64)
WEIGHTS = torch.tensor([0.6, 0.3, 0.1], dtype=F64)


def density(family, z, loc, logvar):
    if family == "normal":
        return math.exp(-0.5 * (z - loc) ** 2 / math.exp(logvar)) / math.sqrt(2 * math.pi * math.exp(logvar))
    b = math.sqrt(math.exp(logvar) / 2)
    return math.exp(-abs(z - loc) / b) / (2 * b)


def quadrature_pairwise_mass(family, locs, logvars, weights):
    """1 - sum_j w_j^2 / Z with Z = int (sum_j w_j sqrt(q_j))^2, w normalised, by quadrature."""
    w = [x / sum(weights) for x in weights]
    total = integrate.quad(lambda z: sum(wj * density(family, z, m, v) ** 0.5 for wj, m, v in zip(w, locs, logvars))
                           ** 2, -60, 60, points=sorted(locs), limit=400, epsabs=1e-14, epsrel=1e-13)[0]
    return 1 - sum(wj**2 for wj in w) / total


@pytest.mark.parametrize("family", ["normal", "laplace"])
def test_pairwise_mass_against_quadrature(family):
    got = opf.hellinger_pairwise_mass(LOC, LOGVAR, weights=WEIGHTS, family=family)
    assert got.shape == (2,)
    for b in range(2):
        expected = quadrature_pairwise_mass(family, LOC[:, b, 0].tolist(), LOGVAR[:, b, 0].tolist(), WEIGHTS.tolist())
        assert float(got[b]) == pytest.approx(expected, rel=1e-9)
    # equal weights by default; a masked expert takes no part (sample 0 without expert 1)
    equal = opf.hellinger_pairwise_mass(LOC, LOGVAR, family=family)
    assert float(equal[1]) == pytest.approx(
        quadrature_pairwise_mass(family, LOC[:, 1, 0].tolist(), LOGVAR[:, 1, 0].tolist(), [1, 1, 1]), rel=1e-9)
    mask = torch.tensor([[True, True], [False, True], [True, True]])
    masked = opf.hellinger_pairwise_mass(LOC, LOGVAR, weights=WEIGHTS, mask=mask, family=family)
    expected = quadrature_pairwise_mass(family, [LOC[0, 0, 0].item(), LOC[2, 0, 0].item()],
                                        [LOGVAR[0, 0, 0].item(), LOGVAR[2, 0, 0].item()], [0.6, 0.1])
    assert float(masked[0]) == pytest.approx(expected, rel=1e-9)
    assert float(masked[1]) == pytest.approx(float(got[1]), rel=1e-14)


def test_pairwise_mass_of_gaussians_is_the_exact_pools():
    """For Gaussians the same fraction comes from ``holder_mixture``'s components at alpha = 1/2 (a second code
    path: the pool's own components), with the prior expert, a mask and latent 4."""
    generator = torch.Generator().manual_seed(3)
    loc = torch.randn(4, 5, 4, generator=generator, dtype=F64) * 2
    logvar = torch.randn(4, 5, 4, generator=generator, dtype=F64)
    mask = torch.rand(4, 5, generator=generator) > 0.3
    mask[0] = True
    weights = torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1], dtype=F64)
    got = opf.hellinger_pairwise_mass(loc, logvar, weights=weights, mask=mask, prior_expert=True)
    mixture = opf.holder_mixture(loc, logvar, 0.5, weights=weights, mask=mask, prior_expert=True)
    expected = torch.logsumexp(mixture.log_weights[..., 5:], -1).exp()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


def test_pairwise_mass_of_far_apart_laplace_experts_is_tiny_not_zero():
    """Three Laplace experts of scale b = 1 at 0, 200 and 400, equal weights: BC = (1 + Delta / 2) e^(-Delta / 2),
    so the mass is 2 (2 s + s') / (3 + 2 (2 s + s')) with s = BC(200), s' = BC(400), about 1e-43."""
    loc = torch.tensor([0.0, 200.0, 400.0], dtype=F64).reshape(3, 1, 1)
    logvar = torch.full((3, 1, 1), math.log(2.0), dtype=F64)
    got = float(opf.hellinger_pairwise_mass(loc, logvar, family="laplace"))
    s, s_far = 101 * math.exp(-100), 201 * math.exp(-200)
    assert got == pytest.approx(2 * (2 * s + s_far) / (3 + 2 * (2 * s + s_far)), rel=1e-12)
    assert got > 0


def test_identical_experts_put_all_but_the_diagonal_in_the_pairs():
    """Identical experts: every component has the same density, so the mass is the pairs' share of the weights,
    1 - sum w_j^2."""
    loc, logvar = torch.ones(3, 2, 5, dtype=F64), torch.full((3, 2, 5), -0.3, dtype=F64)
    for family, (w0, w1, w2) in itertools.product(("normal", "laplace"), [(0.6, 0.3, 0.1), (1.0, 1.0, 1.0)]):
        weights = torch.tensor([w0, w1, w2], dtype=F64)
        normalised = weights / weights.sum()
        got = opf.hellinger_pairwise_mass(loc, logvar, weights=weights, family=family)
        torch.testing.assert_close(got, (1 - (normalised**2).sum()).expand(2), rtol=1e-12, atol=0)


@pytest.mark.parametrize("family", ["normal", "laplace"])
def test_pairwise_mass_with_the_prior_expert_against_quadrature(family):
    """The prior expert is the family's standard one: N(0, 1), or Laplace(0, 1) of variance 2 (not of variance 1),
    with its own weight (the last)."""
    weights = torch.tensor([0.6, 0.3, 0.1, 0.5], dtype=F64)
    got = opf.hellinger_pairwise_mass(LOC, LOGVAR, weights=weights, prior_expert=True, family=family)
    prior_logvar = 0.0 if family == "normal" else math.log(2.0)
    for b in range(2):
        expected = quadrature_pairwise_mass(family, LOC[:, b, 0].tolist() + [0.0],
                                            LOGVAR[:, b, 0].tolist() + [prior_logvar], weights.tolist())
        assert float(got[b]) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("family", ["normal", "laplace"])
def test_pairwise_mass_without_a_pair_has_finite_gradients(family):
    """A sample whose only weighted present expert has no partner (the others absent or of weight zero) has mass 0,
    and gradients 0, not NaN; the other samples' gradients are those they have alone."""
    generator = torch.Generator().manual_seed(5)
    loc = torch.randn(3, 2, 4, generator=generator, dtype=F64).requires_grad_()
    logvar = torch.randn(3, 2, 4, generator=generator, dtype=F64).requires_grad_()
    mask = torch.tensor([[True, True], [False, True], [False, True]])
    alone = opf.hellinger_pairwise_mass(loc[:, 1:], logvar[:, 1:], family=family)
    loc_alone, logvar_alone = torch.autograd.grad(alone.sum(), (loc, logvar))
    for weights, present in ((None, mask), (torch.tensor([1.0, 0.0, 0.0], dtype=F64), None)):
        loc.grad = logvar.grad = None
        mass = opf.hellinger_pairwise_mass(loc, logvar, weights=weights, mask=present, family=family)
        assert float(mass[0].detach()) == 0
        mass.sum().backward()
        assert bool(torch.isfinite(loc.grad).all()) and bool(torch.isfinite(logvar.grad).all())
        assert not bool(loc.grad[:, 0].any()) and not bool(logvar.grad[:, 0].any())
        if weights is None:
            torch.testing.assert_close(loc.grad, loc_alone, rtol=1e-12, atol=0)
            torch.testing.assert_close(logvar.grad, logvar_alone, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gradient_of_subnormal_distances_is_that_of_coinciding_locations(dtype):
    """Locations a subnormal number of scales apart: d log C / d loc = O(R s), about 0 (the coefficient is flat in
    Delta at 0), not the -R sign(Delta) left when the two O(s) terms that cancel underflow unevenly."""
    tiny = torch.finfo(dtype).tiny
    for log_factor in (-6, -3, -1, 0, 1):
        for a, logvar_q in ((0.5, 0.0), (0.5, 1e-3), (0.3, 0.0)):
            distance = tiny * 10.0**log_factor / math.sqrt(0.5)  # s = R Delta = tiny 10^k for a = 1/2, b = 1/sqrt(2)
            inputs = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in (0.0, 0.0, distance, logvar_q)]
            if float(inputs[2].detach()) == 0:  # 10^-6 tiny underflows in float32
                continue
            _laplace_log_chernoff(*inputs, a).backward()
            assert abs(float(inputs[0].grad)) < 1e-4 and abs(float(inputs[2].grad)) < 1e-4
