"""Gaussian affinities where their natural parameters or the precision's square root leave the float range (scales
of 1e-20 in float32, 1e-170 in float64) and at orders next to 0 and 1, against mpmath's closed forms at 50 digits
written from the textbook integrals (``log int p^a q^(1-a)`` of two Normals, their KL). Found by a review."""

import math

import mpmath
import pytest
import torch
from torch.distributions import Independent, Normal

import opinionpool
import opinionpool.functional as opf


@pytest.fixture(autouse=True)
def _fifty_digits():
    """The references are mpmath's at 50 digits (set per test: the session's tests start at the default)."""
    mpmath.mp.dps = 50
    yield


def _normal(loc, scale, dtype):
    return Normal(torch.tensor(loc, dtype=dtype), torch.tensor(scale, dtype=dtype))


def _log_chernoff(a, mu_p, s_p, mu_q, s_q):
    """``log int N(mu_p, s_p^2)^a N(mu_q, s_q^2)^(1-a)``: the Gaussian integral with combined precision
    ``a / v_p + (1 - a) / v_q``."""
    a, mu_p, s_p, mu_q, s_q = (mpmath.mpf(v) for v in (a, mu_p, s_p, mu_q, s_q))
    v_p, v_q = s_p**2, s_q**2
    precision = a / v_p + (1 - a) / v_q
    mean = (a * mu_p / v_p + (1 - a) * mu_q / v_q) / precision
    exponent = a * (mean - mu_p) ** 2 / v_p + (1 - a) * (mean - mu_q) ** 2 / v_q
    return (0.5 * mpmath.log(2 * mpmath.pi / precision) - a / 2 * mpmath.log(2 * mpmath.pi * v_p)
            - (1 - a) / 2 * mpmath.log(2 * mpmath.pi * v_q) - exponent / 2)


def _kl(mu_p, s_p, mu_q, s_q):
    mu_p, s_p, mu_q, s_q = (mpmath.mpf(v) for v in (mu_p, s_p, mu_q, s_q))
    return mpmath.log(s_q / s_p) + (s_p**2 + (mu_p - mu_q) ** 2) / (2 * s_q**2) - mpmath.mpf(1) / 2


CASES = [(torch.float32, 1e-9), (torch.float32, 1e-30), (torch.float32, 1e25), (torch.float64, 1e-170),
         (torch.float64, 1e170)]


@pytest.mark.parametrize("dtype,scale", CASES)
def test_kl_of_normals_at_tiny_and_huge_scales(dtype, scale):
    """The squared difference of means times exp(-logvar_q) was 0 * inf or inf * 0: inf and NaN for KLs of 0.125
    and 0.44."""
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for (mu_p, s_p, mu_q, s_q) in [(0.0, 1.0, 0.5, 1.0), (0.0, 1.0, 1.0, 2.0), (0.3, 2.5, -0.4, 0.7)]:
        p, q = _normal(mu_p * scale, s_p * scale, dtype), _normal(mu_q * scale, s_q * scale, dtype)
        p_stored, q_stored = (float(t) for t in (p.loc, p.scale)), (float(t) for t in (q.loc, q.scale))
        truth = float(_kl(*p_stored, *q_stored))
        for value in (opinionpool.kl_divergence(p, q), opinionpool.amari_alpha_divergence(q, p, 0.0),
                      opf.diag_gaussian_kl(p.loc[None], 2 * p.scale.log()[None], q.loc[None], 2 * q.scale.log()[None])):
            assert float(value) == pytest.approx(truth, rel=tol), (mu_p, s_p, mu_q, s_q)


@pytest.mark.parametrize("dtype,scale", CASES)
def test_chernoff_of_orders_outside_the_unit_interval_at_extreme_scales(dtype, scale):
    """Whether the integral converges was judged on natural parameters, which overflow at these scales: a
    ValueError "diverges" for a Rényi divergence of order 2 of 0.25. It is judged on the combined variance now, and
    still raises where that is negative."""
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    p, q = _normal(0.0, scale, dtype), _normal(0.5 * scale, scale, dtype)
    stored = [float(t) for t in (p.loc, p.scale, q.loc, q.scale)]
    assert float(opinionpool.renyi_divergence(p, q, 2.0)) == pytest.approx(float(_log_chernoff(2.0, *stored)),
                                                                             rel=tol)
    assert float(opinionpool.log_chernoff_coefficient(p, q, -1.0)) == pytest.approx(
        float(_log_chernoff(-1.0, *stored)), rel=tol)
    wide = _normal(0.0, 3 * scale, dtype)  # order 2 of the wider against the narrower: 2 / v_wide - 1 / v_p < 0
    with pytest.raises(ValueError, match="a=2.0 diverges for these Normal experts"):
        opinionpool.log_chernoff_coefficient(wide, p, 2.0)


@pytest.mark.parametrize("a", [1e-20, 1e-14, 1e-8, 0.3, 0.7, 1 - 1e-8, 1 - 1e-14])
def test_chernoff_of_orders_next_to_0_and_1(a):
    """Through the geometric combination, the log-determinant cancelled two terms of order one to order a: the
    Amari divergence at a = 1e-20 came out -22204 for a limit of KL(q || p) = 4.21. Now each coordinate's closed
    form about the expert of the larger weight."""
    loc_p, scale_p = [0.0, 0.0, 2.0], [1.0, 1.0, 0.01]
    loc_q, scale_q = [1.0, 0.0, 2.5], [2.0, 3.0, 0.05]
    p = Independent(Normal(torch.tensor(loc_p, dtype=torch.float64), torch.tensor(scale_p, dtype=torch.float64)), 1)
    q = Independent(Normal(torch.tensor(loc_q, dtype=torch.float64), torch.tensor(scale_q, dtype=torch.float64)), 1)
    truth = sum(_log_chernoff(a, *args) for args in zip(loc_p, scale_p, loc_q, scale_q))
    got = opinionpool.log_chernoff_coefficient(p, q, a)
    assert float(got) == pytest.approx(float(truth), rel=1e-12, abs=1e-300)
    amari = -mpmath.expm1(truth) / (mpmath.mpf(a) * (1 - mpmath.mpf(a)))
    assert float(opinionpool.amari_alpha_divergence(p, q, a)) == pytest.approx(float(amari), rel=1e-9)
    if a < 1e-13:  # its limit at a = 0
        kl = sum(_kl(*args) for args in zip(loc_q, scale_q, loc_p, scale_p))
        assert float(opinionpool.amari_alpha_divergence(p, q, a)) == pytest.approx(float(kl), rel=1e-9)


def test_geometric_combination_of_far_weightless_experts_and_tiny_variances():
    """float32: an expert of weight zero at 1e20 made the other weights' gradients NaN (its deviation squared met
    omega = 0 as inf * 0), and two coinciding experts of log-variance -180 gave a log Bhattacharyya coefficient of
    NaN (the precision's square root overflowed). References: the pool without the weightless expert, and
    -log cosh(d / 2) / 2 per coordinate for log-variances d apart."""
    f32 = torch.float32
    w = torch.tensor([0.5, 0.0, 0.5], dtype=f32, requires_grad=True)
    experts = [_normal(0.0, 1.0, f32), _normal(1e20, 1.0, f32), _normal(1.0, 1.0, f32)]
    value = opinionpool.log_multi_chernoff_coefficient(experts, w)
    value.backward()
    w2 = torch.tensor([0.5, 0.5], dtype=torch.float64, requires_grad=True)
    reference = opinionpool.log_multi_chernoff_coefficient([_normal(0.0, 1.0, torch.float64),
                                                            _normal(1.0, 1.0, torch.float64)], w2)
    reference.backward()
    assert float(value.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    assert torch.isfinite(w.grad).all()
    torch.testing.assert_close(w.grad[[0, 2]].double(), w2.grad, rtol=1e-5, atol=1e-6)
    zero, low = torch.zeros(1, dtype=f32), torch.full((1,), -180.0, dtype=f32)
    assert float(opf.log_bhattacharyya(zero, low, zero, low)) == 0.0
    assert float(opf.log_bhattacharyya(zero, low, zero, low + 1)) == pytest.approx(-0.5 * math.log(math.cosh(0.5)),
                                                                                    rel=1e-5)


# experts whose variances are far apart: v_q / v_p overflows (float64 past e^709, float32 past e^88)
FAR_APART = [(torch.float64, 1e-100, 1e100), (torch.float64, 1e-170, 1e170), (torch.float32, 1e-10, 1e10),
             (torch.float32, 1e-20, 1.0)]


@pytest.mark.parametrize("dtype,s_p,s_q", FAR_APART)
@pytest.mark.parametrize("a", [1e-8, 0.3, 0.5, 0.8, 1.5])
def test_chernoff_of_experts_of_far_apart_scales(dtype, s_p, s_q, a):
    """The closed form's ``log1p(a expm1(d))`` overflowed where the log-variances lie d = 2 log(s_q / s_p) > 709
    (float64) or 88 (float32) apart: -inf for log Chernoff coefficients of -199.7 (a = 0.5, scales e^-200 and e^200),
    Rényi divergences of order 1.5 of -inf for 399.6, and NaN in float32 for scales 1e-20 and 1 (the squared
    difference of means over the variance ratio was inf / inf)."""
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for mu_p, mu_q in [(0.0, 1.0), (0.2 * s_q, -0.7 * s_q)]:
        pairs = [(_normal(mu_p, s_p, dtype), _normal(mu_q, s_q, dtype))]
        if a < 1:  # the other way round: the integral converges for orders in (0, 1) only
            pairs.append(pairs[0][::-1])
        for p, q in pairs:
            stored = [float(t) for t in (p.loc, p.scale, q.loc, q.scale)]
            with mpmath.workdps(800):  # the textbook form cancels 340 digits of the combined mean at these scales
                truth = float(_log_chernoff(a, *stored))
            assert float(opinionpool.log_chernoff_coefficient(p, q, a)) == pytest.approx(truth, rel=tol)
            assert float(opinionpool.renyi_divergence(p, q, a)) == pytest.approx(truth / (a - 1), rel=tol)


def test_chernoff_gradients_for_far_apart_scales():
    """The gradients through the far branch, in the order and the standard deviations, against mpmath's
    derivatives of the textbook integral (at 800 digits: it cancels 200 digits at these scales)."""
    a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    s_p = torch.tensor(1e-100, dtype=torch.float64, requires_grad=True)
    s_q = torch.tensor(1e100, dtype=torch.float64, requires_grad=True)
    value = opinionpool.log_chernoff_coefficient(Normal(torch.tensor(0.0, dtype=torch.float64), s_p),
                                                 Normal(torch.tensor(1.0, dtype=torch.float64), s_q), a)
    value.backward()
    with mpmath.workdps(800):
        exact = [mpmath.diff(lambda x: _log_chernoff(x, 0.0, 1e-100, 1.0, 1e100), 0.3),
                 # d/ds as d/d(log s) / s: the derivatives are of the size of 1 / s
                 mpmath.diff(lambda x: _log_chernoff(0.3, 0.0, 1e-100 * mpmath.exp(x), 1.0, 1e100), 0) / 1e-100,
                 mpmath.diff(lambda x: _log_chernoff(0.3, 0.0, 1e-100, 1.0, 1e100 * mpmath.exp(x)), 0) / 1e100]
    for got, truth in zip((a.grad, s_p.grad, s_q.grad), exact):
        assert float(got) == pytest.approx(float(truth), rel=1e-10)


def _mvn_log_chernoff(a, mu_p, cov_p, mu_q, cov_q):
    """``log int N(mu_p, S_p)^a N(mu_q, S_q)^(1-a)`` by the textbook form, in mpmath's matrices:
    ``-(a (1 - a) D^T S_a^-1 D + log det S_a - (1 - a) log det S_p - a log det S_q) / 2``,
    ``S_a = (1 - a) S_p + a S_q``."""
    a = mpmath.mpf(a)
    cov_p, cov_q = (mpmath.matrix(c.tolist()) for c in (cov_p, cov_q))
    delta = mpmath.matrix((mu_p - mu_q).tolist())
    cov_a = (1 - a) * cov_p + a * cov_q
    quad = (delta.T * mpmath.inverse(cov_a) * delta)[0]
    log_dets = mpmath.log(mpmath.det(cov_a)) - (1 - a) * mpmath.log(mpmath.det(cov_p)) - a * mpmath.log(mpmath.det(cov_q))
    return -(a * (1 - a) * quad + log_dets) / 2


MVN_FAR_APART = [(torch.float32, 1e-2, 1e2), (torch.float32, 1e-4, 1.0), (torch.float64, 1e-8, 1e8),
                 (torch.float64, 1e-13, 1.0)]


@pytest.mark.parametrize("dtype,s_p,s_q", MVN_FAR_APART)
@pytest.mark.parametrize("a", [0.3, 0.5, 0.8, -0.5])
def test_full_gaussian_chernoff_of_far_apart_scales(dtype, s_p, s_q, a):
    """Full-covariance experts whose covariances differ by a factor 1e8 in float32 (standard deviations 1e-2 and
    1e2) or 1e16 in float64: the log-determinants relative to one expert rounded the other's eigenvalues to -1, for
    orders in (0, 1) in the geometric combination (NaN, or -7.07 for -8.05), for orders below 0 in the closed form
    (NaN)."""
    from torch.distributions import MultivariateNormal

    shape_p = torch.tensor([[2.0, 0.6, 0.1], [0.6, 1.0, -0.3], [0.1, -0.3, 1.5]], dtype=torch.float64)
    shape_q = torch.tensor([[1.0, -0.4, 0.2], [-0.4, 3.0, 0.5], [0.2, 0.5, 0.8]], dtype=torch.float64)
    mu_p, mu_q = torch.tensor([0.0, 1.0, -0.5], dtype=dtype), torch.tensor([0.7, -0.2, 0.4], dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    narrow_first = ((mu_p, s_p**2 * shape_p), (mu_q, s_q**2 * shape_q))
    # for a < 0 the integral converges only with the narrower expert as q
    pairs = [narrow_first, narrow_first[::-1]] if a > 0 else [narrow_first[::-1]]
    for (m_p, c_p), (m_q, c_q) in pairs:
        p, q = MultivariateNormal(m_p, c_p.to(dtype)), MultivariateNormal(m_q, c_q.to(dtype))
        with mpmath.workdps(60):
            truth = float(_mvn_log_chernoff(a, *(t.double() for t in (p.loc, p.covariance_matrix, q.loc,
                                                                       q.covariance_matrix))))
        got = opinionpool.log_chernoff_coefficient(p, q, a)
        assert got.dtype == dtype
        assert float(got) == pytest.approx(truth, rel=tol)
        if a == 0.5:
            assert float(opinionpool.hellinger_distance(p, q)) == pytest.approx(math.sqrt(-math.expm1(truth)), rel=tol)


def _mvn_log_multi_chernoff(weights, locs, covs):
    """``log int prod_j N(mu_j, S_j)^(w_j)`` (weights summing to one) by completing the square in mpmath:
    ``-(sum_j w_j log det S_j + log det P + sum_j w_j mu_j^T P_j mu_j - h^T P^-1 h) / 2`` with ``P_j = S_j^-1``,
    ``P = sum_j w_j P_j`` and ``h = sum_j w_j P_j mu_j``."""
    weights = [mpmath.mpf(w) for w in weights]
    locs = [mpmath.matrix(m.tolist()) for m in locs]
    covs = [mpmath.matrix(c.tolist()) for c in covs]
    precisions = [mpmath.inverse(c) for c in covs]
    total = sum((w * p for w, p in zip(weights[1:], precisions[1:])), weights[0] * precisions[0])
    h = sum((w * p * m for w, p, m in zip(weights[1:], precisions[1:], locs[1:])), weights[0] * precisions[0] * locs[0])
    quad = sum(w * (m.T * p * m)[0] for w, p, m in zip(weights, precisions, locs)) - (h.T * mpmath.inverse(total) * h)[0]
    log_dets = sum(w * mpmath.log(mpmath.det(c)) for w, c in zip(weights, covs)) + mpmath.log(mpmath.det(total))
    return -(log_dets + quad) / 2


@pytest.mark.parametrize("dtype,scales", [(torch.float32, (1e-2, 1.0, 1e2)), (torch.float64, (1e-8, 1.0, 1e8))])
def test_full_gaussian_multi_chernoff_of_far_apart_scales(dtype, scales):
    """The geometric combination's log-determinants of full-covariance experts, relative to the heaviest expert's
    precision, rounded the eigenvalues of a far flatter expert to -1: -inf for -5.79 in float32 (covariances 1e8
    apart), NaN for -38.5 in float64 (1e16 apart)."""
    from torch.distributions import MultivariateNormal

    shapes = [[[2.0, 0.5], [0.5, 1.0]], [[1.0, -0.3], [-0.3, 0.5]], [[0.7, 0.2], [0.2, 1.5]]]
    experts = [MultivariateNormal(torch.tensor([0.3 * j, -0.2 * j], dtype=dtype), s**2 * torch.tensor(shape, dtype=dtype))
               for j, (s, shape) in enumerate(zip(scales, shapes))]
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for weights in ([0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.1, 0.2, 0.7]):
        with mpmath.workdps(60):
            truth = float(_mvn_log_multi_chernoff(weights, [e.loc.double() for e in experts],
                                                  [e.covariance_matrix.double() for e in experts]))
        got = opinionpool.log_multi_chernoff_coefficient(experts, torch.tensor(weights, dtype=dtype))
        assert float(got) == pytest.approx(truth, rel=tol), weights


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-8), (torch.float64, 1e-12), (torch.float64, 1e-22)])
def test_multi_chernoff_of_a_far_sharper_lighter_expert(dtype, scale):
    """The quadratic term took each expert's deviation from the pooled mean as its offset from the heaviest expert
    minus the pooled one: for a far sharper expert of smaller weight that is pure rounding times its precision. Full
    covariances at standard deviations 1e-22 and 1e22 gave -7.4e11 for -140.1 (float64), at 1e-8 and 1e8 -62.05 for
    -49.87 (float32); the diagonal form, whose shared weights round to one there, is checked beside."""
    from torch.distributions import MultivariateNormal

    shapes = [[[2.0, 0.5], [0.5, 1.0]], [[1.0, -0.3], [-0.3, 0.5]], [[0.7, 0.2], [0.2, 1.5]]]
    locs = [torch.tensor(m, dtype=dtype) for m in ([0.3, -0.5], [1.2, 0.7], [-0.4, 2.0])]
    covs = [s**2 * torch.tensor(shape, dtype=dtype) for s, shape in zip((scale, 1 / scale, 1.0), shapes)]
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    for weights in ([0.3, 0.7], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]):
        n = len(weights)
        diagonals = [c.diagonal() for c in covs[:n]]
        with mpmath.workdps(200):  # the textbook form cancels the sharp expert's 1 / scale^2 against the pooled one
            truth = float(_mvn_log_multi_chernoff(weights, [m.double() for m in locs[:n]], [c.double() for c in covs[:n]]))
            truth_diagonal = float(_mvn_log_multi_chernoff(weights, [m.double() for m in locs[:n]],
                                                           [torch.diag(v).double() for v in diagonals]))
        w = torch.tensor(weights, dtype=dtype)
        full = opinionpool.log_multi_chernoff_coefficient([MultivariateNormal(m, c) for m, c in zip(locs, covs[:n])], w)
        diagonal = opinionpool.log_multi_chernoff_coefficient([Independent(Normal(m, v.sqrt()), 1)
                                                               for m, v in zip(locs, diagonals)], w)
        assert float(full) == pytest.approx(truth, rel=tol), weights
        assert float(diagonal) == pytest.approx(truth_diagonal, rel=tol), weights


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e-77), (torch.float64, 1e-100), (torch.float32, 1e-10),
                                         (torch.float32, 1e-18)])
def test_full_gaussian_affinities_beyond_the_dtypes_range_are_refused_not_nan(dtype, scale):
    """Covariances about the dtype's range apart (standard deviations 1e-77 and 1e77 in float64) overflow the
    whitened matrix or its eigen-solver (NaN, for -514 or -643 at 1e-80 and 1e-100 by mpmath), or underflow its
    eigenvalues (+inf for a Chernoff coefficient of order -1/2): a ``ValueError`` that says so instead."""
    from torch.distributions import MultivariateNormal

    shape = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=dtype)
    narrow = MultivariateNormal(torch.zeros(2, dtype=dtype), scale**2 * shape)
    wide = MultivariateNormal(torch.ones(2, dtype=dtype), shape / scale**2)
    calls = [lambda: opinionpool.log_chernoff_coefficient(narrow, wide, 0.3),
             lambda: opinionpool.log_multi_chernoff_coefficient([narrow, wide], torch.tensor([0.3, 0.7], dtype=dtype))]
    if scale in (1e-100, 1e-18):
        calls += [lambda: opinionpool.log_chernoff_coefficient(wide, narrow, -0.5),
                  lambda: opinionpool.log_chernoff_coefficient(wide, narrow, 0.5)]
    for call in calls:
        with pytest.raises(ValueError, match=r"eigenvalues of the whitened matrix .* (not finite|not all positive)"):
            call()
