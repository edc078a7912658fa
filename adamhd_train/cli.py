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
from .models import MODEL_NAMES
from .ranks import LaunchContext, launch_context
from .resolve import check_resume, resolve_settings
from .settings import SettingsError, parse_count
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


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The launcher's options; ``description`` is the ``--help`` text (default: this module's docstring)."""
    count = parse_count
    ap = argparse.ArgumentParser(prog=PROG, description=description or __doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    eng = ap.add_argument_group("engine (give one)")
    eng.add_argument("--deepspeed", dest="deepspeed_config", metavar="CONFIG",
                     help="DeepSpeed config JSON (e.g. ds_configs/zero2_adamhd.json); its batch numbers, precision, "
                          "clipping and LR are set from the options below")
    eng.add_argument("--fsdp", action="store_true", default=None, help="FSDP2 (start with torchrun)")
    eng.add_argument("--from-manifest", metavar="FILE",
                     help="re-run the job of a manifest.json (only the run options marked * may be given too)")

    m = ap.add_argument_group("model")
    m.add_argument("--model", help=f"size: {', '.join(MODEL_NAMES)} (default: gpt3-small on a GPU machine, nano on "
                                   f"a CPU-only one)")
    m.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"),
                   help="precision (default auto: the DeepSpeed config's, bf16 on GPU for FSDP2; fp32 on a CPU-only "
                        "machine, where fp16 is refused; fp16 needs DeepSpeed, whose fp16 mode scales the loss)")
    m.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in the backward pass (default off)")

    b = ap.add_argument_group("batch")
    b.add_argument("--global-batch-tokens", type=count, help="tokens per optimizer step (default: the model's, "
                                                             "GPT-3 table)")
    b.add_argument("--seq-len", type=count, help="tokens per sequence (default: the model's context)")
    b.add_argument("--micro-batch", type=count, help="sequences per rank per forward pass (default: the config's "
                                                     "train_micro_batch_size_per_gpu, or 8, reduced to divide)")

    o = ap.add_argument_group("optimizer and schedule")
    o.add_argument("--lr", type=float, help="peak learning rate (default: the model's, GPT-3 table)")
    o.add_argument("--weight-decay", type=float, help="Huber decay λ (default: the config's, or 0.1)")
    o.add_argument("--grad-clip", type=float, help="global gradient-norm clip, 0 disables (default: the config's "
                                                   "gradient_clipping, or 1.0)")
    o.add_argument("--warmup-tokens", type=count, help="linear LR warmup (default: GPT-3's 375M, or 5%% of a "
                                                       "shorter run)")
    o.add_argument("--decay-tokens", type=count, help="cosine decay to --min-lr-ratio ends here (default: GPT-3's "
                                                      "260B, or the end of a shorter run)")
    o.add_argument("--min-lr-ratio", type=float, help="LR floor as a fraction of the peak (default 0.1)")
    o.add_argument("--ramp-tokens", type=count, help="batch-size ramp length, 0 disables (default: GPT-3's 4B, "
                                                     "scaled down for a run shorter than 260B tokens)")
    o.add_argument("--ramp-start-tokens", type=count, help="batch at the start of the ramp (default 32k, GPT-3)")
    o.add_argument("--max-steps", type=count, help="* optimizer steps of the run (default: GPT-3's 300B tokens for "
                                                   "the GPT-3 sizes; nano 1000, tiny 150, mini 50)")
    o.add_argument("--seed", type=count, help="model initialisation and data order (default 0)")

    d = ap.add_argument_group("data")
    d.add_argument("--data", help="'embedded' (default: Python's own sources, no download), a .txt/.jsonl file or "
                                  "folder, or a hub dataset name (openwebtext, hf:NAME)")
    d.add_argument("--tokenizer", help="'local-bpe' (default: trained on the corpus) or a hub tokenizer (gpt2)")
    d.add_argument("--vocab-size", type=count, help="local BPE vocabulary (default 2048 for the CPU sizes, 8192 "
                                                    "otherwise)")
    d.add_argument("--max-chars", type=count, help="use at most this many characters of the corpus (default: all)")
    d.add_argument("--val-fraction", type=float, help="share held out for validation (default 0.01)")
    d.add_argument("--data-cache", help="* token cache (default $ADAMHD_DATA_CACHE or ~/.cache/adamhd_dist)")

    r = ap.add_argument_group("run directory, logging, checkpoints")
    r.add_argument("--out-dir", help="* run directory (default runs/<model>-<config name or fsdp>)")
    r.add_argument("--resume", help="* 'auto' (default: continue from the newest complete checkpoint in --out-dir, "
                                    "if any), 'never', or a checkpoint folder")
    r.add_argument("--eval-interval", type=count, help="* steps between validation passes (default: a tenth of the "
                                                       "run, at most 1000)")
    r.add_argument("--eval-batches", type=count, help="validation micro-batches per rank (default 10)")
    r.add_argument("--save-interval", type=count, help="* steps between checkpoints (default: --eval-interval)")
    r.add_argument("--log-interval", type=count, help="* steps between metrics.jsonl records (default 1; 10 above "
                                                      "1000 steps)")
    r.add_argument("--keep-checkpoints", type=count, help="* complete checkpoints kept, 0 keeps all (default 2)")
    r.add_argument("--exit-after-steps", type=count, help="* save a checkpoint and exit after this many steps of "
                                                          "this launch (for time-limited jobs)")
    r.add_argument("--peak-tflops", type=float, help="* peak TFLOP/s per rank for MFU (default: the GPU's data "
                                                     "sheet, or a CPU estimate)")
    r.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=None,
                   help="* do not write TensorBoard scalars")
    r.add_argument("--master-port", type=port, help="port of rank 0 when this script finds its ranks itself "
                                                   "(mpirun, or one process); launchers use their own --master_port")
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
        return _error(ctx.rank, str(e))


if __name__ == "__main__":
    raise SystemExit(main())
