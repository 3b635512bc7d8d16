"""A user-defined family works wherever built-in families do, and agrees with them."""

import pytest
import torch
from torch.distributions import Exponential, Gamma

import opinionpool
from opinionpool import CustomFamily


def exponential_family():
    return CustomFamily(
        log_normalizer=lambda eta: -torch.log(-eta[..., 0]),
        sufficient_statistic=lambda z: z.unsqueeze(-1),
        log_base_measure=lambda z: torch.zeros_like(z),
        num_params=1,
        natural_domain=lambda eta: eta[..., 0] < 0,
        mean=lambda eta: -1 / eta[..., 0],
        variance=lambda eta: 1 / eta[..., 0] ** 2,
        sampler=lambda eta, shape: Exponential(-eta[..., 0]).sample(shape),
        name="user Exponential",
    )


def gamma_family(support_interval=None):
    """Gamma without any closed-form mean map: autograd gives E[T], damped Newton inverts it; a mean but no
    variance (each is optional)."""
    def log_normalizer(eta):
        a = eta[..., 0] + 1
        return torch.lgamma(a) - a * torch.log(-eta[..., 1])

    return CustomFamily(log_normalizer, lambda z: torch.stack((torch.log(z), z), -1), lambda z: torch.zeros_like(z),
                        num_params=2, natural_domain=lambda eta: (eta[..., 0] > -1) & (eta[..., 1] < 0),
                        mean=lambda eta: (eta[..., 0] + 1) / -eta[..., 1], support_interval=support_interval,
                        name="user Gamma")


RATES = (0.5, 2.0, 1.3)
WEIGHTS = [0.2, 0.3, 0.5]


@pytest.mark.parametrize("alpha", [0, 1 / 3, 1 / 2, 1])
def test_custom_exponential_equals_builtin(alpha):
    fam = exponential_family()
    custom = opinionpool.holder([fam.expert(torch.tensor([-r])) for r in RATES], alpha=alpha, weights=WEIGHTS)
    builtin = opinionpool.holder([Exponential(torch.tensor(r)) for r in RATES], alpha=alpha, weights=WEIGHTS)
    torch.testing.assert_close(custom.log_normalizer, builtin.log_normalizer, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(custom.mean, builtin.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(custom.variance, builtin.variance, rtol=1e-12, atol=1e-14)
    z = torch.linspace(0.01, 5, 20)
    torch.testing.assert_close(custom.log_prob(z), builtin.log_prob(z), rtol=1e-12, atol=1e-12)
    matched = custom.moment_match()
    assert matched.family is fam
    torch.testing.assert_close(matched.natural_params[..., 0], -builtin.moment_match().rate, rtol=1e-10, atol=0)
    assert custom.sample((5,)).shape == (5,)


@pytest.mark.parametrize("alpha", [0, 1 / 2, 1])
def test_custom_gamma_newton_inverse_equals_builtin(alpha):
    params = ((2.0, 1.0), (3.5, 2.0), (1.5, 0.7))
    fam = gamma_family()
    custom = opinionpool.holder(fam.expert(torch.tensor([[a - 1, -b] for a, b in params])), alpha=alpha,
                                weights=WEIGHTS)
    builtin = opinionpool.holder([Gamma(torch.tensor(a), torch.tensor(b)) for a, b in params], alpha=alpha,
                                 weights=WEIGHTS)
    torch.testing.assert_close(custom.log_normalizer, builtin.log_normalizer, rtol=1e-12, atol=1e-14)
    matched, reference = custom.moment_match(), builtin.moment_match()
    torch.testing.assert_close(matched.natural_params[..., 0] + 1, reference.concentration, rtol=1e-9, atol=0)
    torch.testing.assert_close(-matched.natural_params[..., 1], reference.rate, rtol=1e-9, atol=0)
    b = opinionpool.bhattacharyya_coefficient(fam.expert(torch.tensor([1.0, -1.0])), fam.expert(torch.tensor([2.5, -2.0])))
    b_ref = opinionpool.bhattacharyya_coefficient(Gamma(torch.tensor(2.0), torch.tensor(1.0)),
                                                  Gamma(torch.tensor(3.5), torch.tensor(2.0)))
    torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=0)


def test_custom_family_errors():
    fam = exponential_family()
    with pytest.raises(ValueError, match="outside the user Exponential parameter space"):
        fam.expert(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="parameter shape"):
        fam.expert(torch.tensor([1.0, 2.0]).reshape(1, 2))
    other = exponential_family()
    with pytest.raises(ValueError, match="one family"):
        opinionpool.holder([fam.expert(torch.tensor([-1.0])), other.expert(torch.tensor([-1.0]))])
    no_moments = gamma_family()
    no_moments._variance = None
    pool = opinionpool.holder([no_moments.expert(torch.tensor([1.0, -1.0]))] * 2)
    with pytest.raises(NotImplementedError, match="no `variance` function"):  # as torch's distributions
        pool.variance
    with pytest.raises(NotImplementedError, match="no `sampler`"):
        pool.sample()


def test_num_params_and_integer_parameters_are_refused_by_name():
    """num_params = 0 built a family, -1 and 1.5 failed later in torch; an expert of integer parameters rounded the
    values log_prob was asked about (an Exponential(1) density at 0.5 came out exp(0), read at 0)."""
    import math

    def family(num_params):
        return CustomFamily(lambda e: -torch.log(-e[..., 0]), lambda z: z.unsqueeze(-1), lambda z: torch.zeros_like(z),
                            num_params, support_interval=(0.0, math.inf))

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"num_params must be a positive integer .*, got {bad!r}"):
            family(bad)
    exponential = family(1)
    with pytest.raises(ValueError, match="params must be a floating-point tensor, got torch.int64"):
        exponential.expert(torch.tensor([-1]), validate_args=True)
    value = exponential.expert(torch.tensor([-1.0])).log_prob(torch.tensor(0.5))
    assert float(value) == pytest.approx(float(Exponential(1.0).log_prob(torch.tensor(0.5))), rel=1e-12)


def test_a_custom_expert_at_its_support_ends_in_forecasts_and_expanded():
    """The finite upper end of a half-line support was open (torch's ``less_than``): the density there came out
    -inf, or a ValueError with validation, while a lower end was closed; crps and pit of one custom expert raised a
    bare NotImplementedError (the expert had no ``support``); ``expand`` dropped ``validate_args``."""
    import math

    from torch.distributions import transform_to

    f64 = torch.float64
    mirrored = CustomFamily(lambda e: -torch.log(e[..., 0]), lambda z: z.unsqueeze(-1), lambda z: torch.zeros_like(z),
                            1, natural_domain=lambda e: e[..., 0] > 0, support_interval=(-math.inf, 0.0))
    expert = mirrored.expert(torch.tensor([2.0], dtype=f64), validate_args=True)  # density 2 exp(2 z), z <= 0
    assert float(expert.log_prob(torch.tensor(0.0, dtype=f64))) == pytest.approx(math.log(2), rel=1e-15)
    assert expert.support.check(torch.tensor(0.0)) and not expert.support.check(torch.tensor(1e-300))
    point = torch.tensor([-3.0, 0.0, 2.0], dtype=f64)
    torch.testing.assert_close(transform_to(expert.support)(point), -point.exp())
    # an Exponential(2) written as a custom family: crps and pit against their closed forms
    exponential = CustomFamily(lambda e: -torch.log(-e[..., 0]), lambda z: z.unsqueeze(-1),
                               lambda z: torch.zeros_like(z), 1, natural_domain=lambda e: e[..., 0] < 0,
                               mean=lambda e: -1 / e[..., 0], variance=lambda e: 1 / e[..., 0] ** 2,
                               support_interval=(0.0, math.inf))
    rate, y = 2.0, torch.tensor([0.1, 0.3, 2.5], dtype=f64)
    expert = exponential.expert(torch.tensor([-rate], dtype=f64))
    torch.testing.assert_close(opinionpool.crps(expert, y), y + 2 / rate * torch.exp(-rate * y) - 1.5 / rate,
                               rtol=1e-9, atol=0)
    torch.testing.assert_close(opinionpool.pit(expert, y), -torch.expm1(-rate * y), rtol=1e-9, atol=0)
    # expand keeps the argument validation, and fills a given instance as torch's expand does
    checked = exponential.expert(torch.tensor([-rate], dtype=f64), validate_args=True)
    for expanded in (checked.expand((3,)), checked.expand((3,), _instance=checked.__new__(type(checked)))):
        assert expanded.batch_shape == (3,)
        with pytest.raises(ValueError, match="value must lie in the support"):
            expanded.log_prob(torch.tensor(-1.0, dtype=f64))
