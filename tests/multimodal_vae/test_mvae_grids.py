"""The labelled sample grid: its row labels and blocks for 2 and 3 modalities (text ones condition but are not
drawn), padding of smaller images, models with modality-specific latents (test_mvae_config: a run's evaluation
and the ``grid`` command write it)."""

import pytest
import torch
from PIL import Image

from applications.multimodal_vae.__main__ import main
from applications.multimodal_vae.data import Modality, polymnist_modalities
from applications.multimodal_vae.evaluation.grids import draw_sample_grid, grid_images, grid_layout, render_grid
from applications.multimodal_vae.models import MultimodalVAE
from applications.multimodal_vae.networks import make_networks

pytestmark = pytest.mark.usefixtures("float32_default")


def labels(layout):
    return [label for _, rows in layout for label, _, _ in rows]


def test_the_rows_of_two_modalities_are_labelled_in_blocks():
    layout = grid_layout(polymnist_modalities(2))
    assert [title for title, _ in layout] == ["input", "reconstructed from all", "generated from m0",
                                              "generated from m1", "unconditional"]
    assert labels(layout) == ["m0: input", "m1: input", "m0: reconstructed from all", "m1: reconstructed from all",
                              "m0: generated from m0", "m1: generated from m0", "m0: generated from m1",
                              "m1: generated from m1", "m0: unconditional", "m1: unconditional"]
    assert [t for _, rows in layout for _, _, t in rows] == [0, 1] * 5


def test_three_modalities_give_a_block_per_source_and_text_only_conditions():
    layout = grid_layout(polymnist_modalities(3))
    assert len(labels(layout)) == 3 * (3 + 3)  # inputs, reconstructions, 3 sources, prior; 3 rows each
    assert labels(layout)[6:9] == ["m0: generated from m0", "m1: generated from m0", "m2: generated from m0"]
    assert [key for _, rows in layout for _, key, _ in rows][6:] == ["from 0"] * 3 + ["from 1"] * 3 + ["from 2"] * 3 \
        + ["prior"] * 3
    text = Modality("text", (8,), tuple("abcd"))
    mixed = grid_layout([Modality("mnist", (1, 28, 28)), Modality("svhn", (3, 32, 32)), text])
    assert [title for title, _ in mixed] == ["input", "reconstructed from all", "generated from mnist",
                                             "generated from svhn", "generated from text", "unconditional"]
    assert {t for _, rows in mixed for _, _, t in rows} == {0, 1}
    assert grid_layout([text]) == []


def _images(b, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((b,) + shape, generator=g) for shape in shapes]


def test_smaller_and_grey_images_are_padded_and_tiles_enlarged(tmp_path):
    modalities = [Modality("mnist", (1, 28, 28)), Modality("svhn", (3, 32, 32))]
    encoders, decoders = make_networks(modalities, 4)
    model = MultimodalVAE(encoders, decoders, "mvae", modalities=modalities)
    x = _images(3, [(1, 28, 28), (3, 32, 32)])
    layout = grid_layout(modalities)
    images = grid_images(model, x, modalities)
    assert images["input", 0].shape == (3, 1, 28, 28) and images["prior", 1].shape == (3, 3, 32, 32)
    grid = render_grid(layout, images, tmp_path / "grid.png", scale=2)
    assert grid.shape == (10 * 64, 3 * 64, 3)  # 10 rows of 32 x 32 tiles (the largest), 2 x 2 per pixel
    first = grid[:64, :64]  # the first mnist input, padded with white at the bottom and on the right
    assert (first[56:] == 1).all() and (first[:, 56:] == 1).all()
    digit = torch.from_numpy(first[:56, :56])
    expected = x[0][0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1)
    for channel in range(3):  # grey shown as grey
        torch.testing.assert_close(digit[..., channel], expected)
    svhn = torch.from_numpy(grid[64:128, 64:128])  # second row, second column: the second svhn input, unpadded
    torch.testing.assert_close(svhn, x[1][1].permute(1, 2, 0).repeat_interleave(2, 0).repeat_interleave(2, 1))
    with Image.open(tmp_path / "grid.png") as png:
        assert png.size[0] > 3 * 64 and png.size[1] >= 10 * 64  # the tiles and the labels' margin
    with pytest.raises(ValueError, match="scale must be a positive integer, got 0"):
        render_grid(layout, images, scale=0)


def test_a_model_with_private_latents_draws_its_grid_seeded(tmp_path):
    modalities = polymnist_modalities(3)
    encoders, decoders = make_networks(modalities, 4 + 2)
    model = MultimodalVAE(encoders, decoders, "mmvaeplus", modalities=modalities, private_dim=2)
    x = _images(4, [(3, 28, 28)] * 3)
    state = torch.get_rng_state()
    first, again = grid_images(model, x, modalities, seed=1), grid_images(model, x, modalities, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the draws use their own generator
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(grid_images(model, x, modalities, seed=2)["prior", 0], first["prior", 0])
    assert set(first) == {(key, t) for _, rows in grid_layout(modalities) for _, key, t in rows}
    assert draw_sample_grid(model, x, modalities, tmp_path / "grid.png", columns=2)
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_the_grid_command_refuses_bad_sizes_before_loading(tmp_path, capsys):
    for option in ("--columns", "--scale"):
        with pytest.raises(SystemExit):
            main(["grid", "--run", str(tmp_path / "missing"), option, "0"])
        assert f"{option} must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an Overflow once the model and the data had loaded
        main(["grid", "--run", str(tmp_path / "missing"), "--seed", str(10**23)])
    assert f"--seed must be an integer in [0, 2**63), got {10**23}" in capsys.readouterr().err
