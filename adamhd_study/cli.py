"""The comparison's command line: ``launch/compare.py`` (whose docstring lists the commands), and the
``adamhd-compare`` command once the package is installed. :func:`main` parses the options into a
:class:`~adamhd_study.config.CompareConfig` (bad values: exit status 2 with the flag named) and runs
:func:`~adamhd_study.compare.run_comparison`; the exit status is 1 when a run failed."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional

from adamhd_dist.buildlock import BuildLockError
from adamhd_train.options import add_options, cli_option
from adamhd_train.settings import TrainSettings

from .compare import run_comparison
from .config import PRESETS, CompareConfig, preset

__all__ = ["build_parser", "main", "PROG"]

PROG = "compare.py"


LAUNCHER_OPTIONS = {
    "model, batch, schedule (the same for every optimizer)": ("model", "max_steps", "seq_len", "global_batch_tokens",
                                                              "micro_batch", "lr", "weight_decay", "dtype"),
    "data": ("data", "tokenizer", "vocab_size", "max_chars", "val_fraction", "data_cache"),
    "evaluation and verdict": ("eval_interval", "eval_batches"),
}
"""Options every run of the comparison is given, declared once on the launcher's settings (their values are the
preset's, or the ones given here)."""
STUDY_OPTIONS = {
    "": ("out_dir",),
    "what runs": ("optimizers", "reference", "arms", "seeds", "large_batch_factor", "outlier_rate", "outlier_scale",
                  "outlier_fraction", "outlier_mode"),
    "evaluation and verdict": ("final_eval_batches", "sparsities", "prune_scope", "target_loss", "min_effect",
                               "alpha", "speedup_tolerance", "prune_tolerance"),
    "execution": ("nproc", "parallel", "run_timeout_s"),
}
"""The comparison's own options, declared on :class:`~adamhd_study.config.CompareConfig`."""


def _shown(value) -> str:
    if isinstance(value, dict):
        return " and ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def preset_defaults(names) -> dict[str, str]:
    """The default of each field in ``names`` as ``--help`` shows it: its value in every preset (``tiny: X,
    gpt3-small: Y`` where they differ; a value no preset sets is the launcher's)."""
    presets = {name: make() for name, make in PRESETS.items()}
    shown = {}
    for field in names:
        values = {name: getattr(cfg, field) for name, cfg in presets.items()}
        distinct = {repr(v) for v in values.values()}
        if distinct == {"None"}:
            shown[field] = "the launcher's"
        elif len(distinct) == 1:
            shown[field] = _shown(next(iter(values.values())))
        else:
            shown[field] = ", ".join(f"{name}: {_shown(v)}" for name, v in values.items())
    return shown


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The comparison's options; ``description`` is the ``--help`` text (default: this module's docstring)."""
    ap = argparse.ArgumentParser(prog=PROG, description=description or __doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=tuple(PRESETS),
                    help="starting values (default tiny: CPU, embedded corpus; gpt3-small: GPU)")
    ap.add_argument("--report-only", action="store_true", help="do not train: rebuild the report from the runs "
                                                               "already in --out-dir")
    groups = {"": ap}
    for title in ("", "what runs", *LAUNCHER_OPTIONS, "execution"):
        if title not in groups:
            groups[title] = ap.add_argument_group(title)
        own = STUDY_OPTIONS.get(title, ())
        declared = {n for n in own if cli_option(CompareConfig, n).default}
        add_options(groups[title], CompareConfig, own,
                    defaults={k: v for k, v in preset_defaults(own).items() if k not in declared})
        shared = LAUNCHER_OPTIONS.get(title, ())
        add_options(groups[title], TrainSettings, shared, defaults=preset_defaults(shared))
    return ap


def _error(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def main(argv: Optional[list[str]] = None, *, description: Optional[str] = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the comparison, print the verdict; the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(description).parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("preset", "report_only")}
    if "optimizers" in overrides:
        names = [n for n, _ in overrides["optimizers"]]
        if len(set(names)) != len(names):
            return _error(f"--optimizer: a name is given twice: {', '.join(names)}")
        overrides["optimizers"] = dict(overrides["optimizers"])
    overrides.setdefault("out_dir", f"runs/compare-{args.preset}")
    try:
        cfg = preset(args.preset, **overrides)
        _, summary = run_comparison(cfg, command=shlex.join(["python", "launch/compare.py"] + list(argv)),
                                    report_only=args.report_only)
    except (ValueError, BuildLockError) as e:
        return _error(str(e))
    print()
    for sentences in summary["verdict"].values():
        for s in sentences:
            print(f"- {s}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
