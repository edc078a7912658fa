#!/usr/bin/env python3
"""Compare AdamHD with AdamW (or any optimizers DeepSpeed configs name) on one model, data, seed and token budget.

Each arm (optimizer x setting x seed) is a normal launch/pretrain_gpt3.py run with its own run directory under
--out-dir/runs; then the final weights are read back, evaluated, magnitude-pruned and histogrammed, and
--out-dir/report.md is written with PNG plots and results.json. Run from the repository root:

    # CPU: the tiny model on the embedded corpus, 3 arms x 2 optimizers, one seed (11 min on 2 shared cores)
    python launch/compare.py --preset tiny --out-dir runs/compare-tiny

    # more seeds give a noise estimate; arms and budget are flags
    python launch/compare.py --preset tiny --seeds 3 --arms baseline,outliers --max-steps 600

    # GPU: GPT-3 Small, 0.5M-token batches, 2,000 steps per baseline run (OpenWebText; --data for a local corpus)
    python launch/compare.py --preset gpt3-small --out-dir runs/compare-gpt3-small

    # a third optimizer: any DeepSpeed config with an "optimizer" section
    python launch/compare.py --preset tiny --optimizer adamhd=ds_configs/zero2_adamhd.json \\
        --optimizer adamw=ds_configs/zero2_adamw.json --optimizer lamb=my_configs/zero2_lamb.json

    # rebuild the report from finished runs without training
    python launch/compare.py --preset tiny --out-dir runs/compare-tiny --report-only

Arms: baseline; large-batch (--large-batch-factor x the global batch, as many fewer steps: same tokens);
outliers (the baseline plus rare injected outlier gradients, the same events for every optimizer). Re-running the
same command reuses runs that finished. Counts accept k/M/B suffixes (4M, 2k).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adamhd_train.settings import parse_count as count  # noqa: E402

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


def build_parser() -> argparse.ArgumentParser:
    from adamhd_study.compare import ARMS, PRESETS
    from adamhd_train.models import MODEL_NAMES

    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    e.add_argument("--speedup-tolerance", type=float, help="speed-ups within 1 ± this count as none (default 0.05)")
    e.add_argument("--prune-tolerance", type=float, help="relative perplexity increase a pruned model may have "
                                                         "(default 0.05)")

    x = ap.add_argument_group("execution")
    x.add_argument("--nproc", type=count, help="ranks per run (1: one process; more: the deepspeed launcher)")
    x.add_argument("--parallel", type=count, help="runs at the same time (tiny: 2, the two optimizers of an arm "
                                                  "side by side)")
    x.add_argument("--run-timeout", dest="run_timeout_s", type=float, help="seconds per run before it is stopped")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from adamhd_study.compare import preset, run_comparison

    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("preset", "report_only")}
    if "optimizers" in overrides:
        names = [n for n, _ in overrides["optimizers"]]
        if len(set(names)) != len(names):
            print(f"{PROG}: error: --optimizer: a name is given twice: {', '.join(names)}", file=sys.stderr)
            return 2
        overrides["optimizers"] = dict(overrides["optimizers"])
    if "out_dir" not in overrides:
        overrides["out_dir"] = f"runs/compare-{args.preset}"
    try:
        cfg = preset(args.preset, **overrides)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        report, summary = run_comparison(cfg, command=shlex.join(["python", "launch/compare.py"] + list(argv)),
                                         report_only=args.report_only)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print()
    for cand, sentences in summary["verdict"].items():
        for s in sentences:
            print(f"- {s}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
