"""The pre-training command line: ``launch/pretrain_gpt3.py`` (whose docstring lists the launch commands), and the
``adamhd-pretrain`` command once the package is installed (one process; for several ranks, start either under the
deepspeed launcher, torchrun or mpirun).

:func:`main` parses the options, reads how the ranks were started, resolves and validates the settings (a bad
option is reported with exit status 2 before any work starts, naming the option and what is allowed), and trains.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .manifest import MANIFEST_FILE, read_manifest
from .options import add_options
from .ranks import LaunchContext, launch_context
from .resolve import check_resume, resolve_settings
from .settings import FROM_MANIFEST_OVERRIDES, SettingsError, TrainSettings
from .train import train

__all__ = ["build_parser", "given_options", "main", "PROG"]

PROG = "pretrain_gpt3.py"
SCRIPT = "launch/pretrain_gpt3.py"
_NOT_SETTINGS = ("from_manifest", "master_port", "local_rank")


def port(text: str) -> int:
    """A TCP port number from the command line (1-65535)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return value


_GROUPS = (
    ("model", ("model", "dtype", "activation_checkpointing")),
    ("batch", ("global_batch_tokens", "seq_len", "micro_batch")),
    ("model parallelism", ("tp", "pp")),
    ("optimizer and schedule", ("lr", "weight_decay", "grad_clip", "warmup_tokens", "decay_tokens", "min_lr_ratio",
                                "ramp_tokens", "ramp_start_tokens", "max_steps", "seed")),
    ("data", ("data", "tokenizer", "vocab_size", "max_chars", "val_fraction", "data_cache")),
    ("run directory, logging, checkpoints", ("out_dir", "resume", "eval_interval", "eval_batches", "save_interval",
                                             "log_interval", "keep_checkpoints", "exit_after_steps", "peak_tflops",
                                             "tensorboard")),
)
"""The option groups of ``--help``; every option is declared on its :class:`TrainSettings` field."""


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The launcher's options; ``description`` is the ``--help`` text (default: this module's docstring)."""
    ap = argparse.ArgumentParser(prog=PROG, description=description or __doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    eng = ap.add_argument_group("engine (give one)")
    add_options(eng, TrainSettings, ("deepspeed_config",))
    eng.add_argument("--fsdp", action="store_true", default=None, help="FSDP2 (start with torchrun)")
    eng.add_argument("--from-manifest", metavar="FILE",
                     help="re-run the job of a manifest.json (only the run options marked * may be given too)")
    for title, names in _GROUPS:
        group = ap.add_argument_group(title)
        add_options(group, TrainSettings, names, marked=FROM_MANIFEST_OVERRIDES)
        if title.startswith("run directory"):
            group.add_argument("--master-port", type=port,
                               help="port of rank 0 when this script finds its ranks itself (mpirun, or one "
                                    "process); launchers use their own --master_port")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return ap


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options that are settings, by :class:`~adamhd_train.settings.TrainSettings` field name (None:
    not given), as :func:`~adamhd_train.resolve.resolve_settings` takes them."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}


def _rerun_command(ctx: LaunchContext, manifest_path: Path) -> str:
    if ctx.launcher == "deepspeed":
        nodes = max(1, ctx.world_size // max(1, ctx.local_world_size))
        head = f"deepspeed --num_gpus {ctx.local_world_size}" + (f" --num_nodes {nodes}" if nodes > 1 else "")
    elif ctx.launcher == "torchrun":
        head = f"torchrun --nproc-per-node {ctx.local_world_size}"
    elif ctx.launcher == "mpirun":
        head = f"mpirun -np {ctx.world_size} -x PATH python"
    else:
        head = "python"
    return f"{head} {SCRIPT} --from-manifest {shlex.quote(str(manifest_path))} --out-dir <new run directory>"


def _error(rank: int, msg: str) -> int:
    if rank == 0:
        print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    return 2


def main(argv: Optional[list[str]] = None, *, description: Optional[str] = None,
         on_model: Optional[Callable[[torch.nn.Module], None]] = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), resolve the job and train; returns the exit status (2 for bad
    options). ``on_model`` is handed to :func:`~adamhd_train.train.train`."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(description).parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is first imported
    ctx = launch_context(on_gpu)
    given = given_options(args)
    try:
        expect_data_hash = None
        if args.from_manifest:
            manifest = read_manifest(args.from_manifest)
            expect_data_hash = manifest.get("data", {}).get("data_hash")
            if ctx.rank == 0:
                print(f"note: the job of {args.from_manifest} (its settings, DeepSpeed config and data)", flush=True)
                if manifest.get("world_size") != ctx.world_size:
                    print(f"note: the manifest's run had {manifest.get('world_size')} rank(s), this one has "
                          f"{ctx.world_size}: the loss curve will not be bitwise identical", flush=True)
            run = resolve_settings(given, ctx, base=manifest["settings"],
                                   base_ds_source=manifest.get("deepspeed_config_source"))
        else:
            run = resolve_settings(given, ctx)
        resume_from = check_resume(run)
    except (SettingsError, ValueError, FileNotFoundError) as e:
        return _error(ctx.rank, str(e))

    manifest_path = Path(run.settings.out_dir) / MANIFEST_FILE
    try:
        return train(run, ctx, resume_from=resume_from, master_port=args.master_port, argv=[PROG] + list(argv),
                     rerun_command=_rerun_command(ctx, manifest_path), expect_data_hash=expect_data_hash,
                     on_model=on_model)
    except SettingsError as e:
        code = _error(ctx.rank, str(e))
        if torch.distributed.is_initialized():
            # The process group is up (a checkpoint refused while loading): leaving through interpreter teardown
            # with gloo's threads alive can abort the process (SIGABRT) instead of exiting with this status.
            sys.stdout.flush()
            os._exit(code)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
