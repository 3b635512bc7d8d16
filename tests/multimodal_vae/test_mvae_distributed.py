"""Distributed data parallel on the CPU: two gloo processes train the same model and stay bitwise identical."""

import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from tiny_runs import free_port, losses, tiny_config


def replica(rank, world, port, root, out):
    """One process: capture the model ``train`` builds and save its final state under ``out``."""
    import applications.multimodal_vae.train as training

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_default_dtype(torch.float32)
    built = []
    make_model = training.make_model
    training.make_model = lambda config, modalities: built.append(make_model(config, modalities)) or built[-1]
    config = tiny_config(root, "ddp", num_threads=1, epochs=2)
    training.train(config, show_progress=False)
    torch.save(built[0].state_dict(), f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_replicas_stay_identical(tiny_root, tmp_path):
    mp.spawn(replica, args=(2, free_port(), tiny_root, tmp_path), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.manual_seed(0)
    initial = training_initial_state(tiny_root)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert any(not torch.equal(first[k], initial[k]) for k in first)  # they trained
    # only rank 0 wrote: one checkpoint, and one metrics row per step (2 epochs x 24 // 8 batches)
    run = tiny_root / "runs" / "ddp"
    assert [step for step, _ in losses(run)] == list(range(1, 7))
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(saved["model"][k], first[k]) for k in first)


def training_initial_state(root):
    from applications.multimodal_vae.data import polymnist_modalities
    from applications.multimodal_vae.train import make_model

    config = tiny_config(root, "init")
    torch.manual_seed(config.train.seed)
    return make_model(config, polymnist_modalities(config.data.num_modalities)).state_dict()


@pytest.mark.slow
def test_torchrun_launches_the_command_line(tiny_root):
    overrides = [f"data.root={tiny_root / 'data'}", "data.build_offline=false", "data.num_modalities=3",
                 "model.latent_dim=4",
                 "model.architecture=conv", "model.hidden=32", "train.batch_size=8", "train.epochs=1", "train.device=cpu",
                 f"output_dir={tiny_root / 'runs'}", "name=torchrun", "train.num_threads=1"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
         "-m", "applications.multimodal_vae", "train", "--preset", "polymnist-helvae", "--set", *overrides],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [step for step, _ in losses(tiny_root / "runs" / "torchrun")] == [1, 2, 3]


def test_batch_must_split_evenly_before_any_work(tiny_root, monkeypatch):
    from applications.multimodal_vae.train import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="train.batch_size 7 must be a multiple of the 2 processes"):
        train(tiny_config(tiny_root, "odd", batch_size=7), show_progress=False)
    assert not (tiny_root / "runs").exists()


def too_few(rank, world, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from applications.multimodal_vae.train import train

    train(tiny_config(root, "few", num_threads=1, batch_size=32), show_progress=False)


def test_replicas_with_fewer_tuples_than_a_batch_refuse_to_train(tiny_root):
    """With replicas every batch is complete: 24 tuples and batch_size 32 gave no step at all, and the run was saved
    as finished."""
    with pytest.raises(Exception, match=r"train.batch_size=32 is more than the 24 training tuples"):
        mp.spawn(too_few, args=(2, free_port(), tiny_root), nprocs=2)
    assert not (tiny_root / "runs" / "few" / "checkpoint.pt").exists()
