"""Experiments: a grid of models x beta x seeds, trained (resumably), evaluated, and summarised with plots.

``python -m applications.multimodal_vae sweep --preset polymnist-cpu [--set key=value ...]`` reads
``sweeps/{preset}.yaml``. Every run is an ordinary run folder under ``{output_dir}/{name}/`` named
``{model}-beta{beta}-seed{seed}``: a run trained to its steps and evaluated at its last checkpoint with the sweep's
eval settings is skipped, an interrupted one (or one trained to fewer epochs or steps than the sweep now asks for)
resumes from its checkpoint, a trained but unevaluated one (or one whose report is missing, or whose metrics are
of an earlier checkpoint or other eval settings) is only evaluated. A run folder of another configuration (its
``config.yaml``) is an error before any work, a summary's too.
The sweep then writes ``results.csv`` (one row per run), ``report.md`` (mean ± std over seeds) and the figures
of the HELVAE paper's experiments: coherence vs FID and vs log-likelihood with Pareto fronts (Figure 3), metrics
vs beta (Figure 6), coherence and FID vs the number of input modalities (Figure 5), and seconds per training
batch per model (Table 6; medians of the per-step times logged by training, all runs on the device the sweep ran
on).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from .config import PRESETS, check_name, load_config, load_mapping, merge_checked
from .data import load_dataset
from .evaluation import evaluate_run
from .evaluation.fid import check_weights_file
from .files import (
    UnreadableFile,
    atomic_write,
    claim,
    code_commit,
    remove_orphaned_temporaries,
    splice_file,
    temporary_targets,
    write_text,
)
from .train import (
    RunFolderBusy,
    TrainingDiverged,
    budget_reached,
    configuration_differences,
    load_checkpoint,
    load_run,
    run_folder_lock,
    train,
)

__all__ = ["CURVES", "DIVERGED", "FIELDS", "METRICS", "RUN_OUTPUTS", "SCALARS", "SWEEPS", "SweepConfig", "UNFINISHED",
           "aggregate", "available_sweeps", "finished_runs", "grid", "load_sweep", "mean_std", "mean_std_text",
           "number_format", "pareto_front", "plot", "render", "result_row", "run_config", "run_name", "run_sweep",
           "run_workers", "splice_summary", "summarise", "summary_table", "table_name", "write_results"]

SWEEPS = PRESETS.parent / "sweeps"


def _optional(section: str, read):
    """``read(metrics[section])``, or ``None`` when the run did not compute ``section``."""
    return lambda metrics: read(metrics[section]) if section in metrics else None


#: a run's scalar metrics, each read from its metrics.json; ``None`` where the run did not compute it: coherence and
#: the latent probe need class labels (CelebA and CUB have none: ``not_computed`` says so), FID image modalities
#: and ``eval.fid_samples > 0``
METRICS = {
    "coherence": _optional("coherence", lambda c: c["overall"]),
    "cross_coherence": _optional("cross_coherence", lambda c: c["cross_modal"]),
    # one input, its own modality reconstructed: the diagonal of the one-input matrix
    "self_coherence": _optional("cross_coherence",
                                lambda c: statistics.mean(row[i] for i, row in enumerate(c["matrix"]))),
    "unconditional_coherence": _optional("unconditional_coherence", lambda u: u),
    "log_likelihood": lambda metrics: metrics["log_likelihood"]["joint"],
    "conditional_log_likelihood": lambda metrics: metrics["log_likelihood"]["given_one_modality"],
    # the probe's subsets are named "m0,m1,...": the longest name is the full set
    "probe_all": _optional("latent_probe", lambda p: p[max(p, key=len)]),
    "probe_single": _optional("latent_probe", lambda p: statistics.mean(v for k, v in p.items() if "," not in k)),
    # modality-specific latents only: the mean over modalities of the probe on w_m (decoupling: low is good)
    "probe_private": _optional("private_latent_probe", lambda p: statistics.mean(p.values())),
    "fid_unconditional": _optional("fid", lambda f: f["unconditional"]),
    "kid_unconditional": _optional("fid", lambda f: f.get("kid_unconditional")),
    # the run's own jackknife standard error of it (over test tuples; not in runs evaluated before 2026-12-06)
    "kid_unconditional_standard_error": _optional("fid", lambda f: f.get("kid_unconditional_standard_error")),
    "pairwise_mass": lambda metrics: metrics["pooling"]["pairwise_mass"],
}
#: curves over the number of input modalities, as JSON objects (empty when not computed)
CURVES = {
    "coherence_by_inputs": _optional("coherence", lambda c: {k: v[0] for k, v in c["per_size"].items()}),
    "fid_by_inputs": _optional("fid", lambda f: f.get("per_size", {})),
}
#: the columns averaged over seeds
SCALARS = (*METRICS, "seconds_per_batch")
FIELDS = ("model", "beta", "seed", *SCALARS, *CURVES)
#: what a run of the sweep has when it is done: its training log and its evaluation (metrics.json is written
#: before report.md, so a run killed between them is evaluated again)
RUN_OUTPUTS = ("metrics.csv", "metrics.json", "report.md")


@dataclass
class SweepConfig:
    name: str = "sweep"
    #: the run preset every run starts from, and overrides applied to every run
    base: str = "polymnist-helvae-cpu"
    overrides: list[str] = field(default_factory=list)
    #: the runs' labels: a model name, or any label whose ``model_overrides`` set ``model.name`` (a variant, e.g.
    #: ``mmvae-k10`` with ``model.name=mmvae`` and ``model.num_samples=10``)
    models: list[str] = field(default_factory=lambda: ["helvae", "mopoe"])
    #: overrides for one label only (after ``overrides``), e.g. MMVAE+'s latent split
    model_overrides: dict[str, list[str]] = field(default_factory=dict)
    #: overrides applied to every run last, to change a preset from the command line without restating its
    #: ``overrides``: ``--set 'extra_overrides=[train.epochs=2]'``
    extra_overrides: list[str] = field(default_factory=list)
    betas: list[float] = field(default_factory=lambda: [1.0, 2.5])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    #: seeds for one label only, instead of ``seeds`` (fewer for the slow models)
    model_seeds: dict[str, list[int]] = field(default_factory=dict)
    #: betas for one label only, instead of ``betas`` (e.g. one beta for the alpha study's variants)
    model_betas: dict[str, list[float]] = field(default_factory=dict)
    #: run the grid seed by seed (every label's first seed, then every label's second, ...) instead of label by
    #: label, so that a sweep stopped half way has every model once rather than some models three times
    breadth_first: bool = False
    output_dir: str = "runs"


def available_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEPS.glob("*.yaml"))


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def load_sweep(preset: str, overrides=()) -> SweepConfig:
    """The sweep preset ``preset`` (a name in ``SWEEPS``, or the path of a YAML file of the same keys) with the
    ``key=value`` overrides, checked: every run's configuration is valid before anything trains."""
    file = Path(preset) if preset.endswith((".yaml", ".yml")) else SWEEPS / f"{preset}.yaml"
    if not file.is_file():
        raise ValueError(f"unknown sweep preset {preset!r}; available: {', '.join(available_sweeps())}")
    sweep = OmegaConf.to_object(merge_checked("sweep configuration", [OmegaConf.structured(SweepConfig),
                                                                      load_mapping(file, "sweep file")], overrides))
    check_name(sweep.name)  # the sweep's folder, as a run's
    for key in ("models", "betas", "seeds"):
        if not getattr(sweep, key):
            raise ValueError(f"sweep {key} must not be empty")
    # a label names run folders and table rows: a space or a "|" would break the summary's Markdown tables
    unreadable = [label for label in sweep.models if not _LABEL.fullmatch(label)]
    if unreadable:
        raise ValueError(f"sweep models must be labels of letters, digits, '.', '_', '+' and '-' (starting with a "
                         f"letter or digit), got {unreadable}")
    if len(set(sweep.models)) != len(sweep.models):
        raise ValueError(f"sweep models must not repeat a label, got {sweep.models}")
    # a repeated beta or seed names one run twice: counted twice in the progress, run once
    for key, values in [("betas", sweep.betas), ("seeds", sweep.seeds),
                        *((f"model_betas.{label}", items) for label, items in sweep.model_betas.items()),
                        *((f"model_seeds.{label}", items) for label, items in sweep.model_seeds.items())]:
        names = [float(v) for v in values] if "betas" in key else [int(v) for v in values]
        if len(set(names)) != len(names):
            raise ValueError(f"sweep {key} must not repeat a value, got {list(values)}")
    for key in ("model_overrides", "model_seeds", "model_betas"):
        unknown = sorted(set(getattr(sweep, key)) - set(sweep.models))
        if unknown:
            raise ValueError(f"sweep {key} name models not in the sweep: {unknown}")
    for key in ("model_seeds", "model_betas"):
        empty = sorted(label for label, values in getattr(sweep, key).items() if not values)
        if empty:
            raise ValueError(f"sweep {key} must not be empty, got none for {empty}")
    # what run_config sets after every override would silently win over them
    own = {"model.beta": "betas", "train.seed": "seeds", "name": "the run's label", "output_dir": "the sweep",
           "train.evaluate_at_end": "the sweep (it evaluates every run itself)",
           "model.name": "the run's label or its model_overrides"}
    for key, given in [("overrides", sweep.overrides), ("extra_overrides", sweep.extra_overrides),
                       *((f"model_overrides.{label}", items) for label, items in sweep.model_overrides.items())]:
        # (a label's own overrides may name its model: that is what they are for)
        refused = {name: owner for name, owner in own.items()
                   if not (key.startswith("model_overrides") and name == "model.name")}
        claimed = [item for item in given if item.partition("=")[0].strip() in refused]
        if claimed:
            setting = claimed[0].partition("=")[0].strip()
            raise ValueError(f"sweep {key} must not set {setting}, which is set by {own[setting]}, got {claimed}")
    for model, beta, seed in grid(sweep):  # every run's configuration is valid before anything trains
        run_config(sweep, model, beta, seed)
    return sweep


def grid(sweep: SweepConfig):
    """``(label, beta, seed)`` of every run: label by label, or (``breadth_first``) by the rank of the seed in the
    label's seeds first."""
    runs = [(model, beta, seed) for model in sweep.models for beta in sweep.model_betas.get(model, sweep.betas)
            for seed in sweep.model_seeds.get(model, sweep.seeds)]
    if sweep.breadth_first:
        rank = {(model, seed): sweep.model_seeds.get(model, sweep.seeds).index(seed) for model, _, seed in runs}
        runs.sort(key=lambda run: rank[run[0], run[2]])  # stable: labels and betas keep their order within a rank
    return runs


def run_name(model: str, beta: float, seed: int) -> str:
    """The folder name of the run labelled ``model`` at ``beta`` and ``seed`` (inside the sweep's folder)."""
    return f"{model}-beta{float(beta)}-seed{int(seed)}"


def run_config(sweep: SweepConfig, model: str, beta: float, seed: int):
    """The configuration of the run labelled ``model``: the label is the model's name unless its own overrides set
    ``model.name``."""
    own = sweep.model_overrides.get(model, [])
    return load_config(sweep.base, [*sweep.overrides, f"model.name={model}", *own, *sweep.extra_overrides,
                                    f"model.beta={beta}",
                                    f"train.seed={seed}", f"name={run_name(model, beta, seed)}",
                                    f"output_dir={Path(sweep.output_dir) / sweep.name}",
                                    "train.evaluate_at_end=false"])


#: written in a run's folder when its training diverged: later sweeps skip it (and the report says so)
DIVERGED = "diverged.txt"
#: the runs of the grid a summary found not finished, one per line (" (diverged)" after those that diverged)
UNFINISHED = "unfinished.txt"


def run_sweep(sweep: SweepConfig, show_progress: bool = True, *, train_only: bool = False,
              stop_after_minutes: float | None = None, summarise_only: bool = False) -> Path:
    """Train and evaluate every run of the grid that is neither finished nor claimed by another process; then
    write the summary of the runs finished so far (``results.csv``, ``report.md``, the figures). Returns its folder.

    Several processes may run the same sweep at once (say one per core, each with ``train.num_threads=1``): a
    process claims a run with a lock file beside it (``{run}.lock``, an advisory lock naming its process) and skips
    the runs others hold; the lock of a process that died is free. A run the wall-clock guard stopped short of its
    steps is not evaluated: the next sweep resumes it. A run whose training diverges gets ``diverged.txt`` (the
    error) and is skipped from then on, the others go on; the report lists it as diverged. ``train_only`` trains without
    evaluating (a later sweep evaluates); ``stop_after_minutes`` starts no new run after that many minutes (the run
    under way completes); ``summarise_only`` only writes the summary."""
    from tqdm import tqdm

    folder = Path(sweep.output_dir) / sweep.name
    folder.mkdir(parents=True, exist_ok=True)
    deadline = None if stop_after_minutes is None else time.monotonic() + 60 * stop_after_minutes
    configs = [run_config(sweep, *run) for run in grid(sweep)]
    _check_existing_runs(folder, configs)
    if not (train_only or summarise_only):
        check_weights_file(configs[0].eval)  # (the sweep's every run shares its eval settings)
    unreadable = []
    for config in tqdm([] if summarise_only else configs, desc=f"sweep {sweep.name}", unit="run",
                       disable=not show_progress):
        run_dir = folder / config.name
        try:
            if _finished(run_dir, config) or (train_only and _trained(run_dir, config)) or \
                    (run_dir / DIVERGED).exists():
                continue
            if deadline is not None and time.monotonic() > deadline:
                print(f"sweep {sweep.name}: {stop_after_minutes:g} minutes passed; starting no new run")
                break
            _train_and_evaluate(sweep, config, folder, train_only, show_progress)
        except UnreadableFile as error:  # the others go on; the summary lists this run as not finished
            unreadable.append(f"{config.name}: {error}")
    for line in unreadable:
        print(f"sweep {sweep.name}: skipped a run whose checkpoint cannot be read: {line}")
    return summarise(folder, [sweep])


def _train_and_evaluate(sweep: SweepConfig, config, folder: Path, train_only: bool, show_progress: bool) -> None:
    """Train (or resume) and evaluate one run of the grid, unless another process holds it."""
    from tqdm import tqdm

    run_dir = folder / config.name
    with claim(folder / f"{config.name}.lock") as claimed:
        if not claimed or _finished(run_dir, config) or (run_dir / DIVERGED).exists():  # changed as we looked
            return
        if not _trained(run_dir, config):
            try:
                train(config, resume=(run_dir / "checkpoint.pt").exists(), show_progress=show_progress)
            except RunFolderBusy as error:  # trained by hand meanwhile: a later sweep takes it up
                print(f"sweep {sweep.name}: skipped {config.name}: {error}")
                return
            except TrainingDiverged as error:
                # a rerun would diverge again at the same step: mark it, and go on with the other runs
                remove_orphaned_temporaries(run_dir, [DIVERGED])
                write_text(run_dir / DIVERGED, f"{error}\n")
                print(f"sweep {sweep.name}: {config.name} diverged and is skipped from now on (delete "
                      f"{run_dir / DIVERGED} to retry it): {error}")
                return
        if not _trained(run_dir, config):  # the wall-clock guard stopped it: a later sweep resumes it
            print(f"sweep {sweep.name}: {config.name} stopped short of its steps; not evaluated (the next sweep "
                  "resumes it)")
            return
        if not train_only:
            try:  # as the evaluate command: not while a train holds the folder
                with run_folder_lock(run_dir, "the next sweep evaluates it", "evaluated"):
                    _, trained = load_run(run_dir)
                    evaluate_run(run_dir, config, trained, progress=tqdm if show_progress else None)
            except RunFolderBusy as error:
                print(f"sweep {sweep.name}: skipped evaluating {config.name}: {error}")


def _check_existing_runs(folder: Path, configs) -> None:
    """A ``ValueError`` listing the runs of ``configs`` whose folder already holds a run of another configuration
    (its ``config.yaml``, or without one its checkpoint's; the settings a resumed run must share,
    ``train.configuration_differences``) or one trained past the budget ``config`` asks for, before any work:
    resuming it would fail half way through the sweep, and a finished one would report another configuration's
    results, or those of a longer training, as this sweep's."""
    stale = []
    for config in configs:
        run_dir = folder / config.name
        saved = run_dir / "config.yaml"
        if saved.exists():
            differences = configuration_differences(OmegaConf.to_container(OmegaConf.load(saved)), config)
        else:  # (a run folder copied without it; an unreadable checkpoint is reported where the run is trained)
            try:
                saved_config = _checkpoint_state(run_dir)[3]
            except UnreadableFile:
                saved_config = None
            differences = [] if saved_config is None else configuration_differences(saved_config, config)
        past = _past_budget(run_dir, config)
        if differences or past:
            stale.append(f"{config.name} ({'; '.join(differences + past)})")
    if stale:
        raise ValueError(f"{folder} holds runs of another configuration than this sweep's: {', '.join(stale)}; move "
                         "or delete those run folders, or give the sweep another name")


def _past_budget(run_dir: Path, config) -> list[str]:
    """How the run's checkpoint stands past the steps or epochs ``config`` asks for (none where it does not, has
    no checkpoint or one that cannot be read: that is reported where the run is trained or summarised)."""
    try:
        _, epoch, step = _checkpoint_status(run_dir)
    except UnreadableFile:
        return []
    if step is None:
        return []
    past = []
    if config.train.max_steps is not None and step > config.train.max_steps:
        past.append(f"trained to step {step}, past train.max_steps = {config.train.max_steps}")
    if epoch > config.train.epochs:
        past.append(f"trained for {epoch} epochs, past train.epochs = {config.train.epochs}")
    return past


def finished_runs(folder: Path, sweeps: list[SweepConfig]) -> tuple[list[dict], list[str]]:
    """The rows (``result_row``) of the finished runs of the union of the grids of ``sweeps``, variants of one study
    (the same ``name``, so the same folder), and the names of the others (" (diverged)" after those that
    diverged, " (unreadable checkpoint)" after those whose checkpoint cannot be read). A run folder of another
    configuration than its sweep's is a ``ValueError`` (``_check_existing_runs``): its results are not the
    sweep's."""
    names = sorted({sweep.name for sweep in sweeps})
    if len(names) != 1:
        raise ValueError(f"sweeps must be variants of one study (the same name) to be summarised together, got "
                         f"the names {names}")
    folder = Path(folder)
    runs = {}  # the first sweep naming a run gives its configuration (a study's variants share their runs' settings)
    for sweep in sweeps:
        for run in grid(sweep):
            runs.setdefault(run, run_config(sweep, *run))
    _check_existing_runs(folder, runs.values())
    rows, missing = [], []
    for (model, beta, seed), config in runs.items():
        run_dir = folder / config.name
        try:
            finished = _finished(run_dir, config)
        except UnreadableFile:
            missing.append(f"{run_dir.name} (unreadable checkpoint)")
            continue
        if finished:
            try:
                rows.append(result_row(run_dir, model, beta, seed))
            except (ValueError, KeyError, TypeError) as error:  # a damaged metrics.csv: named, the others go on
                missing.append(f"{run_dir.name} (unreadable metrics.csv: {error})")
        else:
            missing.append(run_dir.name + (" (diverged)" if (run_dir / DIVERGED).exists() else ""))
    return rows, missing


def summarise(folder: Path, sweeps: list[SweepConfig]) -> Path:
    """Write in ``folder`` the summary (``results.csv``, ``report.md``, the figures) of the finished runs of the
    union of the grids of ``sweeps`` (``finished_runs``); the report lists the runs not finished. Returns the
    folder."""
    with _summary_lock(folder):
        write_results(folder, *finished_runs(folder, sweeps))
    return Path(folder)


@contextlib.contextmanager
def _summary_lock(folder: Path):
    """Hold the sweep folder's summary lock (``summary.lock``, a blocking exclusive ``flock``) while a summary reads
    the runs and writes what it makes of them: two sweeps started by hand on one folder may finish together, and
    without it one that read the runs first could write its summary, without the other's last run, last. Removed
    by its holder, as the runs' locks are."""
    with claim(Path(folder) / "summary.lock", wait=True):
        yield


_PRESET_STEM = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


def table_name(preset: str) -> str:
    """The docs' table marker name of a sweep preset (a name or a YAML path): ``sweep_`` and its file name's stem
    with ``-`` as ``_``. The stem must be lower-case letters and digits joined by single hyphens, as the bundled
    presets' are, so that two presets never share a table (``a-b`` and ``a_b`` would)."""
    stem = Path(preset).stem
    if not _PRESET_STEM.fullmatch(stem):
        raise ValueError(f"a sweep whose table goes into the docs needs a preset file named in lower-case letters and "
                         f"digits joined by single hyphens (its table's marker is made from the name), got {stem!r} "
                         f"from {preset!r}")
    return "sweep_" + stem.replace("-", "_")


def splice_summary(page: Path, preset: str, sweep: SweepConfig, command: str) -> None:
    """Splice the summary table of ``sweep``'s finished runs (``summary_table``, as in its report.md) into the docs
    ``page``, between the markers of ``table_name(preset)``, with a first line saying when, at which commit and
    by which command it was written, and which runs of the grid had not finished."""
    import datetime

    folder = Path(sweep.output_dir) / sweep.name
    with _summary_lock(folder):  # the runs read and the page written as one step (sweeps of one folder, one page)
        rows, missing = finished_runs(folder, [sweep])
        if not rows:
            raise ValueError(f"sweep {sweep.name}: no run of the preset {preset!r} has finished in {folder}: nothing "
                             "to write into the docs")
        lines = [f"Written on {datetime.date.today().isoformat()} at commit {code_commit()} by `{command}` from the "
                 f"{len(rows)} finished run(s) of the preset in `{folder}`"
                 + (f"; not finished: {', '.join(missing)}" if missing else "")
                 + "; mean ± std over seeds, the value alone where one seed computed it.", ""]
        splice_file(page, table_name(preset), "\n".join(lines + summary_table(aggregate(rows))))


def run_workers(sweep: SweepConfig, workers: int, arguments: list[str], train_only: bool = False) -> int:
    """Run ``workers`` processes of ``python -m applications.multimodal_vae sweep *arguments`` on the same grid
    (they share it through the runs' locks; each writes ``worker-N.log`` in the sweep folder), show the runs done,
    then write the summary. Returns 0, or the first non-zero exit status of a worker (SIGINT or SIGTERM reaches
    every worker: each saves its run's checkpoint and stops; a SIGTERM to this process, or a SIGINT to it alone, is
    sent on to them as SIGTERM, which a worker already stopping on the terminal's SIGINT ignores)."""
    import signal
    import subprocess
    import sys

    from tqdm import tqdm

    folder = Path(sweep.output_dir) / sweep.name
    folder.mkdir(parents=True, exist_ok=True)
    configs = [run_config(sweep, *run) for run in grid(sweep)]
    _check_existing_runs(folder, configs)  # here, not in every worker's log
    load_dataset(configs[0])  # builds the offline PolyMNIST once, not in every worker
    command = [sys.executable, "-m", "applications.multimodal_vae", "sweep", *arguments]
    logs = [open(folder / f"worker-{n}.log", "a", encoding="utf-8") for n in range(workers)]
    processes = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    print(f"{workers} workers on sweep {sweep.name}; their logs: {folder}/worker-*.log")
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: [p.send_signal(signum) for p in processes])
    done = _trained if train_only else _finished
    try:
        with tqdm(total=len(configs), desc=f"sweep {sweep.name}", unit="run") as bar:
            while any(p.poll() is None for p in processes):
                time.sleep(5)
                bar.update(sum(_done_or_unreadable(done, folder / c.name, c) for c in configs) - bar.n)
    except KeyboardInterrupt:
        # Ctrl-C reached the workers too; a SIGINT sent to this process alone (kill -INT) did not, and the grid went
        # on to its end with exit status 0: they get a SIGTERM (ignored by one already stopping)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
    finally:
        statuses = [p.wait() for p in processes]
        signal.signal(signal.SIGTERM, previous)
        for log in logs:
            log.close()
    failed = [(n, status) for n, status in enumerate(statuses) if status]
    if failed:
        for n, status in failed:
            log = folder / f"worker-{n}.log"
            print(f"worker {n} exited with status {status}; the end of {log}:\n{_log_tail(log)}", file=sys.stderr)
        status = failed[0][1]
        return 128 - status if status < 0 else status  # killed by a signal: as a shell reports it (SIGKILL 137)
    print(f"sweep written to {run_sweep(sweep, summarise_only=True)}")
    return 0


def _log_tail(log: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a worker's log that are not progress bars (tqdm redraws with carriage
    returns): where its error is."""
    text = log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    kept = [line for line in text.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    return "\n".join(kept[-lines:])


def _finished(run_dir: Path, config) -> bool:
    """Whether the run is trained (``_trained``) and evaluated at its checkpoint with ``config``'s eval settings:
    its outputs (``RUN_OUTPUTS``) exist and ``metrics.json`` was computed at the checkpoint's step (an evaluation
    of a partly trained run, or a retrained run's old metrics, do not count) with ``config.eval``."""
    # the checkpoint first, whether or not the run was evaluated: a damaged one is named wherever it is asked about
    if not _trained(run_dir, config) or not all((run_dir / name).exists() for name in RUN_OUTPUTS):
        return False
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        # metrics from before they stored the step they were computed at (or their settings): those of the finished
        # checkpoint (with the settings of the sweep that evaluated them)
        training, settings = metrics.get("training"), metrics.get("eval")
        return (training is None or training["steps"] == _checkpoint_status(run_dir)[2]) and \
            (settings is None or settings == asdict(config.eval))
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        # damaged metrics (a truncated file stopped the whole sweep with a JSON error naming no file): the run is
        # evaluated again
        return False


def _trained(run_dir: Path, config) -> bool:
    """Whether the run's checkpoint finished training and stands at the epochs or steps ``config`` asks for. A
    run the wall-clock guard (``train.max_minutes``) stopped is not: a later sweep resumes it (with a guard, one
    more chunk of time); nor is one finished at fewer epochs or a lower ``max_steps`` than ``config``'s: it
    resumes to them."""
    finished, epoch, step = _checkpoint_status(run_dir)
    return finished and budget_reached(config.train, epoch, step)


def _checkpoint_status(run_dir: Path) -> tuple[bool, int | None, int | None]:
    """``(finished, epoch, step)`` of the run's checkpoint (``(False, None, None)`` without one); a run the
    wall-clock guard stopped is not finished."""
    return _checkpoint_state(run_dir)[:3]


def _checkpoint_state(run_dir: Path) -> tuple[bool, int | None, int | None, dict | None]:
    """``_checkpoint_status`` and the checkpoint's configuration (``None`` without one)."""
    checkpoint = run_dir / "checkpoint.pt"
    try:
        stat = checkpoint.stat()
    except FileNotFoundError:
        return False, None, None, None
    # memoised by inode, size and modification time: run_workers asks about every run every few seconds, and each answer
    # would otherwise load and checksum the whole checkpoint
    key = (str(checkpoint.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKPOINTS:
        state = load_checkpoint(checkpoint)
        finished = bool(state.get("finished", False)) and \
            not str(state.get("stopped_by") or "").startswith("train.max_minutes")
        _CHECKPOINTS[key] = (finished, state["epoch"], state["step"], state.get("config"))
    return _CHECKPOINTS[key]


_CHECKPOINTS: dict[tuple, tuple[bool, int, int, dict]] = {}


def _done_or_unreadable(done, run_dir: Path, config) -> bool:
    """``done(run_dir, config)`` for the progress monitor: a checkpoint it cannot read counts as not done (the
    worker training that run reports the error; the monitor must keep waiting for the workers rather than stop)."""
    try:
        return done(run_dir, config)
    except UnreadableFile:
        return False


def result_row(run_dir: Path, model: str, beta: float, seed: int) -> dict:
    """One row of ``results.csv`` (``FIELDS``) from a run folder's metrics.json and metrics.csv; a metric the run
    did not compute is ``None`` (an empty cell), a curve it did not compute ``{}``."""
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    with open(run_dir / "metrics.csv", encoding="utf-8") as handle:
        seconds = [float(row["seconds"]) for row in csv.DictReader(handle)]
    return {"model": model, "beta": beta, "seed": seed, **{column: read(metrics) for column, read in METRICS.items()},
            "seconds_per_batch": statistics.median(seconds[1:] or seconds),
            **{column: json.dumps(read(metrics) or {}) for column, read in CURVES.items()}}


def _is_value(value) -> bool:
    """Whether a run computed this metric (not None or NaN)."""
    return value is not None and value == value


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation of the values that were computed; NaN for none, and NaN for the deviation
    of one value (its spread over seeds is unknown, not 0: a plot draws no error bar for it, and a table shows the
    mean alone). An infinite value (a metric that overflowed) makes the mean infinite (NaN for both signs) and the
    deviation NaN."""
    values = [v for v in values if _is_value(v)]
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1 or not all(math.isfinite(v) for v in values):  # (statistics' exact arithmetic raises on
        # infinities)
        return sum(values) / len(values), float("nan")
    return statistics.mean(values), statistics.stdev(values)


def aggregate(rows: list[dict]) -> dict:
    """``(model, beta) -> {metric: (mean, std)}`` over seeds, including per-input-count curves, with ``seeds`` (the
    runs) and ``computed`` (``metric -> `` the runs that computed it)."""
    groups = {}
    for row in rows:
        groups.setdefault((row["model"], row["beta"]), []).append(row)
    summary = {}
    for key, members in groups.items():
        # (m.get: a results.csv written before a column was added lacks it)
        entry = {f: mean_std([m.get(f) for m in members]) for f in SCALARS}
        for curve in CURVES:
            per_run = [json.loads(m[curve]) for m in members]
            sizes = sorted({k for run in per_run for k in run}, key=int)
            entry[curve] = {int(k): mean_std([run[k] for run in per_run if k in run]) for k in sizes}
        entry["seeds"] = len(members)
        entry["computed"] = {f: sum(_is_value(m.get(f)) for m in members) for f in SCALARS}
        summary[key] = entry
    return summary


def pareto_front(points: list[tuple[float, float]], maximise_y: bool) -> list[int]:
    """Indices of the points not dominated (x = coherence, maximised; y maximised or minimised), sorted by x."""
    sign = 1 if maximise_y else -1
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 >= x and sign * y2 >= sign * y and (x2, y2) != (x, y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def write_results(folder: Path, rows: list[dict], missing=()) -> None:
    """``results.csv``, the figures and ``report.md`` of the finished runs ``rows``; ``missing`` names the runs of
    the grid not finished yet (the report lists them). The temporary files of a summary killed while writing are
    removed first."""
    remove_orphaned_temporaries(folder, ["results.csv", UNFINISHED, "report.md", *temporary_targets(folder, "*.png")])
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(folder / "results.csv", out.getvalue())
    write_text(folder / UNFINISHED, "".join(f"{name}\n" for name in missing))
    summary = aggregate(rows)
    figures = plot(folder, summary)
    write_text(folder / "report.md", render(summary, figures, folder, missing))


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def _computed(summary: dict, keys, metric: str) -> bool:
    """Whether some run of one of ``keys`` computed ``metric``."""
    return any(summary[k]["computed"][metric] for k in keys)


def plot(folder: Path, summary: dict) -> list[str]:
    """The figures (PNG files in ``folder``; their names are returned); a metric that no run computed is left
    out, and a figure left with nothing to show is not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(summary)
    models = sorted({m for m, _ in keys})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(models)}
    written = []
    for metric, label, maximise in (("fid_unconditional", "FID (unconditional, lower is better)", False),
                                    ("log_likelihood", "log p(X) (higher is better)", True)):
        shown = [k for k in keys if all(summary[k][f][0] == summary[k][f][0] for f in ("coherence", metric))]
        if not shown:
            continue
        points = [(summary[k]["coherence"][0], summary[k][metric][0]) for k in shown]
        figure, axis = plt.subplots(figsize=(5, 4))
        for k, (x, y) in zip(shown, points):
            axis.errorbar(x, y, xerr=summary[k]["coherence"][1], yerr=summary[k][metric][1], fmt="o",
                          color=colours[k[0]], label=k[0])
            axis.annotate(f"β={k[1]:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(points, maximise)
        axis.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=1, label="Pareto front")
        handles = dict(zip(*reversed(axis.get_legend_handles_labels())))
        axis.legend(handles.values(), handles.keys(), fontsize=7)
        axis.set(xlabel="conditional coherence", ylabel=label)
        name = f"coherence_vs_{metric}.png"
        _save(figure, folder / name)
        plt.close(figure)
        written.append(name)
    metrics = [(metric, label) for metric, label in (("coherence", "conditional coherence"),
                                                     ("log_likelihood", "log p(X)"), ("probe_all", "probe (all)"),
                                                     ("fid_unconditional", "FID"))
               if _computed(summary, keys, metric)]
    if metrics:
        figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
        for axis, (metric, label) in zip(axes[0], metrics):
            for model in models:
                betas = sorted(b for m, b in keys if m == model)
                values = [summary[(model, b)][metric] for b in betas]
                axis.errorbar(betas, [v[0] for v in values], yerr=[v[1] for v in values], marker="o", label=model,
                              color=colours[model], capsize=2)
            axis.set(xlabel="β", ylabel=label)
        axes[0, 0].legend(fontsize=7)
        _save(figure, folder / "metrics_vs_beta.png")
        plt.close(figure)
        written.append("metrics_vs_beta.png")
    curves = [(curve, label) for curve, label in (("coherence_by_inputs", "conditional coherence"),
                                                  ("fid_by_inputs", "conditional FID"))
              if any(summary[k][curve] for k in keys)]
    if curves:
        figure, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.5), squeeze=False)
        for axis, (curve, label) in zip(axes[0], curves):
            for model in models:
                beta = max(b for m, b in keys if m == model)
                points = summary[(model, beta)][curve]
                if points:
                    sizes = sorted(points)
                    axis.errorbar(sizes, [points[s][0] for s in sizes], yerr=[points[s][1] for s in sizes],
                                  marker="o", label=f"{model} (β={beta:g})", color=colours[model], capsize=2)
            axis.set(xlabel="number of input modalities", ylabel=label)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
        _save(figure, folder / "synergy.png")
        plt.close(figure)
        written.append("synergy.png")
    return written


def number_format(metric: str, mean: float) -> str:
    """The format of a metric's mean and std in the tables: masses fall to 1e-30 and below, and keep their size."""
    if metric in ("pairwise_mass", "own_cross_mass") and 0 < abs(mean) < 1e-2:
        return ".1e"
    return ".3f" if abs(mean) < 10 else ".1f"


def mean_std_text(mean: float, std: float, seeds: int, form: str) -> str:
    """``mean ± std`` over ``seeds`` runs; the mean alone for one run (its spread over seeds is unknown, not 0)."""
    return f"{mean:{form}}" if seeds == 1 else f"{mean:{form}} ± {std:{form}}"


#: a cell whose runs computed the metric but whose mean is NaN (seeds that overflowed to +inf and to -inf)
NOT_FINITE = "not finite"

#: columns whose cell is the mean over seeds alone: each run's own error of a metric, not a metric to spread
PER_RUN_ERRORS = ("kid_unconditional_standard_error",)


def _cell(metric: str, value, computed: int, seeds: int) -> str:
    """A table cell: the mean ± std over the ``computed`` of ``seeds`` runs that computed ``metric``, with that
    count where some runs lack it; a per-run error as its mean (one decimal: an error's own precision)."""
    mean, std = value
    if mean != mean:
        return NOT_FINITE if computed else "–"
    if metric in PER_RUN_ERRORS:
        return f"{mean:.1f}" + ("" if computed == seeds else f" ({computed} of {seeds} runs)")
    return mean_std_text(mean, std, computed, number_format(metric, mean)) + (f" ({computed})" if computed < seeds
                                                                              else "")


def summary_table(summary: dict) -> list[str]:
    """The lines of the summary's tables: every (label, beta) with its mean ± std over seeds, then the seconds per
    training batch of every label."""
    columns = [("coherence", "coherence (all subsets)"), ("cross_coherence", "one input"),
               ("self_coherence", "self (one input)"),
               ("unconditional_coherence", "unconditional"), ("log_likelihood", "log p(X)"),
               ("conditional_log_likelihood", "plug-in log p(X_rest \\| x_m)"), ("probe_all", "probe (all)"),
               ("probe_private", "probe (private w)"),
               ("fid_unconditional", "FID"), ("kid_unconditional", "KID x 1000"),
               ("kid_unconditional_standard_error", "KID s.e. x 1000"), ("pairwise_mass", "pairwise mass")]
    # KID in the units the papers and torch-fidelity print
    scale = {"kid_unconditional": 1000, "kid_unconditional_standard_error": 1000}
    lines = ["| model | β | seeds | " + " | ".join(c for _, c in columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for key in sorted(summary):
        entry = summary[key]
        lines.append(f"| {key[0]} | {key[1]:g} | {entry['seeds']} | " + " | ".join(
            _cell(f, tuple(scale.get(f, 1) * v for v in entry[f]), entry["computed"][f], entry["seeds"])
            for f, _ in columns) + " |")
    missing = [label for f, label in columns
               if f not in ("probe_private", *PER_RUN_ERRORS) and not _computed(summary, summary, f)]
    if missing:
        lines += ["", f"Not computed by any run (–): {', '.join(missing)}; coherence and the latent probe need class "
                  "labels, FID image modalities and eval.fid_samples > 0 (each run's metrics.json says which)."]
    lines += ["", "probe (private w): the latent probe on the modality-specific latents, mean over modalities (models "
              "with model.private_dim > 0 only; low is good: the private latents hold no label)."]
    if _computed(summary, summary, "kid_unconditional"):
        lines += ["", "KID s.e.: each run's jackknife standard error of its KID over the test tuples (the mean over the "
                  "runs that have it, not a spread; none below 3 or above 1 000 FID samples, nor for runs evaluated "
                  "before it was computed: `evaluate --run RUN --only fid` adds it)."]
    timing = {}
    for (model, _), entry in summary.items():
        timing.setdefault(model, []).append(entry["seconds_per_batch"][0])
    lines += ["", "Seconds per training batch (median of the logged step times, same device, one sweep):", "",
              "| model | s / batch |", "|---|---|"]
    lines += [f"| {model} | {statistics.median(values):.4f} |" for model, values in sorted(timing.items())]
    return lines


def render(summary: dict, figures: list[str], folder: Path, missing=()) -> str:
    lines = [f"# Sweep `{folder.name}`", "", "Mean ± std over seeds (the value alone where one seed computed it; "
             "(n): the n seeds that computed it, where fewer than the row's); every metric as defined in "
             "`applications/multimodal_vae/evaluation/` (see each run's report.md for its protocol).", ""]
    if missing:
        lines += [f"**Partial**: {len(missing)} run(s) of the grid not finished yet (rerun the sweep to continue): "
                  + ", ".join(missing) + ".", ""]
    lines += summary_table(summary)
    lines += [""] + [f"![{name}]({name})" for name in figures] + [""]
    return "\n".join(lines)
