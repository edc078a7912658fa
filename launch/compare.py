#!/usr/bin/env python3
"""Compare AdamHD with AdamW (or any optimizers DeepSpeed configs name) on one model, data, seed and token budget.

Each arm (optimizer x setting x seed) is a normal launch/pretrain_gpt3.py run with its own run directory under
--out-dir/runs; then the final weights are read back, evaluated, magnitude-pruned and histogrammed, and
--out-dir/report.md is written with PNG plots and results.json. Run from the repository root:

    # CPU: the tiny model on the embedded corpus, 3 arms x 2 optimizers, one seed (11 min on 2 shared cores)
    python launch/compare.py --preset tiny --out-dir runs/compare-tiny

    # more seeds give a noise estimate (a difference must pass a paired t test, --alpha); arms and budget are flags
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
same command reuses runs that finished. Counts accept k/M/B suffixes (4M, 2k). Before any run starts, the C++ ops the
runs load (DeepSpeed's for each config, AdamHD's CPU kernel) are built once here (first time only), so --run-timeout
never stops a build; a build lock a killed build left is removed, or named with the command that clears it.
"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("adamhd_study.cli", __doc__))
