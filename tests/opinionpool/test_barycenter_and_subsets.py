"""Wasserstein barycenters and subset mixtures against independent computations."""

import itertools
import math

import mpmath
import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from torch.distributions import Independent, MultivariateNormal, Normal

import opinionpool
import opinionpool.functional as opf
from opinionpool.wasserstein import covariance_barycenter


def numpy_barycenter(covs, weights, iterations=2000):
    """The Álvarez-Esteban fixed point written independently with scipy's matrix square root."""
    s = np.eye(covs.shape[-1])
    for _ in range(iterations):
        root = np.real(sqrtm(s))
        inner = sum(w * np.real(sqrtm(root @ c @ root)) for w, c in zip(weights, covs))
        root_inv = np.linalg.inv(root)
        s_new = root_inv @ inner @ inner @ root_inv
        if np.abs(s_new - s).max() < 1e-14:
            return s_new
        s = s_new
    return s


def test_full_covariance_barycenter_against_scipy_fixed_point():
    rng = np.random.default_rng(0)
    covs = []
    for _ in range(3):
        a = rng.normal(size=(3, 3))
        covs.append(a @ a.T + 0.3 * np.eye(3))
    covs = np.array(covs)
    locs = rng.normal(size=(3, 3))
    w = np.array([0.2, 0.3, 0.5])
    bary = opinionpool.wasserstein_barycenter(MultivariateNormal(torch.tensor(locs), torch.tensor(covs)), weights=w)
    np.testing.assert_allclose(bary.covariance_matrix.numpy(), numpy_barycenter(covs, w), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(bary.mean.numpy(), (w[:, None] * locs).sum(0), rtol=1e-12)
    # the fixed-point equation itself holds
    s = bary.covariance_matrix.numpy()
    root = np.real(sqrtm(s))
    residual = sum(wi * np.real(sqrtm(root @ c @ root)) for wi, c in zip(w, covs)) - s
    assert np.abs(residual).max() < 1e-8


def test_diagonal_barycenter_averages_standard_deviations_and_agrees_with_full():
    mu = torch.tensor([[0.0, 1.0], [2.0, -1.0], [1.0, 3.0]])
    sd = torch.tensor([[0.5, 2.0], [1.5, 0.3], [1.0, 1.0]])
    w = torch.tensor([0.2, 0.3, 0.5])
    bary = opinionpool.wasserstein_barycenter(Independent(Normal(mu, sd), 1), weights=w)
    torch.testing.assert_close(bary.stddev, (w[:, None] * sd).sum(0), rtol=1e-14, atol=0)
    full = opinionpool.wasserstein_barycenter(MultivariateNormal(mu, torch.diag_embed(sd**2)), weights=w)
    torch.testing.assert_close(full.covariance_matrix, torch.diag_embed(bary.variance), rtol=1e-9, atol=1e-12)
    loc, logvar = opf.wasserstein_barycenter(mu.unsqueeze(1), (2 * sd.log()).unsqueeze(1), weights=w)
    torch.testing.assert_close(loc[0], bary.mean, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(logvar[0].exp(), bary.variance, rtol=1e-13, atol=0)


def test_diagonal_barycenter_takes_one_weight_vector_per_batch_row():
    """Weights ``(B, M)`` for experts without a batch: row b is the barycenter under weights[b] (sums written out)."""
    mu = [[0.0, 1.0], [2.0, -1.0], [1.0, 1.0]]
    sd = [[1.0, 2.0], [0.5, 1.0], [3.0, 0.2]]
    w = [[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]]
    for experts in (Independent(Normal(torch.tensor(mu), torch.tensor(sd)), 1),
                    [Normal(torch.tensor(m[0]), torch.tensor(s[0])) for m, s in zip(mu, sd)]):
        bary = opinionpool.wasserstein_barycenter(experts, weights=torch.tensor(w))
        columns = 2 if isinstance(experts, Independent) else 1
        for b in range(2):
            mean = [sum(w[b][j] * mu[j][d] for j in range(3)) for d in range(columns)]
            stddev = [sum(w[b][j] * sd[j][d] for j in range(3)) for d in range(columns)]
            assert bary.mean[b].reshape(-1).tolist() == pytest.approx(mean, rel=1e-14, abs=1e-15)
            assert bary.stddev[b].reshape(-1).tolist() == pytest.approx(stddev, rel=1e-14)


def test_full_covariance_barycenter_takes_one_weight_vector_per_batch_row():
    """Weights ``(B, M)`` for full-covariance experts without a batch (they raised in an expand): row b is the
    barycenter under weights[b], against the scipy fixed point; ``covariance_barycenter`` with its default tol."""
    rng = np.random.default_rng(2)
    covs = np.array([(lambda a: a @ a.T + 0.3 * np.eye(3))(rng.normal(size=(3, 3))) for _ in range(3)])
    locs = rng.normal(size=(3, 3))
    w = np.array([[0.2, 0.3, 0.5], [0.7, 0.1, 0.2]])
    bary = opinionpool.wasserstein_barycenter(MultivariateNormal(torch.tensor(locs), torch.tensor(covs)),
                                              weights=torch.tensor(w))
    assert bary.batch_shape == (2,)
    for b in range(2):
        np.testing.assert_allclose(bary.covariance_matrix[b].numpy(), numpy_barycenter(covs, w[b]), rtol=1e-8,
                                   atol=1e-10)
        np.testing.assert_allclose(bary.mean[b].numpy(), (w[b][:, None] * locs).sum(0), rtol=1e-12)
    direct = covariance_barycenter(torch.tensor(covs), torch.tensor(w))
    np.testing.assert_allclose(direct.numpy(), bary.covariance_matrix.numpy(), rtol=1e-8, atol=1e-10)
    # weights are normalised over their largest first: 1e308 each summed to inf (a LinAlgError followed)
    huge = covariance_barycenter(torch.tensor(covs), torch.tensor(w) * 1e308 / w.max())
    np.testing.assert_allclose(huge.numpy(), direct.numpy(), rtol=1e-12, atol=0)


def test_full_covariance_barycenter_gradients_with_repeated_eigenvalues():
    """eigh's backward divides by differences of eigenvalues: an isotropic expert (the prior's covariance) made every
    gradient NaN (the square root now has the Sylvester backward, and the fixed point is differentiated implicitly).
    Commuting isotropic experts s_j^2 I: Sigma = (sum w_j s_j)^2 I, so d trace / d s_j = 2 d w_j
    sum_k w_k s_k; an isotropic expert beside a full one against central differences; gradcheck in float64."""
    scales = torch.tensor([1.0, 2.0], requires_grad=True)
    covariances = torch.stack([scales[0] ** 2 * torch.eye(3), scales[1] ** 2 * torch.eye(3)])
    (gradient,) = torch.autograd.grad(covariance_barycenter(covariances, torch.tensor([0.5, 0.5])).trace(), scales)
    assert gradient.tolist() == pytest.approx([2 * 3 * 0.5 * 1.5] * 2, rel=1e-12)
    full = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]])

    def trace(s):
        return covariance_barycenter(torch.stack([s * torch.eye(3), full]), torch.tensor([0.3, 0.7])).trace()

    s = torch.tensor(1.3, requires_grad=True)
    (gradient,) = torch.autograd.grad(trace(s), s)
    h = 1e-6
    assert float(gradient) == pytest.approx(float(trace(torch.tensor(1.3 + h)) - trace(torch.tensor(1.3 - h))) / (2 * h),
                                            rel=1e-7)
    root = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a: covariance_barycenter(torch.stack([a @ a.T + torch.eye(3), torch.eye(3), full]),
                                        torch.tensor([0.3, 0.2, 0.5])), (root,))
    # commuting experts: the start is already the fixed point, so the iteration stops at once; the gradient must be
    # the fixed point's in every direction (differentiating the one step ran was 0.13 % off off the diagonal)
    commuting = torch.stack([2 * torch.eye(2), torch.tensor([[3.0, 1.0], [1.0, 2.0]])]).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda c: covariance_barycenter(0.5 * (c + c.mT), torch.tensor([0.3, 0.7]), tol=1e-15), (commuting,))
    weights = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w: covariance_barycenter(torch.stack([2 * torch.eye(3), torch.eye(3), full]), w), (weights,))


def test_full_covariance_barycenter_gradients_at_extreme_scales():
    """The gradient's step formed ``Sigma^1/2 Sigma_j Sigma^1/2``, of the scale squared: covariances of 1e160 gave a
    NaN barycenter (with a misleading error about its condition number) and of 1e-170 a zero gradient, while the
    value without gradients was exact. The barycenter is homogeneous of degree one, so ``trace(B(s C)) / s`` and its
    gradients in ``C`` and the weights are those at ``s = 1`` (checked there by central differences); rows of
    different scales in one batch."""
    full = torch.tensor([[[2.0, 0.5], [0.5, 1.0]], [[1.0, -0.3], [-0.3, 0.5]]], dtype=torch.float64)

    def trace(c, w, s):
        return covariance_barycenter(s * c, w).diagonal(dim1=-2, dim2=-1).sum(-1) / torch.as_tensor(s).flatten()

    c = full.clone().requires_grad_()
    w = torch.tensor([0.7, 0.3], dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(trace(c, w, 1.0).sum(), (c, w))
    h = 1e-6
    shifted = full.clone()
    shifted[0, 0, 0] += h
    below = full.clone()
    below[0, 0, 0] -= h
    central = float(trace(shifted, w.detach(), 1.0) - trace(below, w.detach(), 1.0)) / (2 * h)
    assert float(expected[0][0, 0, 0]) == pytest.approx(central, rel=1e-7)
    scales = torch.tensor([1e160, 1e-170, 1e300, 1e-300], dtype=torch.float64).reshape(-1, 1, 1, 1)
    c = full.expand(4, 2, 2, 2).clone().requires_grad_()
    values = trace(c, w, scales)
    assert values.tolist() == pytest.approx([float(trace(full, w.detach(), 1.0))] * 4, rel=1e-13)
    grad_c, grad_w = torch.autograd.grad(values.sum(), (c, w))
    for row in range(4):
        assert torch.allclose(grad_c[row], expected[0], rtol=1e-12, atol=0), row
    assert torch.allclose(grad_w, 4 * expected[1], rtol=1e-12, atol=0)


def test_full_covariance_barycenter_gradient_at_a_condition_number_of_a_million():
    """The implicit gradient's iteration stopped only at a change of 1e-10, below the rounding of its Jacobian's
    products (eps times the condition number, 1.3e-10 here): covariances of condition 1e6 raised "did not converge"
    although the iteration contracts by 0.24 a step. It now stops where the change stalls within that rounding after
    a fast contraction. Central differences of the barycenter (its value good to about eps times the condition)."""
    rng = np.random.default_rng(9)  # (one of its four pairs raised)

    def conditioned(d, condition):
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        return q @ np.diag(np.logspace(0, math.log10(condition), d)) @ q.T

    direction = torch.tensor((lambda a: a + a.T)(rng.normal(size=(3, 3))))
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    failures = 0
    for _ in range(4):  # (whether the old stop raised depended on the rounding of each pair)
        covariances = torch.tensor(np.stack([conditioned(3, 1e6), conditioned(3, 1e6)]))

        def value(c):
            return float((covariance_barycenter(c, weights) * direction).sum())

        c = covariances.clone().requires_grad_()
        experts = [MultivariateNormal(torch.zeros(3, dtype=torch.float64), covariance_matrix=m) for m in c]
        try:
            barycenter = opinionpool.wasserstein_barycenter(experts, weights).covariance_matrix
            (gradient,) = torch.autograd.grad((barycenter * direction).sum(), c)
        except RuntimeError:
            failures += 1
            continue
        # along eigenvectors of the experts (symmetric moves that keep them positive definite), a thousandth of
        # the eigenvalue: the value's rounding, 1e-10 of 1e6, is then 1e-7 of the difference or less
        for expert, k in [(0, 2), (1, 2), (0, 1)]:
            values, vectors = torch.linalg.eigh(covariances[expert])
            move = torch.zeros_like(covariances)
            move[expert] = torch.outer(vectors[:, k], vectors[:, k])
            h = 1e-3 * float(values[k])
            central = (value(covariances + h * move) - value(covariances - h * move)) / (2 * h)
            assert float((gradient * move).sum()) == pytest.approx(central, rel=1e-5), (expert, k)
    assert failures == 0


def test_full_covariance_barycenter_rows_converge_each_and_float32_keeps_its_digits():
    """The stopping test compared the change with the largest entry of the whole batch: beside a row of covariances
    of 1e9 a row of order one stopped at a relative error of 6e-3. Float32 ran the iteration in float32 and failed
    to invert two identical covariances of condition number 1e4. Weights are normalised and checked."""
    rng = np.random.default_rng(3)
    ordinary = np.array([(lambda a: a @ a.T + 0.3 * np.eye(3))(rng.normal(size=(3, 3))) for _ in range(2)])
    large = np.array([1e9 * np.eye(3), 2e9 * np.eye(3)])
    w = np.array([0.4, 0.6])
    batch = covariance_barycenter(torch.tensor(np.stack([large, ordinary])), torch.tensor(w))
    np.testing.assert_allclose(batch[1].numpy(), numpy_barycenter(ordinary, w), rtol=1e-8, atol=1e-10)
    conditioned = torch.diag(torch.tensor([1.0, 1e-4, 0.5])).to(torch.float32)
    same = covariance_barycenter(torch.stack([conditioned, conditioned]), torch.tensor([0.3, 0.7], dtype=torch.float32))
    assert same.dtype == torch.float32
    torch.testing.assert_close(same, conditioned, rtol=1e-6, atol=0)
    three = covariance_barycenter(torch.eye(2).expand(3, 2, 2), torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(three, torch.eye(2, dtype=three.dtype), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"weights must be non-negative and finite, got \[-1"):
        covariance_barycenter(torch.eye(2).expand(2, 2, 2), torch.tensor([-1.0, 2.0]))
    with pytest.raises(ValueError, match="weights must have 2 entries"):
        covariance_barycenter(torch.eye(2).expand(2, 2, 2), torch.tensor([0.2, 0.3, 0.5]))


def _mpmath_barycenter(covs, weights, digits=60):
    """The fixed point ``S = sum_j w_j (S^1/2 C_j S^1/2)^1/2`` by the Álvarez-Esteban iteration in ``digits``-digit
    arithmetic, every matrix symmetrised before its square root, run until it is a fixed point to 1e-40 relative.
    (Stopped on the change between iterates instead, and without symmetrising, it settled on one case below at a
    point 1e-11 from being a fixed point, its smallest eigenvalue 2.6 % low.)"""
    import mpmath

    with mpmath.workdps(digits):
        def root(a):
            values, vectors = mpmath.eigsy((a + a.T) / 2)
            return vectors * mpmath.diag([mpmath.sqrt(max(v, 0)) for v in values]) * vectors.T

        cs = [mpmath.matrix(c.tolist()) for c in covs]

        def mean_root(s):  # sum_j w_j (S^1/2 C_j S^1/2)^1/2, and S^1/2
            r = root(s)
            return sum((w * root(r * c * r) for w, c in zip(weights, cs)), mpmath.zeros(len(covs[0]))), r

        s = sum((w * root(c) for w, c in zip(weights, cs)), mpmath.zeros(len(covs[0])))
        s = s * s
        for _ in range(3000):
            inner, r = mean_root(s)
            s = r**-1 * inner * inner * r**-1
            s = (s + s.T) / 2
            if mpmath.mnorm(mean_root(s)[0] - s, 1) < mpmath.mpf(10) ** -40 * mpmath.mnorm(s, 1):
                return np.array(s.tolist(), dtype=float)
        raise AssertionError(f"the {digits}-digit reference did not converge")


@pytest.mark.parametrize("condition", [1e8, 1e10, 1e12])
def test_full_covariance_barycenter_of_ill_conditioned_covariances(condition):
    """Two covariances of eigenvalues 1 and 1 / condition, rotated apart. The step formed Sigma^1/2 Sigma_j
    Sigma^1/2, whose eigenvalues keep only eps * condition^2 of the smallest, and stopped on a change relative to
    the largest entry: at condition 1e8 it raised (no convergence), at 1e10 it returned an indefinite matrix
    (eigenvalue -4.5e-12 against 1.75e-10), at 1e12 a smallest eigenvalue 11 times too large. Reference: the fixed
    point in 60-digit arithmetic."""
    def rotation(t):
        return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])

    covs = np.array([rotation(t) @ np.diag([1.0, 1 / condition]) @ rotation(t).T for t in (0.3, 1.1)])
    weights = [0.35, 0.65]
    expected = _mpmath_barycenter(covs, weights)
    got = covariance_barycenter(torch.tensor(covs), torch.tensor(weights, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-14)
    smallest, expected_smallest = np.linalg.eigvalsh(got)[0], np.linalg.eigvalsh(expected)[0]
    assert smallest == pytest.approx(expected_smallest, rel=1e-4, abs=0)


def test_barycenter_of_a_slow_contraction_is_not_left_early():
    """Three 3 x 3 covariances of eigenvalues 1e-5 to 1e5: a barycenter of condition number 5e8 whose iteration
    contracts by only about 0.93 a step. It stopped once the change fell within its rounding and shrank by less than
    half, leaving 13 times the last change: the smallest eigenvalue 6e-6 off, relative, where eps times the
    condition number is 1.1e-7 (and tol=1e-13 changed nothing). It now also counts the geometric tail the last two
    changes predict. Reference: the fixed point in 60-digit arithmetic. Found by a review."""
    rng = np.random.default_rng(2)
    covs = []
    for _ in range(3):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        covs.append(q @ np.diag(np.logspace(-5, 5, 3)) @ q.T)
    covs, weights = np.array(covs), rng.dirichlet(np.ones(3))
    expected = np.linalg.eigvalsh(_mpmath_barycenter(covs, [float(w) for w in weights / weights.sum()]))
    condition = expected[-1] / expected[0]
    assert condition > 1e8
    for tol in (None, 1e-13):
        got = np.linalg.eigvalsh(covariance_barycenter(torch.tensor(covs), torch.tensor(weights), tol=tol).numpy())
        assert np.abs(got / expected - 1).max() <= 4 * np.finfo(float).eps * condition, (got, expected)


def test_float32_barycenters_keep_float32_digits_and_bad_covariances_are_named():
    """Float32 inputs stopped at a relative change of 1e-5 (the iteration runs in float64): 1.2e-5 off the float64
    answer of the same inputs, now float32 rounding. Covariances that are not finite, symmetric and positive
    definite, integer dtypes and weights that do not broadcast raise clear errors before any work (an indefinite
    matrix gave a silent answer, NaN 500 iterations and a message about convergence, integers a truncated
    result); empty batches and 0 x 0 matrices give empty results."""
    rng = np.random.default_rng(5)
    for _ in range(3):
        covs = []
        for _ in range(3):
            q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
            covs.append(q @ np.diag(10.0 ** rng.uniform(-3, 0, 3)) @ q.T)
        covs = torch.tensor(np.array(covs), dtype=torch.float32)
        weights = torch.tensor(rng.dirichlet(np.ones(3)), dtype=torch.float32)
        single = covariance_barycenter(covs, weights)
        double = torch.tensor(numpy_barycenter(covs.double().numpy(), (weights.double() / weights.double().sum()).numpy()))
        assert single.dtype == torch.float32
        assert float((single.double() - double).abs().max() / double.abs().max()) < 2e-7
    eye = torch.eye(2, dtype=torch.float64)
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"covariances must be finite, got \[nan, .* at index \(1, 0, 0\)"):
        covariance_barycenter(torch.stack([eye, torch.full((2, 2), math.nan, dtype=torch.float64)]), half)
    with pytest.raises(ValueError, match=r"covariances must be positive definite, got a matrix at index \(1,\) .*-1"):
        covariance_barycenter(torch.stack([eye, torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))]), half)
    with pytest.raises(ValueError, match="covariances must be symmetric"):
        covariance_barycenter(torch.stack([eye, torch.tensor([[2.0, 0.5], [0.1, 2.0]], dtype=torch.float64)]), half)
    with pytest.raises(TypeError, match="covariances must have a real floating dtype, got torch.int64"):
        covariance_barycenter(torch.stack([2 * torch.eye(2, dtype=torch.long), 3 * torch.eye(2, dtype=torch.long)]), half)
    with pytest.raises(ValueError, match=r"weights of shape \(3, 2\) do not broadcast against covariances of shape \(4, 2"):
        covariance_barycenter(eye.expand(4, 2, 2, 2), half.expand(3, 2))
    # float32 sample covariances, symmetric to float32 rounding only, are accepted
    samples = torch.randn(4, 200, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    sampled = torch.stack([torch.cov(x.T) for x in samples])
    assert sampled.dtype == torch.float32 and not torch.equal(sampled, sampled.transpose(-1, -2))
    assert covariance_barycenter(sampled, torch.full((4,), 0.25, dtype=torch.float32)).shape == (5, 5)
    assert covariance_barycenter(eye.expand(0, 2, 2, 2), half).shape == (0, 2, 2)
    assert covariance_barycenter(torch.zeros(5, 2, 0, 0, dtype=torch.float64), half).shape == (5, 0, 0)


def test_a_barycenter_of_no_experts_is_refused_as_such():
    """M = 0 covariances: the error said the weights were all zero."""
    for batch in ((), (2,)):
        with pytest.raises(ValueError, match=r"covariances must hold at least one expert \(M >= 1\), got shape"):
            covariance_barycenter(torch.zeros(batch + (0, 3, 3)), torch.zeros(batch + (0,)))


def test_barycenter_non_convergence_is_an_error():
    rng = np.random.default_rng(1)
    covs = np.array([(lambda a: a @ a.T + 0.1 * np.eye(3))(rng.normal(size=(3, 3))) for _ in range(2)])
    with pytest.raises(RuntimeError, match="did not converge in 1 iterations"):
        opinionpool.wasserstein_barycenter(MultivariateNormal(torch.zeros(2, 3), torch.tensor(covs)), max_iter=1)
    with pytest.raises(ValueError, match="needs Gaussian experts"):
        opinionpool.wasserstein_barycenter([torch.distributions.Poisson(torch.tensor(1.0))] * 2)


@pytest.mark.parametrize("aggregator", [opf.hellinger, opf.poe, opf.wasserstein_barycenter])
def test_subset_mixture_against_brute_force(aggregator):
    g = torch.Generator().manual_seed(0)
    m, b, d = 4, 3, 2
    mu, logvar = torch.randn(m, b, d, generator=g), torch.randn(m, b, d, generator=g)
    mask = torch.tensor([[True, True, False], [False, True, True], [True, True, True], [True, False, True]])
    mix = opf.subset_mixture(aggregator, mu, logvar, mask=mask)
    subsets = [s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)]
    assert mix.loc.shape == (b, len(subsets), d)
    for sample in range(b):
        present = {j for j in range(m) if mask[j, sample]}
        kept = [s for s in subsets if set(s) & present]
        expected = {tuple(sorted(set(s) & present)) for s in kept}
        weights = mix.log_weights[sample].exp()
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert int((weights > 0).sum()) == len(kept)
        for k, s in enumerate(subsets):
            members = sorted(set(s) & present)
            if not members:
                assert weights[k] == 0
                continue
            assert weights[k].item() == pytest.approx(1 / len(kept), rel=1e-12)
            ref_loc, ref_lv = aggregator(mu[members, sample], logvar[members, sample])
            torch.testing.assert_close(mix.loc[sample, k], ref_loc, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(mix.logvar[sample, k], ref_lv, rtol=1e-12, atol=1e-12)
        assert expected  # every sample has at least one non-empty effective subset


def test_subset_mixture_gradients_are_finite_with_empty_subsets():
    mu = torch.randn(3, 2, 4, requires_grad=True)
    logvar = torch.randn(3, 2, 4, requires_grad=True)
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    mix = opf.subset_mixture(opf.hellinger, mu, logvar, mask=mask)
    (mix.log_weights.exp().unsqueeze(-1) * (mix.loc + mix.logvar)).sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()
    with pytest.raises(ValueError, match="subsets must be a boolean"):
        opf.subset_mixture(opf.hellinger, mu, logvar, subsets=torch.zeros(2, 3, dtype=torch.bool))


def test_prior_expert_on_the_full_subset_only_as_in_mopoe():
    g = torch.Generator().manual_seed(2)
    m, b, d = 3, 2, 4
    mu, logvar = torch.randn(m, b, d, generator=g), torch.randn(m, b, d, generator=g)
    mix = opf.subset_mixture(opf.poe, mu, logvar, prior_on_full_subset=True)
    subsets = [s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)]
    for k, s in enumerate(subsets):
        with_prior = len(s) == m
        ref_loc, ref_lv = opf.poe(mu[list(s)], logvar[list(s)], prior_expert=with_prior)
        torch.testing.assert_close(mix.loc[:, k], ref_loc, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mix.logvar[:, k], ref_lv, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="prior_on_full_subset does not combine with pooling weights"):
        opf.subset_mixture(opf.hellinger, mu, logvar, prior_on_full_subset=True, weights=torch.ones(m))
    # a sample missing an expert has no prior (the MoPoE code drops the subsets with a missing modality); one
    # missing every expert keeps it, its pool the prior alone (not a mixture of no components)
    mask = torch.tensor([[True, False], [False, False], [True, False]])
    masked = opf.subset_mixture(opf.poe, mu, logvar, mask=mask, prior_on_full_subset=True, validate_args=False)
    full = len(subsets) - 1
    ref_loc, ref_lv = opf.poe(mu[[0, 2], 0], logvar[[0, 2], 0])
    torch.testing.assert_close(masked.loc[0, full], ref_loc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(masked.logvar[0, full], ref_lv, rtol=1e-12, atol=1e-12)
    assert masked.log_weights[1].tolist() == [-math.inf] * full + [0.0]
    assert masked.loc[1, full].abs().max() == 0 and masked.logvar[1, full].abs().max() == 0


def test_subset_barycenters_of_standard_deviations_beyond_the_float_range():
    """float64 log-variances of -1500 and +1500 (standard deviations e^-+750, beyond the float range): the shared
    subset path averaged the standard deviations themselves (subnormal, 0 or inf), so a subset's log-variance came
    out -inf, inf or NaN, or -1480.019 for an expert of -1480 alone and -1480.691 for -1480.673, where the
    barycenter of the same experts is finite; the reference is mpmath's ``2 log(sum_j w_j s_j)`` with the weights
    normalised within each subset."""
    for logvars in ([-1500.0, -1480.0, 3.0], [1500.0, 1490.0, -2.0]):
        weights = [0.2, 0.5, 0.3]
        mu = torch.tensor([[[0.0, 1.0]], [[2.0, -1.0]], [[0.5, 0.5]]], dtype=torch.float64, requires_grad=True)
        logvar = torch.tensor(logvars, dtype=torch.float64).reshape(3, 1, 1).expand(3, 1, 2).clone().requires_grad_()
        mix = opf.subset_mixture(opf.wasserstein_barycenter, mu, logvar, weights=torch.tensor(weights))
        subsets = [s for r in range(1, 4) for s in itertools.combinations(range(3), r)]
        for k, s in enumerate(subsets):
            total = sum(mpmath.mpf(weights[j]) for j in s)
            truth = 2 * mpmath.log(sum(weights[j] * mpmath.exp(mpmath.mpf(logvars[j]) / 2) for j in s) / total)
            assert mix.logvar[0, k].tolist() == pytest.approx([float(truth)] * 2, rel=1e-13), s
            ref_loc, ref_lv = opf.wasserstein_barycenter(mu[list(s), 0], logvar[list(s), 0],
                                                         weights=torch.tensor([weights[j] for j in s]))
            torch.testing.assert_close(mix.logvar[0, k], ref_lv, rtol=1e-13, atol=0)
        mix.logvar.sum().backward()
        assert torch.isfinite(logvar.grad).all()
        assert mu.grad is None or (mu.grad == 0).all()  # (beyond the shared path's range: each subset on its own)
