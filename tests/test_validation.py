"""The validation command itself: it writes its report, figures and CSV, and its exit status reports failures."""

import csv
import dataclasses
import math
import re

import numpy as np
import pytest

import opinionpool
from opinionpool.numerical import Estimate
from validation import closed_forms, paper
from validation.__main__ import main
from validation.reference import log_power_mean
from validation.report import compare, write_text_atomic


def test_quick_validation_writes_report_figures_and_csv(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert re.search(r"\b0 failed", report) and "The paper's claims, checked" in report
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
    """The diagonal Laplace checks (quadrature and Monte Carlo) pass at the quick run's 20 000 draws, and fail
    when the library reads the experts as Gaussians of the same moments (the diagnostics' reading before the
    Laplace closed form)."""
    checks = closed_forms.laplace_affinity_checks(20_000, np.random.default_rng(0))
    assert len(checks) == 4 and all(c.passed for c in checks)
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
        nll, bc, _, _ = paper.metrics(pools[name])
        with monkeypatch.context() as patch:
            patch.setattr(paper, "_GRID", np.linspace(paper._GRID[0], paper._GRID[-1], 1001))
            fine = paper.metrics(pools[name])
        assert abs(nll - fine[0]) < 1e-10 and abs(bc - fine[1]) < 1e-10  # (the trace does not use the grid)
        assert 0 < bc < 1 and nll > 0


def test_claims_detect_a_violation():
    rows = paper.expert_sweep(3, [0, 1])
    assert dict((c, ok) for c, ok, _ in paper.claims(rows))["PoE has the highest NLL once a bad expert is present"]
    doctored = [r if r[2] != "PoE" or r[1] == 0 else r[:3] + (0.0,) + r[4:] for r in rows]
    verdicts = dict((c, ok) for c, ok, _ in paper.claims(doctored))
    assert not verdicts["PoE has the highest NLL once a bad expert is present"]


def test_claims_on_poe_bc_and_wb_nll_can_fail():
    """The paper's Figure 7 text: PoE's Bhattacharyya coefficient the lowest with bad experts, WB's NLL rising
    with every bad expert added."""
    rows = paper.expert_sweep(3, [0, 1, 2])
    verdicts = dict((c, ok) for c, ok, _ in paper.claims(rows))
    poe, wb = "PoE has the lowest BC once a bad expert is present", "WB's NLL rises with every bad expert added"
    assert verdicts[poe] and verdicts[wb]
    doctored = [r[:4] + (1.0,) + r[5:] if r[2] == "PoE" and r[1] == 2 else r for r in rows]
    assert not dict((c, ok) for c, ok, _ in paper.claims(doctored))[poe]
    doctored = [r[:3] + (0.0,) + r[4:] if r[2] == "WB" and r[1] == 2 and r[0] == 3 else r for r in rows]
    assert dict((c, ok) for c, ok, _ in paper.claims(doctored))[wb] is False


def test_report_helpers_reject_bad_input_and_write_atomically(tmp_path):
    with pytest.raises(ValueError, match="kind must be"):
        compare("g", "n", 1.0, 1.0, "percent", 0.1)
    assert not compare("g", "n", 1.0, 2.0, "z-score", 4.5, standard_error=0.0).passed
    target = tmp_path / "sub" / "out.txt"
    write_text_atomic(target, "hello")
    assert target.read_text() == "hello" and list(target.parent.iterdir()) == [target]


def test_the_affinity_checks_catch_a_few_percent_and_a_swapped_convention(monkeypatch):
    """Against Monte Carlo alone, a Bhattacharyya coefficient 3 % off passed for four families and the Chernoff
    order a <-> 1 - a passed at most seeds; against quadrature (or exact sums) both fail for every family."""
    import opinionpool

    def failed(checks, name):
        return {c.group for c in checks if c.name == f"{name} vs quadrature" and not c.passed}

    checks = closed_forms.affinity_checks(20_000)
    assert all(c.passed for c in checks) and len(failed(checks, "KL(p || q)")) == 0
    families = {f"affinities, {case.name}" for case in closed_forms.cases()}
    assert {c.group for c in checks if c.name.endswith("vs quadrature")} >= families
    bc, chernoff = opinionpool.bhattacharyya_coefficient, opinionpool.log_chernoff_coefficient
    monkeypatch.setattr(opinionpool, "bhattacharyya_coefficient", lambda p, q: 1.03 * bc(p, q))
    monkeypatch.setattr(opinionpool, "log_chernoff_coefficient", lambda p, q, a: chernoff(p, q, 1 - a))
    checks = closed_forms.affinity_checks(20_000)
    assert failed(checks, "Bhattacharyya coefficient") == families
    assert failed(checks, "log Chernoff(0.7)") == families
    assert not failed(checks, "KL(p || q)")


def test_a_wrong_log_density_a_lost_statistic_or_a_cut_shape_fails(monkeypatch):
    """Nothing compared the pools' log_prob (an offset of 0.05 passed every check), a statistic the library did
    not report was skipped, and a result with fewer values than the reference was compared on the overlap."""
    def run(family="Independent(Normal) 2-D", alpha=0.5):
        checks, _ = closed_forms.run(2_000, families=(family,), alphas=(alpha,))
        return [c for c in checks if not c.passed]

    assert run() == [] and run("Dirichlet K=3", 2.0) == [] and run("Gamma") == []
    library = closed_forms._library

    def doctored(change):
        def patched(case, alpha, points):
            values, errors, kind, note = library(case, alpha, points)
            return change(values), errors, kind, note
        return patched

    with monkeypatch.context() as patch:
        patch.setattr(closed_forms, "_library", doctored(lambda v: {**v, "log density": v["log density"] + 0.05}))
        assert {c.name for c in run()} == {f"log density[{i}] vs quadrature" for i in range(5)}
        assert {c.name for c in run("Dirichlet K=3", 2.0)} == {f"log density[{i}] vs quadrature" for i in range(5)}
    with monkeypatch.context() as patch:
        patch.setattr(closed_forms, "_library", doctored(lambda v: {k: x for k, x in v.items() if k != "variance"}))
        assert [c.name for c in run("Gamma")] == ["variance: not reported by the library"]
    with monkeypatch.context() as patch:
        patch.setattr(closed_forms, "_library", doctored(lambda v: {**v, "mean": v["mean"][:1]}))
        assert [c.name for c in run()] == ["mean: 1 values for quadrature's 2", "mean: 1 values for Monte Carlo's 2"]


def test_the_pools_own_covariance_is_checked(monkeypatch):
    """Only the matched Gaussian's covariance was compared (its name, less "matched ", stood for the pool's): the
    exact pools' covariance_matrix, another code path, off by 1e-3 passed every check."""
    def failures(family, alpha):
        checks, _ = closed_forms.run(2_000, families=(family,), alphas=(alpha,))
        return {c.name for c in checks if not c.passed}

    assert failures("MultivariateNormal 2-D", 0.5) == set()
    original = opinionpool.HolderPool.covariance_matrix
    with monkeypatch.context() as patch:
        patch.setattr(opinionpool.HolderPool, "covariance_matrix", property(lambda self: original.fget(self) * 1.001))
        assert failures("MultivariateNormal 2-D", 0.5) == {"covariance vs quadrature"}
    numerical = opinionpool.pool.NumericalHolderPool.covariance_matrix
    with monkeypatch.context() as patch:
        patch.setattr(opinionpool.pool.NumericalHolderPool, "covariance_matrix",
                      property(lambda self: numerical.fget(self) * 1.01))
        assert failures("Independent(Normal) 2-D", 2.0) == {"covariance vs quadrature",
                                                            "covariance within its stated quadrature error estimate"}


def test_the_reference_power_mean_leaves_out_experts_of_weight_zero():
    """An expert of weight 0 and density 0 gave NaN at alpha <= 0 (0 * -inf, inf - inf) instead of the pool of
    the others."""
    log_q = np.array([[-np.inf, -3.0], [0.5, -1.0]])
    for alpha in (-1.0, 0.0, 0.5, 2.0, math.inf, -math.inf):
        np.testing.assert_allclose(log_power_mean(log_q, [0.0, 1.0], alpha), [0.5, -1.0], rtol=1e-15)
    # two experts of weights 1/4 and 3/4 at alpha = -1: the weighted harmonic mean
    expected = -np.log(0.25 / np.exp(-3.0) + 0.75 / np.exp(-1.0))
    np.testing.assert_allclose(log_power_mean(np.array([[-3.0], [-1.0], [-np.inf]]), [1.0, 3.0, 0.0], -1.0),
                               [expected], rtol=1e-14)


def test_an_unwritable_out_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """An existing folder that cannot be written to passed ``mkdir``; the run failed at its first figure, after
    minutes of checks."""
    from validation import forecast_example, report

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(report.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(closed_forms, "run", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(forecast_example, "run", lambda *a, **k: pytest.fail("work started"))
    for command in (main, forecast_example.main):
        with pytest.raises(SystemExit):
            command(["--out", str(tmp_path)])
        assert f"--out '{tmp_path}'" in capsys.readouterr().err


def test_the_report_escapes_bars_in_its_table():
    from validation.report import Report

    report = Report("r", checks=[compare("affinities, Normal", "KL(p || q) vs quadrature", 1.0, 1.0, "absolute", 1e-8)])
    row = report.markdown().splitlines()[-1]
    assert row.startswith("| affinities, Normal | KL(p \\|\\| q) vs quadrature |")
    assert len(re.split(r"(?<!\\)\|", row)) == len(re.split(r"(?<!\\)\|", report.markdown().splitlines()[-3]))


def test_a_metric_that_is_not_finite_fails_the_claims():
    """A NaN NLL of PoE passed "PoE has the highest NLL" (NaN < x is False, so no exception was recorded)."""
    rows = paper.expert_sweep(3, [0, 1])
    doctored = [r[:3] + (math.nan,) + r[4:] if r[2] == "PoE" and r[1] == 1 else r for r in rows]
    verdicts = dict((c, ok) for c, ok, _ in paper.claims(doctored))
    assert verdicts["every metric is finite"] is False and dict(
        (c, ok) for c, ok, _ in paper.claims(rows))["every metric is finite"] is True
    assert not verdicts["PoE has the highest NLL once a bad expert is present"]
    assert not verdicts["WB is more stable than PoE (lower NLL with bad experts)"]


def test_a_mixture_density_that_does_not_integrate_to_one_stops_the_sweep(monkeypatch):
    import opinionpool

    pool = paper.pools(paper.diagonal_experts([paper.GOOD_MEAN, paper.BAD_MEAN], [paper.GOOD_VAR, paper.BAD_VAR]))["MoE"]
    assert paper.metrics(pool)[3].startswith("dense-grid")
    log_prob = opinionpool.HolderPool.log_prob
    monkeypatch.setattr(opinionpool.HolderPool, "log_prob", lambda self, value: log_prob(self, value) + 0.05)
    with pytest.raises(ValueError, match="integrates to 1.05.* not 1"):
        paper.metrics(pool)


@pytest.mark.parametrize("family", ["Normal", "Poisson", "Independent(Normal) 2-D"])
def test_the_engines_stated_errors_are_checked_and_can_fail(family, monkeypatch):
    """Each value of the numerical engine (quadrature, exact sums, grid) is checked to lie within its own stated
    error of the reference, beside the fixed tolerance (an engine that understated its errors a millionfold still
    passed). Shrunk a billionfold, the stated errors fail."""
    checks, _ = closed_forms.run(2000, families=(family,), alphas=(2.0,))
    stated = [c for c in checks if "within its stated" in c.name]
    assert stated and all(c.passed for c in stated)
    library = closed_forms._library

    def understated(*args):
        out, errors, kind, note = library(*args)
        return out, {name: np.asarray(value) * 1e-9 for name, value in errors.items()}, kind, note

    monkeypatch.setattr(closed_forms, "_library", understated)
    monkeypatch.setattr(closed_forms, "_reference_allowance", lambda case, reference: 0.0)
    checks, _ = closed_forms.run(2000, families=(family,), alphas=(2.0,))
    assert any(not c.passed for c in checks if "within its stated" in c.name)


def test_bad_options_are_refused_before_any_work(tmp_path, capsys):
    """One Monte Carlo sample crashed the run inside numpy, an ``--out`` that is a file failed after the closed-form
    stage: both are refused by name first."""
    with pytest.raises(SystemExit):
        main(["--quick", "--samples", "1", "--out", str(tmp_path)])
    assert "--samples must be at least" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(afile)])
    assert f"--out '{afile}'" in capsys.readouterr().err


def test_written_files_are_readable_as_plain_writes_are(tmp_path):
    """``mkstemp`` makes owner-only files, which the rename kept: reports nobody else could read."""
    import os

    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.md", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644


def test_the_forecast_example_checks_its_page_first(tmp_path, monkeypatch, capsys):
    import validation.forecast_example as example
    from validation.forecast_example import BEGIN, END, _splice

    assert _splice(f"a\n{BEGIN}\nold\n{END}\nb", "new") == f"a\n{BEGIN}\nnew\n{END}\nb"
    for broken in ("no markers", f"{END}\n{BEGIN}", f"{BEGIN}{BEGIN}{END}"):
        with pytest.raises(ValueError, match="exactly once"):
            _splice(broken, "new")
    # a page that cannot be read is named, not the output folder (any OSError blamed --out)
    monkeypatch.setattr(example, "ROOT", tmp_path)
    with pytest.raises(SystemExit):
        example.main(["--docs", "--out", str(tmp_path / "figures")])
    error = capsys.readouterr().err
    assert f"{tmp_path / 'docs' / 'forecasting.md'}: " in error and "--out" not in error.split("error:")[-1]
    assert not (tmp_path / "figures").exists()


def test_experts_far_apart_of_very_different_scales_are_resolved():
    """Experts at 0, 25 and -1 of scales 1e-3, 8 and 1: the reference quadrature, over +-60 with breakpoints at the
    means alone, had log Z 1.4e-6 off at alpha = 1/2 and 0.7 at alpha = -1, and the log density far from every
    expert underflowed to -inf. Now the library and the reference agree (both independent) at both orders."""
    checks, _ = closed_forms.run(2000, families=("Normal, far apart",), alphas=(0.5, -1.0))
    assert checks and all(c.passed for c in checks if "Monte Carlo" not in c.name)


def test_the_engines_importance_errors_are_checked_against_their_spread(monkeypatch):
    """The importance engine's stated standard errors were only divided by (a z-score with an error stated a
    hundredfold too large passes): they are checked against the spread of its estimates over seeds, and fail when
    overstated or understated eightfold."""
    case = next(c for c in closed_forms.cases() if c.name == "Dirichlet K=3")
    checks = closed_forms.stated_error_checks(case, 2.0, "Dirichlet", repeats=12)
    assert len(checks) == 10 and all(c.kind == "log ratio" for c in checks)  # log Z, mean, variance, E[T] (3 each)
    assert all(c.passed for c in checks), [(c.name, c.error) for c in checks]
    pool_type = type(opinionpool.holder(case.experts(), alpha=2.0))
    estimate = pool_type.estimate
    for factor in (8.0, 0.125):
        def scaled(self, *args, factor=factor, **kwargs):
            est = estimate(self, *args, **kwargs)
            fields = ("log_normalizer", "mean", "variance", "expected_statistic")
            return dataclasses.replace(est, **{f: Estimate(getattr(est, f).value, factor * getattr(est, f).error)
                                               for f in fields if getattr(est, f) is not None})

        monkeypatch.setattr(pool_type, "estimate", scaled)
        assert not any(c.passed for c in closed_forms.stated_error_checks(case, 2.0, "Dirichlet", repeats=12))


def test_a_log_ratio_check_passes_within_its_tolerance_only():
    assert compare("g", "n", 1.1, 1.0, "log ratio", 4.5, standard_error=0.2).passed
    assert not compare("g", "n", 4.0, 1.0, "log ratio", 4.5, standard_error=0.2).passed
    assert not compare("g", "n", 0.0, 1.0, "log ratio", 4.5, standard_error=0.2).passed


def test_stated_errors_overstated_in_every_case_fail_the_pooled_check():
    """An error stated 1.2 times too large in every case: each case's check passes (z about -3.6 at 200 seeds), their
    mean over cases does not. A case's quantities count once (they share their draws); one case alone is not pooled."""
    z = math.log(1 / 1.2) * math.sqrt(2 * (closed_forms.STATED_ERROR_REPEATS - 1))
    checks = [compare(f"case {k}", f"{q}: spread over 200 seeds vs its stated standard error", 1.0, 1.2, "log ratio",
                      4.5, standard_error=1 / math.sqrt(2 * 199)) for k in range(4) for q in ("log Z", "mean")]
    assert all(c.passed for c in checks) and checks[0].error == pytest.approx(z)
    (pooled,) = closed_forms.pooled_stated_error_check(checks)
    assert not pooled.passed and pooled.error == pytest.approx(2 * z) and pooled.got == pytest.approx(1 / 1.2)
    assert closed_forms.pooled_stated_error_check(checks[:2]) == []
    honest = [compare(c.group, c.name, 1.0, 1.0, "log ratio", 4.5, standard_error=0.05) for c in checks]
    assert all(c.passed for c in closed_forms.pooled_stated_error_check(honest))
