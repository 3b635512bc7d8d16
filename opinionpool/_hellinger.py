r"""The Hölder pool of order 1/2 of diagonal Gaussians, moment-matched, as one autograd function.

The pool :math:`(\sum_j \lambda_j q_j^{1/2})^2` is the mixture of the experts (weights :math:`\lambda_j^2`) and of
one geometric mean per pair :math:`i < j` (weights :math:`2\lambda_i\lambda_j S_{ij}`, :math:`S_{ij}` the
Bhattacharyya coefficient), with, per dimension, :math:`\Delta = \mu_j - \mu_i`, :math:`u = v_i + v_j`:

* :math:`\log S_{ij} = -\sum_d [\Delta^2 / (4u) + \tfrac12 \log\cosh((\log v_i - \log v_j)/2)]`, where
  :math:`\log\cosh(a/2) = a/2 - \log(2 v_{\max} / u)` for :math:`a = |\log v_i - \log v_j|`, the second term in
  :math:`[0, \log 2]` from the pair's ratios :math:`v_i / u = \sigma(\log v_i - \log v_j)` (no terms of the size
  of the log-variances cancel);
* the pair's mean :math:`(\mu_i v_j + \mu_j v_i)/u` and variance :math:`2 v_i v_j / u`.

The components' means are taken relative to one present expert; the pairs' differences of means come
from the means as given (offsets rounded far from that expert would lose them). The pairs are formed row by
row (expert ``i`` against the experts after it, ``_rows``): slices of the inputs, never gathered copies. The
forward pass keeps only the inputs, the output moments and the mixture weights; the backward pass recomputes the
rows and applies the analytic derivatives (:math:`\partial\log S/\partial\mu`,
:math:`\partial m/\partial\log v = \Delta r_i r_j`, ...). Eagerly on the CPU both passes work through the batch
in slices of about ``_chunks.CPU_CHUNK_BYTES`` per row of pairs, so that temporaries are reused from the allocator
instead of being faulted in page by page. The eager passes also leave out the pairs whose components provably
change neither the pool nor its gradients at the dtype's resolution in any sample (``kept_partners``: one Gram
matrix of the scaled means per sample bounds every ``S_ij``): experts that stopped overlapping, as a trained
HELVAE's do, then cost about what the moment-matched mixture of the experts does.

``fused=True`` trades the eager passes for one fused pass per sample. On the CPU that is a C++ kernel
(``_hellinger_kernel.cpp``, built with ``torch.utils.cpp_extension`` on first use, then cached per machine;
docs/benchmarks.md has its build time): per sample, it forms each pair's terms in SIMD registers over the dimensions
and never materialises a pair tensor; a pair's ratios come from the experts' variances relative to the largest (a
division, no transcendental function per pair and dimension) and the Bhattacharyya term :math:`\sum_d \log((1 +
e^{-a})/2)` as the logarithm of a running product (one vector logarithm per 64 SIMD vectors of dimensions).
Elsewhere (a GPU) it runs the same mathematics through ``torch.compile``: up to ``UNROLL_MAX_EXPERTS`` experts the
pairs unrolled in Python (``_forward_unrolled``, ``_backward_unrolled``), each a few ``(..., D)`` operations from
per-expert terms, which the compiler fuses into one loop per body with no ``(..., P, D)`` tensor (this graph, and
its compile time, grow as M^2); beyond, the row bodies of the eager path. One compilation per number of experts,
dtype, device and shape; later calls reuse it. On ``torch.func``-wrapped tensors (``vmap``; the backward pass under
``grad``, ``vjp``, ``jacrev``), which the kernel cannot take, the eager bodies run. Where the kernel cannot be built
or compilation fails it warns once and runs the same bodies eagerly.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.utils._python_dispatch

from ._autograd import first_order_only, second_order_requested
from ._chunks import by_rows, flat, unflat
from .families.gaussian import gaussian_mixture_moments

__all__ = ["hellinger_moments", "kept_partners", "pair_components", "pairs_of", "standing_in", "values_readable",
           "weights_underflow"]

_LOG2 = math.log(2.0)


class _Row(NamedTuple):
    """The pairs ``(i, j)``, ``j`` in ``after`` (all ``j > i`` unless negligible pairs were left out), of one expert
    ``i``: ``neg_log_s`` ``(..., n)``; the others ``(..., n, D)``, ``n`` the number of partners."""

    i: int
    after: slice | torch.Tensor  # the partners j, a slice or (where negligible pairs between them were left out) indices
    neg_log_s: torch.Tensor  # -log S_ij
    loc: torch.Tensor  # the pair's mean offset x_i + r_i Delta
    log_2big: torch.Tensor  # log(2 v_max / u): the pair's log-variance log(2 v_i v_j / u) is log v_min + log_2big
    delta: torch.Tensor  # Delta = mu_j - mu_i
    r_i: torch.Tensor  # v_i / u, the weight of x_j in the pair's mean
    r_j: torch.Tensor  # v_j / u
    big: torch.Tensor  # v_max / u, in [1/2, 1]
    t: torch.Tensor  # 1 / (2 sqrt(v_max))
    z: torch.Tensor  # Delta t
    quad: torch.Tensor  # Delta^2 / (4u) = z^2 big


def _rows(x, logvar, log_s=True, partners=None, mu=None):
    """The pairs ``i < j`` of experts with offsets ``x`` and log-variances ``logvar`` ``(..., M, D)``, one
    ``_Row`` per ``i`` (together the pairs in ``pairs_of`` order, row by row; ``partners``, from ``kept_partners``,
    keeps only the listed pairs and skips empty rows), made as they are consumed: the passes keep
    one row's tensors at a time, not all of them (on the CPU every extra megabyte alive costs cache misses). Each
    row broadcasts expert ``i`` against the experts after it: slices, no gathered copies. Each pair costs two
    sigmoids and one logarithm (on the CPU ``expm1`` and ``log1p`` cost several times as much), the square roots
    of the variances are taken once per expert; in-place and fused operations (``addcmul``) where a temporary is not
    kept.

    ``log cosh((logvar_i - logvar_j) / 2) = |logvar_i - logvar_j| / 2 - log(2 v_max / u)`` with ``log(2 v_max / u)``
    in [0, log 2]: each dimension's term is off by about an ulp of one, whatever the log-variances' size (no terms of
    that size cancel). ``log_s=False`` leaves ``neg_log_s`` and ``log_2big`` out (``None``): the backward passes
    need neither.

    ``mu``: the experts' means, of which ``x`` are offsets. The pairs' differences ``Delta`` are taken from them
    where given: two close experts far from the reference would lose their difference to the rounding of their
    offsets (in float32, 3e-5 at 1e3 from it), and with it ``S_ij``."""
    g = torch.exp(-0.5 * logvar).mul_(0.5)
    for i, after in enumerate(_partner_index(x.shape[-2], partners, x.device)):
        if after is None:
            continue
        here = slice(i, i + 1)
        dlv = logvar[..., here, :] - logvar[..., after, :]
        half_a = dlv.abs().sum(-1).mul_(0.5) if log_s else None
        # sigmoids rather than a select from big and 1 - big: 1 - big loses the digits of a small ratio
        r_i = torch.sigmoid(dlv)
        r_j = torch.sigmoid(dlv.neg_())
        big = torch.maximum(r_i, r_j)
        log_2big = torch.log(2 * big) if log_s else None
        means = x if mu is None else mu
        delta = means[..., after, :] - means[..., here, :]
        t = torch.minimum(g[..., here, :], g[..., after, :])
        z = delta * t
        quad = (z * z).mul_(big)
        neg_log_s = quad.sum(-1).add_(half_a.sub_(log_2big.sum(-1)), alpha=0.5) if log_s else None
        loc = torch.addcmul(x[..., here, :], r_i, delta)
        yield _Row(i, after, neg_log_s, loc, log_2big, delta, r_i, r_j, big, t, z, quad)


def _row_backward(row, d_loc, d_lv, d_neg_log_s):
    """Chain rule from one row's pair quantities (mean ``d_loc``, log-variance ``d_lv``, both ``(..., n, D)``, and
    ``-log S`` ``d_neg_log_s`` ``(..., n)``) to its experts: ``(d x_i, d x_j, d logvar_i, d logvar_j)``, ``(..., D)``
    for expert ``i`` (summed over its pairs) and ``(..., n, D)`` for the experts after it. Consumes ``row``'s
    tensors.

    Expert ``i``'s terms come from the sums of the pair's: ``d x_i + d x_j = d_loc`` (the mean moves with both
    experts) and ``d logvar_i + d logvar_j = d_lv - d_neg quad`` (scaling both variances by ``c`` scales the pair's
    by ``c`` and ``quad`` by ``1 / c``), so only expert ``j``'s are formed elementwise. In place only where the
    tensor written depends on every input the operands depend on: under ``torch.func.vmap`` an unbatched tensor
    cannot take a batched operand in place (the incoming gradients may be batched where the experts are not, as in
    ``jacrev``, or the other way round)."""
    d_neg = d_neg_log_s.unsqueeze(-1)
    # Delta / (4u) (half of d(-log S)/d x_j) and Delta^2 / (4u) overflow only where S, hence d_neg, is zero
    half_slope = _finite((row.z * row.t).mul_(row.big))
    quad = _finite(row.quad)
    dx_j = torch.addcmul((2 * d_neg) * half_slope, d_loc, row.r_i)
    # d logvar_j = r_i (d_lv - d_loc Delta r_j) - d_neg ((r_i - r_j) / 4 + quad r_j), the first term from the
    # pair's mean (d loc / d logvar_j = -Delta r_i r_j) and variance, the second from -log S
    dlv_j = torch.sub(d_lv, (d_loc * row.delta).mul_(row.r_j)).mul_(row.r_i)
    dlv_j = torch.addcmul(dlv_j, d_neg, torch.addcmul((row.r_i - row.r_j).mul_(0.25), quad, row.r_j), value=-1)
    dx_i = d_loc.sum(-2) - dx_j.sum(-2)
    dlv_i = d_lv.sum(-2) - _mix(d_neg_log_s, quad) - dlv_j.sum(-2)
    return dx_i, dx_j, dlv_i, dlv_j


def _row_sizes(m, partners=None):
    """The number of pairs in each row that ``_rows`` yields."""
    if partners is None:
        return [m - 1 - i for i in range(m - 1)]
    return [len(row) for row in partners if row]


def pairs_of(num_experts, partners=None):
    """The pairs ``(i, j)``, ``i < j``, that ``partners`` (from ``kept_partners``; ``None``: all) keeps, row by row
    (the order of ``_rows``)."""
    if partners is None:
        return [(i, j) for i in range(num_experts) for j in range(i + 1, num_experts)]
    return [(i, j) for i, row in enumerate(partners) for j in row]


def _partner_index(m, partners, device):
    """Per expert ``i < m - 1``: its partners as a slice (a contiguous run), an index tensor, or ``None`` (none).
    Cached: the passes slice the batch and call this per slice, and on a GPU each new index tensor is a copy from
    the host. Not while compiling or under a dispatch mode (fake tensors, tracing), whose tensors must not outlive
    it."""
    partners = None if partners is None else tuple(tuple(row) for row in partners)
    if torch.compiler.is_compiling() or torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return _partner_index_uncached(m, partners, device)
    return _partner_index_cached(m, partners, device)


def _partner_index_uncached(m, partners, device):
    def index(row):
        if not row:
            return None
        if row[-1] - row[0] == len(row) - 1:
            return slice(row[0], row[-1] + 1)
        # made outside inference mode, so that a tensor cached there can index under autograd later
        with torch.inference_mode(False):
            return torch.tensor(row, device=device)

    return tuple(index(range(i + 1, m) if partners is None else partners[i]) for i in range(m - 1))


_partner_index_cached = functools.lru_cache(maxsize=256)(_partner_index_uncached)


def values_readable(*tensors) -> bool:
    """Whether a choice may read ``tensors``' values on the host: not under ``torch.compile`` or ``torch.func``
    transforms, nor while a CUDA graph is captured."""
    return not (torch.compiler.is_compiling()
                or any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)
                or any(t.device.type == "cuda" for t in tensors) and torch.cuda.is_current_stream_capturing())


def kept_partners(mu, logvar, log_w, pools=False):
    r"""The pairs of experts ``(..., M, D)`` with log-weights ``log_w`` ``(..., M)`` whose components change the
    moment-matched pool in some sample, as the partners ``j > i`` of each expert ``i``; ``None`` where that is every
    pair, or where the pairs cannot be chosen by value (under ``torch.compile`` or ``torch.func`` transforms, or
    while a CUDA graph is captured). ``pools=True``: ``log_w`` ``(..., K, M)`` weighs the experts in each of ``K``
    pools of the same experts (subsets); a pair is then kept where it changes any of them (its weights' ratio is
    taken in each pool that holds both experts).

    A pair is left out where one of its experts is absent (its weight is exactly zero), or where, in every sample,
    :math:`\log S_{ij} + |\log\lambda_i - \log\lambda_j| + \log(10 P) < 3 \log\epsilon` (:math:`P` pairs,
    :math:`\epsilon` the dtype's resolution; -48 in float32, -108 in float64). Leaving out a pair changes the pool's
    mean by at most :math:`4 S_{ij}` of its standard deviation and its variance by at most
    :math:`5 S_{ij}(\lambda_i / \lambda_j + \lambda_j / \lambda_i)` relative (the pair's weight
    :math:`2\lambda_i\lambda_j S_{ij}` against the experts' own :math:`\lambda_i^2`, :math:`\lambda_j^2`, whose
    components are always kept), and the gradients by about the resolution cubed of their own size (the factors
    the pair's terms carry, powers of :math:`\log S_{ij}` and ratios of the experts' scales, fit in the margin).
    Entries that only the left-out pairs reach, such as the derivative of the mean with respect to a log-variance
    between symmetric experts, become exactly zero, where their exact values are that small.

    :math:`\log S_{ij}` is bounded without forming the pairs: it is at most :math:`-\sum_d \Delta_d^2 / (8 V_d)`
    for any :math:`V_d \ge \max(v_i, v_j)`, a squared distance between the experts scaled by :math:`V^{-1/2}`,
    hence one Gram matrix per sample (less its rounding, ``(2D + 16) eps`` of the squared norms). ``V`` is the
    largest present variance; where that bound leaves pairs, a second one takes ``V`` without each sample's widest
    expert (the largest sum of log-variances) for the pairs without it, so that one broad expert (a prior) does not
    keep every pair. Experts that stopped overlapping, as a trained HELVAE's do, leave every pair out, and the pool
    costs about what the moment-matched mixture of the experts does."""
    m = mu.shape[-2]
    if m < 2 or not values_readable(mu, logvar, log_w):
        return None
    with torch.no_grad():
        eps = torch.finfo(mu.dtype).eps
        held = log_w > -math.inf
        present = held.any(-2) if pools else held
        hidden = torch.full((), -math.inf, dtype=logvar.dtype, device=logvar.device)
        everyone = bool(present.all())
        # absent experts' values are arbitrary: only the present set the scale (the others' pairs are left out)
        top = (logvar if everyone else torch.where(present.unsqueeze(-1), logvar, hidden)).amax(-2, keepdim=True)
        # (the diagonal is no pair: marked negligible, so that "every pair left out" reads as all())
        absent = ~present.unsqueeze(-1) | ~present.unsqueeze(-2) | torch.eye(m, dtype=torch.bool, device=mu.device)
        both = held.unsqueeze(-1) & held.unsqueeze(-2)
        spread = torch.where(both, (log_w.unsqueeze(-1) - log_w.unsqueeze(-2)).abs(), hidden)
        if pools:  # the largest ratio over the pools holding both experts (-inf where none does: absent)
            spread = spread.amax(-3)
        threshold = -3 * math.log(eps) + math.log(10 * m * (m - 1) / 2)
        # NaN (non-finite inputs) compares false: such a pair is kept, and the pool computes what it did before
        negligible = (_scaled_distances(mu, top, eps) - spread > threshold) | absent
        if m > 2 and not bool(negligible.all()):
            widest = torch.where(present, logvar.sum(-1), hidden).argmax(-1, keepdim=True)  # (..., 1)
            without = torch.arange(m, device=mu.device) != widest  # (..., M)
            others = present & without
            top_others = torch.where(others.unsqueeze(-1), logvar, hidden).amax(-2, keepdim=True)
            # (a sample with no other present expert: its pairs are all absent ones, any finite scale will do)
            top_others = torch.where(others.any(-1)[..., None, None], top_others, top)
            closer = _scaled_distances(mu, top_others, eps) - spread > threshold
            negligible |= closer & without.unsqueeze(-1) & without.unsqueeze(-2)
        negligible = negligible.reshape((-1, m, m)).all(0).tolist()
    partners = tuple(tuple(j for j in range(i + 1, m) if not negligible[i][j]) for i in range(m))
    return None if all(len(row) == m - 1 - i for i, row in enumerate(partners)) else partners


def _scaled_distances(mu, top, eps):
    """``(..., M, M)``: a lower bound of ``sum_d (mu_i - mu_j)^2 / (8 e^top_d)`` for experts ``mu (..., M, D)``,
    from the Gram matrix of ``mu e^(-top / 2)`` less its rounding. (Halving ``top`` and dividing by 8 are exact;
    the scale's own rounding is then that of ``exp``.)"""
    y = mu * torch.exp(-0.5 * top)
    gram = y @ y.mT
    norms = gram.diagonal(dim1=-2, dim2=-1)
    both = norms.unsqueeze(-1) + norms.unsqueeze(-2)
    return (both - 2 * gram - (2 * mu.shape[-1] + 16) * eps * both) / 8


def _reference(mu, log_w):
    """The offsets ``mu - mu_ref`` from the expert of largest weight (present by construction)."""
    ref = log_w.argmax(-1, keepdim=True).unsqueeze(-1).expand(log_w.shape[:-1] + (1, mu.shape[-1]))
    mu_ref = mu.gather(-2, ref)
    return mu - mu_ref, mu_ref.squeeze(-2)


def _scale(x, logvar, log_w):
    """``(..., D)``: the larger of the largest present log-variance and the log of the squared spread (twice the
    largest present offset), so that variances and squared deviations, rescaled by it, are at most about one: tiny
    variances do not underflow and deviations of many standard deviations do not overflow."""
    absent = torch.zeros_like(log_w).masked_fill(log_w == -math.inf, -math.inf).unsqueeze(-1)
    spread = (x.abs() + absent).amax(-2)
    # log(2 spread) as log(spread) + log 2: 2 spread overflows for offsets above half the largest float (a NaN pool)
    return torch.maximum((logvar + absent).amax(-2), 2 * (torch.log(spread) + _LOG2))


def _mix(pi, values):
    """``sum_c pi_c values_c``: ``(..., n)``, ``(..., n, D)`` -> ``(..., D)``."""
    return (pi.unsqueeze(-2) @ values).squeeze(-2)


def _half_pair_variances(v, row):
    """Half the variances ``2 v_i v_j / u = 2 min(v_i, v_j) v_max / u`` of a row's pairs, from the experts' ``v``."""
    return torch.minimum(v[..., row.i:row.i + 1, :], v[..., row.after, :]).mul_(row.big)


def _forward(mu, logvar, log_w, partners=None):
    """``(mean, logvar, offset, pi)``: the pool's moments, the mean's offset from the reference expert and the
    mixture weights (experts, then the pairs ``pairs_of(M, partners)``)."""
    x, mu_ref = _reference(mu, log_w)
    m = log_w.shape[-1]
    scale = _scale(x, logvar, log_w)
    v = torch.exp(logvar - scale.unsqueeze(-2))  # variances relative to the scale
    rows = _rows(x, logvar, partners=partners, mu=mu)
    pairs = [(log_w[..., row.i:row.i + 1] + log_w[..., row.after] - row.neg_log_s + _LOG2, row.loc,
              _half_pair_variances(v, row)) for row in rows]
    pi = torch.softmax(torch.cat([2 * log_w] + [logit for logit, _, _ in pairs], -1), -1)
    pis = pi.split([m] + _row_sizes(m, partners), -1)
    offset = sum((_mix(p, loc) for p, (_, loc, _) in zip(pis[1:], pairs)), _mix(pis[0], x))
    h = torch.exp(-0.5 * scale).unsqueeze(-2)
    centre = offset.unsqueeze(-2)

    def spread(p, loc, var, var_factor):
        dev = (loc - centre).mul_(h)
        return _mix(p, dev.mul_(dev).add_(var, alpha=var_factor))

    total = spread(pis[0], x, v, 1)
    for p, (_, loc, half_var) in zip(pis[1:], pairs):
        total = total + spread(p, loc, half_var, 2)
    return mu_ref + offset, scale + torch.log(total), offset, pi


def _backward(mu, logvar, log_w, offset, logvar_out, pi, grad_mean, grad_logvar, partners=None):
    """Gradients of ``_forward``'s mean and log-variance with respect to ``mu``, ``logvar`` and ``log_w``."""
    x, _ = _reference(mu, log_w)
    m = log_w.shape[-1]
    pis = pi.split([m] + _row_sizes(m, partners), -1)
    scale = _scale(x, logvar, log_w)
    v = torch.exp(logvar - scale.unsqueeze(-2))
    q = torch.exp(-0.5 * logvar_out).unsqueeze(-2)
    g_m, g_l = grad_mean.unsqueeze(-2), grad_logvar.unsqueeze(-2)
    g_l_q2 = (2 * g_l).mul_(q)
    g_l_total = grad_logvar.sum(-1, keepdim=True)

    def component(p, dev, rel_var):
        """d/d(mean_c), d/d(logvar_c) and d/d(logit_c) of the loss through components of weights ``p`` ``(..., n)``,
        means ``dev`` about the pool's and ``rel_var = v_c / V`` ``(..., n, D)`` (consumed). The sums over
        dimensions are matrix products: ``d logit_c = p_c sum_d (dev_c g_m + g_l dev_c^2 / V - g_l) + sum_d d_lv_c``."""
        sqrt_p = p.sqrt().unsqueeze(-1)
        # sqrt(p_c) dev_c / sqrt(V), at most one in magnitude (p_c dev_c^2 <= V): scaled by sqrt(p_c) first, so
        # that a component of vanishing weight far from the pool overflows nothing
        s_dev = (dev * sqrt_p).mul_(q)
        d_loc = torch.addcmul(g_m * sqrt_p, s_dev, g_l_q2).mul_(sqrt_p)  # p_c (g_m + 2 g_l dev_c / V)
        d_lv = rel_var.mul_(p.unsqueeze(-1)) * g_l
        d_logit = (p * ((dev @ grad_mean.unsqueeze(-1)).squeeze(-1) - g_l_total)
                   + ((s_dev * s_dev) @ grad_logvar.unsqueeze(-1)).squeeze(-1) + d_lv.sum(-1))
        return d_loc, d_lv, d_logit

    # the rows are formed about the pool's mean: their locations are the components' deviations from it
    dev_x = x - offset.unsqueeze(-2)
    grad_x, grad_lv, d_logit = component(pis[0], dev_x, torch.exp(logvar - logvar_out.unsqueeze(-2)))
    grad_log_w = 2 * d_logit
    # half the pool's variance relative to the scale (at least p_c v_c / 2 for every component: dividing by it
    # never overflows, where its reciprocal would once it falls below e^-88 in float32)
    half_total = torch.exp(logvar_out - scale).mul_(0.5).unsqueeze(-2)
    experts = torch.arange(m, device=mu.device)
    for k, (p, row) in enumerate(zip(pis[1:], _rows(dev_x, logvar, log_s=False, partners=partners, mu=mu))):
        i, after = row.i, row.after
        d_loc, d_lv, d_logit = component(p, row.loc, _half_pair_variances(v, row).div_(half_total))
        dx_i, dx_j, dlv_i, dlv_j = _row_backward(row, d_loc, d_lv, -d_logit)
        if k == 0:
            # the first row added out of place, so that the sums carry every input's vmap batching (jacrev,
            # is_grads_batched) before the other rows are added in place
            reached = torch.cat((experts[i:i + 1], experts[after]))
            grad_log_w = grad_log_w.index_add(-1, reached, torch.cat((d_logit.sum(-1, keepdim=True), d_logit), -1))
            grad_x = grad_x.index_add(-2, reached, torch.cat((dx_i.unsqueeze(-2), dx_j), -2))
            grad_lv = grad_lv.index_add(-2, reached, torch.cat((dlv_i.unsqueeze(-2), dlv_j), -2))
            continue
        # (partners are distinct, so indexed in-place sums are exact)
        grad_log_w[..., i] += d_logit.sum(-1)
        grad_log_w[..., after] += d_logit
        grad_x[..., i, :] += dx_i
        grad_x[..., after, :] += dx_j
        grad_lv[..., i, :] += dlv_i
        grad_lv[..., after, :] += dlv_j
    return grad_x, grad_lv, grad_log_w


def _finite(value):
    """``value`` with infinities clamped to the largest finite number of its dtype, so that a zero factor makes a
    zero product (never ``0 * inf``)."""
    big = torch.finfo(value.dtype).max
    return value.clamp(-big, big)


def _unrolled_components(mu, x, logvar, log_w):
    """Per-expert ``(..., D)`` slices of the offsets ``x`` (of the means ``mu``, whose differences the pairs take,
    as in ``_rows``), of ``g = exp(-logvar / 2) / 2`` and of the variances
    relative to ``_scale``, the scale itself, and the pairs ``(i, j)``, ``i < j`` (row by row), each with its
    ``(..., D)`` terms ``(r_i, Delta, z = Delta min(g_i, g_j), v_max / u, log cosh((logvar_i - logvar_j) / 2))``.

    One Python loop over a static number of experts, which the compiler unrolls and fuses into a few loops over
    ``(..., D)`` without any ``(..., P, D)`` tensor; each pair costs two transcendental functions (``expm1``,
    ``log1p``), everything else comes from the per-expert terms."""
    m = x.shape[-2]
    scale = _scale(x, logvar, log_w)
    xs = [x[..., k, :] for k in range(m)]
    means = [mu[..., k, :] for k in range(m)]
    g = [0.5 * torch.exp(-0.5 * logvar[..., k, :]) for k in range(m)]
    v = [torch.exp(logvar[..., k, :] - scale) for k in range(m)]
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    terms = []
    for i, j in pairs:
        dlv = logvar[..., i, :] - logvar[..., j, :]
        a = dlv.abs()
        em = torch.expm1(-a)
        big = 1 / (2 + em)
        delta = means[j] - means[i]
        lc = 0.5 * a + torch.log1p(0.5 * em)
        terms.append((torch.where(dlv >= 0, big, 1 - big), delta, delta * torch.minimum(g[i], g[j]), big, lc))
    return xs, g, v, scale, pairs, terms


def _unrolled_mixture(xs, v, pairs, terms):
    """The components' offsets and variances relative to the scale: the experts', then the pairs'."""
    locs = xs + [xs[i] + ri * delta for (i, _), (ri, delta, *_) in zip(pairs, terms)]
    var = v + [2 * torch.minimum(v[i], v[j]) * big for (i, j), (*_, big, _) in zip(pairs, terms)]
    return locs, var


def _forward_unrolled(mu, logvar, log_w):
    """``_forward`` with the pairs unrolled (the body ``fused=True`` compiles): the same outputs, ``pi`` with the
    pairs in ``pairs_of`` order."""
    x, mu_ref = _reference(mu, log_w)
    xs, g, v, scale, pairs, terms = _unrolled_components(mu, x, logvar, log_w)
    if pairs:
        neg_log_s = torch.stack([(z * z * big + 0.5 * lc).sum(-1) for _, _, z, big, lc in terms], -1)
        i, j = (list(k) for k in zip(*pairs))
        logits = torch.cat((2 * log_w, _LOG2 + log_w[..., i] + log_w[..., j] - neg_log_s), -1)
    else:
        logits = 2 * log_w
    pi = torch.softmax(logits, -1)
    locs, var = _unrolled_mixture(xs, v, pairs, terms)
    weights = [pi[..., c, None] for c in range(len(locs))]
    offset = sum(w * loc for w, loc in zip(weights, locs))
    h = torch.exp(-0.5 * scale)
    spread = sum(w * (var_c + ((loc - offset) * h) ** 2) for w, var_c, loc in zip(weights, var, locs))
    return mu_ref + offset, scale + torch.log(spread), offset, pi


def _backward_unrolled(mu, logvar, log_w, offset, logvar_out, pi, grad_mean, grad_logvar):
    """``_backward`` with the pairs unrolled (the body ``fused=True`` compiles): one reduction over ``D`` for the
    components' logits, then the gradients of every expert accumulated pair by pair (no ``index_add``)."""
    x, _ = _reference(mu, log_w)
    m = x.shape[-2]
    xs, g, v, scale, pairs, terms = _unrolled_components(mu, x, logvar, log_w)
    locs, var = _unrolled_mixture(xs, v, pairs, terms)
    q = torch.exp(-0.5 * logvar_out)
    w = torch.exp(scale - logvar_out)  # variances relative to the scale -> relative to the pool's
    d_loc, d_lv, d_logit = [], [], []
    g_l_total = grad_logvar.sum(-1)
    for c, (loc, var_c) in enumerate(zip(locs, var)):
        p = pi[..., c, None]
        dev = loc - offset
        dev_q = dev * q  # |p dev_q| <= sqrt(p): no overflow where p vanishes
        rho = p * var_c * w  # pi_c v_c / V
        d_loc.append(p * (grad_mean + 2 * grad_logvar * dev_q * q))
        d_lv.append(grad_logvar * rho)
        d_logit.append((p * (dev * grad_mean + grad_logvar * dev_q * dev_q) + grad_logvar * rho).sum(-1)
                       - pi[..., c] * g_l_total)
    grad_x, grad_lv = d_loc[:m], d_lv[:m]
    grad_log_w = [2 * d for d in d_logit[:m]]
    for p, ((i, j), (ri, delta, z, big, _)) in enumerate(zip(pairs, terms)):
        dl, dv, d_logit_p = d_loc[m + p], d_lv[m + p], d_logit[m + p]
        d_neg = -d_logit_p.unsqueeze(-1)
        rj = 1 - ri
        grad_log_w[i] = grad_log_w[i] + d_logit_p
        grad_log_w[j] = grad_log_w[j] + d_logit_p
        t = torch.minimum(g[i], g[j])
        slope = _finite(2 * z * t * big)  # Delta / (2u): as in _row_backward
        quad = _finite(z * z * big)  # Delta^2 / (4u)
        cross = dl * delta * ri * rj
        tanh_half = 0.25 * (ri - rj)
        grad_x[i] = grad_x[i] + dl * rj - d_neg * slope
        grad_x[j] = grad_x[j] + dl * ri + d_neg * slope
        grad_lv[i] = grad_lv[i] + cross + dv * rj + d_neg * (tanh_half - quad * ri)
        grad_lv[j] = grad_lv[j] - cross + dv * ri - d_neg * (tanh_half + quad * rj)
    return torch.stack(grad_x, -2), torch.stack(grad_lv, -2), torch.stack(grad_log_w, -1)


class _PairComponents(torch.autograd.Function):
    """``(-log S, loc, logvar)`` of the pairs ``i < j`` of experts given as offsets ``x`` and ``logvar``
    ``(..., M, D)`` (those ``partners`` keeps, ``pairs_of`` order): ``(..., P)``, ``(..., P, D)``, ``(..., P, D)``;
    saves only its inputs."""

    # forward and backward are plain batched tensor code: torch.func.vmap runs them on its batched tensors
    generate_vmap_rule = True

    @staticmethod
    def forward(x, logvar, partners, mu):
        rows = list(_rows(x, logvar, partners=partners, mu=mu))
        if not rows:
            empty = x.new_zeros(x.shape[:-2] + (0, x.shape[-1]))
            return x.new_zeros(x.shape[:-2] + (0,)), empty, empty.clone()
        pair_logvar = [torch.minimum(logvar[..., row.i:row.i + 1, :], logvar[..., row.after, :]).add_(row.log_2big)
                       for row in rows]  # log(2 v_i v_j / u) = log v_min + log(2 v_max / u)
        return (torch.cat([row.neg_log_s for row in rows], -1), torch.cat([row.loc for row in rows], -2),
                torch.cat(pair_logvar, -2))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, logvar, ctx.partners, mu = inputs
        ctx.save_for_backward(x, logvar, mu)

    @staticmethod
    def backward(ctx, d_neg_log_s, d_loc, d_lv):
        if ctx.partners is None and second_order_requested(d_neg_log_s, d_loc, d_lv):
            return _plain_pair_gradients(ctx, d_neg_log_s, d_loc, d_lv)
        return _analytic_pair_gradients(ctx, d_neg_log_s, d_loc, d_lv)


def _plain_pair_gradients(ctx, d_neg_log_s, d_loc, d_lv):
    """``_PairComponents``' gradients with a graph (``create_graph=True``), through ``_plain_pair_components`` of
    the saved inputs: the analytic backward is not itself differentiable. Every pair (no ``partners``)."""
    x, logvar, _ = ctx.saved_tensors
    return (*_recomputed_gradients(_plain_pair_components, (x, logvar), ctx.needs_input_grad,
                                   (d_neg_log_s, d_loc, d_lv)), None, None)


def _recomputed_gradients(function, inputs, needs_input_grad, grad_outputs):
    """The gradients of ``function(*inputs)`` (ordinary differentiable operations) with a graph, for the inputs
    that need them (``None`` for the others): the second-order backward of a function whose analytic backward is
    not itself differentiable. Outputs that do not depend on a wanted input (or get no gradient) are left out."""
    wanted = [k for k in range(len(inputs)) if needs_input_grad[k]]
    with torch.enable_grad():
        outputs = function(*inputs)
        used = [(out, grad) for out, grad in zip(outputs, grad_outputs) if grad is not None and out.requires_grad]
        found = torch.autograd.grad([out for out, _ in used], [inputs[k] for k in wanted], [g for _, g in used],
                                    create_graph=True, allow_unused=True, materialize_grads=True) if used else \
            [torch.zeros_like(inputs[k]) for k in wanted]
    grads = [None] * len(inputs)
    for k, grad in zip(wanted, found):
        grads[k] = grad
    return grads


@first_order_only("the Hellinger pool's pair components (of pruned pairs)")
def _analytic_pair_gradients(ctx, d_neg_log_s, d_loc, d_lv):
    x, logvar, mu = ctx.saved_tensors
    partners = ctx.partners
    rows = _rows(x, logvar, log_s=False, partners=partners, mu=mu)
    sizes = _row_sizes(x.shape[-2], partners)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    d_locs = [zero] * len(sizes) if d_loc is None else d_loc.split(sizes, -2)
    d_lvs = [zero] * len(sizes) if d_lv is None else d_lv.split(sizes, -2)
    d_negs = [torch.zeros(x.shape[:-2] + (n,), dtype=x.dtype, device=x.device) for n in sizes] \
        if d_neg_log_s is None else d_neg_log_s.split(sizes, -1)
    grad_x, grad_logvar = [], []
    experts = torch.arange(x.shape[-2], device=x.device)
    for row, *grads in zip(rows, d_locs, d_lvs, d_negs):
        dx_i, dx_j, dlv_i, dlv_j = _row_backward(row, *grads)
        # each row as a (..., M, D) term, summed out of place: the incoming gradients may carry a vmap
        # batching that the inputs do not (jacrev, is_grads_batched), or the other way round
        reached = torch.cat((experts[row.i:row.i + 1], experts[row.after]))
        grad_x.append(x.new_zeros(x.shape).index_copy(-2, reached, torch.cat((dx_i.unsqueeze(-2), dx_j), -2)))
        grad_logvar.append(x.new_zeros(x.shape).index_copy(-2, reached,
                                                           torch.cat((dlv_i.unsqueeze(-2), dlv_j), -2)))
    if not grad_x:
        return torch.zeros_like(x), torch.zeros_like(logvar), None, None
    grad_x, grad_logvar = sum(grad_x[1:], grad_x[0]), sum(grad_logvar[1:], grad_logvar[0])
    # (the differences Delta taken from mu are those of x: their gradients are x's)
    return grad_x, grad_logvar, None, None


def pair_components(x: torch.Tensor, logvar: torch.Tensor, partners=None, mu: torch.Tensor | None = None):
    """``(-log S_ij (..., P), loc_ij (..., P, D), logvar_ij (..., P, D))`` of the pairs ``pairs_of(M, partners)``
    (all ``i < j`` unless ``partners`` from ``kept_partners`` is given) of diagonal Gaussians with
    means ``x`` (offsets from a common reference) and log-variances ``logvar`` ``(..., M, D)``; the backward pass
    recomputes them instead of saving them. ``mu``: the means the offsets were taken from, whose differences the
    pairs then use (exact where the offsets' rounding is not; gradients flow through ``x`` alone)."""
    return _PairComponents.apply(x, logvar, partners, x if mu is None else mu.detach())


def _by_rows(fn, batch, tensors, *constants):
    """``fn(*tensors, *constants)`` through ``by_rows``, in slices of about ``_chunks.CPU_CHUNK_BYTES`` per row of
    pairs ``(M - 1, D)`` of ``tensors[0]`` ``(..., M, D)``."""
    m, d = tensors[0].shape[-2:]
    return by_rows(fn, batch, tensors, *constants, row_elements=max(1, m - 1) * d)


#: ``fused=True`` unrolls the pairs up to this many experts; beyond, the graph (growing as M^2) takes many minutes
#: to compile, and the compiled row bodies (``_forward``, ``_backward``) are used instead
UNROLL_MAX_EXPERTS = 6

_COMPILED: dict[str, object] = {}
_COMPILE_FAILED: list[str] = []
_KERNEL: list = []  # the loaded CPU kernel's operators, once built
_KERNEL_FAILED: list[str] = []

#: compiler flags per ``torch.backends.cpu.get_cpu_capability()``: the macro selects ATen's SIMD vectors (and
#: SLEEF's vector transcendental functions) for that instruction set; anything else gets the portable vectors
_ISA_FLAGS = {"AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
              "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]}


def _cpu_kernel():
    """The fused CPU kernel's operators (``forward``, ``backward``), built on first use and cached by
    ``torch.utils.cpp_extension`` (in ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); ``None``
    where it cannot be built (with a warning the first time)."""
    if not _KERNEL and not _KERNEL_FAILED:
        capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "NO AVX", "Z VECTOR"...
        try:
            from torch.utils import cpp_extension

            cpp_extension.load("opinionpool_hellinger_" + re.sub(r"\W", "_", capability.lower()),
                               [str(Path(__file__).with_name("_hellinger_kernel.cpp"))],
                               extra_cflags=["-O3"] + _ISA_FLAGS.get(capability, []), is_python_module=False)
            _KERNEL.append(torch.ops.opinionpool_hellinger)
        except Exception as error:  # no C++ compiler or ninja, headers missing...: the eager bodies compute the same
            _KERNEL_FAILED.append(repr(error))
            warnings.warn(f"fused=True: the CPU kernel could not be built ({type(error).__name__}: {error}); running "
                          "the Hellinger pool eagerly from now on", RuntimeWarning, stacklevel=5)
    return _KERNEL[0] if _KERNEL else None


def _fused_path(*tensors):
    """How ``fused=True`` runs on these tensors: ``"kernel"`` (the CPU kernel: CPU tensors all float32 or all
    float64, and a kernel that builds), ``"compile"`` (``torch.compile``, on other devices) or ``"eager"``: on
    ``torch.func``-wrapped tensors (the kernel has no batching rule, and compiled functions cannot be called under
    the transforms), while ``torch.compile`` traces (the kernel has no fake implementation; the outer compilation
    fuses the eager bodies), on the CPU in other or mixed dtypes or devices, or where the kernel does not build."""
    first = tensors[0]
    if torch.compiler.is_compiling() or any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return "eager"
    if any(t.dtype != first.dtype or t.device != first.device for t in tensors):
        return "eager"
    if first.device.type != "cpu":
        return "compile"
    return "kernel" if first.dtype in (torch.float32, torch.float64) and _cpu_kernel() is not None else "eager"


def _kernel_layout(mu, logvar, *others):
    """The kernel's operands: ``mu`` and ``logvar`` ``(..., M, D)`` with their batch axes flattened, copied only
    where ``D`` is not their innermost axis (the experts-first tensors of the functional API are read where they
    lie), the ``others`` contiguous."""
    mu, logvar, *others = flat((mu, logvar) + others, mu.shape[:-2])
    # (a copy that really copies: contiguous() hands back an empty tensor as it is, whatever its strides)
    return ([t if t.size(-1) <= 1 or t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)
             for t in (mu, logvar)] + [t.contiguous() for t in others])


def _compiled(name, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[name]


def _run(name, fn, *args):
    """``fn(*args)`` through ``torch.compile`` where compilation works; else eagerly (with a warning the first time
    compilation fails)."""
    if not _COMPILE_FAILED:
        try:
            return _compiled(name, fn)(*args)
        except Exception as error:  # no compiler, an unsupported backend...: the eager body computes the same
            _COMPILE_FAILED.append(repr(error))
            warnings.warn(f"fused=True: torch.compile failed ({type(error).__name__}: {error}); running the "
                          "Hellinger pool eagerly from now on", RuntimeWarning, stacklevel=4)
    return fn(*args)


class _HellingerMoments(torch.autograd.Function):
    """``(mean, logvar, offset, pi)``: the pool's moments and, for the backward pass only (not differentiable),
    the mean's offset from the reference expert and the mixture weights."""

    generate_vmap_rule = True

    @staticmethod
    def forward(mu, logvar, log_w, fused, partners):
        path = _fused_path(mu, logvar, log_w) if fused else "eager"
        if path == "kernel":
            return unflat(_KERNEL[0].forward(*_kernel_layout(mu, logvar, log_w)), mu.shape[:-2])
        if path == "compile":
            unrolled = mu.shape[-2] <= UNROLL_MAX_EXPERTS
            return _run("forward" if unrolled else "forward_rows", _forward_unrolled if unrolled else _forward, mu,
                        logvar, log_w)
        return _by_rows(_forward, mu.shape[:-2], (mu, logvar, log_w), partners)

    @staticmethod
    def setup_context(ctx, inputs, output):
        mu, logvar, log_w, ctx.fused, ctx.partners = inputs
        _, logvar_out, offset, pi = output
        ctx.mark_non_differentiable(offset, pi)
        ctx.save_for_backward(mu, logvar, log_w, offset, logvar_out, pi)

    @staticmethod
    def backward(ctx, grad_mean, grad_logvar, _grad_offset, _grad_pi):
        if second_order_requested(grad_mean, grad_logvar):
            return (*_differentiable_gradients(ctx, grad_mean, grad_logvar), None, None)
        return _HellingerMoments.analytic_backward(ctx, grad_mean, grad_logvar)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def analytic_backward(ctx, grad_mean, grad_logvar):
        mu, logvar, log_w, offset, logvar_out, pi = ctx.saved_tensors
        grad_mean, grad_logvar = grad_mean.contiguous(), grad_logvar.contiguous()
        tensors = (mu, logvar, log_w, offset, logvar_out, pi, grad_mean, grad_logvar)
        path = _fused_path(*tensors) if ctx.fused else "eager"
        batch = mu.shape[:-2]
        if path == "kernel":
            grads = unflat(_KERNEL[0].backward(*_kernel_layout(*tensors)), batch)
        elif path == "compile":
            unrolled = mu.shape[-2] <= UNROLL_MAX_EXPERTS
            grads = _run("backward" if unrolled else "backward_rows", _backward_unrolled if unrolled else _backward,
                         *tensors)
        else:
            grads = _by_rows(_backward, batch, tensors, ctx.partners)
        return (*grads, None, None)


def _plain_pair_components(x, logvar):
    """``pair_components`` from ordinary differentiable operations (no ``_PairComponents``) in the direct form:
    ``-log S_ij = sum_d [Delta^2 / (4 u) + (log u - log 2 - (log v_i + log v_j) / 2) / 2]``, mean
    ``x_i + (v_i / u) Delta``, log-variance ``log 2 + log v_i + log v_j - log u``, ``log u`` by log-sum-exp."""
    first, second = (torch.tensor(index, dtype=torch.long, device=x.device) for index in zip(*pairs_of(x.shape[-2])))
    delta = x[..., second, :] - x[..., first, :]
    lv_i, lv_j = logvar[..., first, :], logvar[..., second, :]
    log_u = torch.logaddexp(lv_i, lv_j)
    neg_log_s = (delta**2 / (4 * log_u.exp()) + 0.5 * (log_u - _LOG2 - 0.5 * (lv_i + lv_j))).sum(-1)
    return neg_log_s, x[..., first, :] + torch.exp(lv_i - log_u) * delta, _LOG2 + lv_i + lv_j - log_u


def _differentiable_gradients(ctx, grad_mean, grad_logvar):
    """The gradients of ``_HellingerMoments`` with a graph (``create_graph=True``: Hessians, gradient penalties),
    from the pool's mixture written out (``_mixture_moments``, ordinary differentiable operations) recomputed from
    the saved inputs: the analytic backward is not itself differentiable. Slower; the same values."""
    return _recomputed_gradients(_written_out_moments, ctx.saved_tensors[:3], ctx.needs_input_grad,
                                 (grad_mean, grad_logvar))


def _written_out_moments(mu, logvar, log_w):
    if mu.shape[-2] == 1:  # one expert: the pool is that expert, whatever its weight
        return mu[..., 0, :], logvar[..., 0, :]
    return _mixture_moments(mu, logvar, log_w, differentiable=True)


def standing_in(mu: torch.Tensor, logvar: torch.Tensor, present: torch.Tensor):
    """``(mu, logvar)`` with the first present expert's values (detached) in place of the experts not ``present``
    (booleans ``(..., M, 1)``), N(0, 1) where none is: experts absent or of weight zero are no part of the pool, and
    whatever they hold (an overflow far from the present ones) would otherwise meet its zero weight as inf * 0 =
    NaN, in the pool or in its gradients. A fixed stand-in such as N(0, 1) is no better: relative to present experts
    of log-variance -90 its variance overflows float32 (NaN pools, eager and fused)."""
    shape = torch.broadcast_shapes(mu.shape, logvar.shape, present.shape)
    mu, logvar, present = mu.expand(shape), logvar.expand(shape), present.expand(shape[:-1] + (1,))
    first = present.to(torch.uint8).argmax(-2, keepdim=True).expand(shape[:-2] + (1, shape[-1]))
    anyone = present.any(-2, keepdim=True)
    zero = torch.zeros((), dtype=mu.dtype, device=mu.device)
    stand_in = [torch.where(anyone, value.detach().gather(-2, first), zero) for value in (mu, logvar)]
    return torch.where(present, mu, stand_in[0]), torch.where(present, logvar, stand_in[1])


def hellinger_moments(mu: torch.Tensor, logvar: torch.Tensor, log_weights: torch.Tensor, fused: bool = False):
    """Moment-matched ``(mean, logvar)`` ``(..., D)`` of the order-1/2 pool of experts ``(..., M, D)`` with
    log-weights ``(..., M)`` (``-inf`` for absent experts, at least one present; they broadcast)."""
    batch = torch.broadcast_shapes(mu.shape[:-2], log_weights.shape[:-1])
    mu = mu.expand(batch + mu.shape[-2:])
    logvar = logvar.expand(batch + logvar.shape[-2:])
    log_weights = log_weights.expand(batch + log_weights.shape[-1:])
    # a standard deviation below e^-88.7 in float32 (subnormal): the scaled deviations' factor e^(-scale / 2)
    # overflowed, and the pool came out NaN (one expert of log-variance -200); float64 keeps its range. Not checked
    # on the fused CUDA path, which reads no values on the host (the check would wait for the GPU every call).
    if (logvar.dtype != torch.float64 and logvar.numel() and values_readable(logvar)
            and not (fused and logvar.device.type == "cuda")
            and bool(logvar.detach().amin() < -2 * math.log(torch.finfo(logvar.dtype).max))):
        return tuple(t.to(mu.dtype) for t in hellinger_moments(mu.double(), logvar.double(), log_weights.double(),
                                                                 fused))
    if not (fused and mu.device.type == "cuda") and weights_underflow(log_weights):
        return _mixture_moments(mu, logvar, log_weights)
    # the fused paths form no pair tensors, so a choice by bound gains them little; the CPU kernel skips the pairs
    # of exactly zero weight itself, sample by sample
    partners = None if fused else kept_partners(mu, logvar, log_weights)
    return _HellingerMoments.apply(mu, logvar, log_weights, bool(fused), partners)[:2]


def weights_underflow(log_w) -> bool:
    """Whether some present expert's mixture weight can fall below the dtype's smallest normal number: it is at
    least ``(lambda_k / lambda_max)^2 / M^2``. The fast paths scale every variance by the largest present one and
    weigh it afterwards, so such an expert's share of the pool's variance is lost however large its variance (a
    weight of 1e-200 beside a log-variance of 1000: a log-variance of -inf for 79). Not where the values cannot be
    read (and not on the fused CUDA path, which reads none)."""
    m = log_w.shape[-1]
    if m < 2 or not log_w.numel() or not values_readable(log_w):
        return False
    with torch.no_grad():
        relative = 2 * (log_w - log_w.amax(-1, keepdim=True)) - 2 * math.log(m)
        return bool(((relative < math.log(torch.finfo(log_w.dtype).tiny)) & (log_w > -math.inf)).any())


def _mixture_moments(mu, logvar, log_w, differentiable: bool = False):
    """``(mean, logvar)`` of the order-1/2 pool from its mixture written out, the experts (weights ``lambda_k^2``)
    and their pairs (``2 lambda_i lambda_j S_ij``), moment-matched with every weight kept in log space
    (``gaussian_mixture_moments``): where ``weights_underflow``. Slower than the fast paths (the pairs'
    components are formed), exact where they lose an expert's share. ``differentiable``: the pairs from ordinary
    operations (``_plain_pair_components``), twice differentiable, for second derivatives."""
    x, mu_ref = _reference(mu, log_w)
    neg_log_s, pair_loc, pair_logvar = (_plain_pair_components(x, logvar) if differentiable
                                        else pair_components(x, logvar, mu=mu))
    # (no caller sends a pool of one expert here: there is at least one pair)
    first, second = (torch.tensor(index, dtype=torch.long, device=mu.device) for index in zip(*pairs_of(mu.shape[-2])))
    logits = torch.cat((2 * log_w, _LOG2 + log_w[..., first] + log_w[..., second] - neg_log_s), -1)
    log_pi = torch.log_softmax(logits, -1)
    mean, pooled_logvar = gaussian_mixture_moments(log_pi, torch.cat((x, pair_loc), -2),
                                                   torch.cat((logvar, pair_logvar), -2), 1)
    return mu_ref + mean, pooled_logvar
