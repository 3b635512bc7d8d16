"""The functional hot path under ``torch.compile(fullgraph=True)`` and ``torch.func.vmap`` with ``validate_args=False``:
compiled values and gradients equal the eager ones, and a vmap over a leading axis equals the loop over it (values,
and ``grad``/``vjp`` composed with vmap for ``hellinger`` and ``poe``). Both fail on any ``nonzero``, ``.item()``,
``int(tensor)``, ``bool(tensor)`` or Python branch on tensor data in the traced path."""

import pytest
import torch
import torch.func

import opinionpool.functional as opf

M, D = 3, 2  # experts, latent size: tiny, so that a compilation stays cheap


def experts(batch=(), seed=0):
    """``mu``, ``logvar`` ``(*batch, M, D)``, asymmetric weights ``(*batch, M)`` and a mask with expert 0 present."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch + (M, D), generator=g, dtype=torch.float64) * 1.5
    logvar = torch.randn(batch + (M, D), generator=g, dtype=torch.float64) * 0.7
    weights = torch.rand(batch + (M,), generator=g, dtype=torch.float64) + 0.2
    mask = torch.rand(batch + (M,), generator=g) > 0.4
    mask[..., 0] = True
    return mu, logvar, weights, mask


def call(name, mu, logvar, weights, mask):
    """One function of the hot path, experts along the second-to-last axis, validation off; tensors out."""
    common = {"dim": -2, "mask": mask, "validate_args": False}
    if name == "hellinger":
        return opf.hellinger(mu, logvar, weights=weights, **common)
    if name == "holder":  # alpha = 1/3: the exact mixture of three-fold compositions, moment-matched
        return opf.holder(mu, logvar, 1 / 3, weights=weights, **common)
    if name == "poe":
        return opf.poe(mu, logvar, weights=weights, **common)
    if name == "moe":
        return tuple(opf.moe(mu, logvar, weights=weights, **common))
    if name == "holder_mixture":
        return tuple(opf.holder_mixture(mu, logvar, 1 / 3, weights=weights, **common))
    if name.startswith("subset_mixture"):  # the components shared by all subsets (``_SHARED``); weights per sample
        aggregator = opf.hellinger if name.endswith("hellinger") else opf.poe
        return tuple(opf.subset_mixture(aggregator, mu, logvar, weights=weights.unsqueeze(-2), **common))
    raise AssertionError(name)


NAMES = ["hellinger", "holder", "poe", "moe", "holder_mixture", "subset_mixture_hellinger", "subset_mixture_poe"]


def loss(outputs):
    """A scalar that weighs every finite output entry differently (absent components carry ``-inf`` weights)."""
    total = 0
    for k, out in enumerate(outputs):
        coefficient = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape) * (k + 1)
        total = total + torch.where(torch.isfinite(out), out, torch.zeros_like(out)).mul(coefficient).sin().sum()
    return total


def every_path(mu, logvar, weights, mask):
    """Every function of the hot path on the same inputs: one graph, so that one compilation covers them all."""
    return {name: call(name, mu, logvar, weights, mask) for name in NAMES}


@pytest.mark.slow
def test_compile_fullgraph_equals_eager():
    torch._dynamo.reset()
    mu, logvar, weights, mask = experts(batch=(2,), seed=1)
    results = []
    for fn in (every_path, torch.compile(every_path, fullgraph=True, dynamic=False)):
        inputs = [t.clone().requires_grad_(True) for t in (mu, logvar, weights)]
        outputs = fn(*inputs, mask)
        # one loss per path, so that each path's gradients are compared on their own
        grads = {name: torch.autograd.grad(loss(out), inputs, allow_unused=True, retain_graph=True)
                 for name, out in outputs.items()}
        results.append((outputs, grads))
    (eager, eager_grads), (compiled, compiled_grads) = results
    for name in NAMES:
        assert len(compiled[name]) == len(eager[name]), name
        for got, want in zip(compiled[name], eager[name]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
        for got, want in zip(compiled_grads[name], eager_grads[name]):
            assert (got is None) == (want is None), name
            if want is not None:
                assert torch.isfinite(want).all(), name
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12,
                                           msg=lambda m, name=name: f"{name} gradient: {m}")
    torch._dynamo.reset()


@pytest.mark.parametrize("name", NAMES)
def test_vmap_equals_loop(name):
    mu, logvar, weights, mask = experts(batch=(4,), seed=2)
    batched = torch.func.vmap(lambda *args: call(name, *args))(mu, logvar, weights, mask)
    looped = [call(name, mu[n], logvar[n], weights[n], mask[n]) for n in range(mu.shape[0])]
    assert len(batched) == len(looped[0])
    for k, got in enumerate(batched):
        torch.testing.assert_close(got, torch.stack([one[k] for one in looped]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["hellinger", "poe", "subset_mixture_hellinger"])
def test_vmap_of_grad_and_vjp_equals_loop(name):
    mu, logvar, weights, mask = experts(batch=(4,), seed=3)

    def scalar(mu, logvar, weights, mask):
        return loss(call(name, mu, logvar, weights, mask))

    grads = torch.func.vmap(torch.func.grad(scalar, argnums=(0, 1, 2)))(mu, logvar, weights, mask)

    def pulled_back(mu, logvar, weights, mask, cotangent_mu, cotangent_logvar):
        outputs, vjp = torch.func.vjp(lambda *args: call(name, *args, mask)[-2:], mu, logvar, weights)
        return vjp((cotangent_mu, cotangent_logvar))

    shapes = [out.shape for out in call(name, mu[0], logvar[0], weights[0], mask[0])[-2:]]
    g = torch.Generator().manual_seed(4)
    cotangents = [torch.randn((mu.shape[0],) + shape, generator=g, dtype=mu.dtype) for shape in shapes]
    vjps = torch.func.vmap(pulled_back)(mu, logvar, weights, mask, *cotangents)
    for n in range(mu.shape[0]):
        inputs = [t[n].clone().requires_grad_(True) for t in (mu, logvar, weights)]
        want = torch.autograd.grad(scalar(*inputs, mask[n]), inputs)
        outputs = call(name, *inputs, mask[n])[-2:]
        want_vjp = torch.autograd.grad(outputs, inputs, [c[n] for c in cotangents], allow_unused=True)
        for k in range(3):
            torch.testing.assert_close(grads[k][n], want[k], rtol=1e-12, atol=1e-12)
            expected = torch.zeros_like(inputs[k]) if want_vjp[k] is None else want_vjp[k]
            torch.testing.assert_close(vjps[k][n], expected, rtol=1e-12, atol=1e-12)
