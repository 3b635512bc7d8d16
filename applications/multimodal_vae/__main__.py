"""Command line of the multimodal VAE application.

    python -m applications.multimodal_vae train --preset polymnist-helvae [--set key=value ...] [--resume]
    torchrun --nproc_per_node N -m applications.multimodal_vae train ...   (distributed data parallel)
    python -m applications.multimodal_vae evaluate --run runs/NAME [--set eval.key=value ...] [--only log_likelihood|fid]
    python -m applications.multimodal_vae grid --run runs/NAME [--columns 8] [--scale 3] [--seed N] [--out FILE]
    python -m applications.multimodal_vae sweep --preset polymnist-cpu [--set key=value ...] [--workers N]
        [--train-only] [--stop-after MINUTES] [--summarise-only]   (workers share the grid: one run each at a time)
    python -m applications.multimodal_vae study --sweep runs/polymnist-cpu-study [--preset NAME ...] [--docs docs]
    python -m applications.multimodal_vae likelihood-check --sweep runs/polymnist-cpu-study [--samples 12 1000]
        [--examples 20] [--out docs/likelihood_check.md]
    python -m applications.multimodal_vae presets
    python -m applications.multimodal_vae build-polymnist [--root data/polymnist] [--seed 0]

SIGINT or SIGTERM during training saves a checkpoint at the next step and exits with 128 + the signal's number;
``--resume`` continues the run (a second SIGINT stops at once, losing the steps since the last checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from pathlib import Path

from .config import available_presets, load_config

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m applications.multimodal_vae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model from a preset")
    train.add_argument("--preset", required=True, help=f"one of: {', '.join(available_presets())}")
    train.add_argument("--config", help="a YAML file merged over the preset")
    train.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override configuration keys, e.g. --set train.epochs=10 model.beta=1.0")
    train.add_argument("--resume", action="store_true", help="continue the run from its checkpoint")
    evaluate = commands.add_parser("evaluate", help="conditional coherence of a trained run; writes report.md")
    evaluate.add_argument("--run", required=True, help="the run folder (holding config.yaml and checkpoint.pt)")
    evaluate.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                          help="override evaluation keys, e.g. --set eval.fid_samples=10000 eval.subsets=single")
    evaluate.add_argument("--only", choices=["log_likelihood", "fid"],
                          help="recompute only this metric of an evaluated run (fid: FID and KID), keeping the others")
    grid = commands.add_parser("grid", help="draw the labelled sample grid of a trained run (sample_grid.png)")
    grid.add_argument("--run", required=True, help="the run folder (holding config.yaml and checkpoint.pt)")
    grid.add_argument("--columns", type=int, default=8,
                      help="test tuples shown (the first the evaluation scores, as its own grid)")
    grid.add_argument("--scale", type=int, default=3, help="figure pixels per image pixel")
    grid.add_argument("--out", help="the PNG to write (default: sample_grid.png in the run folder)")
    grid.add_argument("--seed", type=int, default=None,
                      help="seed of the generations (default: the run's eval.seed, as the evaluation's own grid)")
    sweep = commands.add_parser("sweep", help="train and evaluate a grid of models x beta x seeds, then summarise")
    sweep.add_argument("--preset", required=True, help="a sweep preset (sweeps/*.yaml)")
    sweep.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override sweep keys, e.g. --set seeds=[0] betas=[2.5]")
    sweep.add_argument("--train-only", action="store_true", help="train the runs, do not evaluate them (yet)")
    sweep.add_argument("--stop-after", type=float, metavar="MINUTES",
                       help="start no new run after MINUTES (the run under way completes); rerun to continue")
    sweep.add_argument("--summarise-only", action="store_true",
                       help="only write the summary of the runs finished so far")
    sweep.add_argument("--docs", metavar="PAGE",
                       help="also splice the summary's table into PAGE, between the markers <!-- table: sweep_NAME --> "
                            "and <!-- end table: sweep_NAME --> (NAME: the preset's file name, lower-case letters "
                            "and digits joined by single hyphens, - as _)")
    sweep.add_argument("--workers", type=int, default=1,
                       help="run the grid with this many processes at once (their logs: worker-N.log in the sweep "
                            "folder); give each one thread per core, e.g. --set 'extra_overrides=[train.num_threads=1]'")
    check = commands.add_parser("likelihood-check",
                                help="how far below log p(X) a sweep's importance-sampled estimates lie, per model")
    check.add_argument("--sweep", required=True, help="the sweep folder (runs/NAME, holding results.csv)")
    check.add_argument("--samples", type=int, nargs="+", default=[12, 1000], help="the numbers of samples K compared")
    check.add_argument("--examples", type=int, default=20, help="test tuples per run")
    check.add_argument("--out", help="the page to write (default: likelihood_check.md in the sweep folder)")
    study = commands.add_parser("study", help="the papers' claims and the alpha study checked on a sweep's runs")
    study.add_argument("--sweep", required=True, help="the sweep folder (runs/NAME, holding results.csv)")
    study.add_argument("--docs", help="also write DOCS/study.md and its figures in DOCS/figures/study/")
    study.add_argument("--preset", nargs="+", help="the sweep presets that ran the runs (variants of one study, "
                                                   "such as polymnist-cpu-study-quick and polymnist-cpu-study-alpha, "
                                                   "share its folder): the study first summarises their finished "
                                                   "runs together, and its page names them (default: the folder's "
                                                   "results.csv as it is, and the preset of the folder's name)")
    commands.add_parser("presets", help="list the run and sweep presets")
    build = commands.add_parser("build-polymnist", help="build the offline PolyMNIST")
    build.add_argument("--root", default="data/polymnist")
    build.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "presets":
        from .sweep import available_sweeps

        print("runs:\n  " + "\n  ".join(available_presets()) + "\nsweeps:\n  " + "\n  ".join(available_sweeps()))
        return 0
    if args.command == "sweep":
        from .sweep import load_sweep, run_sweep
        from .train import TrainingInterrupted

        if args.stop_after is not None and not args.stop_after > 0:
            parser.error(f"--stop-after must be a positive number of minutes, got {args.stop_after}")
        if args.workers < 1:
            parser.error(f"--workers must be a positive integer, got {args.workers}")
        try:
            sweep_config = load_sweep(args.preset, args.overrides)
        except ValueError as error:
            parser.error(str(error))
        if args.docs is not None:  # the page and its markers are checked before any run trains
            from .files import check_page
            from .sweep import table_name

            try:
                check_page(args.docs, table_name(args.preset))
            except (OSError, ValueError) as error:
                parser.error(f"--docs {args.docs!r}: {error}")
        try:
            if args.workers > 1 and not args.summarise_only:
                from .sweep import run_workers

                flags = ["--train-only"] * args.train_only + (["--stop-after", str(args.stop_after)]
                                                              if args.stop_after is not None else [])
                status = run_workers(sweep_config, args.workers, ["--preset", args.preset, "--set", *args.overrides,
                                                                  *flags] if args.overrides else
                                     ["--preset", args.preset, *flags], train_only=args.train_only)
            else:
                folder = run_sweep(sweep_config, train_only=args.train_only, stop_after_minutes=args.stop_after,
                                   summarise_only=args.summarise_only)
                print(f"sweep written to {folder}")
                status = 0
            if args.docs is not None and status == 0:
                from .sweep import splice_summary

                # quoted as a shell needs it: an override such as "overrides=['eval.fid_sizes=[]']" pastes back
                splice_summary(args.docs, args.preset, sweep_config, shlex.join(
                    ["python", "-m", "applications.multimodal_vae", "sweep", "--preset", args.preset,
                     "--summarise-only", "--docs", args.docs, *(["--set", *args.overrides] if args.overrides else [])]))
            return status
        except TrainingInterrupted as stop:
            return _stopped(stop, "rerun the same sweep command to continue")
        # as for train: runs of another configuration in the sweep's folder, a missing dataset, a bad setting
        except (FileNotFoundError, ValueError) as error:
            parser.exit(1, f"{parser.prog} sweep: error: {error}\n")
    if args.command == "likelihood-check":
        from tqdm import tqdm

        from .study import write_likelihood_check

        out = args.out or str(Path(args.sweep) / "likelihood_check.md")
        command = (f"python -m applications.multimodal_vae likelihood-check --sweep {args.sweep} --samples "
                   f"{' '.join(map(str, args.samples))} --examples {args.examples}" + (f" --out {args.out}" if args.out
                                                                                       else ""))
        try:
            page = write_likelihood_check(args.sweep, out, args.samples, args.examples, command,
                                          progress=tqdm)
        except ValueError as error:
            parser.error(str(error))
        print(f"likelihood check written to {page}")
        return 0
    if args.command == "study":
        from .study import write_study
        from .sweep import load_sweep, summarise

        folder = Path(args.sweep)
        presets = args.preset or [folder.name]
        command = "; ".join([*(f"python -m applications.multimodal_vae sweep --preset {preset} --workers 2"
                               for preset in presets),
                             f"python -m applications.multimodal_vae study --sweep {args.sweep}"
                             + (f" --preset {' '.join(args.preset)}" if args.preset else "")
                             + (f" --docs {args.docs}" if args.docs else "")])
        try:
            if args.preset:
                summarise(folder, [load_sweep(preset) for preset in args.preset])
            print(f"study written to {write_study(folder, args.docs, command)}")
        except ValueError as error:
            parser.error(str(error))
        except FileNotFoundError as error:  # (a traceback)
            parser.error(f"{error}: the sweep's results.csv lists a run that is no longer there; summarise the runs "
                         "there are again (study --preset PRESET, or the sweep command)")
        return 0
    if args.command == "build-polymnist":
        from .data.build_polymnist import main as build_main

        if args.seed < 0:
            parser.error(f"--seed must be a non-negative integer, got {args.seed}")

        build_main(["--root", args.root, "--seed", str(args.seed)])
        return 0
    if args.command == "grid":
        return _grid(parser, args)
    if args.command == "evaluate":
        from .train import RunFolderBusy, run_folder_lock

        if any(not o.startswith("eval.") for o in args.overrides):
            parser.error(f"evaluate --set takes eval.* keys only, got {args.overrides}")
        # held while evaluating: a train of the folder is refused meanwhile, as an evaluation during one is
        held = run_folder_lock(args.run, "evaluate it once that has stopped", "evaluated") if Path(args.run).is_dir() \
            else contextlib.nullcontext()
        try:
            with held:
                return _evaluate(parser, args)
        except RunFolderBusy as error:
            parser.error(f"--run {args.run!r}: {error}")
    try:
        config = load_config(args.preset, args.overrides, args.config)
    except ValueError as error:
        parser.error(str(error))
    from .train import RunFolderBusy, TrainingDiverged, TrainingInterrupted
    from .train import train as run_training

    try:
        run_dir = run_training(config, resume=args.resume)
    except TrainingInterrupted as stop:
        return _stopped(stop, "continue with --resume")
    # what a user can act on, in one line: a missing checkpoint or data, an existing run folder, a changed setting
    # on --resume, an unreadable file (ValueErrors), a diverged run
    except (FileNotFoundError, FileExistsError, ValueError, TrainingDiverged, RunFolderBusy) as error:
        parser.exit(1, f"{parser.prog} train: error: {error}\n")
    print(f"run written to {run_dir}")
    return 0


def _evaluate(parser, args) -> int:
    from tqdm import tqdm

    from .evaluation import describe_bias, evaluate_run, format_std_error, reevaluate
    from .evaluation.fid import check_weights_file
    from .train import RunFolderBusy, load_run, summary_line

    try:
        config, model = load_run(args.run, args.overrides)
    except ValueError as error:
        parser.error(str(error))
    if args.only is None:
        try:
            check_weights_file(config.eval)
            metrics = evaluate_run(args.run, config, model, progress=tqdm)
        except (FileNotFoundError, ValueError, RunFolderBusy) as error:  # a missing file or data, in one line
            parser.exit(1, f"{parser.prog} evaluate: error: {error}\n")
        print(summary_line(metrics, args.run))
        return 0
    try:
        metrics = reevaluate(args.run, config, model, args.only, progress=tqdm)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if args.only == "log_likelihood":
        likelihood = metrics["log_likelihood"]
        print(f"{args.run}: log p(X) {likelihood['joint']:.1f} +- {format_std_error(likelihood)} "
              f"(K = {likelihood['num_samples']}, {likelihood['examples']} tuples), given one modality "
              f"{likelihood['given_one_modality']:.1f}" + (f"; {describe_bias(likelihood)}"
                                                           if describe_bias(likelihood) else ""))
    else:
        fid = metrics["fid"]
        error = fid.get("kid_unconditional_standard_error")
        print(f"{args.run}: unconditional FID {fid['unconditional']:.1f}, KID x 1000 {1000 * fid['kid_unconditional']:.2f}"
              + ("" if error is None else f" +- {1000 * error:.2f}") + f" ({fid['samples']} samples)")
    return 0


def _grid(parser, args) -> int:
    import torch

    from .data import load_dataset
    from .evaluation import scored_tuples
    from .evaluation.grids import GRID_FILE, draw_sample_grid
    from .train import load_run

    for name in ("columns", "scale"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.seed is not None and not 0 <= args.seed < 2**63:  # a generator's seed
        parser.error(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    try:
        config, model = load_run(args.run)
        # the tuples the evaluation scores, in its seeded order (some test splits are stored class by class)
        data = scored_tuples(config.eval, load_dataset(config, "test"))
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"{parser.prog} grid: error: {error}\n")
    out = args.out or str(Path(args.run) / GRID_FILE)
    shown = data.gather(torch.arange(min(args.columns, len(data))))
    title = f"{config.name}: {config.model.name}, beta {config.model.beta:g}"
    seed = config.eval.seed if args.seed is None else args.seed
    if not draw_sample_grid(model, shown, data.modalities, out, args.columns, args.scale, seed, title):
        parser.exit(1, f"{parser.prog} grid: error: {config.data.dataset} has no image modality to draw\n")
    print(f"sample grid written to {out}")
    return 0


def _stopped(stop, to_continue: str) -> int:
    """A ``TrainingInterrupted`` (SIGINT or SIGTERM): say where the run stands and how the command continues it
    (``to_continue``); exit with 128 + the signal."""
    print(f"{stop}; {to_continue}", file=sys.stderr)
    return 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main())
