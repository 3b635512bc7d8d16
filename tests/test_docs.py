"""Every Python code block in the README and docs runs, so the docs cannot drift from the code."""

import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(path, i, block) for path in DOCS
          for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))]


def test_docs_have_code_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("path,index,code", BLOCKS, ids=[f"{p.name}-{i}" for p, i, _ in BLOCKS])
def test_code_block_runs(path, index, code, capsys):
    exec(compile(code, f"{path.name}[{index}]", "exec"), {})


@pytest.mark.parametrize("module", ["opinionpool", "opinionpool.symbolic"])
def test_module_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.attempted > 0 and result.failed == 0


# the project's pages, not those tools leave in hidden folders (.pytest_cache/README.md)
PAGES = sorted({*DOCS, *(page for page in ROOT.glob("*/README.md") if not page.parent.name.startswith(".")),
                *ROOT.glob("applications/*/README.md")})
MAX_LINES = 2000


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_is_one_page(path):
    """One H1 and at most 2 000 lines: an edit with an empty search string once filled a page with copies."""
    text = path.read_text()
    outside_code = re.sub(r"```.*?```", "", text, flags=re.S)
    h1 = re.findall(r"^# ", outside_code, flags=re.M)
    assert len(h1) == 1, f"{path} has {len(h1)} H1 headings"
    assert text.count("\n") <= MAX_LINES, f"{path} has {text.count(chr(10))} lines (at most {MAX_LINES})"


def test_docs_do_not_link_outside_the_repository():
    for path in PAGES:
        assert "../shared" not in path.read_text(), path


def test_benchmark_tables_are_spliced_between_their_markers():
    from applications.multimodal_vae.files import splice_table as splice

    page = "# B\n\nprose\n<!-- table: t -->\nold\n<!-- end table: t -->\nmore prose\n"
    assert splice(page, "t", "| new |\n") == "# B\n\nprose\n<!-- table: t -->\n| new |\n<!-- end table: t -->\nmore prose\n"
    for bad_page in ("# B\n", page + page, "<!-- end table: t -->\n<!-- table: t -->\n"):
        with pytest.raises(ValueError, match="'t'"):
            splice(bad_page, "t", "| new |")
    # a marker with something after it on its line is not one, and the error says why
    for ending in ("\r\n", " \n"):
        with pytest.raises(ValueError, match="found 0 '<!-- table: t -->'.*must end its line"):
            splice(page.replace("<!-- table: t -->\n", "<!-- table: t -->" + ending), "t", "| new |")
    # tables must not nest or interleave: splicing the outer one deleted the inner one's markers
    inner = "<!-- table: u -->\nU\n<!-- end table: u -->\n"
    for bad_page in (f"<!-- table: t -->\n{inner}<!-- end table: t -->\n",
                     "<!-- table: t -->\n<!-- table: u -->\nT\n<!-- end table: t -->\nU\n<!-- end table: u -->\n"):
        with pytest.raises(ValueError, match="enclose another table's marker"):
            splice(bad_page, "t", "| new |")
    assert splice(inner + page, "t", "| new |").startswith(inner)
    with pytest.raises(ValueError, match="name"):
        splice(page, "", "| new |")
    with pytest.raises(ValueError, match="empty"):
        splice(page, "t", "\n")
    benchmarks_page = (ROOT / "docs" / "benchmarks.md").read_text()
    for name in ("bench_aggregators", "bench_numerical", "bench_mvae"):
        assert splice(benchmarks_page, name, "| x |").count("| x |") == 1


def test_two_tables_spliced_into_one_page_at_once_are_both_kept(tmp_path, capsys):
    """Each splice read the page and wrote it back with its table: two at once (two sweeps' summaries, two
    benchmarks) each wrote the page as it had read it, and the first one's table was lost. Now a splice waits for
    the page's lock, held here by another writer until it has written its table."""
    import threading

    from applications.multimodal_vae.files import claim, splice_file, splice_table, write_text

    page = tmp_path / "page.md"
    page.write_text("<!-- table: a -->\nA\n<!-- end table: a -->\n<!-- table: b -->\nB\n<!-- end table: b -->\n")
    lock = tmp_path / ".page.md.lock"
    with claim(lock, wait=True):
        before = page.read_text()  # the other writer has read the page
        splicing = threading.Thread(target=splice_file, args=(page, "b", "new B"))
        splicing.start()
        splicing.join(0.5)
        assert splicing.is_alive()  # waiting for the lock, the page not read yet
        write_text(page, splice_table(before, "a", "new A"))
    splicing.join(10)
    assert "new A" in page.read_text() and "new B" in page.read_text() and not lock.exists()


def test_benchmark_tables_say_where_they_come_from_and_whether_targets_are_met():
    """The tables carry their date, commit and machine and judge their own targets, so the prose need not retype."""
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from measure import provenance, verdict

    assert verdict(3.99, "<= 4") == "<= 4: met" and verdict(4.01, "<= 4") == "<= 4: missed"
    assert verdict(0.9, ">= 0.9") == ">= 0.9: met" and verdict(0.89, ">= 0.9") == ">= 0.9: missed"
    # printed with two decimals as the bound itself: the verdict says by how much
    assert verdict(2.003, "<= 2") == "<= 2: missed by 0.003" and verdict(0.8951, ">= 0.9") == ">= 0.9: missed by 0.005"
    with pytest.raises(ValueError, match="'< 4'"):
        verdict(1.0, "< 4")
    # quartiles: statistics' exclusive method (Type 6, numpy's "weibull"), within the values, two values included
    import numpy as np

    from measure import quartiles

    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0, 3.5, 8.0]
    np.testing.assert_allclose(quartiles(values), np.percentile(values, [25, 50, 75], method="weibull"), rtol=1e-15)
    for few in ([2.0, 1.0], [1.0, 3.0, 2.0]):
        q1, q2, q3 = quartiles(few)
        assert min(few) <= q1 <= q2 <= q3 <= max(few) and q2 == np.median(few)
    # the importance target is for 1e5 samples on 2 threads: other runs state none
    from bench_numerical import judged_verdict

    assert judged_verdict(0.5, "<= 1", True) == "<= 1: met"
    assert judged_verdict(0.5, "<= 1", False).startswith("n/a (the target is for N=1e+05, 2 threads)")
    line = provenance()
    assert re.fullmatch(r"run of \d{4}-\d\d-\d\d at commit \S+.* on .+, \d+ cores, torch " + re.escape(torch.__version__),
                        line), line


@pytest.mark.parametrize("script, arguments, message", [
    ("bench_aggregators", ["--rounds", "0"], "--rounds: must be a positive integer, got '0'"),
    ("bench_aggregators", ["--shapes", "4,2"], "a shape is B,M,D"),
    ("bench_aggregators", ["--only", "mopoe"], "invalid choice: 'mopoe'"),
    ("bench_aggregators", ["--only", "hellinger fused"], "needs --fused"),
    ("bench_aggregators", ["--only", "MoPoE", "--docs", "docs/benchmarks.md"], "would replace the full one"),
    ("bench_aggregators", ["--docs", "docs/missing.md"], "--docs 'docs/missing.md'"),
    ("bench_aggregators", ["--shapes", "8,1,4"], "a shape needs at least 2 experts (M), got '8,1,4'"),
    ("bench_aggregators", ["--device", "cpux"], "--device: must be a torch device such as cpu or cuda, got 'cpux'"),
    ("bench_aggregators", ["--rounds", "-1"], "--rounds: must be a positive integer, got '-1'"),
    ("bench_mvae", ["--sweep", "nosuch"], "--sweep 'nosuch': unknown sweep preset 'nosuch'"),
    ("bench_mvae", ["--models", "helvae", "--docs", "docs/benchmarks.md"], "would replace the full one"),
    ("bench_mvae", ["--repeats", "0"], "--repeats: must be a positive integer"),
    ("bench_mvae", ["--warmup", "-1"], "--warmup: must be a non-negative integer"),
    ("bench_mvae", ["--sweep", "polymnist-cpu", "--batch", "4"], "--batch: not taken with --sweep"),
    ("bench_mvae", ["--train-examples", "5"], "--train-examples: taken only with --sweep"),
    ("bench_mvae", ["--docs", "docs/api.md"], "marker of 'bench_mvae' exactly once"),
    ("bench_numerical", ["--threads", "0"], "--threads: must be a positive integer"),
    ("bench_numerical", ["--docs", "docs/api.md"], "marker of 'bench_numerical' exactly once"),
    ("bench_peer", ["--batch", "x"], "--batch: must be an integer, got 'x'"),
])
def test_benchmarks_refuse_bad_options_before_any_work(script, arguments, message, monkeypatch, capsys):
    """Options are checked when parsed, and the page a table goes into before the measurements: 0 rounds failed after
    the warm-up, a misspelt ``--only`` timed PoE alone and spliced that table over the real one, and a missing page
    or marker lost a whole run."""
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(ROOT)
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *arguments])
    with pytest.raises(SystemExit) as raised:
        module.main()
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_a_benchmark_candidate_that_computes_something_else_is_not_timed(monkeypatch):
    """Nothing compared the candidates' outputs: a fused path returning PoE's pool was timed and met its target. Each
    candidate is checked against a float64 reference of its own before the rounds."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_aggregators

    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 8, 4, generator=g), torch.randn(3, 8, 4, generator=g) * 0.5
    found = bench_aggregators.candidates(3, False, 5)
    assert set(found) == {"poe", "hellinger", "official port", "object API", "MoPoE", "MoHELVAE"}
    bench_aggregators.check_agreement(found, mu, logvar, "here")  # the real candidates agree
    for name, wrong in (("hellinger", bench_aggregators.opf.poe),
                        ("MoHELVAE", bench_aggregators._subsets(bench_aggregators.opf.poe)),
                        ("poe", lambda m, lv: (m.mean(0), lv.mean(0)))):
        with pytest.raises(SystemExit, match=f"{name} at here differs from the float64 reference"):
            bench_aggregators.check_agreement({**found, name: wrong}, mu, logvar, "here")
    # the reference itself: one expert's subset is that expert, the product of two the precision-weighted pool
    loc, lv = bench_aggregators.reference_outputs("MoPoE", mu[:2], logvar[:2])
    torch.testing.assert_close(loc[:, 0], mu[0].double())
    precision = torch.exp(-logvar[:2].double())
    torch.testing.assert_close(lv[:, 2], -torch.log(precision.sum(0)))


def test_the_commit_is_the_codes_not_the_working_directorys(tmp_path, monkeypatch):
    """Tables name the commit of the code that wrote them: git ran in the working directory, which named another
    repository's commit (or none) when a command ran from elsewhere."""
    import subprocess

    from applications.multimodal_vae.files import code_commit

    monkeypatch.delenv("OPINIONPOOL_COMMIT", raising=False)
    here = code_commit()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    assert code_commit() == here
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert here.split()[0] == (head.stdout.strip() if head.returncode == 0 else "unknown")  # "unknown": no checkout
    monkeypatch.setenv("OPINIONPOOL_COMMIT", "abc1234")
    assert code_commit() == "abc1234 (as stated by OPINIONPOOL_COMMIT)"
