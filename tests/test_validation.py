"""The validation command itself: it writes its report, figures and CSV, and its exit status reports failures."""

import csv

import numpy as np
import pytest

from validation import closed_forms, paper
from validation.__main__ import main
from validation.report import compare, write_text_atomic


def test_quick_validation_writes_report_figures_and_csv(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "0 failed" in report and "The paper's claims, checked" in report
    for name in ("zscores.png", "quadrature_errors.png", "figure1.png", "figures2_7.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 10_000
    rows = list(csv.DictReader((tmp_path / "figures" / "expert_sweep.csv").read_text().splitlines()))
    assert len(rows) == 4 * 3 * len(paper.AGGREGATORS)
    assert {r["aggregator"] for r in rows} == set(paper.AGGREGATORS)


def test_a_failing_check_sets_the_exit_status(tmp_path, monkeypatch):
    monkeypatch.setattr(closed_forms, "QUAD_TOLERANCE", 1e-300)  # far below any float64 rounding error
    run = closed_forms.run  # one family (exact sums) is enough to fail, and quicker than the three of --quick
    monkeypatch.setattr(closed_forms, "run", lambda samples, families, progress: run(samples, families=("Poisson",),
                                                                                    progress=progress))
    assert main(["--quick", "--out", str(tmp_path)]) == 1
    assert "**NO**" in (tmp_path / "report.md").read_text()


def test_the_laplace_affinity_checks_pass_and_can_fail(monkeypatch):
    """The diagonal Laplace checks pass at the quick run's 20 000 draws, and fail when the library reads the
    experts as Gaussians of the same moments (the diagnostics' reading before the Laplace closed form)."""
    checks = closed_forms.laplace_affinity_checks(20_000, np.random.default_rng(0))
    assert len(checks) == 2 and all(c.passed for c in checks)
    import opinionpool.functional as opf

    for name in ("log_bhattacharyya", "hellinger_pairwise_mass"):
        original = getattr(opf, name)
        monkeypatch.setattr(opf, name, lambda *args, original=original, family="normal", **kwargs:
                            original(*args, family="normal", **kwargs))
    checks = closed_forms.laplace_affinity_checks(20_000, np.random.default_rng(0))
    assert not any(c.passed for c in checks)


def test_the_quadrature_grid_of_the_mixtures_has_converged(monkeypatch):
    """The NLL and Bhattacharyya coefficient of the two mixtures on the sweep's grid equal those on a grid of 2.5x
    finer spacing, with two bad experts (the narrowest components) present."""
    means = [paper.GOOD_MEAN] * 2 + [paper.BAD_MEAN] * 2
    variances = [paper.GOOD_VAR] * 2 + [paper.BAD_VAR] * 2
    pools = paper.pools(paper.diagonal_experts(means, variances))
    for name in ("MoE", "Hölder α=1/2"):
        nll, bc, trace, _ = paper.metrics(pools[name])
        with monkeypatch.context() as patch:
            patch.setattr(paper, "_GRID", np.linspace(paper._GRID[0], paper._GRID[-1], 1001))
            fine = paper.metrics(pools[name])
        assert abs(nll - fine[0]) < 1e-10 and abs(bc - fine[1]) < 1e-10 and trace == fine[2]
        assert 0 < bc < 1 and nll > 0


def test_claims_detect_a_violation():
    rows = paper.expert_sweep(3, [0, 1])
    assert dict((c, ok) for c, ok, _ in paper.claims(rows))["PoE has the highest NLL once a bad expert is present"]
    doctored = [r if r[2] != "PoE" or r[1] == 0 else r[:3] + (0.0,) + r[4:] for r in rows]
    verdicts = dict((c, ok) for c, ok, _ in paper.claims(doctored))
    assert not verdicts["PoE has the highest NLL once a bad expert is present"]


def test_report_helpers_reject_bad_input_and_write_atomically(tmp_path):
    with pytest.raises(ValueError, match="kind must be"):
        compare("g", "n", 1.0, 1.0, "percent", 0.1)
    assert not compare("g", "n", 1.0, 2.0, "z-score", 4.5, standard_error=0.0).passed
    target = tmp_path / "sub" / "out.txt"
    write_text_atomic(target, "hello")
    assert target.read_text() == "hello" and list(target.parent.iterdir()) == [target]
