"""Run the pre-training app with outlier gradients injected (the outlier arm of ``launch/compare.py``).

    python -m adamhd_study.compare_runner --outliers '{"seed": 1000, "rate": 0.02, "scale": 100}' \\
        --outlier-events runs/cmp/outliers-adamhd-s0/outliers.jsonl  <any pretrain_gpt3.py options>

Every option that is not one of the two above goes to the launcher (:func:`adamhd_train.cli.main`) unchanged, so
this starts exactly the run ``launch/pretrain_gpt3.py`` would, under any of its launchers (one process,
``deepspeed --module``, ``mpirun``). The only difference: the model the launcher builds gets an
:class:`adamhd_study.analysis.OutlierInjector` before the engine wraps it (the launcher's ``on_model`` hook), and
rank 0 writes the events (one JSON object per outlier micro-batch) to ``--outlier-events`` when the run ends.
A run that resumes from a checkpoint continues the count of micro-batches from the checkpoint's token count, so
its events are those of the uninterrupted run, and the events logged before the checkpoint are kept.

Gradient hooks on the parameters run before DeepSpeed's ZeRO-1/2 gradient hooks; FSDP2 replaces the parameters
afterwards and is not supported (refused here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from adamhd_dist.fsutil import atomic_write
from adamhd_train import cli
from adamhd_train.checkpoints import latest_checkpoint, read_trainer_state
from adamhd_train.manifest import read_manifest

from .analysis import OutlierInjector, OutlierSchedule

PROG = "compare_runner.py"


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outliers", required=True,
                    help="OutlierSchedule fields as JSON: seed, rate, scale, fraction, mode, start")
    ap.add_argument("--outlier-events", required=True, help="JSON-lines file the events are written to (rank 0)")
    return ap.parse_known_args(argv)


def _resume_offset(rest: list[str]) -> int:
    """Micro-batches the run already consumed when it resumes (0 for a fresh start), from the checkpoint that the
    launcher will continue from and the manifest's tokens per micro-step."""
    ap = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ap.add_argument("--out-dir")
    ap.add_argument("--resume", default="auto")
    known, _ = ap.parse_known_args(rest)
    if not known.out_dir or known.resume == "never":
        return 0
    out = Path(known.out_dir)
    if known.resume == "auto":
        found = latest_checkpoint(out / "checkpoints")
        if found is None:
            return 0
        folder = found[1]
    else:
        folder = Path(known.resume)
    try:
        tokens = int(read_trainer_state(folder)["tokens"])
        per_micro = int(read_manifest(out / "manifest.json")["derived"]["tokens_per_micro_step"])
    except (FileNotFoundError, KeyError, ValueError):
        return 0
    return tokens // per_micro


def _write_events(path: Path, offset: int, events: list[dict]) -> None:
    """Rank 0: the run's events, after those an interrupted launch logged before its checkpoint."""
    kept = []
    if offset and path.is_file():
        kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [ev for ev in kept if ev.get("micro_batch", offset) < offset]
    atomic_write(path, lambda f: f.write("".join(json.dumps(ev) + "\n" for ev in kept + events)))


def main(argv: list[str] | None = None) -> int:
    """Parse the runner's two options, run the launcher with the injector on its model, write the events."""
    argv = sys.argv[1:] if argv is None else argv
    args, rest = _parse(argv)
    if "--fsdp" in rest:
        print(f"{PROG}: error: outlier injection needs the DeepSpeed engine (--deepspeed CONFIG); FSDP2 "
              "replaces the parameters after the model is built", file=sys.stderr)
        return 2
    try:
        schedule = OutlierSchedule(**json.loads(args.outliers))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        print(f"{PROG}: error: --outliers: {e}", file=sys.stderr)
        return 2

    offset = _resume_offset(rest)
    injectors: list[OutlierInjector] = []

    def install(model) -> None:
        injector = OutlierInjector(schedule).install(model)
        injector.micro_batch = offset - 1
        injectors.append(injector)

    try:
        code = cli.main(rest, on_model=install)
    except SystemExit as e:  # argparse's exit on a bad option
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if int(os.environ.get("RANK", "0")) == 0 and injectors:
        _write_events(Path(args.outlier_events), offset, injectors[-1].events)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
