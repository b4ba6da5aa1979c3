"""Command lines: ``jackpot-train`` and ``jackpot-export``.

    jackpot-train [--config configs/demo.py] [--workdir DIR] [--resume] [--config.algorithm.lam=0.5 ...]
                  [--distributed | --coordinator_address HOST:PORT --num_processes N --process_id I]
    jackpot-export WORKDIR --out DIR [--model policy|actor] [--step N]

Both take ``--debug`` (or ``JACKPOT_DEBUG=1``): a user error (a bad config, value or path) is otherwise one
line ``jackpot-train: message`` (exit status 1) and TensorFlow's and XLA's start-up logs are silenced
(:mod:`jackpot_jax.console`).

``jackpot-train`` without ``--config`` runs ``configs/demo.py``; without ``--workdir``, a fresh
directory ``runs/<config name>-<date>-<time>``. A work dir that already holds checkpoints is only
continued with ``--resume`` (never overwritten by accident), and is one run's: a second ``jackpot-train``
on it fails at once, naming the process of the first (which holds ``WORKDIR/lock``). Multi-process runs
start every process with the same flags plus ``--distributed`` (the cluster detected: TPU pod slices, SLURM) or the
explicit three (``launch/local.sh``); see :func:`jackpot_jax.parallel.initialize`. ``jackpot-export`` writes a trained
model of a run as a Hugging Face checkpoint (``config.json`` + safetensors, and the tokenizer).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from jackpot_jax.console import debug_requested, quiet_startup, user_errors

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "configs", "demo.py")



def _define_flags() -> None:
    """jackpot-train's flags (defined when it runs, so that importing this module parses nothing)."""
    config_flags.DEFINE_config_file("config", DEMO_CONFIG, "the run's config file (ml_collections)", lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and plots go (default: a new runs/ dir)")
    flags.DEFINE_bool("resume", False, "continue the run in --workdir from its latest checkpoint")
    flags.DEFINE_bool("distributed", False, "multi-process: jax.distributed.initialize() detects the cluster "
                      "(TPU pod slices, SLURM)")
    flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0's coordinator")
    flags.DEFINE_integer("num_processes", None, "multi-process: how many processes the run has")
    flags.DEFINE_integer("process_id", None, "multi-process: this process's index, 0 .. num_processes - 1")
    flags.DEFINE_bool("debug", False, "full tracebacks of every error and TensorFlow's / XLA's start-up logs "
                      "(also JACKPOT_DEBUG=1)")


def _default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0]
    return os.path.join("runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


_started = False  # whether jackpot-train got past flag parsing (see train_main)


def _train(argv) -> None:
    global _started
    _started = True
    del argv
    from jackpot_jax import parallel  # noqa: PLC0415 (after flag parsing: fast --help)
    from jackpot_jax.config import ConfigError  # noqa: PLC0415
    from jackpot_jax.files import lock_holder  # noqa: PLC0415
    from jackpot_jax.train.checkpoint import Checkpointer, ResumeError  # noqa: PLC0415
    from jackpot_jax.train.loop import LOCK_FILE, Trainer, TrainingStopped, workdir_in_use  # noqa: PLC0415

    logging.getLogger("jackpot_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save at INFO
    args = flags.FLAGS
    workdir = args.workdir or _default_workdir(config_flags.get_config_filename(args["config"]))
    checkpoints = os.path.join(workdir, "checkpoints")
    if not args.resume and os.path.isdir(checkpoints) and Checkpointer.has_checkpoints(checkpoints):
        holder = lock_holder(os.path.join(workdir, LOCK_FILE))  # a run going on there: resuming is no advice
        if holder is not None:
            sys.exit(f"jackpot-train: {workdir_in_use(os.path.abspath(workdir), holder)}")
        sys.exit(f"jackpot-train: {workdir} already holds checkpoints: pass --resume to continue that run, or "
                 f"choose another --workdir.")
    with user_errors("jackpot-train", debug=args.debug or debug_requested(),
                     own=(ConfigError, TrainingStopped, ResumeError)):
        parallel.initialize(args.coordinator_address, args.num_processes, args.process_id, auto=args.distributed)
        trainer = Trainer(args.config, workdir, resume=args.resume)
        history = trainer.run()
    print(f"jackpot-train: {len(history)} steps in {os.path.abspath(workdir)}; metrics in metrics.jsonl, "
          f"plots with `jackpot-plot {workdir}`.")


def train_main() -> None:
    """Entry point of ``jackpot-train``."""
    quiet_startup(debug_requested(sys.argv[1:]))  # before anything imports JAX or TensorFlow
    try:
        _define_flags()  # with the default config, ml_collections applies the overrides here
        app.run(_train)
    except (AttributeError, KeyError) as error:  # ml_collections: an override of a key the config lacks
        if _started:  # not from the flags: a bug to see whole
            raise
        sys.exit(f"jackpot-train: unknown config key: {error}")


def export(workdir: str, out: str, *, model: str = "policy", step: int | None = None) -> str:
    """:func:`jackpot_jax.train.export.export` (imported when called: ``--help`` stays fast)."""
    from jackpot_jax.train.export import export as export_run  # noqa: PLC0415

    return export_run(workdir, out, model=model, step=step)


def export_main(argv=None) -> None:
    """Entry point of ``jackpot-export``."""
    parser = argparse.ArgumentParser(description="Write a trained model of a jackpot-train run as a Hugging Face "
                                                 "checkpoint.")
    parser.add_argument("workdir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="policy", choices=("policy", "actor"))
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--debug", action="store_true", help="full tracebacks of every error and TensorFlow's / "
                        "XLA's start-up logs (also JACKPOT_DEBUG=1)")
    args = parser.parse_args(argv)
    debug = args.debug or debug_requested()
    quiet_startup(debug)  # before anything imports JAX or TensorFlow
    from jackpot_jax.config import ConfigError  # noqa: PLC0415
    from jackpot_jax.train.checkpoint import ResumeError  # noqa: PLC0415 (imports JAX)

    with user_errors("jackpot-export", debug=debug, own=(ConfigError, ResumeError)):
        print(f"jackpot-export: wrote {export(args.workdir, args.out, model=args.model, step=args.step)}")
