"""Run ``launch/pretrain_gpt3.py`` with outlier gradients injected (the outlier arm of ``launch/compare.py``).

    python adamhd_dist/compare_runner.py --outliers '{"seed": 1000, "rate": 0.02, "scale": 100}' \\
        --outlier-events runs/cmp/outliers-adamhd-s0/outliers.jsonl  <any pretrain_gpt3.py options>

Every option that is not one of the two above goes to the launcher unchanged, so this starts exactly the run the
launcher would, under any of its launchers (one process, ``deepspeed``, ``mpirun``). The only difference: the
model the launcher builds gets an :class:`adamhd_study.analysis.OutlierInjector` before the engine wraps it, and
rank 0 writes the events (one JSON object per outlier micro-batch) to ``--outlier-events`` when the run ends.
A run that resumes from a checkpoint continues the count of micro-batches from the checkpoint's token count, so
its events are those of the uninterrupted run, and the events logged before the checkpoint are kept.

The launcher offers no callback for this, so the runner wraps :func:`adamhd_train.models.build_model`, which
:func:`adamhd_train.train.train` looks up when it starts. Gradient hooks on the parameters run before DeepSpeed's
ZeRO-1/2 gradient hooks; FSDP2 replaces the parameters afterwards and is not supported (refused here).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a file, Python puts this package's folder first on sys.path, where deepspeed.py would shadow DeepSpeed.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if (os.path.abspath(p) if p else os.getcwd()) != _HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LAUNCHER = ROOT / "launch" / "pretrain_gpt3.py"


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="compare_runner.py", allow_abbrev=False,
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outliers", required=True,
                    help="OutlierSchedule fields as JSON: seed, rate, scale, fraction, mode, start")
    ap.add_argument("--outlier-events", required=True, help="JSON-lines file the events are written to (rank 0)")
    return ap.parse_known_args(argv)


def _resume_offset(rest: list[str]) -> int:
    """Micro-batches the run already consumed when it resumes (0 for a fresh start), from the checkpoint that the
    launcher will continue from and the manifest's tokens per micro-step."""
    from adamhd_train.checkpoints import latest_checkpoint, read_trainer_state
    from adamhd_train.manifest import read_manifest

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


def main(argv: list[str] | None = None) -> int:
    """Parse the runner's two options, install the injector around the model factory, run the launcher."""
    argv = sys.argv[1:] if argv is None else argv
    args, rest = _parse(argv)
    from adamhd_train import models
    from adamhd_study.analysis import OutlierInjector, OutlierSchedule

    if "--fsdp" in rest:
        print("compare_runner.py: error: outlier injection needs the DeepSpeed engine (--deepspeed CONFIG); FSDP2 "
              "replaces the parameters after the model is built", file=sys.stderr)
        return 2
    try:
        fields = json.loads(args.outliers)
        schedule = OutlierSchedule(**fields)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        print(f"compare_runner.py: error: --outliers: {e}", file=sys.stderr)
        return 2

    offset = _resume_offset(rest)
    injectors: list[OutlierInjector] = []
    original = models.build_model

    @functools.wraps(original)
    def build_model_with_outliers(*a, **kw):
        model = original(*a, **kw)
        injector = OutlierInjector(schedule).install(model)
        injector.micro_batch = offset - 1
        injectors.append(injector)
        return model

    models.build_model = build_model_with_outliers
    old_argv = sys.argv
    sys.argv = [str(LAUNCHER)] + rest
    code = 0
    try:
        runpy.run_path(str(LAUNCHER), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        models.build_model = original
    if int(os.environ.get("RANK", "0")) == 0 and injectors:
        path = Path(args.outlier_events)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        kept = []
        if offset and path.is_file():
            kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            kept = [ev for ev in kept if ev.get("micro_batch", offset) < offset]
        events = kept + injectors[-1].events
        tmp.write_text("".join(json.dumps(ev) + "\n" for ev in events))
        os.replace(tmp, path)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
