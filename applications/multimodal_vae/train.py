"""Training: one loop for every model, with atomic checkpoints, exact resume and a NaN stop.

A run lives in ``{output_dir}/{name}/``: ``config.yaml`` (the resolved configuration), ``checkpoint.pt``,
``metrics.csv`` (one row per optimiser step), ``samples.png`` (inputs, their reconstructions from all modalities,
and every modality generated from the first modality alone) and ``tensorboard/`` (the same scalars and grids).
Every file is written to a temporary file, flushed to the disk and renamed; at each save the logs are written
first and the checkpoint last (it is the commit point: a resumed run drops the log rows past its step), so a kill
at any moment loses no row and leaves no half-written file (temporaries of killed processes are removed at the next
start). A checkpoint stores the model, the optimiser, the RNG states and the position in the epoch as plain
tensors, numbers and strings (loaded with ``weights_only=True``: loading never runs code) with a SHA-256 of its
contents, checked on load; the data order of an epoch is a function of (seed, epoch), so a resumed run continues
exactly where an uninterrupted one would be. A run folder can be moved or renamed and resumed from its new place.

Divergence: the loss, the gradients and the parameters after each step are checked to be finite; a non-finite one
stops training (``TrainingDiverged``) before any weights are written, and ``RunWriter.save`` refuses
non-finite weights.
SIGINT and SIGTERM stop training at the next step boundary after a checkpoint (``TrainingInterrupted``); a
second SIGINT stops at once.

Distributed data parallel: started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), every process takes
an equal share of each batch (NCCL on GPUs, gloo on the CPU), gradients are averaged, only rank 0 writes, and
the replicas are checked to be bitwise identical at the end. Each rank draws its own noise, seeded by (seed,
rank, step), so a distributed run resumes deterministically but not onto the stream of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Config, load_config, to_yaml
from .data import Modality, MultimodalDataset, load_dataset, modality_mask, polymnist_modalities, subset_mask
from .data.text import ALPHABET, decode_characters, decode_words
from .evaluation import EVALUATION_FILES, evaluate_run, pooling_diagnostics, training_notice
from .evaluation.fid import check_weights_file
from .files import UnreadableFile, atomic_write, claim, load_checked, remove_orphaned_temporaries, save_checked, write_text
from .models import MultimodalVAE, evaluating
from .networks import make_networks

__all__ = ["DIVERGED_LOG", "METRIC_FIELDS", "POOLING_FIELDS", "RESUMABLE_CHANGES", "RUN_FILES", "RUN_LOCK",
           "RunFolderBusy", "RunWriter", "SCALARS", "StopConditions", "TrainingDiverged", "TrainingInterrupted",
           "budget_reached", "configuration_differences", "epoch_order", "load_checkpoint", "load_run", "make_model",
           "render_text", "resolve_device", "run_folder_lock", "sample_grid", "setting_differences", "shared_settings",
           "summary_line", "train", "with_defaults"]

METRIC_FIELDS = ("epoch", "step", "loss", "reconstruction", "kl", "seconds")
SCALARS = ("loss", "reconstruction", "kl")
#: pooling diagnostics at every checkpoint (see ``evaluation.pooling_diagnostics``)
POOLING_FIELDS = ("epoch", "step", "mean_log_bhattacharyya", "pairwise_mass", "own_cross_mass")
#: the loss rows of a run up to its divergence (``RunWriter.keep_diverged_log``)
DIVERGED_LOG = "metrics.diverged.csv"
#: the lock a run folder holds while a process trains it (its holder's pid and host; removed by it)
RUN_LOCK = "train.lock"
#: the files ``train`` writes in a run folder (and ``evaluate`` beside them), whose orphaned temporaries it removes
RUN_FILES = ("checkpoint.pt", "config.yaml", "metrics.csv", "pooling.csv", "samples.png", "samples.txt", DIVERGED_LOG,
             *EVALUATION_FILES)


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock (``RUN_LOCK``): it is training or evaluating the run."""


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or a parameter became NaN or infinite; no weights were written after it."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training (after a checkpoint when it came during the training loop)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available")
    return torch.device(name)


def make_model(config: Config, modalities) -> MultimodalVAE:
    """The model of ``config`` for ``modalities`` (a ``data.Modality`` each, from the dataset)."""
    model = config.model
    encoders, decoders = make_networks(modalities, model.latent_dim + model.private_dim, model.architecture,
                                       model.activation, model.hidden, model.private_dim)
    return MultimodalVAE(encoders, decoders, model.name, beta=model.beta, alpha=model.alpha,
                         learnable_weights=model.learnable_weights, modalities=modalities,
                         num_samples=model.num_samples, estimator=model.estimator, likelihood=model.likelihood,
                         likelihood_scale=model.likelihood_scale, private_dim=model.private_dim,
                         latent_dim=model.latent_dim, posterior_scale=model.posterior_scale,
                         private_kl_weights=model.private_kl_weights, latent_family=model.latent_family,
                         normal_prior_weight=model.normal_prior_weight)


def _start_replicas(device: torch.device) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; joins the process group when launched by ``torchrun``."""
    if _launch_variable("WORLD_SIZE") == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _check_replicas_identical(model: torch.nn.Module, rank: int) -> None:
    flat = torch.cat([t.detach().reshape(-1).double() for t in model.state_dict().values()])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    if not torch.equal(flat, reference):
        raise RuntimeError(f"replica {rank} differs from replica 0 after training "
                           f"(max |difference| {float((flat - reference).abs().max()):.3g})")


#: the training settings a resumed run may change: its budget, and what it logs and how often it checkpoints.
#: num_threads is one of them (a sweep switched to one thread per worker resumes), but a run resumed with another
#: thread count or on another device continues with other rounding: only the same ones give the uninterrupted
#: run's numbers bit for bit (on the CPU; CUDA kernels are not deterministic)
RESUMABLE_CHANGES = ("epochs", "max_steps", "max_minutes", "evaluate_at_end", "tensorboard", "checkpoint_every",
                     "diagnostics_every", "num_threads")


def shared_settings(config: dict) -> dict:
    """The settings a resumed run must share with its checkpoint (not ``RESUMABLE_CHANGES``, its evaluation, or
    where its folder is: a moved or renamed run folder resumes)."""
    train = {k: v for k, v in config["train"].items() if k not in RESUMABLE_CHANGES}
    return {**{k: v for k, v in config.items() if k not in ("eval", "output_dir", "name")}, "train": train}


def budget_reached(settings, epoch: int, step: int) -> bool:
    """Whether a run standing at ``epoch`` (the epochs it finished) and ``step`` has taken the steps the training
    ``settings`` (a config's ``train``) ask for: its epochs, or its ``max_steps``."""
    return (settings.max_steps is not None and step >= settings.max_steps) or epoch >= settings.epochs


def configuration_differences(saved: dict, config: Config) -> list[str]:
    """``key: saved X, now Y`` for every setting in which ``config`` differs from a run's ``saved`` configuration
    (a nested dict, as a checkpoint or ``config.yaml`` holds it) and which a resumed run must share with it; an
    option added after ``saved`` was written counts as the default it ran with."""
    saved = with_defaults(saved, asdict(Config()))
    return [f"{key}: saved {old!r}, now {new!r}"
            for key, old, new in setting_differences(shared_settings(saved), shared_settings(asdict(config)))]


class _Missing:
    def __repr__(self) -> str:
        return "(missing)"


_MISSING = _Missing()


def setting_differences(first, second, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, first's value, second's value)`` for every key whose value differs between two nested dicts
    (a value one lacks shows as ``(missing)``), in key order."""
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return [] if first == second else [(prefix, first, second)]
    found = []
    for key in sorted(first.keys() | second.keys(), key=str):
        found += setting_differences(first.get(key, _MISSING), second.get(key, _MISSING),
                                     f"{prefix}.{key}" if prefix else str(key))
    return found


def with_defaults(saved, defaults):
    """``saved`` (a nested dict) with the keys it lacks taken from ``defaults``."""
    if not (isinstance(saved, dict) and isinstance(defaults, dict)):
        return saved
    return {**defaults, **{key: with_defaults(value, defaults.get(key)) for key, value in saved.items()}}


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path`` on the CPU, loaded without running code and checked (its SHA-256 when it holds
    one, finite values, the keys a checkpoint has); an ``UnreadableFile`` naming it and saying what to do."""
    advice = (f"; it cannot be resumed or evaluated: restore an intact copy of it, or remove {path} and train the run "
              "again")
    try:
        state = load_checked(path, map_location="cpu")
    except UnreadableFile as error:
        raise UnreadableFile(f"{error}{advice}") from None
    missing = [k for k in ("model", "optimizer", "rng", "epoch", "position", "step", "config") if k not in state]
    if missing or not isinstance(state["model"], dict):
        raise UnreadableFile(f"{path} is not a training checkpoint (missing {missing}){advice}")
    return state


def _describe(value) -> str:
    return f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def _restore_model(model: torch.nn.Module, saved: dict, path: Path) -> None:
    """Load ``saved`` into ``model`` after checking that it holds every tensor with its shape and dtype (checkpoints
    from before checksums are checked by this and by finiteness only)."""
    expected = model.state_dict()
    problems = [f"{k}: missing" for k in expected if k not in saved]
    problems += [f"{k}: unexpected" for k in saved if k not in expected]
    problems += [f"{k}: saved {_describe(v)}, model {_describe(expected[k])}" for k, v in saved.items()
                 if k in expected and _describe(v) != _describe(expected[k])]
    if problems:
        raise UnreadableFile(f"{path} does not fit the model of its configuration ({'; '.join(problems[:5])}"
                             f"{'; ...' if len(problems) > 5 else ''})")
    model.load_state_dict(saved)


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _read_csv(path: Path, up_to_step: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if int(row["step"]) <= up_to_step]


def _write_csv(path: Path, rows: list[dict], fields) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, out.getvalue())


@torch.no_grad()
def sample_grid(model: MultimodalVAE, x, modalities, path: Path) -> torch.Tensor:
    """For up to 8 tuples ``x``: the inputs of every modality, their reconstructions from all modalities (posterior
    mean), then every modality generated from modality 0 alone (modality-specific latents: posterior means for
    the given modalities, prior draws for the others). Images go into a PNG grid (one block of rows each,
    padded to a common size; its ``(H, W, 3)`` array is returned), texts into ``samples.txt`` beside it."""
    from PIL import Image

    x = [t[:8] for t in x]
    outputs = [x]
    m = model.num_modalities
    # the draws (prior samples of modality-specific latents) leave the training RNGs as they were, so that a run
    # resumed from this checkpoint continues as the uninterrupted run does
    x_device = x[0].device
    with torch.random.fork_rng(devices=[x_device] if x_device.type == "cuda" else []), evaluating(model):
        shared_mu, shared_logvar, private = model.encode_with_private(x)
        for present in (torch.ones(m, x[0].shape[0], dtype=torch.bool, device=x[0].device),
                        subset_mask((0,), m, x[0].shape[0], x[0].device)):
            mu = model.conditional_posterior(shared_mu, shared_logvar, present).mean
            # a given modality's private latent at its posterior mean, the others' drawn from the prior
            outputs.append([model.decode(mu, t, present, private, sample=False).float() for t in range(m)])
    images = [m for m, modality in enumerate(modalities) if not modality.is_text]
    height = max([modalities[m].shape[1] for m in images], default=0)
    width = max([modalities[m].shape[2] for m in images], default=0)
    rows = [torch.nn.functional.pad(block[m].clamp(0, 1).expand(-1, 3, -1, -1),
                                    (0, width - modalities[m].shape[2], 0, height - modalities[m].shape[1]))
            for block in outputs for m in images]
    grid = torch.zeros(0, 0, 3)
    if rows:
        stacked = torch.stack(rows).cpu()  # (rows, B, 3, H, W)
        grid = stacked.permute(0, 3, 1, 4, 2).reshape(stacked.shape[0] * height, stacked.shape[1] * width, 3)
        image = Image.fromarray((grid.numpy() * 255).round().astype("uint8"))
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    texts = [m for m, modality in enumerate(modalities) if modality.is_text]
    if texts:
        lines = []
        for m in texts:
            titles = ("input", "reconstruction", f"from {modalities[0].name}")
            for title, block, is_input in zip(titles, outputs, (True, False, False)):
                ids = block[m] if is_input else block[m].argmax(-1)
                lines += [f"{modalities[m].name} {title}: {render_text(row, modalities[m])}" for row in ids]
        write_text(path.with_suffix(".txt"), "\n".join(lines) + "\n")
    return grid


def render_text(ids: torch.Tensor, modality: Modality) -> str:
    return decode_characters(ids) if modality.vocabulary == ALPHABET else decode_words(ids, modality.vocabulary)


def train(config: Config, resume: bool = False, show_progress: bool = True) -> Path:
    """Train ``config``; returns the run folder. ``resume=True`` continues from its checkpoint. One process trains
    a run folder at a time (with replicas, their first holds its lock, ``RUN_LOCK``)."""
    run_dir = Path(config.output_dir) / config.name
    checkpoint_path = run_dir / "checkpoint.pt"
    _check_start(checkpoint_path, resume)
    if config.train.evaluate_at_end:
        check_weights_file(config.eval)
    world = _launch_variable("WORLD_SIZE")
    if config.train.batch_size % world:
        raise ValueError(f"train.batch_size {config.train.batch_size} must be a multiple of the {world} processes")
    created = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]  # the deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with run_folder_lock(run_dir, "wait for it or stop it, then continue the run with --resume") \
                if _launch_variable("RANK", 0) == 0 else contextlib.nullcontext():
            _check_start(checkpoint_path, resume)  # again: another may have saved its first checkpoint meanwhile
            # the checkpoint and its configuration checked before any data is built or loaded
            state = _resumable_state(checkpoint_path, config) if resume else None
            return _train_replicas(config, run_dir, state, show_progress, world)
    except BaseException:
        for folder in created:  # refused before writing anything: no trace of the run (rmdir keeps a folder in use)
            try:
                folder.rmdir()
            except OSError:
                break
        raise


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, advice: str, purpose: str = "trained"):
    """Hold the run folder's lock (``RUN_LOCK``) while the run is ``purpose`` ("trained" or "evaluated");
    ``RunFolderBusy``, naming the holder and what it does and ending with ``advice``, where another process holds
    it."""
    lock = Path(run_dir) / RUN_LOCK
    with claim(lock, purpose=purpose) as held:
        if not held:
            try:
                holder, _, theirs = lock.read_text(encoding="utf-8").strip().partition("\n")
            except FileNotFoundError:  # released as we looked
                holder, theirs = "unknown", ""
            raise RunFolderBusy(f"{run_dir} is being {theirs.strip() or 'used'} by another process (pid and host: "
                                f"{holder}); {advice}")
        yield


def _check_start(checkpoint_path: Path, resume: bool) -> None:
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(f"{checkpoint_path.parent} already holds a run; pass --resume to continue it or choose "
                              "another name")
    if resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")


def _launch_variable(name: str, default: int = 1) -> int:
    """The integer environment variable ``name`` that ``torchrun`` sets (``default`` without it)."""
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable {name} must be an integer (torchrun sets it), got {value!r}") \
            from None


def _train_replicas(config: Config, run_dir: Path, state: dict | None, show_progress: bool, world: int) -> Path:
    from tqdm import tqdm

    threads = torch.get_num_threads()
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    rank, world, device = _start_replicas(resolve_device(config.train.device))
    try:
        with _stop_requests() as requests, _denormals_flushed(device):
            result = _train(config, run_dir, state, show_progress and rank == 0, rank, world, device, tqdm, requests)
    except BaseException as error:
        if world > 1:
            if isinstance(error, TrainingInterrupted):
                # a signal stops every replica at the same step: they meet before the teardown, as a finished run's
                # do (torn down at once, one replica aborted at exit now and then, "terminate called without an
                # active exception"); bounded, for a second signal that stopped one replica alone
                with contextlib.suppress(RuntimeError):
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
            dist.destroy_process_group()
        raise
    finally:  # the next run of a sweep process starts from the process's own setting
        torch.set_num_threads(threads)
    if world > 1:
        # every replica past its last collective before any tears gloo down: a replica that tore down while the
        # other was still in its final steps made that one abort at exit, rarely ("terminate called without an
        # active exception")
        dist.barrier()
        dist.destroy_process_group()
    return result


class _StopRequests:
    """SIGINT and SIGTERM during training. While ``deferred`` (the training loop), the first one is recorded in
    ``signum`` and the loop stops at the next step boundary after a checkpoint; otherwise, and for a second SIGINT,
    ``TrainingInterrupted`` is raised at once (nothing is lost: every file is written atomically)."""

    def __init__(self):
        self.signum = None
        self.deferred = False

    def handle(self, signum, frame):
        if self.deferred and self.signum is None:
            self.signum = signum
            print(f"{signal.Signals(signum).name}: stopping after this step and a checkpoint (SIGINT again to stop "
                  "at once)", flush=True)
            return
        if self.deferred and signum != signal.SIGINT:
            return  # already stopping
        raise TrainingInterrupted(f"{signal.Signals(signum).name}: training stopped at once; the run folder keeps "
                                  "its last checkpoint, if any", signum)


def _denormals_are_flushed() -> bool:
    """Whether the CPU flushes subnormal numbers to zero now (``torch.set_flush_denormal`` has no getter)."""
    return float(torch.tensor([1e-310], dtype=torch.float64) * 1.0) == 0.0


@contextlib.contextmanager
def _denormals_flushed(device: torch.device, flushed: bool = True):
    """Subnormal numbers flushed to zero on the CPU while training, the previous mode restored after: once values in
    the backward pass fell below the smallest normal float32 (1.2e-38), it took several times as long
    (docs/benchmarks.md). The pools keep their scaled quantities within the normal range and work in log space, so
    training loses nothing it uses; the mode is restored because the library's float64 numerics rely on gradual
    underflow elsewhere in the same process. ``flushed=False``: gradual underflow inside training's mode, for the
    evaluation at its end (likelihoods and pooling diagnostics use those numerics)."""
    if device.type != "cpu":
        yield
        return
    previous = _denormals_are_flushed()
    torch.set_flush_denormal(flushed)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


@contextlib.contextmanager
def _stop_requests():
    requests = _StopRequests()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield requests
        return
    # a signal ignored by whoever started us (SIGINT for a background job of a script) stays ignored
    previous = {s: signal.signal(s, requests.handle) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield requests
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _train(config, run_dir, state, show_progress, rank, world, device, tqdm, requests) -> Path:
    resume = state is not None
    writes = rank == 0
    if writes:  # what a killed run left
        remove_orphaned_temporaries(run_dir, RUN_FILES)
    batch_size = config.train.batch_size
    data = load_dataset(config).to(device)
    probe = config.eval.probe_examples
    if config.train.evaluate_at_end and data.num_classes is not None and probe != -1 and probe > len(data):
        # (the probe draws from the whole training split; found short only after training, the run was left
        # unevaluated)
        raise ValueError(f"eval.probe_examples={probe} is more than the {len(data)} training tuples of "
                         f"{config.data.dataset} at {config.data.root} the latent probe draws from: set it to at "
                         "most that, or -1 (all)")
    n = len(data) if config.data.train_subset is None else config.data.train_subset
    if n > len(data):
        raise ValueError(f"data.train_subset={n} is more than the {len(data)} training tuples of "
                         f"{config.data.dataset} at {config.data.root}")
    data = data.choose(n)  # not the first n: some datasets are stored class by class
    # distributed: every batch is complete, so each process takes an equal share
    batches_per_epoch = n // batch_size if world > 1 else math.ceil(n / batch_size)
    if batches_per_epoch == 0:
        raise ValueError(f"train.batch_size={batch_size} is more than the {n} training tuples: with {world} replicas "
                         "every batch must be complete, so there would be no step")
    torch.manual_seed(config.train.seed)
    model = make_model(config, data.modalities).to(device)
    if config.train.compile:
        for net in (*model.encoders, *model.decoders):
            net.compile()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    epoch, position, step = _restore(state, run_dir / "checkpoint.pt", model, optimizer) if resume else (0, 0, 0)
    network = _replicate(model, config.train.seed, step, rank, world)
    run = RunWriter(run_dir, config, data, resume, step, writes, world)
    stops = StopConditions(config.train, batches_per_epoch, requests, world, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.train.precision == "bf16")
    # a run resumed at its max_steps (a signal stopped it after its last step), or resumed with train.epochs
    # lowered to where it stands or below, takes no further step: it is finished
    stop = budget_reached(config.train, epoch, step)
    if stop:
        run.save(model, optimizer, epoch, position, step, stops.planned, stops.stopped_by, finished=True)
    requests.deferred = True
    model.train()
    # one bar over the planned steps, so that its estimate is the time left for the whole training
    bar = tqdm(total=stops.planned, initial=step, unit="step", disable=not show_progress)
    try:
        while epoch < config.train.epochs and not stop:
            order = epoch_order(n, config.train.seed, epoch)
            bar.set_description(f"epoch {epoch + 1}/{math.ceil(stops.planned / max(batches_per_epoch, 1))}")
            for b in range(position, batches_per_epoch):
                where = f"at step {step + 1} (epoch {epoch + 1}, batch {b + 1})"
                x = data.gather(order[b * batch_size:(b + 1) * batch_size][rank::world].to(device))
                batch = x[0].shape[0]
                present = modality_mask(batch, model.num_modalities, config.data.drop_rate).to(device)
                tic = time.perf_counter()
                kl_weight = kl_warmup_weight(step + 1, config.train.kl_warmup_epochs * batches_per_epoch)
                scalars, bad_parameters = _step(network, model, optimizer, x, present, kl_weight, autocast, world,
                                                where, run)
                step, position = step + 1, b + 1
                bar.update()
                seconds = time.perf_counter() - tic
                speed = batch * world / seconds  # samples per second, all replicas together
                run.log_step(epoch + 1, step, scalars, seconds, speed)
                bar.set_postfix(loss=f"{scalars[0]:.1f}", samples_per_s=f"{speed:.0f}")
                over_time, signum, bad_parameters = stops.agree(bad_parameters)
                if bad_parameters:
                    raise TrainingDiverged(f"non-finite parameters or optimiser state after the optimiser step {where} "
                                           f"(loss {scalars[0]:.6g}; is train.lr {config.train.lr:g} too large?); no "
                                           f"weights were written; last good checkpoint: {run.last_good()}")
                # after the parameters' check: diagnostics of non-finite weights would fail on their encodings
                if config.train.diagnostics_every and step % config.train.diagnostics_every == 0:
                    run.log_pooling(model, epoch + 1, step)
                if stops.reached(step, over_time, signum):
                    stop = True
                    break
            if position == batches_per_epoch:
                epoch, position = epoch + 1, 0
            scheduled = position == 0 and (epoch % config.train.checkpoint_every == 0 or epoch == config.train.epochs)
            if stop or scheduled:
                # a run stopped by a signal is not finished: a sweep resumes it; its diagnostics wait for the
                # steps an uninterrupted run logs them at (a resumed run's pooling.csv had a row at the signal's step)
                run.save(model, optimizer, epoch, position, step, stops.planned, stops.stopped_by,
                         finished=(stop and requests.signum is None) or epoch == config.train.epochs,
                         diagnostics=scheduled or requests.signum is None)
    except TrainingDiverged:
        run.keep_diverged_log()
        raise
    except BaseException:
        run.close()
        raise
    requests.deferred = False
    bar.close()
    notice = training_notice({"steps": step, "planned_steps": stops.planned, "stopped_by": stops.stopped_by})
    if notice and writes and requests.signum is None:
        print(f"warning: {notice}")
    if world > 1:
        _check_replicas_identical(model, rank)
    run.close()
    if requests.signum is not None:
        name = signal.Signals(requests.signum).name
        raise TrainingInterrupted(f"{name}: training stopped after step {step}; {run.checkpoint_path} holds it",
                                  requests.signum)
    if config.train.evaluate_at_end and writes:
        with _denormals_flushed(device, flushed=False):  # as `evaluate --run` evaluates the checkpoint
            result = evaluate_run(run_dir, config, model, progress=tqdm if show_progress else None)
        print(summary_line(result, run_dir))
    return run_dir


def _resumable_state(path: Path, config: Config) -> dict:
    """The checkpoint at ``path``, whose configuration ``config`` may differ from in its budget only."""
    state = load_checkpoint(path)
    differences = configuration_differences(state["config"], config)
    if differences:
        raise ValueError(f"--resume: the configuration differs from the one saved in {path}: "
                         f"{'; '.join(differences)} (only the train settings {', '.join(RESUMABLE_CHANGES)} may "
                         "change)")
    return state


def _restore(state: dict, path: Path, model: MultimodalVAE, optimizer) -> tuple[int, int, int]:
    """Load the checkpoint ``state`` (``_resumable_state``, read from ``path``) into the model, the optimiser and
    the RNGs; ``(epoch, position, step)``: where training continues."""
    _restore_model(model, state["model"], path)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if model.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), model.device)
    return state["epoch"], state["position"], state["step"]


def _replicate(model: MultimodalVAE, seed: int, step: int, rank: int, world: int) -> torch.nn.Module:
    """The network the steps run: ``model`` itself, or its DDP wrapper with the rank's own noise (seeded by (seed,
    rank, step))."""
    if world == 1:
        return model
    torch.manual_seed((seed * 1_000_003 + step) * world + rank)
    device = model.device
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def kl_warmup_weight(step: int, warmup_steps: float) -> float:
    """The KL weight's factor at the optimiser step ``step`` (counted from 1) of a linear warm-up over
    ``warmup_steps`` steps: ``min(1, step / warmup_steps)``, 1 without a warm-up (``warmup_steps = 0``)."""
    return min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0


def _step(network, model: MultimodalVAE, optimizer, x, present, kl_weight: float, autocast, world: int, where: str,
          run: RunWriter) -> tuple[tuple[float, float, float], bool]:
    """One optimiser step on the batch ``x`` with the KL weighted by ``beta * kl_weight``; the loss terms
    ``SCALARS`` (averaged over the replicas) and whether a parameter became non-finite (this replica). The step is
    taken only with a finite loss and finite gradients on every replica (else ``TrainingDiverged``, ``where``
    saying at which step)."""
    with autocast:
        out = network(x, present, kl_weight)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    # the flag of non-finite gradients travels with the loss terms (one collective; summed over the replicas)
    grads_finite = _all_finite([p.grad for p in model.parameters() if p.grad is not None])
    values = torch.stack([*(out[key].detach().float() for key in SCALARS),
                          (~grads_finite).float().to(out["loss"].device)])
    if world > 1:
        dist.all_reduce(values)
        values[:len(SCALARS)] /= world
    loss_value, reconstruction_value, kl_value, bad_gradients = values.tolist()
    if not math.isfinite(loss_value):
        raise TrainingDiverged(f"non-finite loss {loss_value} {where}; no weights were written; "
                               f"last good checkpoint: {run.last_good()}")
    for name, value in zip(SCALARS[1:], (reconstruction_value, kl_value)):
        if not math.isfinite(value):  # a logged term (a diagnostic where the estimator does not use it)
            raise TrainingDiverged(f"non-finite {name} {value} {where} behind the finite loss {loss_value:.6g}; the "
                                   f"step was not taken; no weights were written; last good checkpoint: "
                                   f"{run.last_good()}")
    if bad_gradients:
        raise TrainingDiverged(f"non-finite gradients {where} behind the finite loss {loss_value:.6g}; the "
                               f"step was not taken; no weights were written; last good checkpoint: "
                               f"{run.last_good()}")
    optimizer.step()
    # the optimiser's state too: a finite gradient whose square overflows Adam's second moment freezes those
    # parameters (their updates become zero) while the weights stay finite
    bad_parameters = not bool(_all_finite([*model.parameters(), *_tensors(optimizer.state)]))
    return (loss_value, reconstruction_value, kl_value), bad_parameters


class StopConditions:
    """When training stops early: ``train.max_steps``, the ``train.max_minutes`` wall-clock guard (``stopped_by``
    names it when it stopped short of the ``planned`` steps) or a SIGINT/SIGTERM in ``requests``; the epochs are
    the loop's. With replicas, every one stops at the same step for the same reason."""

    def __init__(self, settings, batches_per_epoch: int, requests: _StopRequests, world: int, device: torch.device):
        """``settings``: the ``train`` section of the configuration."""
        self.max_steps, self.max_minutes = settings.max_steps, settings.max_minutes
        # the steps the configuration asks for; the report says when the wall-clock guard stopped short of them
        self.planned = settings.epochs * batches_per_epoch
        if self.max_steps is not None:
            self.planned = min(self.planned, self.max_steps)
        self.requests, self.world, self.device = requests, world, device
        self.stopped_by = None
        self.start = time.perf_counter()

    def agree(self, bad_parameters: bool) -> tuple[bool, int, bool]:
        """``(over_time, signum, bad_parameters)``, each the maximum over the replicas (one collective for all)."""
        over_time = self.max_minutes is not None and time.perf_counter() - self.start > 60 * self.max_minutes
        signum = self.requests.signum or 0
        if self.world > 1:
            over_time, signum, bad_parameters = _max_across([over_time, signum, bad_parameters], self.device)
            self.requests.signum = int(signum) or None
        return over_time, signum, bad_parameters

    def reached(self, step: int, over_time: bool, signum: int) -> bool:
        """Whether training stops after ``step`` (``over_time`` and ``signum`` from ``agree``)."""
        if not ((self.max_steps is not None and step >= self.max_steps) or over_time or signum):
            return False
        if over_time and step < self.planned:
            self.stopped_by = f"train.max_minutes={self.max_minutes}"
        return True


class RunWriter:
    """The files of a run folder: ``config.yaml``, ``metrics.csv``, ``pooling.csv``, the samples, TensorBoard and
    the checkpoint. Only rank 0 (``writes``) writes; every replica checks the weights before a checkpoint.

    At each ``save`` the logs are written first and the checkpoint last: it is the commit point (a resumed run drops
    the log rows past its step), and it never holds non-finite weights."""

    def __init__(self, run_dir: Path, config: Config, data: MultimodalDataset, resume: bool, step: int,
                 writes: bool, world: int):
        self.run_dir, self.checkpoint_path = run_dir, run_dir / "checkpoint.pt"
        self.config, self.data, self.writes, self.world = config, data, writes, world
        # what the samples and the pooling diagnostics show: 500 training tuples, a fixed random choice (the first
        # 500 of a dataset stored class by class were all of one class)
        self.shown = data.choose(500)
        self.board = None
        if writes:
            write_text(run_dir / "config.yaml", to_yaml(config))
            if not resume:  # the events of a run killed before its first checkpoint, the files of one trained before
                # it whose checkpoint was removed (its evaluation would pass for this run's)
                shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
                for stale in (DIVERGED_LOG, *EVALUATION_FILES):
                    (run_dir / stale).unlink(missing_ok=True)
            if config.train.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if resume else None)
        self.metrics = _read_csv(run_dir / "metrics.csv", step)
        self.pooling = _read_csv(run_dir / "pooling.csv", step)
        self.saved_step = step if resume else None

    def last_good(self) -> str:
        return "none yet" if self.saved_step is None else f"{self.checkpoint_path} (step {self.saved_step})"

    def log_step(self, epoch: int, step: int, scalars, seconds: float, samples_per_second: float) -> None:
        """The loss terms ``SCALARS`` of a step (in memory and TensorBoard; ``metrics.csv`` at the next ``save``)."""
        loss_value, reconstruction_value, kl_value = scalars
        self.metrics.append({"epoch": epoch, "step": step, "loss": f"{loss_value:.9g}",
                             "reconstruction": f"{reconstruction_value:.9g}", "kl": f"{kl_value:.9g}",
                             "seconds": f"{seconds:.4f}"})
        if self.board is not None:
            for key, value in zip(SCALARS, scalars):
                self.board.add_scalar(f"train/{key}", value, step)
            self.board.add_scalar("train/samples_per_second", samples_per_second, step)

    def save(self, model: MultimodalVAE, optimizer, epoch: int, position: int, step: int, planned: int,
             stopped_by: str | None, finished: bool, diagnostics: bool = True) -> None:
        """The logs, the samples, the pooling diagnostics (unless not ``diagnostics``), then the checkpoint of
        training at ``step``."""
        device = model.device
        # the last line of defence: a checkpoint never holds non-finite weights (every process agrees)
        finite = _all_finite([*model.state_dict().values(), *_tensors(optimizer.state_dict()["state"])])
        if _all_any(not finite, device) if self.world > 1 else not finite:
            # (epoch counts the finished epochs; position > 0: the step is in the next one)
            raise TrainingDiverged(f"non-finite weights at step {step} (epoch {epoch + (position > 0)}); refusing to "
                                   f"save them; no weights were written; last good checkpoint: {self.last_good()}")
        if self.writes:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     "epoch": epoch, "position": position, "step": step, "config": asdict(self.config),
                     "modalities": [asdict(m) for m in self.data.modalities], "finished": finished,
                     "planned_steps": planned, "stopped_by": stopped_by}
            # the logs first, the checkpoint last: a kill in between leaves rows past the checkpoint's step, which
            # a resumed run drops, never a checkpoint whose rows are missing
            _write_csv(self.run_dir / "metrics.csv", self.metrics, METRIC_FIELDS)
            with self._overflow_is_divergence(step):
                grid = sample_grid(model, self._shown(device), self.data.modalities, self.run_dir / "samples.png")
            if diagnostics:
                self.log_pooling(model, epoch + (position > 0), step)
            _write_csv(self.run_dir / "pooling.csv", self.pooling, POOLING_FIELDS)
            if self.board is not None and grid.numel():
                self.board.add_image("samples", grid, step, dataformats="HWC")
            if self.board is not None:
                self.board.flush()
            save_checked(self.checkpoint_path, state)
        self.saved_step = step

    def _shown(self, device):
        return self.shown.gather(torch.arange(len(self.shown), device=device))

    def log_pooling(self, model: MultimodalVAE, epoch: int, step: int) -> None:
        """The pooling diagnostics at ``step``, of the ``epoch`` (from 1) that holds it, as ``metrics.csv``'s (in
        memory and TensorBoard; ``pooling.csv`` at the next ``save``), once per step."""
        if not self.writes or (self.pooling and int(self.pooling[-1]["step"]) == step):
            return
        with self._overflow_is_divergence(step):
            diagnostics = pooling_diagnostics(model, self._shown(model.device))
        self.pooling.append({"epoch": epoch, "step": step,
                             **{k: "" if v is None else f"{v:.6g}" for k, v in diagnostics.items()}})
        if self.board is not None:
            for key, value in diagnostics.items():
                if value is not None:
                    self.board.add_scalar(f"pooling/{key}", value, step)

    @contextlib.contextmanager
    def _overflow_is_divergence(self, step: int):
        """A ``FloatingPointError`` of the evaluation passes on the shown tuples (finite weights whose encodings or
        decodings overflow) as ``TrainingDiverged``: as diverged as NaN weights, and logged as such."""
        try:
            yield
        except FloatingPointError as error:
            raise TrainingDiverged(f"at step {step}: {error}; no weights were written; last good checkpoint: "
                                   f"{self.last_good()}") from None

    def keep_diverged_log(self) -> None:
        """The loss rows up to a divergence in ``DIVERGED_LOG`` (``metrics.csv`` keeps those of the last checkpoint,
        as a resumed run needs it): the steps leading into it are what explains it."""
        if self.writes:
            _write_csv(self.run_dir / DIVERGED_LOG, self.metrics, METRIC_FIELDS)
        self.close()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _all_any(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any process."""
    return bool(_max_across([flag], device)[0])


def _max_across(values, device: torch.device) -> list[float]:
    """The maximum over the processes of each of ``values`` (flags or small integers; one collective for all)."""
    value = torch.tensor([float(v) for v in values], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.tolist()


def _all_finite(tensors) -> torch.Tensor:
    """A boolean scalar on the first floating tensor's device: every floating tensor in ``tensors`` is finite.
    (Their minima and maxima are: NaN propagates into both, an infinity shows in one; one pass each, many times
    faster than ``isfinite().all()`` on the CPU, and unlike a sum it cannot overflow.) The tensors may live on
    several devices (Adam keeps its step counts on the CPU beside CUDA moments): one flag per device, one copy."""
    extremes = {}
    for t in tensors:
        if t.is_floating_point() and t.numel():
            extremes.setdefault(t.device, []).extend(e.float() for e in torch.aminmax(t.detach()))
    flags = [torch.stack(values).isfinite().all() for values in extremes.values()]
    if not flags:
        return torch.tensor(True)
    return torch.stack([flag.to(flags[0].device) for flag in flags]).all()


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in a nest of dicts and lists (an optimiser's state)."""
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [t for item in items for t in _tensors(item)]


def summary_line(metrics: dict, run_dir: Path) -> str:
    notice = training_notice(metrics.get("training"))
    warning = f"\nwarning: {notice}" if notice else ""
    if "coherence" not in metrics:
        return (f"log p(X) {metrics['log_likelihood']['joint']:.1f} (no coherence: {metrics['not_computed']}); "
                f"report: {Path(run_dir) / 'report.md'}{warning}")
    return (f"conditional coherence: one input, cross-modal {metrics['cross_coherence']['cross_modal']:.3f}; "
            f"all subsets {metrics['coherence']['overall']:.3f}; report: {Path(run_dir) / 'report.md'}{warning}")


def load_run(run_dir: Path, overrides=()):
    """``(config, model)`` of a finished or interrupted run, from its ``config.yaml`` (with ``key=value``
    ``overrides``) and checkpoint, which must share the configuration of ``config.yaml`` as written (but for the
    budget, the evaluation settings and ``data.root``): one from another run would load, if its shapes fit, and
    be reported as this run's."""
    path = Path(run_dir) / "config.yaml"
    config = load_config(path=path, overrides=overrides)
    checkpoint_path = Path(run_dir) / "checkpoint.pt"
    if not checkpoint_path.is_file():
        raise ValueError(f"{run_dir} holds no checkpoint.pt: not a run, or one that has not saved yet")
    state = load_checkpoint(checkpoint_path)
    # (data.root may differ: where the data now lies, edited by hand for a moved dataset)
    differences = [d for d in configuration_differences(state["config"], load_config(path=path))
                   if not d.startswith("data.root:")]
    if differences:
        raise UnreadableFile(f"{path} does not describe the run of {checkpoint_path}: {'; '.join(differences)} "
                             "(restore the run's own config.yaml)")
    modalities = ([Modality(m["name"], tuple(m["shape"]), m["vocabulary"] and tuple(m["vocabulary"]))
                   for m in state["modalities"]] if "modalities" in state
                  else polymnist_modalities(config.data.num_modalities))  # checkpoints from before heterogeneous data
    model = make_model(config, modalities)
    _restore_model(model, state["model"], checkpoint_path)
    return config, model
