"""The `mcscale` command line: one subcommand per stage.

User-caused problems (bad config, missing data, unusable checkpoint) end with one line on stderr and a
non-zero exit: 2 for configuration errors (found before any work starts), 1 for the others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mcscale import __version__

BENCHMARKS = ("data", "kernels", "p2ot")  # benchmarks/bench_<name>.py of a checkout (not installed)
BENCHMARK_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
RESUME_AUTO = "auto"


def load_benchmark(name: str):
    """``benchmarks/bench_<name>.py`` of this checkout as a module (benchmarks are not installed)."""
    import importlib.util

    path = BENCHMARK_DIR / f"bench_{name}.py"
    if not path.is_file():
        from mcscale.errors import RunError

        raise RunError(f"bench {name}: {path} not found; benchmarks run from a source checkout of mcscale")
    spec = importlib.util.spec_from_file_location(f"mcscale_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_checkpoint_name(value: str) -> bool:
    from mcscale.train.run_folder import CHECKPOINT_PATTERN

    return bool(CHECKPOINT_PATTERN.match(Path(value).name))


def _spell_out_resume(argv: list[str]) -> list[str]:
    """``--resume key=value`` means resume (auto) plus an override, not ``--resume`` with the value
    ``key=value``: write it ``--resume=auto key=value`` before argparse sees it."""
    out = list(argv)
    for i, item in enumerate(out[:-1]):
        following = out[i + 1]
        if item == "--resume" and "=" in following and not following.startswith("-") \
                and not _is_checkpoint_name(following):
            out[i] = f"--resume={RESUME_AUTO}"
    return out


def _resume_args(args, parser) -> None:
    """args.resume: None, "auto" or a checkpoint path -> args.resume (bool) and args.resume_from."""
    value = args.resume
    if value is not None and value != RESUME_AUTO and not _is_checkpoint_name(value):
        parser.error(f"--resume {value}: expected auto or a ckpt-NNNNNNN.pt file of --out")
    args.resume, args.resume_from = value is not None, None if value in (None, RESUME_AUTO) else value


def _add_run_options(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--config", required=True, help="YAML file, or the name of one in configs/ (e.g. digits_lt)")
    p.add_argument("--out", required=True, help="run folder to write (created if missing)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--batch-size", type=int, help=f"global batch size ({stage}.batch_size)")
    p.add_argument("--seed", type=int, help="run seed (seed)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    example = "cluster.tau=0.95" if stage == "cluster" else "pretrain.lr=0.1"
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted config overrides, e.g. {example}")
    p.add_argument(
        "--resume", nargs="?", const=RESUME_AUTO, metavar="auto|CKPT",
        help="continue the run in --out: from its latest good checkpoint (--resume or --resume auto; a newer"
        " truncated or corrupt one is set aside), or from one of its ckpt-NNNNNNN.pt files",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcscale",
        description="Long-tailed deep clustering: MiniClustering, MaxiClustering, P2OT, BYOL pre-training.",
    )
    parser.add_argument("--version", action="version", version=f"mcscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("quickstart", help="BYOL, then encoder + K-means, self-labelling, MiniClustering, P2OT and"
                       " P2OT + mini-cluster weights on digits-LT (a few CPU minutes)")
    p.add_argument("--out", default="runs/quickstart", help="folder for the runs and summary.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the long-tailed subset, BYOL and every method")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    p.add_argument("--resume", nargs="?", const=RESUME_AUTO, choices=(RESUME_AUTO,), metavar="auto",
                   help="continue a stopped quickstart in --out: each stage from its latest good checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every stage, e.g. max_steps=20 for a smoke run")

    p = sub.add_parser("pretrain", help="BYOL pre-training of the encoder")
    _add_run_options(p, "pretrain")

    p = sub.add_parser("cluster", help="K-means head init, then MiniClustering / MaxiClustering / self-labelling /"
                       " P2OT training (cluster.method)")
    _add_run_options(p, "cluster")
    p.add_argument("--encoder", help="folder written by `mcscale pretrain`; without it the encoder comes from the"
                   " config (model.backbone=identity, or model.weights=PATH of a pretrained backbone)")

    p = sub.add_parser("embed", help="clean-view features of the data set through the encoder into"
                       " OUT/features.npy + labels.npy (read back with data.source=embeddings)")
    p.add_argument("--config", required=True, help="YAML file, or the name of one in configs/")
    p.add_argument("--out", required=True, help="folder for features.npy and labels.npy (created if missing)")
    p.add_argument("--encoder", help="folder written by `mcscale pretrain`; default: the config's encoder")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. model.weights=PATH")

    from mcscale.data.shards.prepare import add_parser as add_prepare_parser

    add_prepare_parser(sub)

    p = sub.add_parser("bench", help="benchmarks: the P2OT solver, the head-objective kernels or the data loaders")
    p.add_argument("target", choices=BENCHMARKS, help="what to time")
    p.add_argument("--out", help="CSV to write (default benchmarks/<target>_<device>.csv)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when visible, else cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (kernels, data; data defaults to 1 on CPU)")

    p = sub.add_parser("eval", help="re-evaluate the latest checkpoint of a clustering run")
    # positional too: torchrun's own parser takes `--run` for an abbreviation of its --run-path
    p.add_argument("run_dir", nargs="?", metavar="RUN", help="folder written by `mcscale cluster` (or --run RUN)")
    p.add_argument("--run", help="folder written by `mcscale cluster`")
    p.add_argument("--cpu", action="store_true")

    p = sub.add_parser("report", help="figures and an offline report.html in RUN/report/")
    p.add_argument("--run", required=True, help="folder written by `mcscale cluster`")
    p.add_argument("--cpu", action="store_true", help="recompute predictions on the CPU if needed")

    p = sub.add_parser("compare", help="one metrics table across clustering runs")
    p.add_argument("runs", nargs="+", metavar="DIR", help="folders written by `mcscale cluster`")

    from mcscale.data.synth import add_parser as add_synth_parser
    from mcscale.report.diagnose import add_parser as add_diagnose_parser

    add_synth_parser(sub)
    add_diagnose_parser(sub)
    return parser


def _config_from_args(args, stage: str):
    from mcscale.config import load_config

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    if args.batch_size is not None:
        overrides.append(f"{stage}.batch_size={args.batch_size}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    return load_config(args.config, overrides)


def _say(text: str) -> None:
    """Print once per job: on rank 0 of a multi-process run (every rank ends with the same result)."""
    from mcscale.launcher import launched_rank

    if launched_rank() == 0:
        print(text)


def _print_metrics(title: str, metrics: dict) -> None:
    from mcscale.report.tables import metrics_table

    _say(title + "\n" + metrics_table({"kmeans": metrics["kmeans"], "final": metrics["final"]}))


def _resume_from(args) -> Path | None:
    """The checkpoint of ``--resume CKPT``, checked before any work starts."""
    if args.resume_from is None:
        return None
    from mcscale.train.run_folder import chosen_checkpoint

    return chosen_checkpoint(args.out, args.resume_from)


def _dispatch(args) -> int:
    # configuration first: a config error is reported before torch and the data load
    stage = args.command if args.command in ("pretrain", "cluster") else None
    if stage is not None:
        from mcscale.launcher import (
            check_global_batch,
            launched_rank,
            launched_world_size,
        )

        cfg = _config_from_args(args, stage)
        batch = getattr(cfg, stage).batch_size
        check_global_batch(batch, launched_world_size(), f"{stage}.batch_size", cfg.distributed.sync_batchnorm)
        cfg.model.check_encoder_source(stage, getattr(args, "encoder", None) is not None)
    elif args.command == "embed":
        from mcscale.config import load_config

        cfg = load_config(args.config, args.overrides)
        cfg.model.check_encoder_source("embed", args.encoder is not None)
    if args.command == "pretrain":
        from mcscale.train.pretrain import run_pretrain

        path = run_pretrain(cfg, args.out, resume=args.resume, force_cpu=args.cpu, resume_from=_resume_from(args))
        _say(f"encoder written to {path}")
    elif args.command == "cluster":
        from mcscale.train.cluster import run_cluster

        metrics = run_cluster(cfg, args.encoder, args.out, resume=args.resume, force_cpu=args.cpu,
                              resume_from=_resume_from(args))
        if cfg.logging.report and launched_rank() == 0:
            from mcscale.report.html import write_report

            write_report(args.out, force_cpu=args.cpu)
        _print_metrics(f"clustering ({cfg.cluster.method}) written to {Path(args.out) / 'metrics.json'}", metrics)
    elif args.command == "embed":
        from mcscale.train.embed import run_embed

        out = run_embed(cfg, args.encoder, args.out, force_cpu=args.cpu, batch_size=args.batch_size)
        _say(f"features written to {out}; cluster them with data.source=embeddings data.root={out}"
             " data.imbalance_ratio=null")
    elif args.command == "eval":
        args.run = args.run or args.run_dir
        if not args.run:
            from mcscale.errors import RunError

            raise RunError("eval: name the run folder (mcscale eval RUN, or --run RUN)")
        from mcscale.train.evaluate import run_eval

        metrics = run_eval(args.run, force_cpu=args.cpu)
        _print_metrics(f"re-evaluated {args.run}", metrics)
    elif args.command == "report":
        from mcscale.report.html import write_report

        print(write_report(args.run, force_cpu=args.cpu))
    elif args.command == "compare":
        from mcscale.report.tables import compare_runs

        print(compare_runs(args.runs))
    elif args.command == "synth":
        from mcscale.data.synth import run as run_synth

        return run_synth(args)
    elif args.command == "diagnose":
        from mcscale.report.diagnose import run as run_diagnose

        return run_diagnose(args)
    elif args.command == "prepare":
        from mcscale.data.shards.prepare import run as run_prepare

        return run_prepare(args)
    elif args.command == "bench":
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        out = args.out or f"benchmarks/{args.target}_{device}.csv"
        extra = {"threads": args.threads} if args.threads else {}
        load_benchmark(args.target).run(out, device=device, repeats=args.repeats, **extra)
        print(f"written to {out}")
    elif args.command == "quickstart":
        from mcscale.quickstart import run_quickstart

        run_quickstart(args.out, seed=args.seed, force_cpu=args.cpu, resume=args.resume is not None,
                       overrides=args.overrides)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    # overrides may come before or after options: collect every stray key=value
    args, extra = parser.parse_known_args(_spell_out_resume(sys.argv[1:] if argv is None else argv))
    stray = [item for item in extra if "=" not in item or item.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + extra
    if hasattr(args, "resume") and args.command != "quickstart":
        _resume_args(args, parser)
    if args.command is None:
        parser.print_help()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command is None:
        return 0
    from mcscale.config import ConfigError
    from mcscale.data.sources import DataError
    from mcscale.errors import RunError, StopRequested

    # under a multi-process launcher, lines from ranks other than 0 say which rank they come from
    from mcscale.launcher import launched_rank

    rank = launched_rank()
    tag = f"mcscale[rank {rank}]" if rank else "mcscale"
    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"{tag}: config error: {err}", file=sys.stderr)
        return 2
    except (DataError, RunError) as err:
        print(f"{tag}: error: {err}", file=sys.stderr)
        return 1
    except StopRequested as stop:
        if not rank:
            print(f"{tag}: {stop}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print(f"{tag}: interrupted; resume with the same command and --resume auto", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # only a run that got that far can have joined a group
            from mcscale.parallel import leave_process_group

            leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
