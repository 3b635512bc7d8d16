"""The pools on a CUDA device equal the CPU's, values and gradients: the alpha = 1/2 autograd function eager and
fused (torch.compile emits Triton kernels there), and the shared-component subset mixtures. Skipped without CUDA."""

import pytest
import torch

import opinionpool.functional as opf

pytestmark = pytest.mark.cuda


def experts(m=5, b=64, d=128, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = (3 * torch.randn(m, b, d, generator=g)).to(dtype)
    logvar = (2 * torch.randn(m, b, d, generator=g)).to(dtype)
    mask = torch.rand(m, b, generator=g) < 0.7
    mask[0] = True
    weights = torch.rand(b, m, generator=g).to(dtype) + 0.1  # one per expert, last
    return mu, logvar, mask, weights


def values_and_gradients(function, *inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outputs = function(*leaves)
    total = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum() for o in outputs)
    total.backward()
    return [o.detach().cpu() for o in outputs], [t.grad.cpu() for t in leaves]


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("m", [2, 5])
def test_hellinger_on_cuda_equals_the_cpu(fused, m):
    mu, logvar, mask, weights = experts(m=m)

    def pool(mu, logvar, weights):
        return opf.hellinger(mu, logvar, mask=mask.to(mu.device), weights=weights, fused=fused)

    cpu = values_and_gradients(pool, mu, logvar, weights)
    gpu = values_and_gradients(pool, mu.cuda(), logvar.cuda(), weights.cuda())
    for a, b in zip(cpu[0] + cpu[1], gpu[0] + gpu[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("aggregator", [opf.poe, opf.hellinger])
def test_subset_mixtures_on_cuda_equal_the_cpu(aggregator):
    mu, logvar, mask, weights = experts(m=4)

    def mixture(mu, logvar, weights):
        # per-sample weights broadcast against the (batch, subset, expert) axes of the subsets' pools
        result = opf.subset_mixture(aggregator, mu, logvar, mask=mask.to(mu.device), weights=weights[:, None, :])
        return result.log_weights, result.loc, result.logvar

    cpu = values_and_gradients(mixture, mu, logvar, weights)
    gpu = values_and_gradients(mixture, mu.cuda(), logvar.cuda(), weights.cuda())
    for a, b in zip(cpu[0] + cpu[1], gpu[0] + gpu[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
