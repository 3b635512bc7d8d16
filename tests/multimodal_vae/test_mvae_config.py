"""The multimodal VAE application's configuration checks (every option's range, keys named in type errors, run
names that stay inside output_dir) and the training budget of the main command (a number of steps; a run stopped
early by the wall-clock guard says so on the console and in its report)."""

import dataclasses
import json
import math
import re
import typing

import pytest
from omegaconf import OmegaConf

from applications.multimodal_vae import config as config_module
from applications.multimodal_vae.__main__ import main
from applications.multimodal_vae.config import load_config
from applications.multimodal_vae.train import train

pytestmark = pytest.mark.usefixtures("float32_default")

# (override, the key the error must name); every one of these trained, or failed late with a raw error, before
BAD = [
    ("model.beta=-1", "model.beta"), ("model.beta=0", "model.beta"), ("model.beta=1001", "model.beta"),
    ("model.alpha=nan", "model.alpha"), ("model.alpha=-0.5", "model.alpha"), ("model.alpha=1.5", "model.alpha"),
    ("model.latent_dim=0", "model.latent_dim"), ("model.likelihood_scale=inf", "model.likelihood_scale"),
    ("model.likelihood_scale=1e-9", "model.likelihood_scale"), ("model.hidden=0", "model.hidden"),
    ("model.hidden=-4", "model.hidden"),
    ("train.lr=inf", "train.lr"), ("train.lr=nan", "train.lr"), ("train.lr=1e30", "train.lr"),
    ("train.lr=1.5", "train.lr"),
    ("train.max_steps=0", "train.max_steps"), ("train.max_steps=-3", "train.max_steps"),
    ("train.max_minutes=-1", "train.max_minutes"), ("train.max_minutes=0", "train.max_minutes"),
    ("train.max_minutes=inf", "train.max_minutes"), ("train.max_minutes=nan", "train.max_minutes"),
    ("train.num_threads=-1", "train.num_threads"), ("train.num_threads=0", "train.num_threads"),
    ("train.seed=-1", "train.seed"), (f"train.seed={2**32}", "train.seed"),
    ("data.train_subset=-2", "data.train_subset"), ("data.train_subset=0", "data.train_subset"),
    ("data.num_modalities=0", "data.num_modalities"), ("data.num_modalities=1", "data.num_modalities"),
    ("data.drop_rate=nan", "data.drop_rate"),
    ("data.drop_rate=-0.1", "data.drop_rate"), ("data.drop_rate=1", "data.drop_rate"),
    ("eval.test_examples=0", "eval.test_examples"), ("eval.test_examples=-5", "eval.test_examples"),
    (f"eval.seed={2**32}", "eval.seed"),
]


@pytest.mark.parametrize("override, key", BAD)
def test_values_out_of_range_fail_in_the_config_check(override, key):
    value = override.split("=", 1)[1]
    with pytest.raises(ValueError, match=rf"^{re.escape(key)} must be .*, got "):
        load_config("polymnist-helvae-cpu", [override])
    shown = str(float(value)) if key in FLOAT_KEYS else value
    with pytest.raises(ValueError, match=re.escape(f"got {shown}")):
        load_config("polymnist-helvae-cpu", [override])


def _fields():
    """``(key, type)`` of every option of every section, from the dataclasses themselves."""
    hints = typing.get_type_hints(config_module.Config)
    for section in dataclasses.fields(config_module.Config):
        if dataclasses.is_dataclass(hints[section.name]):
            for option, kind in typing.get_type_hints(hints[section.name]).items():
                yield f"{section.name}.{option}", kind


FLOAT_KEYS = [key for key, kind in _fields() if float in (typing.get_args(kind) or (kind,))]
INT_KEYS = [key for key, kind in _fields() if int in (typing.get_args(kind) or (kind,))]


def test_every_float_option_is_found():
    # the systematic tests below cover these; a float option added later is covered without listing it
    assert {"model.beta", "model.alpha", "model.likelihood_scale", "train.lr", "train.max_minutes",
            "data.drop_rate"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_option_must_be_finite(key, value):
    with pytest.raises(ValueError, match=re.escape(key.split(".")[1].replace("_", " ")) + "|" + re.escape(key)):
        load_config("polymnist-helvae-cpu", [f"{key}={value}"])


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_integer_option_refuses_a_negative_value(key):
    option = key.split(".")[1]
    with pytest.raises(ValueError, match=f"{re.escape(key)}|{option}"):
        load_config("polymnist-helvae-cpu", [f"{key}=-5"])


@pytest.mark.parametrize("sizes", ["[0]", "[5]", "[2,2]", "[-1]"])
def test_fid_sizes_must_be_distinct_numbers_of_inputs_below_the_number_of_modalities(sizes):
    with pytest.raises(ValueError, match=r"^eval.fid_sizes must be distinct numbers of inputs in \[1, 4\] .*got "
                       + re.escape(sizes.replace(",", ", "))):
        load_config("polymnist-helvae-cpu", [f"eval.fid_sizes={sizes}", "data.num_modalities=5"])
    assert load_config("polymnist-helvae-cpu", ["data.num_modalities=5"]).eval.fid_sizes is None  # all
    assert load_config("polymnist-helvae-cpu", ["eval.fid_sizes=[4,1]"]).eval.fid_sizes == [4, 1]
    assert load_config("polymnist-helvae-cpu", ["eval.fid_sizes=[]"]).eval.fid_sizes == []


@pytest.mark.parametrize("override", [
    "train.lr=1", "train.lr=1e-9", "model.alpha=0", "model.alpha=1", "model.beta=1000", "model.beta=1e-6",
    "model.likelihood_scale=1e-3", "model.likelihood_scale=1000", "data.drop_rate=0", "data.drop_rate=0.999",
    "train.max_minutes=null", "train.max_minutes=1e-9", "train.max_steps=null", "train.max_steps=1",
    f"train.seed={2**32 - 1}", "train.seed=0", "eval.seed=0", "data.train_subset=null", "data.train_subset=1",
    "train.num_threads=null", "train.num_threads=1", "eval.test_examples=1", "name=helvae-beta2.5-seed0",
    "name=polymnist-helvae-cpu-20250101-120000", "name=.hidden",
])
def test_values_at_the_documented_bounds_are_accepted(override):
    key, value = override.split("=", 1)
    model = ["model.name=holder"] if key == "model.alpha" else []  # (a model that takes alpha)
    config = load_config("polymnist-helvae-cpu", [*model, override])
    section, option = key.split(".") if "." in key else (None, key)
    got = getattr(getattr(config, section) if section else config, option)
    if value == "null":
        assert got is None
    elif key == "name":
        assert got == value
    else:
        assert got == float(value)


@pytest.mark.parametrize("name", ["../../x", "..", ".", "a/b", "a\\b", "/tmp/x", "sub/../x"])
def test_run_names_that_leave_the_output_folder_are_refused(name, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^name must be one folder name .*got " + re.escape(repr(name))):
        load_config("polymnist-helvae-cpu", [f"name={name}", f"output_dir={tmp_path / 'runs'}"])
    with pytest.raises(SystemExit):
        main(["train", "--preset", "polymnist-helvae-cpu", "--set", f"name={name}",
              f"output_dir={tmp_path / 'runs' / 'inner'}", "data.build_offline=false", f"data.root={tmp_path / 'no'}"])
    assert "name must be one folder name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written, inside output_dir or beside it


@pytest.mark.parametrize("override, key", [("train.lr=abc", "train.lr"), ("data.train_subset=x", "data.train_subset"),
                                           ("train.compile=maybe", "train.compile"), ("eval.seed=1.5", "eval.seed"),
                                           ("model.nme=3", "model.nme")])
def test_type_errors_name_the_key(override, key, capsys):
    with pytest.raises(ValueError, match=r"^invalid configuration: .*\(key " + re.escape(key) + r"\)$"):
        load_config("polymnist-helvae-cpu", [override])
    with pytest.raises(SystemExit):
        main(["train", "--preset", "polymnist-helvae-cpu", "--set", override])
    assert f"(key {key})" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["2", "0", "1", "-1", "0.5", "Y", "null"])
def test_booleans_are_true_or_false_not_numbers(value, tmp_path):
    """OmegaConf reads any number as a boolean: ``train.tensorboard=2`` was accepted as true, ``0`` as false. Every
    boolean option, in overrides, configuration files and sweep files."""
    from applications.multimodal_vae.sweep import load_sweep

    booleans = ["data.build_offline", "model.learnable_weights", "train.compile", "train.tensorboard",
                "train.evaluate_at_end"]
    for key in booleans:
        message = r"^invalid configuration: a boolean must be true or false, got .* \(key " + re.escape(key) + r"\)$"
        with pytest.raises(ValueError, match=message):
            load_config("polymnist-helvae-cpu", [f"{key}={value}"])
        section, option = key.split(".")
        file = tmp_path / "config.yaml"
        file.write_text(f"{section}:\n  {option}: {value}\n")
        with pytest.raises(ValueError, match=message):
            load_config("polymnist-helvae-cpu", path=file)
        for word in ("true", "false", "yes", "off"):  # YAML's booleans
            assert getattr(getattr(load_config(None, [f"{key}={word}"]), section), option) is (word in ("true", "yes"))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: s\nbreadth_first: {value}\n")
    with pytest.raises(ValueError, match=r"^invalid sweep configuration: .*\(key breadth_first\)$"):
        load_sweep(str(sweep))


@pytest.mark.parametrize("override, message", [
    ("train.lr=${nope}", r"^invalid configuration: Interpolation key 'nope' not found \(key train.lr\)$"),
    ("train.epochs=${train.lr}", r"^invalid configuration: .*could not be converted to Integer \(key train.epochs\)$"),
    ("model.name=${oc.env:MVAE_TEST_UNSET_NAME}", r"^invalid configuration: .*MVAE_TEST_UNSET_NAME.* \(key model.name\)$")])
def test_an_interpolation_that_does_not_resolve_is_a_one_line_error_naming_the_setting(override, message):
    """The checks after the merge resolved interpolations outside its error handling: OmegaConf's message of three
    lines, the first naming no setting."""
    with pytest.raises(ValueError, match=message) as raised:
        load_config("polymnist-helvae-cpu", [override])
    assert "\n" not in str(raised.value)


def test_booleans_through_interpolations_are_checked_at_their_source(tmp_path, monkeypatch):
    """An interpolation to a number (the preset's ``train.epochs``) is a number; a resolver's string that says true
    or false (``oc.env``) is a boolean, as OmegaConf reads it."""
    from applications.multimodal_vae.sweep import load_sweep

    with pytest.raises(ValueError, match=r"got 20 \(key train.tensorboard\)$"):
        load_config("polymnist-helvae-cpu", ["train.tensorboard=${train.epochs}"])
    file = tmp_path / "config.yaml"
    file.write_text("train:\n  epochs: 7\n  compile: ${train.epochs}\n")
    with pytest.raises(ValueError, match=r"got 7 \(key train.compile\)$"):
        load_config("polymnist-helvae-cpu", path=file)
    monkeypatch.setenv("MVAE_TEST_BOOLEAN", "TRUE")
    assert load_config(None, ["train.compile=${oc.env:MVAE_TEST_BOOLEAN}"]).train.compile is True
    assert load_config(None, ["train.compile=${oc.env:MVAE_TEST_UNSET,false}"]).train.compile is False
    assert load_config(None, ["train.compile=${train.tensorboard}"]).train.compile is True
    monkeypatch.setenv("MVAE_TEST_BOOLEAN", "1")
    with pytest.raises(ValueError, match=r"got '1' \(key train.compile\)$"):
        load_config(None, ["train.compile=${oc.env:MVAE_TEST_BOOLEAN}"])
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: s\nbreadth_first: ${oc.env:MVAE_TEST_BOOLEAN}\n")
    with pytest.raises(ValueError, match=r"^invalid sweep configuration: .*\(key breadth_first\)$"):
        load_sweep(str(sweep))


def test_missing_or_broken_files_and_bad_seeds_are_command_line_errors(tmp_path, capsys):
    """They ended in raw FileNotFoundError or YAML tracebacks; a negative build seed failed inside numpy after
    downloading the build's wheels."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    train = ["train", "--preset", "polymnist-helvae-cpu", "--config"]
    for argv, message in (([*train, str(tmp_path / "missing.yaml")], "no configuration file at"),
                          ([*train, str(broken)], "cannot read the configuration file"),
                          (["evaluate", "--run", str(tmp_path)], "no configuration file at"),
                          (["build-polymnist", "--root", str(tmp_path / "data"), "--seed", "-1"],
                           "--seed must be a non-negative integer, got -1")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err, argv
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(load_config("polymnist-helvae-cpu"))))
    with pytest.raises(SystemExit):
        main(["grid", "--run", str(tmp_path)])
    assert "holds no checkpoint.pt" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_files_that_are_not_mappings_and_bad_sweep_files_name_the_file(tmp_path):
    """A configuration or sweep file holding a list, or a sweep file that is not YAML, raised raw TypeErrors and
    parser tracebacks; a section set to a plain value (``--set train=3``) did not name the key."""
    from applications.multimodal_vae.sweep import load_sweep

    listed = tmp_path / "listed.yaml"
    listed.write_text("- train\n- model\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [unclosed\n")
    with pytest.raises(ValueError, match=r"the configuration file .*listed.yaml must hold a mapping of keys to values, "
                                         r"got a ListConfig"):
        load_config("polymnist-helvae-cpu", path=listed)
    with pytest.raises(ValueError, match=r"the sweep file .*listed.yaml must hold a mapping"):
        load_sweep(str(listed))
    with pytest.raises(ValueError, match=r"cannot read the sweep file .*broken.yaml"):
        load_sweep(str(broken))
    with pytest.raises(ValueError, match=r"invalid configuration: .*\(key train\)"):
        load_config("polymnist-helvae-cpu", ["train=3"])


def test_a_sweep_name_must_be_one_folder_name():
    """The sweep's folder is ``{output_dir}/{name}``: ``name=../../x`` wrote its results outside ``output_dir``."""
    from applications.multimodal_vae.sweep import load_sweep

    for name in ("../../escaped", "a/b", ".."):
        with pytest.raises(ValueError, match=r"name must be one folder name .*got " + re.escape(repr(name))):
            load_sweep("polymnist-cpu", [f"name={name}"])


@pytest.mark.parametrize("override, key", [("model.beta=-1", "model.beta"), ("train.lr=inf", "train.lr"),
                                           ("data.train_subset=0", "data.train_subset"),
                                           ("train.max_steps=0", "train.max_steps")])
def test_the_command_line_writes_nothing_for_a_bad_value(override, key, tiny_root, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--preset", "polymnist-helvae-cpu", "--set", f"data.root={tiny_root / 'data'}",
              "data.build_offline=false", "data.num_modalities=3", f"output_dir={tiny_root / 'runs'}", override])
    assert f"{key} must be" in capsys.readouterr().err
    assert not (tiny_root / "runs").exists()


def test_the_main_command_trains_a_fixed_number_of_steps():
    """The CPU preset's budget is the documented 1 870 steps; a wall-clock limit is only a guard that would let a
    machine four times slower than the documented ~0.25 s per step finish."""
    config = load_config("polymnist-helvae-cpu")
    assert config.train.max_steps == 1870
    assert config.train.max_minutes is None or config.train.max_minutes * 60 >= 1870 * 4 * 0.25
    # the CPU sweep's runs also have a budget in steps, not in minutes
    from applications.multimodal_vae.sweep import grid, load_sweep, run_config

    sweep = load_sweep("polymnist-cpu")
    for point in grid(sweep):
        run = run_config(sweep, *point)
        assert run.train.max_steps is not None
        assert run.train.max_minutes is None or run.train.max_minutes * 60 >= run.train.max_steps * 4 * 0.25


def _tiny(root, name, **train):
    # 24 training tuples in batches of 8: 3 steps per epoch, 6 planned in 2 epochs
    overrides = [f"data.root={root / 'data'}", "data.build_offline=false", "data.num_modalities=3",
                 "model.latent_dim=4", "model.architecture=conv", "model.hidden=32", "train.batch_size=8", "train.epochs=2",
                 "train.device=cpu", "train.tensorboard=false", f"output_dir={root / 'runs'}", f"name={name}",
                 "train.evaluate_at_end=true", "eval.probe_examples=10", "eval.likelihood_samples=2",
                 "eval.unconditional_samples=20", "eval.likelihood_examples=4", "eval.subsets=single"]
    return load_config("polymnist-helvae", overrides + [f"train.{k}={v}" for k, v in train.items()])


@pytest.mark.parametrize("weight", [0.0, 0.25])
def test_mmvms_unconditional_metrics_say_when_its_objective_does_not_fit_the_prior(tiny_root, weight):
    """MMVM without an N(0, I) component in its prior trains each latent towards the other modalities' posteriors,
    never towards N(0, I); its unconditional coherence (and FID, KID) decode N(0, I) samples all the same, and the
    report printed them as any other model's."""
    config = _tiny(tiny_root, f"mmvm{weight}", max_steps=1)
    config.model.name, config.model.normal_prior_weight = "mmvm", weight
    run = train(config, show_progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    report = (run / "report.md").read_text()
    assert metrics["prior_fitted"] is (weight > 0)
    line = next(line for line in report.splitlines() if line.startswith("**Unconditional coherence**"))
    assert ("which this model's objective does not fit" in line) is (weight == 0)


def test_evaluate_only_the_likelihood_keeps_the_other_metrics(tiny_root, capsys):
    run = train(_tiny(tiny_root, "relik", max_steps=1), show_progress=False)
    before = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", "--run", str(run), "--only", "log_likelihood"]) == 0
    assert json.loads((run / "metrics.json").read_text()) == before  # seeded: the same estimates
    assert main(["evaluate", "--run", str(run), "--only", "log_likelihood", "--set", "eval.likelihood_samples=3"]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["log_likelihood"]["num_samples"] == 3 and after["log_likelihood"] != before["log_likelihood"]
    assert after["protocol"]["likelihood_samples"] == 3  # the protocol says so too
    before["protocol"]["likelihood_samples"] = 3
    before["eval"]["likelihood_samples"] = 3  # and the record of the eval settings
    assert {k: v for k, v in after.items() if k != "log_likelihood"} == \
        {k: v for k, v in before.items() if k != "log_likelihood"}
    assert "K = 3" in capsys.readouterr().out
    (run / "metrics.json").unlink()
    with pytest.raises(SystemExit):
        main(["evaluate", "--run", str(run), "--only", "log_likelihood"])
    assert "no metrics.json in" in capsys.readouterr().err


def test_evaluate_only_the_fid_adds_kid_errors_to_an_older_evaluation(tiny_root, capsys):
    """A run evaluated before KID had its standard error gets it from ``--only fid``: the same seeded FID and KID,
    the error added, every other metric kept; other FID settings are recorded; other tuples, a checkpoint trained
    since, or (metrics without a record of their settings) any setting but config.yaml's are refused."""
    from tiny_runs import WHEEL_CACHE

    from applications.multimodal_vae.evaluation.fid import default_weights

    config = _tiny(tiny_root, "refid", max_steps=1)
    config.eval.fid_samples, config.eval.fid_sizes = 4, [1]
    config.eval.fid_weights = str(default_weights(WHEEL_CACHE))
    run = train(config, show_progress=False)
    path, report = run / "metrics.json", run / "report.md"
    before = json.loads(path.read_text())
    error = before["fid"].pop("kid_unconditional_standard_error")
    before["fid"].pop("kid_per_size_standard_error")
    assert error > 0
    path.write_text(json.dumps(before))  # as an evaluation from before the error was computed wrote it
    report.write_text(report.read_text().replace("jackknife standard error", ""))
    assert main(["evaluate", "--run", str(run), "--only", "fid"]) == 0
    after = json.loads(path.read_text())
    assert after["fid"].pop("kid_unconditional_standard_error") == error
    assert set(after["fid"].pop("kid_per_size_standard_error")) == {"1"}
    assert after == before
    assert f"+- {1000 * error:.2f} (4 samples)" in capsys.readouterr().out
    assert "jackknife standard error" in report.read_text()  # the report is written again
    assert main(["evaluate", "--run", str(run), "--only", "fid", "--set", "eval.fid_samples=3", "eval.fid_sizes=[]"]) == 0
    after = json.loads(path.read_text())
    assert after["fid"]["samples"] == 3 and after["fid"]["per_size"] == {}
    assert after["eval"]["fid_samples"] == 3 and after["eval"]["fid_sizes"] == []
    assert after["log_likelihood"] == before["log_likelihood"] and after["coherence"] == before["coherence"]

    def refused(overrides, message):
        kept = path.read_text()
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(["evaluate", "--run", str(run), "--only", "fid", *(["--set", *overrides] if overrides else [])])
        assert message in capsys.readouterr().err
        assert path.read_text() == kept  # a refusal changes nothing

    refused(["eval.seed=5"], "evaluate the run in full")
    refused(["eval.fid_samples=0"], "eval.fid_samples=0: no FID to compute")
    # a checkpoint trained further than the evaluated one
    path.write_text(json.dumps({**after, "training": {**after["training"], "steps": 7}}))
    refused([], "its metrics were computed at step 7")
    # metrics without a record of their settings: config.yaml's (fid_samples 4), and no change that none would record
    path.write_text(json.dumps({**after, "eval": None}))
    refused(["eval.fid_samples=3"], "record no eval settings")
    refused(["eval.seed=5"], "record no eval settings")
    assert main(["evaluate", "--run", str(run), "--only", "fid"]) == 0
    assert json.loads(path.read_text())["fid"]["samples"] == 4


def test_a_run_stopped_by_the_wall_clock_guard_says_so(tiny_root, capsys, monkeypatch):
    run = train(_tiny(tiny_root, "early", max_minutes=1e-9), show_progress=True)  # over time after one step
    out, err = capsys.readouterr()
    notice = "training stopped early at train.max_minutes=1e-09 (wall-clock limit): 1 of 6 planned steps"
    assert f"warning: {notice}" in out and "not comparable" in out
    assert re.search(r"\b1/6\b", err)  # the progress bar runs over the 6 planned steps, not over one epoch's 3
    report = (run / "report.md").read_text()
    assert "Training stopped early at train.max_minutes=1e-09 (wall-clock limit): 1 of 6 planned steps" in report
    assert "not comparable with those of runs that completed their steps" in report
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"] == {"steps": 1, "planned_steps": 6, "stopped_by": "train.max_minutes=1e-09"}
    # evaluating the run again, from the command line, keeps the notice
    (run / "report.md").unlink()
    leftovers = [run / ".sample_grid.png.abc123.tmp", run / ".metrics.json.abc123.tmp"]  # of a killed evaluation
    for leftover in leftovers:
        leftover.write_bytes(b"partial")
    assert main(["evaluate", "--run", str(run)]) == 0
    assert not [leftover for leftover in leftovers if leftover.exists()]
    assert notice in capsys.readouterr().out and notice[1:] in (run / "report.md").read_text()
    # the evaluation draws the labelled sample grid, and so does the grid command
    from PIL import Image

    assert "![sample grid](sample_grid.png)" in (run / "report.md").read_text()
    with Image.open(run / "sample_grid.png") as png:
        assert png.size[1] >= 3 * 6 * 28 * 3  # 3 modalities x 6 blocks of 28-pixel tiles, 3 x 3 per pixel
    out = tiny_root / "grid.png"
    assert main(["grid", "--run", str(run), "--columns", "3", "--scale", "2", "--out", str(out)]) == 0
    with Image.open(out) as png:
        assert 3 * 6 * 28 * 2 <= png.size[1] < 3 * 6 * 28 * 3
    assert str(out) in capsys.readouterr().out
    # the grid command draws with the run's eval.seed, as the evaluation's grid, unless told otherwise (its default
    # of 0 overwrote the evaluation's grid with differently seeded generations)
    from applications.multimodal_vae.evaluation import grids

    stored = OmegaConf.load(run / "config.yaml")
    stored.eval.seed = 7
    OmegaConf.save(stored, run / "config.yaml")
    seeds = []
    monkeypatch.setattr(grids, "draw_sample_grid", lambda *args: seeds.append(args[6]) or True)
    assert main(["grid", "--run", str(run), "--out", str(out)]) == 0
    assert main(["grid", "--run", str(run), "--out", str(out), "--seed", "3"]) == 0
    assert seeds == [7, 3]


@pytest.mark.parametrize("train_budget, steps", [({"epochs": 1}, 3), ({"max_steps": 2}, 2)])
def test_a_run_that_completes_its_steps_has_no_notice(tiny_root, capsys, train_budget, steps):
    run = train(_tiny(tiny_root, "complete", max_minutes=60, **train_budget), show_progress=False)
    out = capsys.readouterr().out
    assert "stopped early" not in out and "warning" not in out
    report = (run / "report.md").read_text()
    assert "stopped early" not in report.lower() and "not comparable" not in report
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"] == {"steps": steps, "planned_steps": steps, "stopped_by": None}
    assert math.isfinite(metrics["log_likelihood"]["joint"])


def test_text_options_keep_the_text_they_are_given(tmp_path):
    """YAML read name=007 as the number 7 (runs/7, which --run runs/007 could not find), 1e3 as 1000.0, 12:30 as
    750 and yes as true; the schema then made them other text."""
    for text in ("007", "1e3", "12:30", "yes", "0x1F"):
        config = load_config("polymnist-helvae-cpu", [f"name={text}", f"data.root={text}", f"output_dir={text}"])
        assert (config.name, config.data.root, config.output_dir) == (text, text, text)
    assert load_config("polymnist-helvae-cpu", ["name='42'"]).name == "42"  # quoted: YAML's string
    with pytest.raises(ValueError, match="key name"):
        load_config("polymnist-helvae-cpu", ["name=null"])  # not text: refused, as before
    from applications.multimodal_vae.sweep import load_sweep

    assert load_sweep("polymnist-cpu", ["name=2024"]).name == "2024"


def test_interpolations_in_text_options_resolve_over_the_whole_configuration():
    """Keeping the text resolved the value over the overrides alone: ``name=run-${train.seed}`` raised "key
    'train.seed' not found", where the same line in a file resolves (to run-0)."""
    config = load_config("polymnist-helvae-cpu", ["name=run-${train.seed}", "train.seed=3",
                                                  "output_dir=${data.root}/runs"])
    assert config.name == "run-3" and config.output_dir == f"{config.data.root}/runs"
    from applications.multimodal_vae.sweep import load_sweep

    assert load_sweep("polymnist-cpu", ["output_dir=${name}-out"]).output_dir == "polymnist-cpu-out"


def test_a_text_option_given_twice_takes_its_last_value():
    """Keeping the text read every occurrence: an earlier text replaced a later number-like one (name=run then
    name=007 gave 'run'); run_config and --set chain overrides by design."""
    assert load_config("polymnist-helvae-cpu", ["name=run", "name=007"]).name == "007"
    assert load_config("polymnist-helvae-cpu", ["name=12", "name=abc"]).name == "abc"
