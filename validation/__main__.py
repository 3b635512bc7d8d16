"""Run every validation script: ``python -m validation`` (or ``make validate``).

Writes ``validation/report.md`` (every check with its error, tolerance and time, the paper's claims),
PNG figures and the Figures 2/7 numbers as CSV under ``validation/figures/``. Exits with status 1 if any
closed-form check fails. The paper's qualitative claims are reported pass/fail but do not set the exit
status: they are claims about the aggregators, not about the correctness of this library.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm import tqdm

from . import closed_forms, paper
from .report import Z_TOLERANCE, Report, prepare_folder, save_figure_atomic, write_text_atomic

__all__ = ["main", "zscore_figure", "error_figure"]

HERE = Path(__file__).resolve().parent
#: the fewest Monte Carlo samples per check whose standard errors mean something
MIN_SAMPLES = 1000


def zscore_figure(zscores):
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(name for name, *_ in zscores))
    fig, ax = plt.subplots(figsize=(11, 4))
    for k, alpha in enumerate(closed_forms.ALPHAS):
        xs = [families.index(f) + 0.1 * (k - 3) for f, a, _, _ in zscores if a == alpha]
        ys = [z for _, a, _, z in zscores if a == alpha]
        ax.scatter(xs, ys, s=10, color=f"C{k}", label=f"alpha = {alpha:.3g}")
    ax.axhspan(-Z_TOLERANCE, Z_TOLERANCE, color="0.9", zorder=0, label=f"|z| <= {Z_TOLERANCE}")
    ax.set_xticks(range(len(families)), families, rotation=30, ha="right")
    ax.set_ylabel("(library - Monte Carlo) / standard error")
    ax.set_title("Pooled statistics against Monte Carlo: z-scores (the affinity and Laplace checks are in the report)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return fig


def error_figure(checks):
    import matplotlib.pyplot as plt

    # each error over its own tolerance (scaled for far log-densities, a stated bound for the engine's): one line
    # for all; the engine's "within its stated" checks are drawn beside its checks against quadrature
    quad = [c for c in checks if c.kind in ("relative", "absolute") and np.isfinite(c.error)]  # (a missing value:
    # listed as failed)
    fig, ax = plt.subplots(figsize=(8, 4))
    for stated, colour, label in ((False, "C0", "library vs quadrature / exact sums"),
                                  (True, "C1", "the same within the engine's stated error")):
        errors = [max(abs(c.error), 1e-17) / c.tolerance for c in quad if ("within its stated" in c.name) == stated]
        if errors:
            ax.hist(np.log10(errors), bins=40, color=colour, alpha=0.7, label=label)
    ax.axvline(0.0, color="C3", linestyle="--", label="tolerance (errors of exactly 0 at 1e-17)")
    ax.set_xlabel("log10 (error / its tolerance) (errors relative for variances; absolute for the rest)")
    ax.set_ylabel("number of checks")
    ax.set_title("Closed forms and numerical engine against independent quadrature")
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=None,
                        help="Monte Carlo samples per check (default 200 000, with --quick 20 000)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for report.md and figures/")
    parser.add_argument("--quick", action="store_true",
                        help="pools of three families (affinities of all), 20k samples, 1-4 good and 0-2 bad experts "
                             "in the sweep (smoke test)")
    args = parser.parse_args(argv)
    if args.samples is not None and args.samples < MIN_SAMPLES:
        # (one draw crashed the Monte Carlo, two made its standard errors meaningless)
        parser.error(f"--samples must be at least {MIN_SAMPLES} (a standard error needs them), got {args.samples}")
    try:  # checked before the work, not after it
        for folder in (args.out, args.out / "figures"):
            prepare_folder(folder)
    except OSError as error:
        parser.error(f"--out {str(args.out)!r}: {error}")
    matplotlib.use("Agg")
    torch.set_default_dtype(torch.float64)
    samples = args.samples or (20_000 if args.quick else 200_000)
    families = ("Normal", "Poisson", "Independent(Normal) 2-D") if args.quick else None
    figures = args.out / "figures"
    report = Report("opinionpool validation report")
    start = time.perf_counter()

    checks, zscores = closed_forms.run(samples, families=families,
                                       progress=lambda jobs: tqdm(jobs, desc="closed forms", unit="case"))
    checks += closed_forms.affinity_checks(samples)
    report.checks = checks
    save_figure_atomic(zscore_figure(zscores), figures / "zscores.png")
    save_figure_atomic(error_figure(checks), figures / "quadrature_errors.png")
    report.add("Closed forms against quadrature and Monte Carlo",
               f"Families x alpha in {[round(a, 4) for a in closed_forms.ALPHAS]} (alpha = 2 and -1 through the "
               "numerical engine), weights (0.2, 0.3, 0.5), unequal scales: log Z, mean, variance, moment-matched "
               "statistics and the log density at five points. References: scipy quadrature of scipy.stats "
               "densities (1-D), a dense trapezoid grid (2-D Gaussians), a tensor Gauss-Legendre rule on the simplex "
               f"(Dirichlet), exact sums (discrete); Monte Carlo: {samples} draws from the experts' equal-weight "
               "mixture, reweighted to the pool (log Z, mean and variance; E[T] of the von Mises). Affinities: "
               "Bhattacharyya coefficient, KL and log Chernoff(0.7) between the first two experts against the same "
               "quadrature and Monte Carlo under the first; diagonal Laplace experts' Bhattacharyya coefficient and "
               "Hellinger pairwise mass against quadrature, Monte Carlo and importance sampling.\n\n"
               "![z-scores](figures/zscores.png)\n\n![errors](figures/quadrature_errors.png)")

    sweep_shape = (4, 2) if args.quick else (10, 3)
    rows = []
    for n_bad in tqdm(range(sweep_shape[1] + 1), desc="paper sweep", unit="n_bad"):
        rows += paper.expert_sweep(sweep_shape[0], [n_bad])
    write_text_atomic(figures / "expert_sweep.csv", paper.sweep_csv(rows))
    save_figure_atomic(paper.figure_1(), figures / "figure1.png")
    save_figure_atomic(paper.figure_sweep(rows), figures / "figures2_7.png")
    claim_lines = ["| claim | result | detail |", "|---|---|---|"]
    claim_lines += [f"| {claim} | {'pass' if ok else '**FAIL**'} | {detail} |" for claim, ok, detail in paper.claims(rows)]
    methods = sorted({f"{r[2]}: {r[6]}" for r in rows})
    report.add("The HELVAE paper's synthetic experiments",
               "Figure 1 (three 2-D experts, means (0,0), (1,0.2), (4,0), variances 0.5, 0.6, 0.2):\n\n"
               "![figure 1](figures/figure1.png)\n\n"
               "Figures 2 and 7 (numbers in `figures/expert_sweep.csv`). How each number is computed: "
               + "; ".join(methods) + ". Sharpness is the trace of the exact covariance for every aggregator.\n\n"
               "![figures 2 and 7](figures/figures2_7.png)\n\nThe paper's claims, checked:\n\n" + "\n".join(claim_lines))
    options = (" --quick" if args.quick else "") + (f" --samples {args.samples}" if args.samples else "")
    report.add("Run", f"`python -m validation{options}` in "
                      f"{time.perf_counter() - start:.0f} s, torch {torch.__version__}.")
    write_text_atomic(args.out / "report.md", report.markdown())
    failed = report.failed
    print(f"validation: {len(report.checks)} checks, {len(failed)} failed; report in {args.out / 'report.md'}")
    for c in failed:
        print(f"  FAILED {c.group}: {c.name}: library {c.got:.12g}, reference {c.reference:.12g}, "
              f"{c.kind} error {c.error:.3g} > {c.tolerance:.1e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
