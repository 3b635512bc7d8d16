"""Wall time of the numerical engine (issue target: a 64-dimensional pool of 5 diagonal Gaussians,
normaliser + mean + variance from 1e5 importance samples, in under 1 s on 2 CPU cores).

Also times the deterministic methods on typical inputs: 1-D adaptive quadrature and the 2-D / 3-D
grid. The importance rows are the median of ``--repeats`` runs in float64, each with a fresh seed, the grid and
quadrature rows of 3.

Usage: python benchmarks/bench_numerical.py [--repeats 7 --samples 100000] [--docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.distributions import Independent, Normal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import opinionpool  # noqa: E402
from applications.multimodal_vae.files import splice_file  # noqa: E402

from measure import check_docs_page, positive_int, provenance, verdict  # noqa: E402

__all__ = ["main", "diagonal_experts", "median_seconds", "judged_verdict", "IMPORTANCE_TARGET_SECONDS", "TARGET_SAMPLES",
           "TARGET_THREADS"]

#: the issue's target for the 64-dimensional importance-sampled estimate on 2 CPU cores
IMPORTANCE_TARGET_SECONDS = 1.0
#: the settings the target is stated for
TARGET_SAMPLES = 100_000
TARGET_THREADS = 2


def judged_verdict(seconds: float, target: str, judged: bool) -> str:
    """The target's verdict, or "n/a" with the settings it is stated for where the run had others."""
    if judged:
        return verdict(seconds, target)
    return f"n/a (the target is for N={TARGET_SAMPLES:.0e}, {TARGET_THREADS} threads)"


def diagonal_experts(dim: int, count: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(count, dim, generator=g)
    scale = 0.5 + torch.rand(count, dim, generator=g)
    return Independent(Normal(loc, scale), 1)


def median_seconds(fn, repeats: int) -> float:
    fn(0)  # warm-up
    times = []
    for seed in range(1, repeats + 1):
        start = time.perf_counter()
        fn(seed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (the targets are for 2 cores)")
    parser.add_argument("--samples", type=positive_int, default=100_000)
    parser.add_argument("--docs", type=Path, metavar="PAGE",
                        help="also splice the tables into PAGE between its <!-- table: bench_numerical --> markers")
    args = parser.parse_args()
    check_docs_page(parser, args.docs, "bench_numerical")
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    measured = provenance()  # the commit whose code runs
    rows = []
    experts = diagonal_experts(64, 5)
    for alpha in (2.0, 0.4, -1.0, float("inf")):
        pool = opinionpool.holder(experts, alpha=alpha)
        result = pool.estimate(method="importance", num_samples=args.samples, seed=0)
        seconds = median_seconds(lambda s, p=pool: p.estimate(method="importance", num_samples=args.samples, seed=s),
                                 args.repeats)
        rows.append((f"importance, D=64, M=5, N={args.samples:.0e}", alpha, seconds,
                     f"ESS {float(result.effective_sample_size):.3g}, SE(log Z) {float(result.log_normalizer.error):.2g}"))
    for dim in (2, 3):
        pool = opinionpool.holder(diagonal_experts(dim, 5), alpha=2.0)
        result = pool.estimate(method="grid")
        rows.append((f"grid, D={dim}, M=5", 2.0, median_seconds(lambda s, p=pool: p.estimate(method="grid"), 3),
                     f"error(log Z) {float(result.log_normalizer.error):.2g}"))
    g = torch.Generator().manual_seed(0)  # the row's experts, as every other row's, from a fixed seed
    pool = opinionpool.holder(Normal(torch.randn(5, generator=g), 0.5 + torch.rand(5, generator=g)), alpha=2.0)
    result = pool.estimate(method="quadrature")
    rows.append(("quadrature, 1-D, M=5", 2.0, median_seconds(lambda s: pool.estimate(method="quadrature"), 3),
                 f"error(log Z) {float(result.log_normalizer.error):.2g}"))
    # the target is for 1e5 samples on 2 threads: a run of other settings states none
    judged = args.samples == TARGET_SAMPLES and torch.get_num_threads() == TARGET_THREADS
    target = f"<= {IMPORTANCE_TARGET_SECONDS:g}"
    table = "\n".join([f"{measured}; {torch.get_num_threads()} threads, float64, median of {args.repeats} runs "
                       "(grid and quadrature: of 3)", "",
                       "| case | alpha | median (s) | accuracy | target (s) |", "|---|---|---|---|---|",
                       *(f"| {case} | {alpha:g} | {seconds:.3f} | {note} | "
                         f"{judged_verdict(seconds, target, judged) if case.startswith('importance') else ''} |"
                         for case, alpha, seconds, note in rows)])
    print(table)
    if args.docs:
        splice_file(args.docs, "bench_numerical", table)


if __name__ == "__main__":
    main()
