"""Forward+backward time of the Gaussian aggregators on the VAE hot path (CPU, float32 by default).

Compares, on the same inputs and in one run:
  * opinionpool.functional.hellinger (Hölder alpha=1/2, moment-matched)
  * opinionpool.functional.poe (product of experts)
  * a direct float32 port of the official HELVAE aggregator (E[z^2] - mu^2, all ordered pairs)
  * the object API: opinionpool.holder(Independent(Normal), alpha=0.5).moment_match()

Usage: python benchmarks/bench_aggregators.py [--batch 256 --experts 5 --latent 512 --repeats 50]
Prints a Markdown table of medians (ms) and ratios; ``--docs docs/benchmarks.md`` also splices it into that page.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.distributions import Independent, Normal

import opinionpool
import opinionpool.functional as opf

from doc_tables import splice_file

__all__ = ["main", "official_hellinger", "object_api", "time_fn"]


def official_hellinger(mu: torch.Tensor, logvar: torch.Tensor):
    """Port of the released HELVAE aggregator, for timing only (experts stacked as (M, B, D))."""
    m = mu.shape[0]
    var = torch.exp(logvar)
    i, j = zip(*[(a, b) for a in range(m) for b in range(m) if a != b])
    i, j = list(i), list(j)
    var_i, var_j, mu_i, mu_j = var[i], var[j], mu[i], mu[j]
    denom = var_i + var_j
    mu_ij = (mu_i * var_j + mu_j * var_i) / denom
    var_ij = 2 * var_i * var_j / denom
    log_s = (0.5 * torch.log(2 * torch.sqrt(var_i * var_j) / denom) - 0.25 * (mu_i - mu_j) ** 2 / denom).sum(-1)
    s = torch.exp(log_s).unsqueeze(-1)
    normaliser = m + s.sum(0)
    mean = (mu.sum(0) + (s * mu_ij).sum(0)) / normaliser
    second = ((mu**2 + var).sum(0) + (s * (mu_ij**2 + var_ij)).sum(0)) / normaliser
    variance = torch.clamp(second - mean**2, min=1e-8)
    return mean, torch.log(variance)


def object_api(mu: torch.Tensor, logvar: torch.Tensor):
    experts = Independent(Normal(mu.movedim(0, 1), torch.exp(0.5 * logvar).movedim(0, 1), validate_args=False), 1)
    q = opinionpool.holder(experts, alpha=0.5, validate_args=False).moment_match()
    return q.base_dist.loc, 2 * torch.log(q.base_dist.scale)


def time_fn(fn, mu, logvar, repeats: int, warmup: int = 5) -> list[float]:
    times = []
    for step in range(warmup + repeats):
        a = mu.detach().requires_grad_(True)
        b = logvar.detach().requires_grad_(True)
        start = time.perf_counter()
        loc, lv = fn(a, b)
        (loc.sum() + lv.sum()).backward()
        elapsed = time.perf_counter() - start
        if step >= warmup:
            times.append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--latent", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--docs", type=Path, metavar="PAGE",
                        help="also splice the tables into PAGE between its <!-- table: bench_aggregators --> markers")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    shape = (args.experts, args.batch, args.latent)
    mu = torch.randn(shape, generator=g).to(args.device, dtype)
    logvar = (torch.randn(shape, generator=g) * 0.5).to(args.device, dtype)
    opinionpool.set_validate_args(False)
    candidates = {
        "functional hellinger": lambda m, v: opf.hellinger(m, v),
        "functional poe": lambda m, v: opf.poe(m, v),
        "official formula (port)": official_hellinger,
        "object API hellinger": object_api,
    }
    medians = {}
    for name, fn in candidates.items():
        medians[name] = statistics.median(time_fn(fn, mu, logvar, args.repeats)) * 1e3
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, {args.dtype}, "
          f"batch {args.batch}, experts {args.experts}, latent {args.latent}, {args.repeats} repeats (forward+backward)")
    h = medians["functional hellinger"]
    table = "\n".join([
        "| aggregator | median ms |", "|---|---|", *(f"| {name} | {ms:.3f} |" for name, ms in medians.items()), "",
        "| ratio | value | target |", "|---|---|---|",
        f"| hellinger / poe | {h / medians['functional poe']:.2f} | <= 2 |",
        f"| hellinger / official port | {h / medians['official formula (port)']:.2f} | <= 1 |",
        f"| object API / functional | {medians['object API hellinger'] / h:.2f} | <= 1.5 |"])
    print("\n" + table)
    if args.docs:
        splice_file(args.docs, "bench_aggregators", table)


if __name__ == "__main__":
    main()
