"""Gradients of numerical pools at every alpha outside {0, 1/n}: log-normaliser, mean, variance, log_prob and
moment_match() with respect to the experts' parameters, the weights and a tensor alpha, against float64 central
finite differences of the values themselves (asymmetric weights, unequal scales)."""

import warnings

import pytest
import torch
from torch.distributions import Gamma, Normal, Poisson

import opinionpool


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def normal_outputs(pool, value):
    projected = pool.moment_match()
    return [pool.log_normalizer, pool.mean, pool.variance, pool.log_prob(value).sum(), projected.loc, projected.scale]


def shaped_outputs(pool, value):
    projected = pool.moment_match()
    params = [projected.concentration, projected.rate] if isinstance(projected, Gamma) else [projected.rate]
    return [pool.log_normalizer, pool.mean, pool.variance, pool.log_prob(value).sum(), *params]


CASES = {
    # family: (make the experts from two parameter tensors, their values, observed values)
    "normal": (lambda a, b: Normal(a, b), (t([0.0, 2.0]), t([1.0, 0.4])), t([0.3, 1.7])),
    "gamma": (lambda a, b: Gamma(a, b), (t([2.0, 5.0]), t([1.0, 2.5])), t([0.7, 2.5])),
    "poisson": (lambda a, b: Poisson(a * b), (t([1.5, 6.0]), t([1.0, 1.0])), t([0.0, 3.0, 7.0])),
}


def outputs(case, alpha, a, b, weights):
    make, _, value = CASES[case]
    pool = opinionpool.NumericalHolderPool(make(a, b), alpha=alpha, weights=weights)
    assert not isinstance(pool, opinionpool.HolderPool)
    return torch.stack([v.reshape(()) for v in (normal_outputs if case == "normal" else shaped_outputs)(pool, value)])


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("alpha", [2.0, -1.0, 0.3])
def test_gradients_match_finite_differences(case, alpha):
    _, (a, b), _ = CASES[case]
    inputs = [a, b, t([0.3, 0.7]), t(alpha)]
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    values = outputs(case, leaves[3], *leaves[:3])
    with torch.no_grad():
        assert torch.allclose(values, outputs(case, alpha, *inputs[:3]), rtol=1e-9, atol=0)
    step = 1e-5
    for index, x in enumerate(inputs):
        if case == "poisson" and index == 1:
            continue  # the rate is a * b: one parameter suffices
        grads = [torch.autograd.grad(v, leaves[index], retain_graph=True)[0] for v in values]
        for k in range(x.numel()):
            shift = torch.zeros_like(x).flatten()
            shift[k] = step
            shift = shift.reshape(x.shape)
            moved = [[y + sign * shift if i == index else y for i, y in enumerate(inputs)] for sign in (1, -1)]
            with torch.no_grad():
                up, down = (outputs(case, m[3], *m[:3]) for m in moved)
            reference = (up - down) / (2 * step)
            got = torch.stack([g.reshape(-1)[k] for g in grads])
            assert torch.allclose(got, reference, rtol=1e-6, atol=1e-7), (index, k, got, reference)


def test_a_tensor_alpha_at_an_exact_order_stays_exact_and_says_so():
    alpha = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    experts = Normal(t([0.0, 2.0]), t([1.0, 0.4]))
    with pytest.warns(UserWarning, match=r"exactly 1/2.*no gradient with respect to alpha"):
        exact = opinionpool.holder(experts, alpha=alpha, weights=t([0.3, 0.7]))
    assert isinstance(exact, opinionpool.HolderPool) and not exact.log_normalizer.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        numerical = opinionpool.NumericalHolderPool(experts, alpha=alpha, weights=t([0.3, 0.7]))
        (grad,) = torch.autograd.grad(numerical.log_normalizer, alpha)
    # d log Z / d alpha at alpha = 1/2 by central differences of the exact pools on either side
    step = 1e-5
    up, down = (float(opinionpool.NumericalHolderPool(experts, alpha=0.5 + s, weights=t([0.3, 0.7])).log_normalizer)
                for s in (step, -step))
    assert float(grad) == pytest.approx((up - down) / (2 * step), rel=1e-6)
    assert float(numerical.log_normalizer.detach()) == pytest.approx(float(exact.log_normalizer), rel=1e-10)


def test_a_natural_parameter_of_exactly_zero_keeps_its_gradient():
    """A concentration of exactly 1 (Gamma, Beta, Dirichlet) or a VonMises loc of 0 makes a natural parameter 0,
    whose gradient the edge-of-support guard (0 * log 0 = 0) threw away: 1.2704 against torch's 0.9137 for the
    Gamma. The family's log_prob against torch's own, and the alpha = 1/2 pool against central differences."""
    from torch.distributions import Beta, Dirichlet, Gamma, VonMises

    from opinionpool.families import family_of

    def t(*values):
        return torch.tensor(values if len(values) > 1 else values[0], dtype=torch.float64, requires_grad=True)

    cases = [(Gamma, (t(1.0), t(2.0)), torch.tensor(0.7, dtype=torch.float64)),
             (Beta, (t(1.0), t(3.0)), torch.tensor(0.3, dtype=torch.float64)),
             (Dirichlet, (t(1.0, 2.0, 3.0),), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)),
             (VonMises, (t(0.0), t(2.0)), torch.tensor(0.4, dtype=torch.float64))]
    for cls, args, value in cases:
        dist = cls(*args)
        family = family_of(dist)
        ours = torch.autograd.grad(family.log_prob(family.params_from_distribution(dist), value), args)
        reference = torch.autograd.grad(cls(*args).log_prob(value), args)
        for got, want in zip(ours, reference):
            # (torch's VonMises normaliser is a polynomial approximation good to about 1e-7)
            tolerance = 1e-6 if cls is VonMises else 1e-10
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=cls.__name__)

    def pool_log_prob(concentration):
        experts = [Gamma(concentration, torch.tensor(2.0, dtype=torch.float64)),
                   Gamma(torch.tensor(3.0, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64))]
        return opinionpool.holder(experts, alpha=0.5, weights=[0.3, 0.7]).log_prob(torch.tensor(0.7, dtype=torch.float64))

    concentration = t(1.0)
    (grad,) = torch.autograd.grad(pool_log_prob(concentration), concentration)
    h = 1e-6
    central = (pool_log_prob(torch.tensor(1 + h, dtype=torch.float64))
               - pool_log_prob(torch.tensor(1 - h, dtype=torch.float64))).item() / (2 * h)
    assert grad.item() == pytest.approx(central, rel=1e-6)


# scale_tril entries (L11, L21, L22) of three 2-D experts; the isotropic ones have covariances I and 4 I, whose
# whitened difference is 3 I (a repeated eigenvalue)
GENERAL = ([1.0, 0.3, 0.8], [1.5, -0.2, 0.6], [0.7, 0.1, 1.2])
ISOTROPIC = ([1.0, 0.0, 1.0], [2.0, 0.0, 2.0], [0.7, 0.1, 1.2])


@pytest.mark.parametrize("weights, scales", [([0.3, 0.5, 0.2], GENERAL), ([0.3, 0.7, 0.0], GENERAL),
                                             ([0.5, 0.3, 0.2], ISOTROPIC)])
def test_full_covariance_combination_has_finite_second_derivatives(weights, scales):
    """The log-determinants of the full-covariance combination and of the two-expert Chernoff coefficient ran the
    eigen-solver's derivatives, which divide by differences of eigenvalues: on the heaviest expert's own excess
    (a zero matrix), on weightless experts' (zeros) and on isotropic differences (covariances I and 4 I) their
    repeated eigenvalues made every Hessian with respect to ``scale_tril`` NaN. Checked against finite
    differences."""
    from torch.distributions import MultivariateNormal

    rows, cols = torch.tril_indices(2, 2)
    locs = [torch.tensor([0.0, 1.0]), torch.tensor([0.5, -0.3]), torch.tensor([-1.0, 0.2])]
    entries = [torch.tensor(v, requires_grad=True) for v in scales]

    def experts(tril_entries):
        return [MultivariateNormal(m, scale_tril=torch.zeros(2, 2).index_put((rows, cols), t))
                for m, t in zip(locs, tril_entries)]

    def log_c(*tril_entries):
        return opinionpool.log_multi_chernoff_coefficient(experts(tril_entries), torch.tensor(weights))

    def pair(*tril_entries):
        first, second = experts(tril_entries + (entries[2],))[:2]
        return opinionpool.log_chernoff_coefficient(first, second, 0.3)

    assert torch.autograd.gradgradcheck(log_c, tuple(entries))
    assert torch.autograd.gradgradcheck(pair, tuple(entries[:2]))


@pytest.mark.parametrize("family_name", ["Gamma", "Beta", "Dirichlet", "VonMises"])
def test_second_derivatives_of_the_mean_to_natural_solve(family_name):
    """natural_from_mean attached its gradient through one Newton step from the detached solution: right first
    derivatives, second derivatives of zero or partial ones without a word (the Gamma's shape Hessian [[0, 0], [0,
    15.9]] against central differences' [[103, -124], [-124, 165]]). The implicit function theorem's backward pass
    is now differentiable itself: gradgradcheck (finite differences of the analytic gradient) of the solve and of
    moment matching through pools at alpha = 1 and 1/2."""
    from torch.autograd import gradcheck, gradgradcheck

    from opinionpool import families

    f64 = torch.float64
    family, natural = {
        "Gamma": (families.GammaFamily(), [1.5, -3.0]), "Beta": (families.BetaFamily(), [2.0, 3.5]),
        "Dirichlet": (families.DirichletFamily(3), [2.0, 3.5, 0.7]), "VonMises": (families.VonMisesFamily(), [1.2, -0.7]),
    }[family_name]
    natural = torch.tensor([natural], dtype=f64)
    mean = family.mean_parameters(natural).detach().requires_grad_(True)

    def solve(m):
        return family.natural_from_mean(m, init=1.1 * natural)

    assert gradcheck(solve, (mean,)) and gradgradcheck(solve, (mean,))
    experts = {"Gamma": lambda c: torch.distributions.Gamma(c, torch.tensor([1.0, 2.0], dtype=f64)),
               "Beta": lambda c: torch.distributions.Beta(c, torch.tensor([1.5, 4.0], dtype=f64)),
               "Dirichlet": lambda c: torch.distributions.Dirichlet(
                   torch.stack([c, torch.tensor([1.5, 4.0], dtype=f64), torch.tensor([0.5, 0.9], dtype=f64)], -1)),
               "VonMises": lambda c: torch.distributions.VonMises(torch.tensor([0.2, -0.4], dtype=f64), c)}[family_name]
    for alpha in (1.0, 0.5):
        def matched(c, alpha=alpha):
            pool = opinionpool.holder(experts(c), alpha=alpha, weights=[0.3, 0.7])
            return family.params_from_distribution(pool.moment_match())

        assert gradgradcheck(matched, (torch.tensor([2.0, 3.0], dtype=f64, requires_grad=True),)), alpha
