"""ZeRO-2 AdamHD vs ZeRO-2 AdamW on the same GPT model: training throughput, peak memory, optimizer-state bytes.

    python bench/zero_throughput.py                          # CPU ranks (gloo); GPUs with NCCL when present
    python bench/zero_throughput.py --model tiny --world 2 --rounds 5 --steps 4 --out bench/results/zero_throughput.json

Three measurements, each with both optimizers built from the project's ds_configs (zero2_adamhd.json and
zero2_adamw.json, batch sizes and precision overridden for the machine):

1. tokens/s: ONE launch of ``--world`` ranks builds both engines on the same model and data, then times them in
   interleaved rounds (round r trains ``--steps`` optimizer steps with each engine); the median of the rounds.
2. peak memory: one launch per optimizer (a process's peak cannot be split between two engines): peak resident
   memory of the largest rank on CPU, ``torch.cuda.max_memory_allocated`` on a GPU.
3. optimizer-state bytes per rank at world sizes 1, 2 and 4: every tensor of the inner optimizer's state plus the
   fp32 master partition, on rank 0, after one step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adamhd_train.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def _config(name: str, args, world: int, device: str) -> dict:
    from adamhd_dist.deepspeed import load_config

    cfg = load_config(ROOT / "ds_configs" / name)
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = args.micro_batch * world
    cfg["steps_per_print"] = 10**9
    if device == "cpu":
        cfg.pop("bf16", None)  # fp32 on CPU ranks
    return cfg


def _state_bytes(engine) -> int:
    """Bytes of the inner optimizer's state tensors and fp32 master partitions on this rank."""
    zopt = engine.optimizer
    inner = zopt.optimizer
    seen, total = set(), 0
    for st in inner.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    for flat in zopt.single_partition_of_fp32_groups:
        total += flat.numel() * flat.element_size()
    lay = getattr(getattr(engine, "_adamhd_optimizer", None), "layout", None)
    if lay is not None:
        total += lay.mu.numel() * lay.mu.element_size()
    return total


def rank_main(args) -> None:
    """One rank: build the engine(s) for ``args.task`` and write its numbers to ``args.out_dir``."""
    import deepspeed

    import adamhd_dist.deepspeed as ads
    from adamhd_train.models import build_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    names = {"adamhd": "zero2_adamhd.json", "adamw": "zero2_adamw.json"}
    which = list(names) if args.task == "throughput" else [args.task.split(":")[1]]
    engines = {}
    for key in which:
        model = build_model(args.model, vocab_size=args.vocab, seed=0)
        engines[key], *_ = ads.initialize(model=model, config=_config(names[key], args, world, device))
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), generator=g)
    tokens = tokens.to(engines[which[0]].device)

    def train(engine, steps):
        for _ in range(steps):
            logits = engine(tokens[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                                     tokens[:, 1:].reshape(-1))
            engine.backward(loss)
            engine.step()
        if device == "cuda":
            torch.cuda.synchronize()

    out = {"rank": rank, "world": world}
    for key, engine in engines.items():
        train(engine, 1)  # warm-up (kernel builds, lazy state)
    if args.task == "throughput":
        times = {k: [] for k in engines}
        for r in range(args.rounds):
            order = list(engines.items())
            for key, engine in (order if r % 2 == 0 else order[::-1]):  # alternate who goes first
                torch.distributed.barrier()
                t0 = time.perf_counter()
                train(engine, args.steps)
                torch.distributed.barrier()
                times[key].append(time.perf_counter() - t0)
        tokens_per_round = args.steps * args.micro_batch * args.seq_len * world
        out["tokens_per_s"] = {k: tokens_per_round / statistics.median(v) for k, v in times.items()}
        out["inner_optimizer"] = {k: type(e.optimizer.optimizer).__name__ for k, e in engines.items()}
        out["rounds_s"] = times
    elif args.task.startswith("memory"):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train(engines[which[0]], args.steps)
        out["peak_bytes"] = (torch.cuda.max_memory_allocated() if device == "cuda"
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    elif args.task.startswith("state"):
        out["state_bytes"] = _state_bytes(engines[which[0]])
    Path(args.out_dir, f"rank{rank}.json").write_text(json.dumps(out))


def launch(args, task: str, world: int) -> list[dict]:
    """Run ``task`` on ``world`` local ranks (CPU processes, or one per GPU) and return their outputs."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
            cmd = [sys.executable, __file__, "--_rank", "--task", task, "--_out", tmp, "--model", args.model,
                   "--vocab", str(args.vocab), "--seq-len", str(args.seq_len), "--micro-batch",
                   str(args.micro_batch), "--steps", str(args.steps), "--rounds", str(args.rounds)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True))
        errors = []
        for rank, p in enumerate(procs):
            try:
                _, err = p.communicate(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise SystemExit(f"{task} at world size {world}: rank {rank} did not finish in {args.timeout} s")
            if p.returncode != 0:
                errors.append(f"rank {rank}: {err[-3000:]}")
        if errors:
            raise SystemExit(f"{task} at world size {world} failed:\n" + "\n".join(errors))
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="a name from adamhd_train.models (default tiny)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--world", type=int, default=2, help="ranks for the throughput and memory runs (default 2)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per timed round (default 4)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "zero_throughput.json"))
    ap.add_argument("--task", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_out", dest="out_dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._rank:
        rank_main(args)
        return
    for name in ("seq_len", "micro_batch", "world", "steps", "rounds", "vocab"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    ngpu = torch.cuda.device_count()
    if ngpu and args.world > ngpu:
        ap.error(f"--world {args.world} needs {args.world} GPUs, this machine has {ngpu}")
    t0 = time.time()
    print(f"ZeRO-2 AdamHD vs ZeRO-2 AdamW, model {args.model}, {args.world} rank(s), micro-batch {args.micro_batch} "
          f"x {args.seq_len} tokens per rank", flush=True)
    first = launch(args, "throughput", args.world)[0]
    thr, inner, rounds = first["tokens_per_s"], first["inner_optimizer"], first["rounds_s"]
    mem = {k: max(r["peak_bytes"] for r in launch(args, f"memory:{k}", args.world)) for k in ("adamhd", "adamw")}
    worlds = [w for w in (1, 2, 4) if not ngpu or w <= ngpu]
    state = {k: {w: launch(args, f"state:{k}", w)[0]["state_bytes"] for w in worlds} for k in ("adamhd", "adamw")}
    device = torch.cuda.get_device_name(0) if ngpu else f"{platform.processor() or platform.machine()} CPU, " \
                                                          f"{os.cpu_count()} cores"
    result = {
        "command": "python " + " ".join(sys.argv), "device": device, "model": args.model, "world": args.world,
        "inner_optimizer": inner, "tokens_per_s": thr, "tokens_per_s_ratio": thr["adamhd"] / thr["adamw"],
        "rounds_s": rounds,
        "peak_bytes": mem, "peak_memory_ratio": mem["adamhd"] / mem["adamw"],
        "optimizer_state_bytes_rank0": state, "seconds": time.time() - t0,
    }
    print("\n| measure | ZeRO-2 AdamHD | ZeRO-2 AdamW | AdamHD / AdamW |\n|---|---:|---:|---:|")
    print(f"| tokens/s ({args.world} ranks, median of {args.rounds} rounds) | {thr['adamhd']:.0f} | "
          f"{thr['adamw']:.0f} | {result['tokens_per_s_ratio']:.3f} |")
    print(f"| peak memory, largest rank (MiB) | {mem['adamhd'] / 2**20:.1f} | {mem['adamw'] / 2**20:.1f} | "
          f"{result['peak_memory_ratio']:.3f} |")
    for w in worlds:
        a, b = state["adamhd"][w], state["adamw"][w]
        print(f"| optimizer state + fp32 master bytes per rank, world {w} | {a:,} | {b:,} | {a / b:.4f} |")
    print(f"\ndevice: {device}; inner optimizers: AdamHD = {inner['adamhd']}, AdamW = {inner['adamw']}; "
          f"{result['seconds']:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
