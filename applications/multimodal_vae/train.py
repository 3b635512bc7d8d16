"""Training: one loop for every model, with atomic checkpoints, exact resume and a NaN stop.

A run lives in ``{output_dir}/{name}/``: ``config.yaml`` (the resolved configuration), ``checkpoint.pt``,
``metrics.csv`` (one row per optimiser step) and ``samples.png`` (inputs, and every modality generated from the
first modality alone). Every file is written to a temporary file and renamed. A checkpoint stores the model,
the optimiser, the global RNG state and the position in the epoch; the data order of an epoch is a function of
(seed, epoch), so a resumed run continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .config import Config, to_yaml
from .data import PolyMNIST, modality_mask
from .files import atomic_write, write_text
from .models import MultimodalVAE
from .networks import make_networks

METRIC_FIELDS = ("epoch", "step", "loss", "reconstruction", "kl", "seconds")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; no weights were written after it."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available")
    return torch.device(name)


def load_dataset(config: Config, split: str = "train") -> PolyMNIST:
    root = Path(config.data.root)
    if config.data.dataset != "polymnist":
        raise ValueError(f"data.dataset {config.data.dataset!r} has no loader yet; available: 'polymnist'")
    if config.data.build_offline and not root.exists():
        from tqdm import tqdm

        from .build_polymnist import build

        build(root, progress=tqdm)
    return PolyMNIST(root, split, num_modalities=config.data.num_modalities)


def make_model(config: Config) -> MultimodalVAE:
    encoders, decoders = make_networks(config.data.dataset, config.data.num_modalities, config.model.latent_dim)
    return MultimodalVAE(encoders, decoders, config.model.name, beta=config.model.beta, alpha=config.model.alpha,
                         learnable_weights=config.model.learnable_weights)


def _without_budget(config: dict) -> dict:
    train = {k: v for k, v in config["train"].items() if k not in ("epochs", "max_steps", "max_minutes")}
    return {**config, "train": train}


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _read_metrics(path: Path, up_to_step: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as handle:
        return [row for row in csv.DictReader(handle) if int(row["step"]) <= up_to_step]


def _write_metrics(path: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, out.getvalue())


@torch.no_grad()
def sample_grid(model: MultimodalVAE, images: torch.Tensor, path: Path) -> None:
    """Rows: the inputs of every modality, then every modality generated from modality 0 alone."""
    from PIL import Image

    model.eval()
    x = images[:, :8].transpose(0, 1).float() / 255  # (B, M, 3, 28, 28)
    present = torch.zeros(model.num_modalities, x.shape[0], dtype=torch.bool, device=x.device)
    present[0] = True
    with torch.random.fork_rng(devices=[]):
        mu, _ = model.posterior(x, present)
        generated = torch.stack([decoder(mu) for decoder in model.decoders], 1).clamp(0, 1)
    model.train()
    rows = torch.cat((x.transpose(0, 1), generated.transpose(0, 1)))  # (2M, B, 3, 28, 28)
    grid = rows.permute(0, 3, 1, 4, 2).reshape(rows.shape[0] * 28, rows.shape[1] * 28, 3)
    image = Image.fromarray((grid.cpu().numpy() * 255).round().astype("uint8"))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def train(config: Config, resume: bool = False, show_progress: bool = True) -> Path:
    """Train ``config``; returns the run folder. ``resume=True`` continues from its checkpoint."""
    from tqdm import tqdm

    run_dir = Path(config.output_dir) / config.name
    checkpoint_path = run_dir / "checkpoint.pt"
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another name")
    if resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    device = resolve_device(config.train.device)
    data = load_dataset(config)
    images, labels = data.images, data.labels
    if config.data.train_subset is not None:
        images, labels = images[:, : config.data.train_subset], labels[: config.data.train_subset]
    images = images.to(device)
    torch.manual_seed(config.train.seed)
    model = make_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    epoch, position, step = 0, 0, 0
    if resume:
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if _without_budget(state["config"]) != _without_budget(asdict(config)):
            raise ValueError(f"--resume: the configuration differs from the one saved in {checkpoint_path} "
                             "(only train.epochs, train.max_steps and train.max_minutes may change)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        epoch, position, step = state["epoch"], state["position"], state["step"]
    write_text(run_dir / "config.yaml", to_yaml(config))
    metrics = _read_metrics(run_dir / "metrics.csv", step)
    saved_step = step if resume else None

    def save():
        nonlocal saved_step
        saved_step = step
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                 "epoch": epoch, "position": position, "step": step, "config": asdict(config)}
        atomic_write(checkpoint_path, lambda tmp: torch.save(state, tmp))
        _write_metrics(run_dir / "metrics.csv", metrics)
        sample_grid(model, images, run_dir / "samples.png")

    n = images.shape[1]
    batch_size = config.train.batch_size
    batches_per_epoch = math.ceil(n / batch_size)
    start = time.perf_counter()
    stop = False
    model.train()
    while epoch < config.train.epochs and not stop:
        order = epoch_order(n, config.train.seed, epoch)
        bar = tqdm(range(position, batches_per_epoch), desc=f"epoch {epoch + 1}/{config.train.epochs}",
                   unit="batch", disable=not show_progress)
        for b in bar:
            index = order[b * batch_size:(b + 1) * batch_size].to(device)
            x = images[:, index].transpose(0, 1).float() / 255
            present = modality_mask(x.shape[0], model.num_modalities, config.data.drop_rate).to(device)
            tic = time.perf_counter()
            out = model(x, present)
            loss_value = out["loss"].item()
            if not math.isfinite(loss_value):
                last = "none yet" if saved_step is None else f"{checkpoint_path} (step {saved_step})"
                raise TrainingDiverged(f"non-finite loss {loss_value} at step {step + 1} (epoch {epoch + 1}, "
                                       f"batch {b + 1}); no weights were written; last good checkpoint: {last}")
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            step += 1
            position = b + 1
            seconds = time.perf_counter() - tic
            metrics.append({"epoch": epoch + 1, "step": step, "loss": f"{loss_value:.9g}",
                            "reconstruction": f"{float(out['reconstruction']):.9g}", "kl": f"{float(out['kl']):.9g}",
                            "seconds": f"{seconds:.4f}"})
            bar.set_postfix(loss=f"{loss_value:.1f}", samples_per_s=f"{x.shape[0] / seconds:.0f}")
            over_time = config.train.max_minutes is not None and time.perf_counter() - start > 60 * config.train.max_minutes
            if (config.train.max_steps is not None and step >= config.train.max_steps) or over_time:
                stop = True
                break
        if position == batches_per_epoch:
            epoch, position = epoch + 1, 0
        if stop or epoch % config.train.checkpoint_every == 0 or epoch == config.train.epochs:
            save()
    if config.train.evaluate_at_end:
        from .evaluation import evaluate_run

        result = evaluate_run(run_dir, config, model, progress=tqdm if show_progress else None)
        print(f"conditional coherence (cross-modal): {result['cross_modal']:.3f}; report: {run_dir / 'report.md'}")
    return run_dir


def load_run(run_dir: Path):
    """``(config, model)`` of a finished or interrupted run, from its ``config.yaml`` and checkpoint."""
    from .config import load_config

    config = load_config(path=Path(run_dir) / "config.yaml")
    model = make_model(config)
    state = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return config, model
