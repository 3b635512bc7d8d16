"""Showcase: pool three 2-D Gaussian experts (the HELVAE paper's Figure 1 setting) and print the results.

Run with ``python -m opinionpool.demo``.
"""

from __future__ import annotations

import torch
from torch.distributions import Independent, Normal

import opinionpool

__all__ = ["main"]


def main() -> None:
    torch.set_default_dtype(torch.float64)
    means = torch.tensor([[0.0, 0.0], [1.0, 0.2], [4.0, 0.0]])
    variances = torch.tensor([0.5, 0.6, 0.2]).unsqueeze(-1).expand(3, 2)
    experts = Independent(Normal(means, variances.sqrt()), 1)  # rightmost batch dim indexes the experts
    print("Three experts N(mu_j, sigma_j^2 I): mu =", means.tolist(), "sigma^2 =", [0.5, 0.6, 0.2])
    print(f"\n{'pool':<28}{'log Z':>10}  {'mean':>22}  {'variance':>22}  how")
    for name, alpha in [("min (alpha=-inf)", -float("inf")), ("Hölder alpha=-1", -1.0), ("log-linear (alpha=0)", 0),
                        ("Hölder alpha=1/3", 1 / 3), ("Hölder alpha=1/2", 0.5), ("mixture (alpha=1)", 1),
                        ("Hölder alpha=2", 2.0), ("max (alpha=+inf)", float("inf"))]:
        pool = opinionpool.holder(experts, alpha=alpha)
        mean = ", ".join(f"{v:7.4f}" for v in pool.mean.tolist())
        var = ", ".join(f"{v:7.4f}" for v in pool.variance.tolist())
        how = "exact" if isinstance(pool, opinionpool.HolderPool) else (
            f"{pool.summary.method}, error {pool.summary.log_normalizer.error.item():.0e}")
        print(f"{name:<28}{pool.log_normalizer.item():>10.4f}  [{mean}]  [{var}]  {how}")
    matched = opinionpool.holder(experts, alpha=0.5).moment_match()
    print("\nHellinger aggregation = holder(experts, alpha=0.5).moment_match():")
    print("  ", matched)
    print("   loc      =", [round(v, 6) for v in matched.mean.tolist()])
    print("   variance =", [round(v, 6) for v in matched.variance.tolist()])
    product = opinionpool.poe(experts)
    print("\nProduct of experts (precisions add up): loc =", [round(v, 6) for v in product.mean.tolist()],
          " variance =", [round(v, 6) for v in product.variance.tolist()])
    s = opinionpool.bhattacharyya_coefficient(_expert(experts, 0), _expert(experts, 2))
    print(f"Bhattacharyya coefficient between experts 1 and 3: {s.item():.3e}")


def _expert(experts: Independent, j: int) -> Independent:
    base = experts.base_dist
    return Independent(Normal(base.loc[j], base.scale[j]), 1)


if __name__ == "__main__":
    main()
