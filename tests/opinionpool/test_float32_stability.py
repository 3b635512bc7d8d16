"""float32 behaviour on the ranges VAEs produce: log-variances in [-30, 30], |mu| <= 1e3, latent
sizes up to 4096, up to 16 experts; compared with the same computation in float64."""

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
    mu = torch.tensor([[[30.0, -1e3, 0.5]]])
    logvar = torch.tensor([[[-10.0, -30.0, 30.0]]])
    loc, lv = opf.holder(mu, logvar, alpha)
    assert torch.equal(loc, mu[0])
    torch.testing.assert_close(lv, logvar[0], rtol=0, atol=4 * EPS32 * 30)
    loc3, lv3 = opf.holder(mu.expand(3, 1, 3), logvar.expand(3, 1, 3), alpha, weights=[0.2, 0.3, 0.5])
    assert torch.equal(loc3, mu[0])
    torch.testing.assert_close(lv3, logvar[0], rtol=0, atol=8 * EPS32 * 30)


def test_tiny_log_variances_do_not_become_nan():
    """Below logvar -88 exp(-logvar) overflows float32; the log-space formulas stay finite."""
    mu = torch.tensor([[[1.0, 2.0]], [[1.0, 2.5]]])
    logvar = torch.tensor([[[-95.0, -120.0]], [[-90.0, -100.0]]])
    for alpha in (0, 0.5, 1):
        loc, lv = opf.holder(mu, logvar, alpha)
        assert torch.isfinite(loc).all() and torch.isfinite(lv).all()
