"""Training steps of this application's models against the MultiVae library's, on identical networks.

Both sides get the same encoder and decoder classes (this application's MoPoE PolyMNIST conv nets,
``networks.PolyMNISTEncoder``/``PolyMNISTDecoder``), the same latent size (64; MMVAE+ 32 shared + 32
modality-specific on both sides), batch, Laplace(0.75) likelihood, Gaussian posteriors, beta 2.5, Adam and
thread count, and the same batch of PolyMNIST-shaped inputs. A step is forward + backward + Adam step. The
candidates run interleaved in a new random order each round, so that machine noise hits both sides alike;
the table gives medians and the median of the per-round ratios (ours / MultiVae's) with its interquartile range.

The models compared (MultiVae's settings chosen to compute what ours computes):
- MoPoE: all 31 subsets, a prior expert in the full subset (MultiVae: ``MoPoE``).
- MVAE: the joint ELBO plus one ELBO per modality, no random subsets (MultiVae: ``MVAE``, ``k=0``, warm-up over).
- MMVAE, K = 1: the stratified ELBO (MultiVae: ``MMVAE``, ``K=1``, ``iwae_looser``, ``normal`` posteriors).
- MMVAE+, K = 1: as MMVAE with private latents and learnable auxiliary priors (MultiVae: ``MMVAEPlus``).

MultiVae is not a dependency of this project. It needs torchvision at import, and the registry's torchvision is a
CUDA build whose ops do not load on the CPU torch; a separate environment works:

    python -m venv --system-site-packages peer-venv
    peer-venv/bin/pip install --no-deps multivae==1.0.3 pythae torchmetrics lightning-utilities nltk cloudpickle \
        torchvision==0.28.0
    # on a CPU-only torch, give torchvision's two meta-registered ops a definition before it imports, e.g. in
    # peer-venv/.../site-packages/sitecustomize.py:
    #   import torch; lib = torch.library.Library("torchvision", "DEF")
    #   lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"); (the same for "qnms")
    peer-venv/bin/python benchmarks/bench_peer.py --docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from applications.multimodal_vae.data import polymnist_modalities  # noqa: E402
from applications.multimodal_vae.files import splice_file  # noqa: E402
from applications.multimodal_vae.models import MultimodalVAE  # noqa: E402
from applications.multimodal_vae.networks import PolyMNISTDecoder, PolyMNISTEncoder, make_networks  # noqa: E402

from measure import check_docs_page, non_negative_int, positive_int, provenance, quartiles, verdict  # noqa: E402

__all__ = ["main", "MODELS", "PEER_TARGET"]

#: label -> (our model, our options, MultiVae model class name, MultiVae config options)
MODELS = {
    "MoPoE": ("mopoe", {}, "MoPoE", {}),
    "MVAE": ("mvae", {}, "MVAE", {"k": 0, "warmup": 0}),
    "MMVAE (K=1)": ("mmvae", {}, "MMVAE", {"K": 1, "loss": "iwae_looser", "prior_and_posterior_dist": "normal",
                                           "learn_prior": False}),
    "MMVAE+ (K=1)": ("mmvaeplus", {}, "MMVAEPlus", {"K": 1, "loss": "iwae_looser", "prior_and_posterior_dist": "normal"}),
}

MODALITIES = 5
#: the issue's target: our step at most the peer's, as the median of per-round ratios
PEER_TARGET = "<= 1"
BETA = 2.5


def inputs(batch_size: int) -> torch.Tensor:
    return torch.rand(batch_size, MODALITIES, 3, 28, 28, generator=torch.Generator().manual_seed(1))


def ours(name: str, options: dict, latent: int, batch_size: int):
    if name == "mmvaeplus":
        options = {**options, "private_dim": latent // 2}
    torch.manual_seed(0)
    encoders, decoders = make_networks(polymnist_modalities(MODALITIES), latent)
    model = MultimodalVAE(encoders, decoders, name, beta=BETA, **options)
    x = inputs(batch_size)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), lambda: model(x)["loss"]


def peer(class_name: str, options: dict, latent: int, batch_size: int):
    import multivae.models as mv
    from multivae.data.datasets.base import MultimodalBaseDataset
    from multivae.models.nn import BaseMultilatentEncoder
    from pythae.models.base.base_model import BaseDecoder, BaseEncoder
    from pythae.models.base.base_utils import ModelOutput

    private = latent // 2 if class_name == "MMVAEPlus" else 0

    class Encoder(BaseEncoder):
        def __init__(self):
            BaseEncoder.__init__(self)
            self.net = PolyMNISTEncoder(latent)

        def forward(self, x):
            mu, logvar = self.net(x)
            return ModelOutput(embedding=mu, log_covariance=logvar)

    class PrivateEncoder(BaseMultilatentEncoder):
        def __init__(self):
            BaseMultilatentEncoder.__init__(self)
            self.net = PolyMNISTEncoder(latent)

        def forward(self, x):
            mu, logvar = self.net(x)
            shared = latent - private
            return ModelOutput(embedding=mu[:, :shared], log_covariance=logvar[:, :shared],
                               style_embedding=mu[:, shared:], style_log_covariance=logvar[:, shared:])

    class Decoder(BaseDecoder):
        def __init__(self):
            BaseDecoder.__init__(self)
            self.net = PolyMNISTDecoder(latent)

        def forward(self, z):
            return ModelOutput(reconstruction=self.net(z))

    names = [f"m{m}" for m in range(MODALITIES)]
    config_options = {"n_modalities": MODALITIES, "latent_dim": latent - private, "beta": BETA,
                      "input_dims": {n: (3, 28, 28) for n in names},
                      "decoders_dist": {n: "laplace" for n in names},
                      "decoder_dist_params": {n: {"scale": 0.75} for n in names}, **options}
    if private:
        config_options["modalities_specific_dim"] = private
    torch.manual_seed(0)
    config = getattr(mv, f"{class_name}Config")(**config_options)
    encoder = PrivateEncoder if private else Encoder
    model = getattr(mv, class_name)(config, encoders={n: encoder() for n in names},
                                    decoders={n: Decoder() for n in names})
    model.train()
    x = inputs(batch_size)
    data = MultimodalBaseDataset(data={n: x[:, m] for m, n in enumerate(names)})
    extra = {"epoch": 10**6} if class_name == "MVAE" else {}  # past the KL warm-up: beta at its value
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), lambda: model(data, **extra).loss


def timed_step(optimizer: torch.optim.Optimizer, loss_fn) -> float:
    tic = time.perf_counter()
    loss = loss_fn()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=positive_int, default=128)
    parser.add_argument("--latent", type=positive_int, default=64)
    parser.add_argument("--rounds", type=positive_int, default=15)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the order of the candidates in each round")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--docs", type=Path, metavar="PAGE",
                        help="also splice the table into PAGE between its <!-- table: bench_peer --> markers")
    args = parser.parse_args()
    check_docs_page(parser, args.docs, "bench_peer")
    try:
        import multivae  # noqa: F401
    except Exception as error:  # ImportError, or torchvision's RuntimeError on a CPU-only torch
        raise SystemExit(f"MultiVae does not import here ({type(error).__name__}: {error}); see this script's "
                         "docstring for a separate environment") from None
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    measured = provenance()  # the commit whose code runs
    candidates = {}
    for label in args.models:
        name, options, class_name, peer_options = MODELS[label]
        candidates[(label, "ours")] = ours(name, options, args.latent, args.batch)[1:]
        candidates[(label, "MultiVae")] = peer(class_name, peer_options, args.latent, args.batch)[1:]
    order = random.Random(args.seed)
    times = {key: [] for key in candidates}
    for r in tqdm(range(args.warmup + args.rounds), desc="interleaved steps", unit="round"):
        keys = list(candidates)
        order.shuffle(keys)
        for key in keys:
            seconds = timed_step(*candidates[key])
            if r >= args.warmup:
                times[key].append(seconds)
    from importlib.metadata import version

    lines = [f"{measured}; {args.threads} threads; batch {args.batch}, latent {args.latent}, {MODALITIES} "
             f"modalities; {args.rounds} interleaved rounds; MultiVae {version('multivae')}", "",
             "| model | ours: median s / step | MultiVae: median s / step | ours / MultiVae, median of rounds (IQR) | "
             "target |", "|---|---|---|---|---|"]
    for label in args.models:
        mine, theirs = times[(label, "ours")], times[(label, "MultiVae")]
        q1, q2, q3 = quartiles([a / b for a, b in zip(mine, theirs)])
        lines.append(f"| {label} | {statistics.median(mine):.4f} | {statistics.median(theirs):.4f} | "
                     f"{q2:.2f} ({q1:.2f}-{q3:.2f}) | {verdict(q2, PEER_TARGET)} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.docs:
        splice_file(args.docs, "bench_peer", table)


if __name__ == "__main__":
    main()
