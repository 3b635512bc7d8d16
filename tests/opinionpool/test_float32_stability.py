"""float32 behaviour on the ranges VAEs produce: log-variances in [-30, 30], |mu| <= 1e3, latent
sizes up to 4096, up to 16 experts; compared with the same computation in float64."""

import math

import pytest
import torch

import opinionpool.functional as opf

EPS32 = torch.finfo(torch.float32).eps


def check_against_float64(mu64, logvar64, alpha, **kwargs):
    loc64, lv64 = opf.holder(mu64, logvar64, alpha, **kwargs)
    mu32 = mu64.float().requires_grad_(True)
    lv32 = logvar64.float().requires_grad_(True)
    loc32, lvout32 = opf.holder(mu32, lv32, alpha, **kwargs)
    assert torch.isfinite(loc32).all() and torch.isfinite(lvout32).all()
    (loc32.sum() + lvout32.sum()).backward()
    assert torch.isfinite(mu32.grad).all() and torch.isfinite(lv32.grad).all()
    sd64 = (0.5 * lv64).exp()
    ulps = 8 * EPS32 * mu64.abs().amax(0)  # a few float32 ulps of the largest |mu| involved
    mean_err = (loc32.double() - loc64).abs()
    assert (mean_err <= torch.maximum(1e-3 * sd64, ulps)).all(), (mean_err / sd64).max()
    var_err = (lvout32.double().exp() - lv64.exp()).abs()
    allowance = torch.maximum(1e-3 * lv64.exp(), 2 * ulps * sd64 + ulps**2)
    assert (var_err <= allowance).all(), (var_err / lv64.exp()).max()


@pytest.mark.parametrize("alpha", [0, 1 / 2, 1])
@pytest.mark.parametrize("num_experts,dim", [(2, 4096), (5, 512), (16, 64)])
def test_float32_random_experts(alpha, num_experts, dim):
    g = torch.Generator().manual_seed(num_experts)
    mu = (torch.rand(num_experts, 4, dim, generator=g) * 2 - 1) * 1e3
    logvar = torch.rand(num_experts, 4, dim, generator=g) * 60 - 30
    check_against_float64(mu, logvar, alpha)


@pytest.mark.parametrize("alpha", [0, 1 / 2, 1 / 3])
def test_float32_nearly_agreeing_sharp_experts(alpha):
    """Experts that agree to within their (tiny or huge) standard deviations keep all pairwise terms."""
    g = torch.Generator().manual_seed(7)
    m, dim = 5, 256
    logvar = torch.rand(m, 3, dim, generator=g) * 60 - 30
    centre = (torch.rand(1, 3, dim, generator=g) * 2 - 1) * 1e3
    mu = centre + torch.randn(m, 3, dim, generator=g) * (0.5 * logvar).exp() * 0.1
    check_against_float64(mu, logvar, alpha)


@pytest.mark.parametrize("alpha", [0, 1 / 3, 1 / 2, 1])
def test_single_and_identical_experts_exact_in_float32(alpha):
    mu = torch.tensor([[[30.0, -1e3, 0.5]]], dtype=torch.float32)  # (the library tests' default is float64)
    logvar = torch.tensor([[[-10.0, -30.0, 30.0]]], dtype=torch.float32)
    loc, lv = opf.holder(mu, logvar, alpha)
    assert loc.dtype == torch.float32 and torch.equal(loc, mu[0])
    torch.testing.assert_close(lv, logvar[0], rtol=0, atol=4 * EPS32 * 30)
    loc3, lv3 = opf.holder(mu.expand(3, 1, 3), logvar.expand(3, 1, 3), alpha, weights=[0.2, 0.3, 0.5])
    assert torch.equal(loc3, mu[0])
    torch.testing.assert_close(lv3, logvar[0], rtol=0, atol=8 * EPS32 * 30)


@pytest.mark.parametrize("alpha", [0, 1 / 3, 1 / 2, 1])
def test_tiny_log_variances_do_not_become_nan(alpha):
    """Below logvar -88 exp(-logvar) overflows float32, and experts many standard deviations apart square
    deviations past its range: the log-space formulas stay finite and agree with float64, gradients included.
    (float32 is explicit: the tests' default dtype is float64.)"""
    mu = torch.tensor([[[1.0, 2.0]], [[1.0, 2.5]]], dtype=torch.float32)
    logvar = torch.tensor([[[-95.0, -120.0]], [[-90.0, -100.0]]], dtype=torch.float32)
    mu32, lv32 = mu.clone().requires_grad_(True), logvar.clone().requires_grad_(True)
    loc, lv = opf.holder(mu32, lv32, alpha)
    assert torch.isfinite(loc).all() and torch.isfinite(lv).all()
    (loc.sum() + lv.sum()).backward()
    assert torch.isfinite(mu32.grad).all() and torch.isfinite(lv32.grad).all()
    loc64, lv64 = opf.holder(mu.double(), logvar.double(), alpha)
    torch.testing.assert_close(loc.double(), loc64, rtol=1e-6, atol=0)
    torch.testing.assert_close(lv.double(), lv64, rtol=0, atol=1e-4)


SUBNORMAL_AGGREGATORS = {
    "poe": opf.poe, "wasserstein_barycenter": opf.wasserstein_barycenter, "hellinger": opf.hellinger,
    "hellinger, fused": lambda mu, logvar: opf.hellinger(mu, logvar, fused=True),
    "holder 1/3": lambda mu, logvar: opf.holder(mu, logvar, 1 / 3), "holder 1/4": lambda mu, logvar: opf.holder(
        mu, logvar, 1 / 4), "moe moments": lambda mu, logvar: opf.moe(mu, logvar).moments()}


@pytest.mark.parametrize("name", list(SUBNORMAL_AGGREGATORS) + ["subset hellinger", "subset poe", "subset barycenter"])
@pytest.mark.parametrize("centre", [-200.0, -300.0])
def test_standard_deviations_below_float32s_normal_range_do_not_become_nan(name, centre):
    """float32 log-variances below -177 (standard deviations under e^-88.7, subnormal): e^(-scale / 2) overflowed
    in the Hellinger pool, the exact Hölder pools' moments and the Hellinger subsets, whose pools came out NaN (one
    expert of log-variance -200 gave NaN). Now finite, with finite gradients, and float64's to float32's rounding."""
    if name.startswith("subset"):
        aggregator = {"hellinger": opf.hellinger, "poe": opf.poe, "barycenter": opf.wasserstein_barycenter}[
            name.split()[1]]

        def pooled(mu, logvar):
            mixture = opf.subset_mixture(aggregator, mu, logvar)
            return mixture.loc, mixture.logvar
    else:
        pooled = SUBNORMAL_AGGREGATORS[name]
    g = torch.Generator().manual_seed(3)
    logvar = centre + torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    lv32 = logvar.float().requires_grad_(True)
    mu32 = torch.zeros(3, 2, 4, dtype=torch.float32, requires_grad=True)
    loc, lv = pooled(mu32, lv32)
    assert torch.isfinite(loc).all() and torch.isfinite(lv).all()
    (loc.sum() + lv.sum()).backward()
    assert torch.isfinite(mu32.grad).all() and torch.isfinite(lv32.grad).all()
    loc64, lv64 = pooled(torch.zeros(3, 2, 4, dtype=torch.float64), lv32.detach().double())
    assert torch.isfinite(lv64).all() and (loc.double() == loc64).all()
    torch.testing.assert_close(lv.double(), lv64, rtol=0, atol=8 * EPS32 * abs(centre))


def _coinciding_experts(num_experts=3, batch=2, dim=512, seed=11):
    """float32 experts that nearly coincide: |mu| about 1e3, log-variances across [-30, 30] shared up to 1e-3,
    means apart by a tenth of a standard deviation, rounded to multiples of the float32 spacing near the centre
    (so that sharp dimensions coincide exactly instead of sitting whole ulps, i.e. many standard deviations, apart).
    Returned in float64, every value exactly a float32."""
    g = torch.Generator().manual_seed(seed)
    logvar = torch.rand(1, batch, dim, generator=g) * 60 - 30 + torch.randn(num_experts, batch, dim, generator=g) * 1e-3
    centre = ((torch.rand(1, batch, dim, generator=g) * 2 - 1) * 1e3).float().double()
    spacing = (torch.nextafter(centre.float(), torch.tensor(float("inf"))).double() - centre).abs()
    offset = torch.randn(num_experts, batch, dim, generator=g) * (0.5 * logvar).exp() * 0.1
    mu = centre + torch.round(offset / spacing) * spacing
    return mu.float().double(), logvar.float().double()


def test_float32_hellinger_of_coinciding_experts_against_float64():
    """The regime of issue 15: 512 dimensions of log-variances of size 30 made the log Bhattacharyya coefficient
    cancel (off by 4e-2), and means of size 1e3 squared around a rounded pooled mean lost the sharp dimensions."""
    mu64, logvar64 = _coinciding_experts()
    mu64.requires_grad_(True)
    logvar64.requires_grad_(True)
    loc64, lv64 = opf.hellinger(mu64, logvar64)
    mu32 = mu64.detach().float().requires_grad_(True)
    logvar32 = logvar64.detach().float().requires_grad_(True)
    loc32, lv32 = opf.hellinger(mu32, logvar32)
    sd64 = (0.5 * lv64).exp()
    assert ((loc32.double() - loc64).abs() <= torch.maximum(1e-5 * sd64, 2 * EPS32 * loc64.abs())).all()
    torch.testing.assert_close(lv32.double(), lv64, rtol=0, atol=1e-5)
    # gradients of a scale-free loss: d/dlogvar is dimensionless, d/dmu in units of 1/sd
    probe = torch.randn(lv64.shape, generator=torch.Generator().manual_seed(3))
    for lv, loc, inputs in ((lv64, loc64, (mu64, logvar64)), (lv32, loc32, (mu32, logvar32))):
        ((lv * probe).sum() + (loc * probe * (-0.5 * lv).exp().detach()).sum()).backward(inputs=list(inputs))
    sd_in = (0.5 * logvar64.detach()).exp()
    torch.testing.assert_close(logvar32.grad.double(), logvar64.grad, rtol=0, atol=1e-4)
    torch.testing.assert_close(mu32.grad.double() * sd_in, mu64.grad * sd_in, rtol=0, atol=1e-4)


def test_float32_log_bhattacharyya_of_coinciding_experts_against_float64():
    mu, logvar = _coinciding_experts(num_experts=2)
    exact = opf.log_bhattacharyya(mu[0], logvar[0], mu[1], logvar[1])
    approx = opf.log_bhattacharyya(mu[0].float(), logvar[0].float(), mu[1].float(), logvar[1].float())
    assert (exact < -0.1).all()  # the coefficient is far from one: the regime tests the sum, not a trivial zero
    torch.testing.assert_close(approx.double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("alpha", [0, 1 / 3])
def test_float32_generic_pools_of_coinciding_experts_against_float64(alpha):
    """alpha = 0 and 1/3 combine experts in ``gaussian_combine`` too: their log Chernoff coefficients were the same
    cancellation."""
    mu64, logvar64 = _coinciding_experts()
    loc64, lv64 = opf.holder(mu64, logvar64, alpha)
    loc32, lv32 = opf.holder(mu64.float(), logvar64.float(), alpha)
    sd64 = (0.5 * lv64).exp()
    assert ((loc32.double() - loc64).abs() <= torch.maximum(1e-5 * sd64, 2 * EPS32 * loc64.abs())).all()
    torch.testing.assert_close(lv32.double(), lv64, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dim,scale,spread", [(16, 30.0, 0.05), (64, 60.0, 0.01), (32, -30.0, 0.02)])
def test_float32_full_covariance_combine_of_coinciding_experts_against_float64(dim, scale, spread):
    """``MultivariateNormalFamily.combine`` took ``log det sum_j w_j P_j - sum_j w_j log det P_j`` from
    log-determinants of the size of the precisions' (here dim x scale): the cancellation of the diagonal case.
    Nearly coinciding sharp (or flat) experts in float32 against a float64 computation by slogdet of the same
    (float32) inputs, with weights that sum to one exactly in both."""
    from opinionpool.families.gaussian import MultivariateNormalFamily

    g = torch.Generator().manual_seed(3)
    base = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    base = base @ base.T / dim + torch.eye(dim, dtype=torch.float64)
    noise = [torch.randn(dim, dim, generator=g, dtype=torch.float64) for _ in range(3)]
    precision = torch.stack([math.exp(scale) * (base + spread * a @ a.T / dim) for a in noise]).float().double()
    loc = (1.0 + math.exp(-scale / 2) * torch.randn(3, dim, generator=g, dtype=torch.float64)).float().double()
    weights = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    combined = (weights[:, None, None] * precision).sum(0)
    # offsets from expert 0, so that the reference's own rounding is not multiplied by the precisions
    offset = loc - loc[0]
    shift = torch.linalg.solve(combined, (weights[:, None, None] * precision @ offset[..., None]).sum(0))[..., 0]
    mean, dev = loc[0] + shift, offset - shift
    quad = (weights * torch.einsum("si,sij,sj->s", dev, precision, dev)).sum()
    exact = -0.5 * quad - 0.5 * (torch.linalg.slogdet(combined)[1] - (weights * torch.linalg.slogdet(precision)[1]).sum())
    family = MultivariateNormalFamily(dim)
    params, log_weights = family.join(loc, precision).unsqueeze(0), weights.log().unsqueeze(0)
    assert exact.abs() > 1e-4  # the coefficient is not one: the test checks its digits
    _, log_c64 = family.combine(params, log_weights)
    torch.testing.assert_close(log_c64[0], exact, rtol=1e-9, atol=1e-12)
    combined32, log_c32 = family.combine(params.float(), log_weights.float())
    torch.testing.assert_close(log_c32[0].double(), exact, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(combined32[0, :, 0].double(), mean, rtol=1e-6, atol=1e-5 * math.exp(-scale / 2))


def test_float32_affinities_of_nearly_equal_non_gaussian_experts_against_mpmath():
    """The log-normalisers of large parameters cancel in the Chernoff coefficient (a Poisson rate of 1e6 gave a
    float32 Bhattacharyya coefficient of e^0.5 > 1; float32 weights summing to one only to 1e-7 did too); the
    families now combine in float64. Closed forms in 50 digits by mpmath."""
    import mpmath
    from torch.distributions import Beta, Gamma, Poisson

    import opinionpool as op

    mpmath.mp.dps = 50
    r1, r2 = 10**6, 10**6 + 100
    poisson = -(mpmath.sqrt(r1) - mpmath.sqrt(r2)) ** 2 / 2

    def gamma_norm(k, r):
        return mpmath.loggamma(k) - k * mpmath.log(r)

    gamma = (gamma_norm((10**4 + 10100) / mpmath.mpf(2), (10**4 + 10100) / mpmath.mpf(2))
             - (gamma_norm(10**4, 10**4) + gamma_norm(10100, 10100)) / 2)

    def beta_norm(a, b):
        return mpmath.loggamma(a) + mpmath.loggamma(b) - mpmath.loggamma(a + b)

    beta = beta_norm(mpmath.mpf(6000.5) / 2, 5000) - (beta_norm(3000, 5000) + beta_norm(mpmath.mpf(3000.5), 5000)) / 2
    def f32(value):
        return torch.tensor(value, dtype=torch.float32)

    cases = [(Poisson(f32(1e6)), Poisson(f32(1e6 + 100)), poisson),
             (Gamma(f32(1e4), f32(1e4)), Gamma(f32(1.01e4), f32(1.01e4)), gamma),
             (Beta(f32(3000.0), f32(5000.0)), Beta(f32(3000.5), f32(5000.0)), beta)]
    for p, q, exact in cases:
        got = op.log_bhattacharyya_coefficient(p, q)
        assert got.dtype == torch.float32
        assert abs(got.item() - float(exact)) <= 1e-3 * abs(float(exact)), (type(p).__name__, got.item(), exact)
    pool = op.holder([cases[0][0], cases[0][1]], alpha=0.5)
    # the alpha = 1/2 pool of two equal-weight experts: log Z = log((1 + BC) / 2)
    assert pool.log_normalizer.item() == pytest.approx(float(mpmath.log((1 + mpmath.exp(poisson)) / 2)), rel=1e-3)


@pytest.mark.parametrize("family", ["Dirichlet", "VonMises"])
def test_float32_moment_matching_solves_to_float64_accuracy(family):
    """The mean-to-natural Newton solve ran in float32 to a residual of 2e-5 (a Dirichlet's concentration 0.2 %
    off); it now solves in float64 whatever the dtype: float32 within 2e-4 of float64 (what the float32 target allows)."""
    from torch.distributions import Dirichlet, VonMises

    import opinionpool as op

    def experts(dtype):
        if family == "Dirichlet":
            return [Dirichlet(torch.tensor([500.0, 300, 200], dtype=dtype)),
                    Dirichlet(torch.tensor([510.0, 300, 190], dtype=dtype))]
        return [VonMises(torch.tensor(0.0, dtype=dtype), torch.tensor(500.0, dtype=dtype)),
                VonMises(torch.tensor(0.3, dtype=dtype), torch.tensor(600.0, dtype=dtype))]

    got, want = (op.holder(experts(dtype), alpha=0.5).moment_match() for dtype in (torch.float32, torch.float64))
    torch.testing.assert_close(got.concentration.double(), want.concentration, rtol=2e-4, atol=0)


def test_float32_moment_matching_renormalises_its_weights():
    """Float32 mixture weights sum to one only to about 1e-8, and matching two Gamma(1e6) experts amplifies that:
    the matched concentration was 40476.5 against float64's 40419.90, a VonMises of 1e6 845188 against 882766.
    The weights are normalised again in float64: float32 now within its own rounding of float64."""
    from torch.distributions import Gamma, VonMises

    import opinionpool as op

    for make, alpha in ((lambda t: [Gamma(t(1e6), t(1e6)), Gamma(t(1.01e6), t(1e6))], 1),
                        (lambda t: [VonMises(t(0.0), t(1e6)), VonMises(t(1e-3), t(1e6))], 0.5)):
        got, want = (op.holder(make(lambda x, d=dtype: torch.tensor(x, dtype=d)), alpha=alpha, weights=[0.4, 0.6])
                     .moment_match() for dtype in (torch.float32, torch.float64))
        torch.testing.assert_close(got.concentration.double(), want.concentration, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rates", [(1e6, 1e6), (3e7, 3.0001e7), (5.0, 40.0)])
def test_float32_log_linear_pool_of_large_poisson_rates(rates):
    """alpha = 0 combined the experts with float32 weights, which sum to one only to about 1e-7, and log Z takes that
    times the log-normaliser (the rate): two identical Poisson(1e6) experts gave log Z = -0.273 for an exact 0. The
    closed form: log sum_z prod_j q_j(z)^(w_j) = prod_j r_j^(w_j) - sum_j w_j r_j."""
    from torch.distributions import Poisson

    import opinionpool

    weights = (0.3, 0.7)
    pool = opinionpool.holder(Poisson(torch.tensor(rates, dtype=torch.float32)), alpha=0,
                              weights=torch.tensor(weights, dtype=torch.float32))
    exact = math.exp(sum(w * math.log(r) for w, r in zip(weights, rates))) - sum(w * r for w, r in zip(weights, rates))
    assert float(pool.log_normalizer) == pytest.approx(exact, abs=1e-5)


def test_float32_poisson_pools_of_large_rates_agree_with_float64():
    """A float32 Poisson's log-probability at a rate of 3e7 kept none of its digits (+22.0 for -9.53, scipy), and its
    support, an arange from 0, repeated values above 2^24 and held 1e8 entries at a rate of 1e8. Now: float64 inside,
    a support window around the rates (its lower tail in the bound), and the enumeration in float64."""
    import scipy.stats
    from torch.distributions import Poisson

    import opinionpool
    from opinionpool.families import PoissonFamily

    value = PoissonFamily().log_prob(torch.tensor([3e7], dtype=torch.float32), torch.tensor(3e7, dtype=torch.float32))
    assert float(value) == pytest.approx(scipy.stats.poisson(3e7).logpmf(3e7), rel=1e-6)
    weights = (0.3, 0.7)
    for alpha in (0.3, -1.0):
        pools = [opinionpool.holder(Poisson(torch.tensor([1e6, 1.001e6], dtype=dtype)), alpha=alpha,
                                    weights=torch.tensor(weights, dtype=dtype)) for dtype in (torch.float32, torch.float64)]
        point = torch.tensor(1e6)
        assert float(pools[0].log_prob(point.float())) == pytest.approx(float(pools[1].log_prob(point.double())),
                                                                       rel=1e-6)
        assert float(pools[0].mean) == pytest.approx(float(pools[1].mean), rel=1e-6)
        assert float(pools[0].variance) == pytest.approx(float(pools[1].variance), rel=1e-5)
    large = opinionpool.holder(Poisson(torch.tensor([1e8, 1.0001e8], dtype=torch.float64)), alpha=0.3,
                               weights=torch.tensor(weights, dtype=torch.float64))
    assert 1e8 < float(large.mean) < 1.0001e8
    # beyond 2^24 float32 does not hold the support's integers: the enumeration runs in float64 (it raised)
    narrow, wide = (opinionpool.holder(Poisson(torch.tensor([3e7, 3.1e7], dtype=dtype)), alpha=0.3)
                    for dtype in (torch.float32, torch.float64))
    assert float(narrow.mean) == pytest.approx(float(wide.mean), rel=1e-7)
    assert float(narrow.variance) == pytest.approx(float(wide.variance), rel=1e-6)


def test_von_mises_variances_of_concentrated_experts_against_mpmath():
    """The circular variance 1 - |E e^(iz)| cancelled: a VonMises(0, 1e8) kept 8 digits fewer than float64 (and in
    float32 the log-linear pool of two such experts had variance -1.2e-7 for 5e-9). It is now 1 - I1/I0 from the
    difference of the asymptotic series above a concentration of 30, and a mixture's sum_k w_k (1 - A_k cos(mu_k -
    m)), non-negative terms. References: 50-digit mpmath (the weights normalised as the pool normalises them)."""
    import mpmath
    from torch.distributions import VonMises

    import opinionpool as op

    mpmath.mp.dps = 50
    for kappa in (1e-8, 1.0, 29.0, 31.0, 1e3, 1e8, 1e12):
        got = op.holder([VonMises(torch.tensor(0.5, dtype=torch.float64), torch.tensor(kappa, dtype=torch.float64))],
                        alpha=0).variance
        expected = 1 - mpmath.besseli(1, kappa) / mpmath.besseli(0, kappa)
        assert float(got) == pytest.approx(float(expected), rel=2e-14, abs=0)
    weights, locs, kappas = [0.3, 0.7], [0.0, 1e-3], [1e6, 2e6]
    pool = op.holder([VonMises(torch.tensor(loc, dtype=torch.float64), torch.tensor(kappa, dtype=torch.float64))
                      for loc, kappa in zip(locs, kappas)], alpha=1, weights=weights)
    total = sum(mpmath.mpf(w) for w in weights)
    resultant = abs(sum(mpmath.mpf(w) / total * mpmath.besseli(1, k) / mpmath.besseli(0, k)
                        * mpmath.exp(1j * mpmath.mpf(loc)) for w, loc, k in zip(weights, locs, kappas)))
    assert float(pool.variance) == pytest.approx(float(1 - resultant), rel=1e-13, abs=0)
    single = op.holder([VonMises(torch.tensor(0.0, dtype=torch.float32), torch.tensor(1e8, dtype=torch.float32))] * 2,
                       alpha=0).variance
    assert single.dtype == torch.float32 and float(single) == pytest.approx(5.0000000125e-09, rel=1e-6, abs=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_von_mises_log_prob_of_concentrated_experts_against_mpmath(dtype):
    """<eta, T(z)> - A(eta) has terms of size kappa that cancel: float32 was 3.5e-4 off a log-density of 3.7 at a
    concentration of 1e4. The log-density is now formed as kappa (cos(z - mu) - 1) - log(2 pi i0e(kappa)), with the
    exponential family's gradient. Reference: mpmath at 30 digits, from the rounded parameters and values."""
    import mpmath

    from opinionpool.families import VonMisesFamily

    mpmath.mp.dps = 30
    family, tolerance = VonMisesFamily(), 1e-6 if dtype == torch.float32 else 1e-13
    for kappa in (1e-3, 1.0, 30.0, 1e4):
        for loc in (0.3, -2.9):
            params = torch.tensor([kappa * math.cos(loc), kappa * math.sin(loc)], dtype=dtype)
            values = torch.tensor([0.3, 0.31, -2.0, 2.9, loc + 1e-3], dtype=dtype)
            got = family.log_prob(params, values)
            eta_1, eta_2 = (mpmath.mpf(float(x)) for x in params)
            log_norm = mpmath.log(2 * mpmath.pi * mpmath.besseli(0, mpmath.sqrt(eta_1**2 + eta_2**2)))
            for value, result in zip(values.tolist(), got.tolist()):
                expected = eta_1 * mpmath.cos(value) + eta_2 * mpmath.sin(value) - log_norm
                assert abs(result - float(expected)) <= tolerance * max(1.0, abs(float(expected))), (kappa, value)
    params = torch.tensor([2.0, -1.0], dtype=torch.float64, requires_grad=True)
    value = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(family.log_prob, (params, value))


def test_entropy_of_concentrated_log_linear_pools_in_float32_against_scipy():
    """The alpha = 0 pool is one family member whose entropy torch gives; in float32 torch cancels log-gammas of
    about 1e5 (Gamma: 6.0234 for 6.0223 at shapes of 1.5e4; Beta, Dirichlet 3e-2 off). The entropy is computed in
    float64 and cast back. Reference: scipy's entropies of the pooled member, whose parameters are the weighted sums
    of the experts' natural parameters (in float64, from the same float32 inputs)."""
    import numpy as np
    from scipy import stats
    from torch.distributions import Beta, Dirichlet, Gamma

    import opinionpool

    weights = np.array([0.7, 0.2, 0.1])
    shapes, rates = np.array([1e4, 2e4, 1.5e4], np.float32), np.array([1.0, 1.5, 1.2], np.float32)
    pool = opinionpool.holder(Gamma(torch.from_numpy(shapes), torch.from_numpy(rates)), 0.0, weights=weights.tolist())
    expected = stats.gamma(weights @ (shapes.astype(float) - 1) + 1, scale=1 / (weights @ rates.astype(float))).entropy()
    assert pool.entropy().dtype == torch.float32
    assert float(pool.entropy()) == pytest.approx(expected, rel=2e-7)
    a, b = np.array([1e4, 2e4, 1.5e4], np.float32), np.array([2e4, 1e4, 1.5e4], np.float32)
    pool = opinionpool.holder(Beta(torch.from_numpy(a), torch.from_numpy(b)), 0.0, weights=weights.tolist())
    expected = stats.beta(weights @ (a.astype(float) - 1) + 1, weights @ (b.astype(float) - 1) + 1).entropy()
    assert float(pool.entropy()) == pytest.approx(expected, abs=4e-7 * abs(expected) + 1e-6)
    concentrations = np.array([[1e4, 2e4, 3e4], [2e4, 1e4, 1.5e4], [1.5e4, 1.5e4, 1e4]], np.float32)
    pool = opinionpool.holder(Dirichlet(torch.from_numpy(concentrations)), 0.0, weights=weights.tolist())
    expected = stats.dirichlet(weights @ (concentrations.astype(float) - 1) + 1).entropy()
    assert float(pool.entropy()) == pytest.approx(expected, abs=4e-7 * abs(expected) + 1e-6)


def test_float32_numerical_pools_moment_match_and_expected_statistics_as_float64():
    """A float32 numerical pool's E[T(z)] was summed uncentred (Poisson rates of 1e6: E[z] 4690 off while its mean
    was right) and its moment match solved from the float32 statistic, which rounds E[log x] (about 9.4 for a Gamma
    of shape 1e4) by 5e-7, the size of the gap log E[x] - E[log x] the solve inverts: it raised for concentrated
    Gamma and Beta pools and lost digits elsewhere. Against the same pools in float64 (the inputs are float32
    numbers), with the float32 gradient flowing."""
    from torch.distributions import Beta, Gamma, Poisson

    import opinionpool

    weights = [0.7, 0.2, 0.1]
    rates = [1e6, 2e6, 1.5e6]
    for_dtype = {dtype: opinionpool.holder([Poisson(torch.tensor(r, dtype=dtype)) for r in rates], -1, weights=weights)
                 for dtype in (torch.float32, torch.float64)}
    narrow, wide = (for_dtype[d].summary.expected_statistic.value for d in (torch.float32, torch.float64))
    assert float(narrow) == pytest.approx(float(wide), rel=2e-7)
    cases = [(Gamma, ([1e4, 2e4, 1.5e4], [1.0, 1.5, 1.2])), (Beta, ([1e4, 2e4, 1.5e4], [2e4, 1e4, 1.5e4])),
             (Gamma, ([2.0, 200.0, 0.5], [1.0, 0.5, 10.0]))]
    for family, (first, second) in cases:
        matched = {}
        for dtype in (torch.float32, torch.float64):
            leaf = torch.tensor(first, dtype=dtype, requires_grad=True)
            pool = opinionpool.holder(family(leaf, torch.tensor(second, dtype=dtype)), -1, weights=weights)
            member = pool.moment_match()
            (gradient,) = torch.autograd.grad(member.mean.sum(), leaf)
            matched[dtype] = (member, gradient)
        (narrow, narrow_gradient), (wide, wide_gradient) = matched[torch.float32], matched[torch.float64]
        assert narrow.mean.dtype == torch.float32
        for name in ("mean", "variance"):
            assert float(getattr(narrow, name)) == pytest.approx(float(getattr(wide, name)), rel=2e-6), (family, name)
        torch.testing.assert_close(narrow_gradient.double(), wide_gradient, rtol=1e-3,
                                   atol=1e-6 * float(wide_gradient.abs().max()))


@pytest.mark.parametrize("alpha", [1 / 3, -1.0, 0.5, 2.0, 1.0])
def test_float32_discrete_pools_of_tiny_probabilities_as_float64(alpha):
    """log p(0) of experts with probabilities (or rates) of 1e-6 is about -1e-6, which float32 sums near 1 round by
    6e-8: 6 % off at alpha = 1/3, 0.7 % at -1. Exact and enumerated discrete pools now form log Z and log u in
    float64 (the weights renormalised there) and cast back. Against the same pools in float64, with gradients."""
    from torch.distributions import Bernoulli, Binomial, Poisson

    import opinionpool

    weights = [0.7, 0.2, 0.1]
    makers = (lambda p: Bernoulli(probs=p), lambda p: Binomial(10, probs=p), lambda p: Poisson(10 * p))
    for make in makers:
        results = {}
        for dtype in (torch.float32, torch.float64):
            probs = torch.tensor([1e-6, 2e-6, 3e-6], dtype=dtype, requires_grad=True)
            pool = opinionpool.holder(make(probs), alpha, weights=weights)
            log_p = pool.log_prob(torch.tensor([0.0, 1.0], dtype=dtype))
            (gradient,) = torch.autograd.grad(log_p[0], probs)
            results[dtype] = (log_p.detach(), gradient)
        (narrow, narrow_gradient), (wide, wide_gradient) = results[torch.float32], results[torch.float64]
        assert narrow.dtype == torch.float32
        torch.testing.assert_close(narrow.double(), wide, rtol=1e-6, atol=0)
        torch.testing.assert_close(narrow_gradient.double(), wide_gradient, rtol=1e-4, atol=0)


def test_float32_entropy_and_kl_of_numerical_pools_with_large_log_normalisers():
    """Entropy and KL are log Z minus an expectation of log u of the same size: a float32 log Z of -86077 (Poisson
    experts at 1e6, alpha = -1) rounds by 0.004, and the entropy of 2.9004 came out 2.9033. They take log Z in
    float64 from the engine's weighted points. Against the same pools in float64."""
    from torch.distributions import Normal, Poisson

    import opinionpool

    weights = [0.7, 0.2, 0.1]
    pools = {dtype: opinionpool.holder(Poisson(torch.tensor([1e6, 2e6, 1.5e6], dtype=dtype)), -1.0, weights=weights)
             for dtype in (torch.float32, torch.float64)}
    narrow, wide = (float(pools[d].entropy()) for d in (torch.float32, torch.float64))
    assert narrow == pytest.approx(wide, rel=2e-7)
    other = {dtype: Poisson(torch.tensor(1.4e6, dtype=dtype)) for dtype in pools}
    narrow, wide = (float(torch.distributions.kl_divergence(pools[d], other[d])) for d in pools)
    assert narrow == pytest.approx(wide, rel=2e-6)
    pools = {dtype: opinionpool.holder(Normal(torch.tensor([0.0, 300.0, 100.0], dtype=dtype),
                                              torch.tensor([1.0, 2.0, 0.5], dtype=dtype)), -1.0, weights=weights)
             for dtype in (torch.float32, torch.float64)}
    narrow, wide = (float(pools[d].entropy()) for d in pools)
    assert narrow == pytest.approx(wide, rel=2e-7)
