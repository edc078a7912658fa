#!/usr/bin/env python3
"""Pre-train a GPT-3-style model with AdamHD: DeepSpeed ZeRO (deepspeed launcher or mpirun) or FSDP2 (torchrun).

One entry, three ways to start the ranks (run from the repository root):

    # DeepSpeed launcher: one rank per GPU (on a CPU-only machine, --num_gpus N starts N CPU ranks)
    deepspeed launch/pretrain_gpt3.py --deepspeed ds_configs/zero2_adamhd.json
    deepspeed --num_gpus 8 launch/pretrain_gpt3.py --deepspeed ds_configs/zero3_adamhd.json --model gpt3-xl \\
        --max-steps 20000 --seed 1 --out-dir runs/gpt3-xl --resume auto

    # torchrun + FSDP2 (fully_shard per transformer block)
    torchrun --nproc-per-node 8 launch/pretrain_gpt3.py --fsdp --model gpt3-small --out-dir runs/gpt3s-fsdp

    # torchrun + FSDP2 over tensor parallelism: a dp 2 × tp 4 mesh (tp divides the heads and --seq-len)
    torchrun --nproc-per-node 8 launch/pretrain_gpt3.py --fsdp --tp 4 --model gpt3-xl --out-dir runs/gpt3xl-tp4

    # mpirun: DeepSpeed discovers rank, world size and master through mpi4py
    mpirun -np 8 -x PATH python launch/pretrain_gpt3.py --deepspeed ds_configs/zero2_adamhd.json --model gpt3-small

    # re-run a finished job from its manifest (same settings, data check, same world size: same loss curve)
    deepspeed --num_gpus 2 launch/pretrain_gpt3.py --from-manifest runs/nano-zero2_adamhd/manifest.json \\
        --out-dir runs/rerun

Without options the job is the embedded default: on a CPU-only machine the `nano` model for 1000 steps on text
that ships with Python (the standard library's sources, tokenized with a BPE trained on them; no download); on a
GPU machine `gpt3-small` with GPT-3's recipe for 300B tokens (give a real corpus with --data). `make run` runs the
CPU default through the deepspeed launcher on 2 CPU ranks.

The run prints its derived numbers (parameters, decayed vs undecayed, tokens per step, micro-batch, gradient
accumulation, schedule), shows a progress bar with loss, tokens/s and MFU, validates periodically, saves a
checkpoint every --save-interval steps (atomically: an interrupted run loses no checkpoint; SIGINT/SIGTERM save
one at the end of the current step), and writes into --out-dir: metrics.jsonl, deltas.jsonl (per-layer δ),
tensorboard/, manifest.json, checkpoints/ and loss_curve.png. Re-running the same command continues the run
(--resume auto). Bad options are reported before any work starts, with the option's name and what is allowed.
Precision: the DeepSpeed config's (fp16 included: DeepSpeed scales the loss) or, for FSDP2, bf16 on a GPU; FSDP2
refuses fp16 (it has no loss scaling).
Counts of tokens accept k/M/B suffixes (375M, 4B).
"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("adamhd_train.cli", __doc__))
