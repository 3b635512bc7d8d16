"""A worked forecasting example on scikit-learn's bundled diabetes data (442 patients, disease progression a year
after baseline; Efron et al. 2004, "Least angle regression"): three Gaussian predictive forecasters from least-squares
regressions on different measurements, pooled at alpha 0, 1/2, 1 and a learned alpha, with weights fitted on a
calibration split and every pool scored on a held-out test split (mean log score, CRPS, coverage of central intervals).

    python -m validation.forecast_example [--docs] [--out validation/figures]

``--docs`` writes the table into docs/forecasting.md (between its markers).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from torch.distributions import Normal

import opinionpool as op

from .report import prepare_folder, save_figure_atomic, write_text_atomic

__all__ = ["forecasters", "main", "run"]

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: the forecasters: the diabetes features each regression uses (sklearn's column names)
FEATURES = {"bmi": ["bmi"], "blood (bp, s5)": ["bp", "s5"], "all ten": None}
BEGIN, END = "<!-- forecast-example:begin -->", "<!-- forecast-example:end -->"


def forecasters(seed: int = 0):
    """Gaussian predictive locations and scales ``(n, 3)`` for every patient and the outcomes, with the split:
    regressions fitted on 200 patients (their residual standard deviation is the predictive scale), pooling weights
    on 100, the remaining 142 scored. The patients are shuffled with ``seed``."""
    data = load_diabetes()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x, y = data.data[order].astype(np.float64), data.target[order].astype(np.float64)
    names = list(data.feature_names)
    fit = slice(0, 200)
    locs, scales = [], []
    for columns in FEATURES.values():
        design = np.column_stack([np.ones(len(y)), x if columns is None else x[:, [names.index(c) for c in columns]]])
        coef, *_ = np.linalg.lstsq(design[fit], y[fit], rcond=None)
        residual = y[fit] - design[fit] @ coef
        locs.append(design @ coef)
        scales.append(np.full(len(y), np.sqrt(residual @ residual / (200 - design.shape[1]))))
    return np.column_stack(locs), np.column_stack(scales), y, (slice(200, 300), slice(300, None))


def run(seed: int = 0):
    """The table rows ``(name, weights, alpha, log score, its s.e., CRPS, its s.e., 50% / 90% coverage, and the
    differences of log score and CRPS from the regression on all ten with their paired s.e.)`` and the PIT values of
    each forecast on the test split."""
    locs, scales, y, (calibrate, test) = forecasters(seed)

    def experts(part):
        return Normal(torch.tensor(locs[part]), torch.tensor(scales[part]))

    y_cal, y_test = torch.tensor(y[calibrate]), torch.tensor(y[test])
    rows, pits, per_patient = [], {}, []
    n = len(y_test)

    def score(name, pool, weights, alpha):
        log_scores, crps = pool.log_prob(y_test).detach(), op.crps(pool, y_test).detach()
        table = op.coverage(pool, y_test, levels=(0.5, 0.9))
        rows.append((name, weights, alpha, float(log_scores.mean()), float(log_scores.std() / n ** 0.5),
                     float(crps.mean()), float(crps.std() / n ** 0.5), *table.empirical))
        per_patient.append((log_scores, crps))
        pits[name] = op.pit(pool, y_test).numpy()

    for j, name in enumerate(FEATURES):
        one_hot = [float(i == j) for i in range(len(FEATURES))]
        score(f"regression on {name}", op.holder(experts(test), 1.0, one_hot), one_hot, None)
    for alpha in (0.0, 0.5, 1.0):
        fitted = op.fit_weights(experts(calibrate), y_cal, alpha=alpha)
        score(f"pool, alpha = {alpha:g}", op.holder(experts(test), alpha, fitted.weights), fitted.weights.tolist(), alpha)
    fitted = op.fit_weights(experts(calibrate), y_cal, alpha=0.5, learn_alpha=True, max_iter=20)
    score("pool, learned alpha", op.holder(experts(test), fitted.alpha, fitted.weights), fitted.weights.tolist(),
          fitted.alpha)
    # differences from the regression on all ten, patient by patient: the forecasts score the same patients, so the
    # standard error of a difference is that of the paired differences (as in a Diebold-Mariano comparison)
    reference = per_patient[list(FEATURES).index("all ten")]
    paired = []
    for row, (log_scores, crps) in zip(rows, per_patient):
        differences = [(values - base) for values, base in zip((log_scores, crps), reference)]
        paired.append(row + tuple(x for d in differences for x in (float(d.mean()), float(d.std() / n ** 0.5))))
    return paired, pits


def _markdown(rows) -> str:
    lines = ["| forecast | weights | alpha | log score (s.e.) | CRPS (s.e.) | 50% cover | 90% cover "
             "| log score - all ten (paired s.e.) | CRPS - all ten (paired s.e.) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, weights, alpha, ls, ls_se, crps, crps_se, c50, c90, dls, dls_se, dcrps, dcrps_se in rows:
        shown = ", ".join(f"{w:.2f}" for w in weights)
        lines.append(f"| {name} | {shown} | {'—' if alpha is None else f'{alpha:.3f}'} | {ls:.3f} ({ls_se:.3f}) | "
                     f"{crps:.2f} ({crps_se:.2f}) | {c50:.2f} | {c90:.2f} | {dls:+.4f} ({dls_se:.4f}) | "
                     f"{dcrps:+.3f} ({dcrps_se:.3f}) |")
    return "\n".join(lines)


def _plot(rows, pits, out: pathlib.Path) -> pathlib.Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [row[0] for row in rows]
    left.barh(names, [row[5] for row in rows], xerr=[row[6] for row in rows], color="tab:blue")
    left.set_xlabel("mean CRPS on the test split (lower is better)")
    for name in names[3:]:
        right.hist(pits[name], bins=10, range=(0, 1), histtype="step", density=True, label=name)
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xlabel("PIT of the test outcomes")
    right.legend(fontsize=8)
    fig.tight_layout()
    path = out / "forecast_example.png"
    save_figure_atomic(fig, path)
    plt.close(fig)
    return path


def _splice(text: str, table: str) -> str:
    """``text`` with the table between its markers replaced by ``table``; raises unless each marker is there once,
    in order."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(END) < text.index(BEGIN):
        raise ValueError(f"the page must hold {BEGIN!r} and then {END!r}, each exactly once")
    head, rest = text.split(BEGIN)
    return f"{head}{BEGIN}\n{table}\n{END}{rest.split(END)[1]}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", action="store_true", help="write the table into docs/forecasting.md")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "validation" / "figures")
    args = parser.parse_args(argv)
    page = ROOT / "docs" / "forecasting.md"
    # the page and the output folder are checked before the work, not after it, each error naming its own
    if args.docs:
        try:
            _splice(page.read_text(encoding="utf-8"), "-")
        except (OSError, ValueError) as error:
            parser.error(f"{page}: {error}")
    try:
        prepare_folder(args.out)
    except OSError as error:
        parser.error(f"--out {str(args.out)!r}: {error}")
    torch.set_default_dtype(torch.float64)
    start = time.perf_counter()
    rows, pits = run()
    table = _markdown(rows)
    print(table)
    print(f"plot: {_plot(rows, pits, args.out)}  ({time.perf_counter() - start:.0f} s)")
    if args.docs:
        write_text_atomic(page, _splice(page.read_text(encoding="utf-8"), table))


if __name__ == "__main__":
    main()
