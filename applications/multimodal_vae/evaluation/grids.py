"""A labelled sample grid of a trained model (``sample_grid.png`` in a run folder), drawn with matplotlib.

For a few test tuples (the columns), blocks of rows, one row per image modality in each block:

* **input**: the tuples themselves;
* **reconstructed from all**: decoded from the posterior mean given every modality;
* **generated from m_s**, for every modality ``s`` (text ones too, as conditions): decoded from a sample of
  ``q(z | x_s)``, as coherence is measured; the row of ``s`` itself is its reconstruction from itself alone;
* **unconditional**: decoded from prior samples ``z ~ p(z)`` (``N(0, I)``, or ``Laplace(0, 1)`` for Laplace latents).

Modality-specific latents follow ``MultimodalVAE.decode``: a target among the given modalities takes its own
posterior (its mean for the reconstruction from all, a draw otherwise), every other target a prior draw. Decoder
outputs are clamped to [0, 1]; grey images are shown in grey, images smaller than the largest are padded with
white; tiles are enlarged by pixel repetition (nearest neighbour), so that a 28x28 digit stays readable. Text
modalities are not drawn (the training loop writes them to ``samples.txt``). Generations are seeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data import subset_mask
from ..files import atomic_write
from ..models import evaluating

__all__ = ["GRID_FILE", "draw_sample_grid", "grid_images", "grid_layout", "render_grid"]

GRID_FILE = "sample_grid.png"
#: white, between a smaller image and the tile size
PAD_VALUE = 1.0


def grid_layout(modalities) -> list[tuple[str, list[tuple[str, str, int]]]]:
    """The grid's blocks in order, each ``(title, rows)`` with rows ``(label, key, target)``: the row label drawn
    on the left, the key of its images in ``grid_images`` and the target modality. Only image modalities are
    targets; every modality (text too) conditions a "generated from" block. An empty list without image
    modalities."""
    names = [modality.name for modality in modalities]
    images = [t for t, modality in enumerate(modalities) if not modality.is_text]
    if not images:
        return []
    blocks = [("input", "input"), ("reconstructed from all", "all")]
    blocks += [(f"generated from {names[s]}", f"from {s}") for s in range(len(modalities))]
    blocks += [("unconditional", "prior")]
    return [(title, [(f"{names[t]}: {title}", key, t) for t in images]) for title, key in blocks]


@torch.no_grad()
def grid_images(model, x, modalities, seed: int = 0) -> dict[tuple[str, int], torch.Tensor]:
    """The images of every row of ``grid_layout(modalities)`` for the tuples ``x`` (a tensor per modality, on
    the model's device): ``(key, target) -> (B, C, H, W)`` in [0, 1] on the CPU. Draws use a generator seeded
    with ``seed``; the global random state is left as it was."""
    m, b, device = model.num_modalities, x[0].shape[0], model.device
    layout = grid_layout(modalities)
    targets = sorted({t for _, rows in layout for _, _, t in rows})
    generator = torch.Generator(device=device).manual_seed(seed)
    out = {("input", t): x[t].float() for t in targets}
    with evaluating(model):
        shared_mu, shared_logvar, private = model.encode_with_private(x)
        everything = torch.ones(m, b, dtype=torch.bool, device=device)
        mu = model.conditional_posterior(shared_mu, shared_logvar, everything).mean
        for t in targets:
            out["all", t] = model.decode(mu, t, everything, private, generator=generator, sample=False)
        for s in range(m):
            given = subset_mask((s,), m, b, device)
            z = model.conditional_posterior(shared_mu, shared_logvar, given).sample(generator=generator)
            for t in targets:
                out[f"from {s}", t] = model.decode(z, t, given, private, generator=generator)
        prior = model.latent.prior_sample((b, shared_mu.shape[-1]), generator=generator, device=device,
                                          dtype=shared_mu.dtype)
        for t in targets:
            out["prior", t] = model.decode(prior, t, generator=generator)
    return {key: images.float().clamp(0, 1).cpu() for key, images in out.items()}


def _tile_rows(layout, images, scale: int) -> np.ndarray:
    """The grid as one ``(rows * H * scale, B * W * scale, 3)`` array, ``H, W`` the largest image size."""
    rows = [images[key, t] for _, block in layout for _, key, t in block]
    height, width = max(r.shape[-2] for r in rows), max(r.shape[-1] for r in rows)
    padded = [torch.nn.functional.pad(r.expand(-1, 3, -1, -1), (0, width - r.shape[-1], 0, height - r.shape[-2]),
                                      value=PAD_VALUE) for r in rows]
    stacked = torch.stack(padded)  # (rows, B, 3, H, W)
    grid = stacked.permute(0, 3, 1, 4, 2).reshape(len(rows) * height, stacked.shape[1] * width, 3)
    return grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()


def render_grid(layout, images, path: Path | None = None, scale: int = 3, title: str = "") -> np.ndarray:
    """Draw the rows of ``layout`` (``grid_layout``) from ``images`` (``grid_images``) with their labels on the
    left and a line between blocks; one image pixel is ``scale`` x ``scale`` figure pixels. Writes the PNG to
    ``path`` atomically when given; returns the tile array (without labels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if not layout:
        raise ValueError("layout has no rows (no image modality to draw)")
    grid = _tile_rows(layout, images, scale)
    labels = [label for _, block in layout for label, _, _ in block]
    row_height = grid.shape[0] / len(labels)
    dpi, margin, top = 100, 2.4, 0.4 if title else 0.1  # margins in inches: labels on the left, title on top
    width, height = grid.shape[1] / dpi, grid.shape[0] / dpi
    figure = Figure(figsize=(width + margin + 0.1, height + top + 0.1), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((margin / (width + margin + 0.1), 0.1 / (height + top + 0.1),
                            width / (width + margin + 0.1), height / (height + top + 0.1)))
    axes.imshow(grid, interpolation="nearest", aspect="equal")
    axes.set_xticks([])
    axes.set_yticks([(i + 0.5) * row_height - 0.5 for i in range(len(labels))], labels, fontsize=9)
    axes.tick_params(length=0)
    start = 0
    for _, block in layout[:-1]:
        start += len(block)
        axes.axhline(start * row_height - 0.5, color="black", linewidth=1.5)
    if title:
        axes.set_title(title, fontsize=10)
    if path is not None:
        atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=dpi))
    return grid


def draw_sample_grid(model, x, modalities, path: Path, columns: int = 8, scale: int = 3, seed: int = 0,
                     title: str = "") -> bool:
    """``render_grid`` of the first ``columns`` tuples of ``x`` into ``path``; False (nothing written) when there
    is no image modality."""
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be a positive integer, got {columns!r}")
    layout = grid_layout(modalities)
    if not layout:
        return False
    x = [t[:columns].to(model.device) for t in x]
    render_grid(layout, grid_images(model, x, modalities, seed), path, scale, title)
    return True
