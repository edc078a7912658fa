"""The comparison's command line: ``launch/compare.py`` (whose docstring lists the commands), and the
``adamhd-compare`` command once the package is installed. :func:`main` parses the options into a
:class:`~adamhd_study.config.CompareConfig` (bad values: exit status 2 with the flag named) and runs
:func:`~adamhd_study.compare.run_comparison`; the exit status is 1 when a run failed."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional

from adamhd_train.models import MODEL_NAMES
from adamhd_train.settings import parse_count

from .compare import run_comparison
from .config import ARMS, PRESETS, preset

__all__ = ["build_parser", "main", "PROG"]

PROG = "compare.py"


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _named_config(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=CONFIG, e.g. adamw=ds_configs/zero2_adamw.json")
    return name.strip(), path.strip()


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The comparison's options; ``description`` is the ``--help`` text (default: this module's docstring)."""
    count = parse_count
    ap = argparse.ArgumentParser(prog=PROG, description=description or __doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=tuple(PRESETS),
                    help="starting values (default tiny: CPU, embedded corpus; gpt3-small: GPU)")
    ap.add_argument("--out-dir", help="output folder (default runs/compare-<preset>)")
    ap.add_argument("--report-only", action="store_true", help="do not train: rebuild the report from the runs "
                                                               "already in --out-dir")

    r = ap.add_argument_group("what runs")
    r.add_argument("--optimizer", dest="optimizers", action="append", type=_named_config, metavar="NAME=CONFIG",
                   help="an optimizer and its DeepSpeed config; repeat for each (default: "
                        "adamhd=ds_configs/zero2_adamhd.json and adamw=ds_configs/zero2_adamw.json)")
    r.add_argument("--reference", help="the optimizer the others are measured against (default adamw)")
    r.add_argument("--arms", type=_csv, help=f"comma-separated, from {', '.join(ARMS)} (default: all)")
    r.add_argument("--seeds", type=count, help="seeds per arm and optimizer: 0 .. N-1 (default 1)")
    r.add_argument("--large-batch-factor", type=count, help="global-batch multiplier of the large-batch arm "
                                                            "(default 4)")
    r.add_argument("--outlier-rate", type=float, help="share of micro-batches with an outlier (default 0.02)")
    r.add_argument("--outlier-scale", type=float, help="spike size in gradient RMS units, or the multiplier in "
                                                       "scale mode (default 100)")
    r.add_argument("--outlier-fraction", type=float, help="share of each tensor's entries spiked (default 1e-3)")
    r.add_argument("--outlier-mode", choices=("spike", "scale"), help="sparse spikes (default) or the whole "
                                                                      "gradient scaled")

    m = ap.add_argument_group("model, batch, schedule (the same for every optimizer)")
    m.add_argument("--model", help=f"size: {', '.join(MODEL_NAMES)} (default: the preset's)")
    m.add_argument("--max-steps", type=count, help="optimizer steps of the baseline arm")
    m.add_argument("--seq-len", type=count, help="tokens per sequence")
    m.add_argument("--global-batch-tokens", type=count, help="tokens per step in the baseline arm")
    m.add_argument("--micro-batch", type=count, help="sequences per rank per forward pass")
    m.add_argument("--lr", type=float, help="peak learning rate (default: the model's)")
    m.add_argument("--weight-decay", type=float, help="weight decay of every optimizer (default 0.1)")
    m.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="training precision (default: the launcher's)")

    d = ap.add_argument_group("data")
    d.add_argument("--data", help="'embedded', a .txt/.jsonl file or folder, or a hub dataset name")
    d.add_argument("--tokenizer", help="'local-bpe' or a hub tokenizer name")
    d.add_argument("--vocab-size", type=count, help="local BPE vocabulary")
    d.add_argument("--max-chars", type=count, help="use at most this many characters of the corpus")
    d.add_argument("--val-fraction", type=float, help="share held out for validation")
    d.add_argument("--data-cache", help="token cache folder (default: the launcher's)")

    e = ap.add_argument_group("evaluation and verdict")
    e.add_argument("--eval-interval", type=count, help="steps between validation passes (baseline arm)")
    e.add_argument("--eval-batches", type=count, help="validation micro-batches per pass during training")
    e.add_argument("--final-eval-batches", type=count, help="validation micro-batches for final and pruned models "
                                                            "(default: the preset's: tiny 16, gpt3-small 50)")
    e.add_argument("--sparsities", type=_floats, help="pruning sparsities, e.g. 0,0.1,0.2,0.3,0.4,0.5")
    e.add_argument("--prune-scope", choices=("global", "layer"), help="one magnitude threshold for all decayed "
                                                                      "matrices (default) or per tensor")
    e.add_argument("--target-loss", type=float, help="validation loss for steps-to-target (default: the "
                                                     "higher of the two final losses, which both reached)")
    e.add_argument("--min-effect", type=float, help="smallest loss difference in nats counted as real "
                                                    "(default 0.01)")
    e.add_argument("--alpha", type=float, help="level of the two-sided paired t test a loss difference must pass "
                                               "with two seeds or more (default 0.05)")
    e.add_argument("--speedup-tolerance", type=float, help="speed-ups within 1 ± this count as none (default 0.05)")
    e.add_argument("--prune-tolerance", type=float, help="relative perplexity increase a pruned model may have "
                                                         "(default 0.05)")

    x = ap.add_argument_group("execution")
    x.add_argument("--nproc", type=count, help="ranks per run (1: one process; more: the deepspeed launcher)")
    x.add_argument("--parallel", type=count, help="runs at the same time (tiny: 2, the two optimizers of an arm "
                                                  "side by side)")
    x.add_argument("--run-timeout", dest="run_timeout_s", type=float, help="seconds per run before it is stopped")
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
    except ValueError as e:
        return _error(str(e))
    print()
    for sentences in summary["verdict"].values():
        for s in sentences:
            print(f"- {s}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
