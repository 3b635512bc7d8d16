"""Training-step time and peak memory of the multimodal VAEs on PolyMNIST-shaped batches (one run, same nets).

Every model gets the same encoders/decoders (the MoPoE PolyMNIST nets, ``--latent`` outputs; MMVAE+ splits them
into a shared and a modality-specific half), batch and device. Times are medians of
forward + backward + Adam step, measured in rounds (one step of each model per round, in a new random order each
round, ``--seed``) so that machine noise hits every model alike; ratios to HELVAE are the medians of the per-round
ratios, with their interquartile range. Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` over a
few steps of that model alone, minus what it held before; on the CPU (whose allocator gives no peak) the bytes of
the distinct tensors autograd saves for the backward pass in one step, the model's weights and the input batch
left out (the activation memory, which grows with the batch), counted with
``torch.autograd.graph.saved_tensors_hooks``.

Usage:
    python benchmarks/bench_mvae.py                              # CPU: batch 128, latent 64, 2 threads
    python benchmarks/bench_mvae.py --device cuda --batch 256 --latent 512
    python benchmarks/bench_mvae.py --sweep polymnist-cpu-study --docs docs/results.md
    python benchmarks/bench_mvae.py --sweep polymnist-gpu --docs docs/gpu_study.md    # on the preset's device
Prints Markdown tables (steps, memory, the ratios with their targets); ``--docs docs/benchmarks.md`` also splices
them into that page. ``--sweep PRESET`` times instead one step of every label of that sweep preset, built from its
own run configuration (networks, latent split, batch, precision, threads) on its device, and what the whole grid
costs in hours (``study_cost`` table; ``--set`` overrides the sweep, e.g. its runs' precision).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
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
from applications.multimodal_vae.networks import make_networks  # noqa: E402

from measure import (  # noqa: E402
    check_docs_page,
    device_arg,
    non_negative_int,
    positive_int,
    provenance,
    quartiles,
    saved_tensor_bytes,
    verdict,
)

__all__ = ["main", "MODELS", "RATIO_TARGETS", "build", "step", "batch", "memory_mib", "cuda_peak_bytes", "sweep_cost"]

#: label -> (model, options)
MODELS = {
    "helvae": ("helvae", {}),
    "mohelvae": ("mohelvae", {}),
    "mopoe": ("mopoe", {}),
    "mwbvae": ("mwbvae", {}),
    "mvae": ("mvae", {}),
    "mmvae (K=1)": ("mmvae", {}),
    "mmvae (K=10, DReG)": ("mmvae", {"num_samples": 10, "estimator": "dreg"}),
    "mmvaeplus (K=1)": ("mmvaeplus", {}),
    "holder_mixture (one draw)": ("holder_mixture", {"alpha": 0.5}),
    "holder_stratified": ("holder_stratified", {"alpha": 0.5}),
    "holderplus (K=1)": ("holderplus", {"alpha": 0.5}),
    "holderplusplus (K=1)": ("holderplusplus", {"alpha": 0.5}),
    "mmvm": ("mmvm", {}),
    "mmvm_holder (alpha 1/2)": ("mmvm_holder", {"alpha": 0.5}),
    "wbvae": ("wbvae", {}),
    "helvae (private latents)": ("helvae", {"private_dim": "half"}),
    "mopoe (private latents)": ("mopoe", {"private_dim": "half"}),
}

#: (label, name in the ratio table, target): HELVAE's step time over the model's
RATIO_TARGETS = (("mopoe", "MoPoE", "<= 0.9"), ("mmvae (K=10, DReG)", "MMVAE with K = 10 (DReG)", "<= 0.35"))


def build(label, latent, device, modalities=5):
    name, options = MODELS[label]
    if name in ("mmvaeplus", "holderplus", "holderplusplus") or options.get("private_dim") == "half":
        # half of the encoder outputs are the modality-specific latents (32 + 32 in MMVAE+ and Hölder+/++)
        options = {**options, "private_dim": latent // 2}
    if name == "holderplusplus":  # its top-down private encoders read the shared latent
        options["latent_dim"] = latent - options["private_dim"]
    torch.manual_seed(0)
    encoders, decoders = make_networks(polymnist_modalities(modalities), latent)
    model = MultimodalVAE(encoders, decoders, name, beta=2.5, **options).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def step(model, optimizer, x, sync, autocast=None):
    tic = time.perf_counter()
    with autocast or contextlib.nullcontext():
        loss = model(x)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    sync()
    return time.perf_counter() - tic


def batch(size, device, modalities=5):
    return torch.rand(size, modalities, 3, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)


def cuda_peak_bytes(run) -> int:
    """The CUDA allocator's peak while ``run()`` runs, beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def memory_mib(label, args) -> float:
    """Training memory of ``label`` alone (MiB): CUDA peak, or CPU saved activations."""
    model, optimizer = build(label, args.latent, args.device)
    x = batch(args.batch, args.device)
    if args.device.startswith("cuda"):
        def three_steps():
            for _ in range(3):
                step(model, optimizer, x, torch.cuda.synchronize)

        return cuda_peak_bytes(three_steps) / 2**20
    return saved_tensor_bytes(lambda: model(x)["loss"], exclude=(*model.parameters(), x)) / 2**20


def _steps_of(config, train_examples: int) -> int:
    """The training steps of one run of ``config``: its step cap, its epochs of ``train_examples``, or the fewer."""
    by_epochs = config.train.epochs * math.ceil(train_examples / config.train.batch_size)
    return min(by_epochs, config.train.max_steps) if config.train.max_steps else by_epochs


def sweep_cost(preset: str, repeats: int, warmup: int, overrides=(), train_examples: int = 60_000,
               seed: int = 0) -> str:
    """The ``study_cost`` table: each label of the sweep ``preset`` (with ``key=value`` ``overrides`` of the sweep)
    timed round-robin on its own configuration and device (its precision too), in an order shuffled each round from
    ``seed``, and the grid's hours on one process
    (runs x steps x s / step, the steps counted for ``train_examples`` training tuples; evaluation not included).
    On CUDA also each label's peak memory over a step beyond its weights and Adam's moments."""
    from collections import Counter

    from tqdm import tqdm

    from applications.multimodal_vae.sweep import grid, load_sweep, run_config
    from applications.multimodal_vae.train import make_model, resolve_device

    sweep = load_sweep(preset, overrides)
    runs = grid(sweep)
    counts = Counter(label for label, _, _ in runs)
    configs = {label: run_config(sweep, label, beta, seed) for label, beta, seed in reversed(runs)}
    first = next(iter(configs.values()))
    for key in ("device", "num_threads"):  # one process times every label: they must share these
        found = {label: getattr(config.train, key) for label, config in configs.items()}
        if len(set(found.values())) > 1:
            raise ValueError(f"sweep {preset!r}: the labels' train.{key} differ ({found}); one process times them all "
                             "on one setting: time such labels in separate sweeps")
    device = resolve_device(first.train.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if not cuda:
        torch.set_num_threads(first.train.num_threads or torch.get_num_threads())
    measured = provenance(str(device))  # the commit whose code runs
    built = {}
    for label in counts:
        torch.manual_seed(0)
        model = make_model(configs[label], polymnist_modalities(configs[label].data.num_modalities)).to(device)
        built[label] = (model, torch.optim.Adam(model.parameters(), lr=configs[label].train.lr),
                        torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=configs[label].train.precision == "bf16"))
    # each label on a batch of its own size and modalities (a label's overrides may change them)
    shapes = {label: (config.train.batch_size, config.data.num_modalities) for label, config in configs.items()}
    inputs = {(size, modalities): batch(size, device, modalities) for size, modalities in set(shapes.values())}
    times = {label: [] for label in built}
    order, labels = random.Random(seed), list(built)
    for r in tqdm(range(warmup + repeats), desc=f"{preset}: rounds of steps", unit="round"):
        order.shuffle(labels)  # each label once per round, in a new order each round
        for label in labels:
            model, optimizer, autocast = built[label]
            seconds = step(model, optimizer, inputs[shapes[label]], sync, autocast)
            if r >= warmup:
                times[label].append(seconds)
    median = {label: statistics.median(t) for label, t in times.items()}
    steps = {label: _steps_of(configs[label], train_examples) for label in built}
    hours = {label: counts[label] * steps[label] * median[label] / 3600 for label in built}
    parameters = {label: sum(p.numel() for p in model.parameters()) for label, (model, _, _) in built.items()}
    peak = {}
    if cuda:  # one label at a time: a step's activations (its weights, gradients and moments are resident before)
        for label, (model, optimizer, autocast) in built.items():
            peak[label] = cuda_peak_bytes(lambda m=model, o=optimizer, a=autocast, x=inputs[shapes[label]]:
                                          step(m, o, x, sync, a)) / 2**30
    where = "" if cuda else f"{torch.get_num_threads()} thread(s) per process, "
    precisions = sorted({config.train.precision for config in configs.values()})
    sizes = "/".join(str(b) for b in sorted({b for b, _ in shapes.values()}))
    lines = [f"`{preset}`: {measured}; {where}batch {sizes}, {'/'.join(precisions)}; median of "
             f"{repeats} steps per label (round-robin); steps per run for {train_examples} training tuples"
             + ("" if cuda else f"; load average {os.getloadavg()[0]:.1f} when it ended"), "",
             "| label | runs | parameters (M) | steps per run | s / step | hours of training |"
             + (" step memory (GiB) |" if cuda else ""),
             "|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    lines += [f"| {label} | {counts[label]} | {parameters[label] / 1e6:.1f} | {steps[label]} | {median[label]:.3f} | "
              f"{hours[label]:.2f} |" + (f" {peak[label]:.1f} |" if cuda else "") for label in built]
    lines += [f"| **all** | {len(runs)} | | | | **{sum(hours.values()):.1f}** |" + (" |" if cuda else "")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", type=device_arg)
    parser.add_argument("--batch", type=positive_int, default=128)
    parser.add_argument("--latent", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the order of the models in each round")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--docs", type=Path, metavar="PAGE",
                        help="also splice the tables into PAGE between its <!-- table: NAME --> markers (--table)")
    parser.add_argument("--table", metavar="NAME",
                        help="the markers' name for --docs (default: bench_mvae, with --sweep study_cost)")
    parser.add_argument("--sweep", metavar="PRESET", help="time the labels of this sweep preset instead")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="with --sweep: overrides of the sweep preset, e.g. 'extra_overrides=[train.precision=bf16]'")
    parser.add_argument("--train-examples", type=positive_int, default=60_000,
                        help="with --sweep: training tuples per epoch, for runs limited by epochs (PolyMNIST: 60000)")
    args = parser.parse_args()
    if args.sweep:
        # (the preset sets the device, batch, latent size, threads and models of its runs)
        ignored = [f"--{name}" for name in ("device", "batch", "latent", "threads", "models")
                   if getattr(args, name) != parser.get_default(name)]
        if ignored:
            parser.error(f"{', '.join(ignored)}: not taken with --sweep, whose preset sets them")
    else:
        given = [flag for flag, name in (("--set", "overrides"), ("--train-examples", "train_examples"))
                 if getattr(args, name) != parser.get_default(name)]
        if given:
            parser.error(f"{', '.join(given)}: taken only with --sweep")
    if not args.sweep and args.docs and not args.table and args.models != parser.get_default("models"):
        parser.error("--models times some models: its table would replace the full one; give --table another name")
    check_docs_page(parser, args.docs, args.table or ("study_cost" if args.sweep else "bench_mvae"))
    if args.sweep:  # an unknown preset or override named before any work
        from applications.multimodal_vae.sweep import load_sweep

        try:
            load_sweep(args.sweep, args.overrides)
        except ValueError as error:
            parser.error(f"--sweep {args.sweep!r}: {error}")
    from tqdm import tqdm

    if args.sweep:
        table = sweep_cost(args.sweep, args.repeats, args.warmup, args.overrides, args.train_examples, args.seed)
        print("\n" + table)
        if args.docs:
            splice_file(args.docs, args.table or "study_cost", table)
        return

    torch.set_num_threads(args.threads)
    measured = provenance(args.device)  # the commit whose code runs
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    built = {label: build(label, args.latent, args.device) for label in args.models}
    x = batch(args.batch, args.device)
    times = {label: [] for label in args.models}
    order, labels = random.Random(args.seed), list(built)
    for r in tqdm(range(args.warmup + args.repeats), desc="rounds of steps", unit="round"):
        order.shuffle(labels)  # no model always runs right after the same other one
        for label in labels:
            seconds = step(*built[label], x, sync)
            if r >= args.warmup:
                times[label].append(seconds)
    del built
    memory = {label: memory_mib(label, args) for label in tqdm(args.models, desc="memory", unit="model")}
    median = {label: statistics.median(t) for label, t in times.items()}
    # HELVAE's step time over the model's, round by round (one round's noise hits both)
    ratios = ({label: quartiles([h / t for h, t in zip(times["helvae"], times[label])]) for label in args.models}
              if "helvae" in times else {})
    kind = "peak CUDA memory" if args.device.startswith("cuda") else "saved activations"
    threads = "" if args.device.startswith("cuda") else f"{args.threads} threads, "
    lines = [f"{measured}; {threads}batch {args.batch}, latent {args.latent}, 5 modalities; medians of "
             f"{args.repeats} rounds, each model once per round in a random order (seed {args.seed})", "",
             f"| model | median s / step | HELVAE / model, median of rounds (IQR) | {kind} (MiB) |",
             "|---|---|---|---|"]
    def spread(label):  # the median ratio and its interquartile range
        q1, q2, q3 = ratios[label]
        return f"{q2:.2f} ({q1:.2f}-{q3:.2f})"

    for label in args.models:
        ratio = spread(label) if ratios else "-"
        lines.append(f"| {label} | {median[label]:.4f} | {ratio} | {memory[label]:.0f} |")
    targets = [(label, f"HELVAE / {title}", target) for label, title, target in RATIO_TARGETS if label in ratios]
    if targets:
        lines += ["", "| ratio (HELVAE step time / model's), median of rounds | value (IQR) | target |",
                  "|---|---|---|",
                  *(f"| {title} | {spread(label)} | {verdict(ratios[label][1], target)} |"
                    for label, title, target in targets)]
    table = "\n".join(lines)
    print("\n" + table)
    if args.docs:
        splice_file(args.docs, args.table or "bench_mvae", table)


if __name__ == "__main__":
    main()
