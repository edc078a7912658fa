"""FSDP2 training throughput and peak memory: AdamHD vs torch.optim.AdamW on the same GPT model, in one run.

    python bench/fsdp_throughput.py                  # 2 CPU ranks (gloo); with GPUs: one rank per GPU (NCCL)
    python bench/fsdp_throughput.py --nproc 2 --rounds 7 --steps 4 --out bench/results/fsdp_throughput.json

Both candidates train the same GPT-2-style model (transformers ``GPT2LMHeadModel``, built from a config, sharded
block by block with :func:`adamhd_dist.fsdp.apply_fsdp`), with the same param groups (decay / no decay), the same
hyperparameters (GPT-3 recipe: betas (0.9, 0.95), weight decay 0.1, clipping at 1.0) and the same batches.

- Throughput: both models live in the same ranks; rounds are interleaved (round r trains each candidate for
  ``--steps`` steps, the order alternating between rounds) after a warm-up round; the median over rounds is
  reported. A step is forward + backward + clip_grad_norm_ + optimizer.step() + zero_grad; tokens/s counts the
  global batch (all ranks). Also reported: the median of the per-round time ratios (the two candidates' rounds
  run back to back), and the CPU time per step of each rank (less sensitive than wall time to other load on a
  shared machine).
- Peak memory: each candidate alone in freshly started ranks (a process's peak is a high-water mark); on GPU
  ``torch.cuda.max_memory_allocated`` over the timed steps, on CPU the peak resident set (VmHWM) of each rank.
  Optimizer-state bytes per rank are counted exactly from the local shards of the state tensors.

AdamHD runs with its defaults (``delta_mode="ema"``: the per-layer statistic and its one collective every step).
AdamW uses its fused kernel where torch has one for DTensor parameters (else its default path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from adamhd_train.ports import free_port

ROOT = Path(__file__).resolve().parents[1]

HP = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
WEIGHT_DECAY = 0.1
CANDIDATES = ("AdamW", "AdamHD")


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _build(args, name: str, device: torch.device):
    """A GPT model sharded with FSDP2 and its optimizer (the same seed for both candidates)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import adamhd_dist
    from adamhd_dist.fsdp import apply_fsdp

    logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.d_model, n_layer=args.n_layer,
                     n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0)
    with torch.device(device):
        model = GPT2LMHeadModel(cfg)
    mp = None
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    apply_fsdp(model, mp_policy=mp)
    if name == "AdamHD":
        return model, adamhd_dist.AdamHD(adamhd_dist.param_groups(model, WEIGHT_DECAY), **HP)
    try:
        opt = torch.optim.AdamW(adamhd_dist.param_groups(model, WEIGHT_DECAY), **HP, fused=True)
        _probe(model, opt, args, device)
    except (RuntimeError, NotImplementedError):
        opt = torch.optim.AdamW(adamhd_dist.param_groups(model, WEIGHT_DECAY), **HP)
    return model, opt


def _probe(model, opt, args, device):
    """One zero-learning-rate step: fails here (not mid-benchmark) when a fused kernel rejects DTensors."""
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    _step(model, opt, _batch(args, device, 0))
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.state.clear()


def _batch(args, device, step: int):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    return torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=g).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model, opt, x):
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _state_bytes(opt) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                t = v.to_local() if isinstance(v, DTensor) else v
                total += t.numel() * t.element_size()
    return total


def _rss_peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(rank: int, world: int, port: int, mode: str, args, out_path: str):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    device = _device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        result = _throughput(args, device) if mode == "throughput" else _memory(args, device, mode)
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            torch.save(gathered, out_path)
    finally:
        dist.destroy_process_group()


def _throughput(args, device):
    import torch.distributed as dist

    runs = {name: _build(args, name, device) for name in CANDIDATES}
    times = {name: [] for name in CANDIDATES}
    cpu_times = {name: [] for name in CANDIDATES}
    opt_times = {name: [] for name in CANDIDATES}
    step = 0
    for r in range(args.rounds + 1):  # round 0 warms up
        order = CANDIDATES if r % 2 == 0 else CANDIDATES[::-1]
        for name in order:
            model, opt = runs[name]
            dist.barrier()
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            t_opt = 0.0
            for s in range(args.steps):
                x = _batch(args, device, step + s)
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                _sync(device)
                t1 = time.perf_counter()
                opt.step()
                _sync(device)
                t_opt += time.perf_counter() - t1
                opt.zero_grad(set_to_none=True)
            _sync(device)
            cpu = time.process_time() - c0
            dist.barrier()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(cpu)
                opt_times[name].append(t_opt / args.steps)
        step += args.steps
    model, _ = runs["AdamW"]
    return {"times": times, "cpu_times": cpu_times, "opt_times": opt_times, "params": sum(p.numel() for p in model.parameters()),
            "adamw_fused": bool(runs["AdamW"][1].defaults.get("fused"))}


def _memory(args, device, name):
    base = _rss_now_bytes()
    model, opt = _build(args, name, device)
    for s in range(2):
        _step(model, opt, _batch(args, device, s))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for s in range(args.steps):
        _step(model, opt, _batch(args, device, 2 + s))
    _sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _rss_peak_bytes()
    return {"peak_bytes": peak, "rss_before_model": base, "state_bytes": _state_bytes(opt)}


def _launch(mode: str, world: int, args):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="fsdp-bench-") as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(world, free_port(), mode, args, out), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--nproc", type=int, default=torch.cuda.device_count() if gpu else 2, help="ranks")
    p.add_argument("--d-model", type=int, default=1024 if gpu else 256)
    p.add_argument("--n-layer", type=int, default=24 if gpu else 4)
    p.add_argument("--n-head", type=int, default=16 if gpu else 4)
    p.add_argument("--vocab", type=int, default=50257 if gpu else 8192)
    p.add_argument("--seq", type=int, default=1024 if gpu else 256)
    p.add_argument("--micro-batch", type=int, default=8 if gpu else 4, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=8 if gpu else 4, help="steps per candidate per round")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fsdp_throughput.json"))
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error("--nproc must be >= 1")

    device = "cuda" if gpu else "cpu"
    tokens_per_step = args.nproc * args.micro_batch * args.seq
    print(f"FSDP2 on {args.nproc} {device} rank(s); GPT d_model={args.d_model} n_layer={args.n_layer} "
          f"vocab={args.vocab} seq={args.seq}; {tokens_per_step} tokens per step (global); "
          f"{args.rounds} interleaved rounds x {args.steps} steps per candidate", flush=True)

    per_rank = _launch("throughput", args.nproc, args)
    t = per_rank[0]
    mem = {name: _launch(name, args.nproc, args) for name in CANDIDATES}
    print(f"{t['params']:,} parameters; AdamW fused={t['adamw_fused']}", flush=True)

    rows = {}
    for name in CANDIDATES:
        med = statistics.median(t["times"][name])
        cpu_per_round = [statistics.mean(r["cpu_times"][name][i] for r in per_rank) for i in range(args.rounds)]
        peak = max(r["peak_bytes"] for r in mem[name])
        rows[name] = {
            "tokens_per_s": tokens_per_step * args.steps / med,
            "step_ms": 1e3 * med / args.steps,
            "cpu_ms_per_step_per_rank": 1e3 * statistics.median(cpu_per_round) / args.steps,
            "optimizer_step_ms": 1e3 * statistics.median(t["opt_times"][name]),
            "peak_mem_per_rank_bytes": peak,
            "peak_mem_above_start_per_rank_bytes": max(r["peak_bytes"] - r["rss_before_model"] for r in mem[name])
            if not gpu else peak,
            "optimizer_state_bytes_per_rank": max(r["state_bytes"] for r in mem[name]),
            "round_times_s": t["times"][name],
            "round_cpu_times_s": cpu_per_round,
        }
    base = rows["AdamW"]
    for name in CANDIDATES:
        # rounds r of the two candidates ran back to back: their ratio cancels slow drifts of the machine
        rows[name]["paired_round_time_ratio_vs_adamw"] = statistics.median(
            a / b for a, b in zip(t["times"][name], t["times"]["AdamW"]))
        rows[name]["cpu_time_vs_adamw"] = rows[name]["cpu_ms_per_step_per_rank"] / base["cpu_ms_per_step_per_rank"]
        rows[name]["tokens_per_s_vs_adamw"] = rows[name]["tokens_per_s"] / base["tokens_per_s"]
        rows[name]["peak_mem_vs_adamw"] = rows[name]["peak_mem_per_rank_bytes"] / base["peak_mem_per_rank_bytes"]
        rows[name]["peak_mem_above_start_vs_adamw"] = (rows[name]["peak_mem_above_start_per_rank_bytes"]
                                                       / base["peak_mem_above_start_per_rank_bytes"])

    mem_kind = "peak CUDA allocated" if gpu else "peak RSS"
    extra = "" if gpu else " | peak RSS above start / rank | vs AdamW"
    print()
    print(f"| optimizer | tokens/s | vs AdamW | paired round time vs AdamW | step ms | CPU ms / step / rank "
          f"| vs AdamW | optimizer.step ms | {mem_kind} / rank | vs AdamW{extra} | optimizer state / rank |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + ("" if gpu else " ---: | ---: |")
          + " ---: |")
    for name in CANDIDATES:
        r = rows[name]
        cells = [f"FSDP2 {name}", f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s_vs_adamw']:.3f}x",
                 f"{r['paired_round_time_ratio_vs_adamw']:.3f}x", f"{r['step_ms']:.1f}",
                 f"{r['cpu_ms_per_step_per_rank']:.1f}", f"{r['cpu_time_vs_adamw']:.3f}x",
                 f"{r['optimizer_step_ms']:.2f}",
                 f"{r['peak_mem_per_rank_bytes'] / 2**20:,.1f} MiB", f"{r['peak_mem_vs_adamw']:.3f}x"]
        if not gpu:
            cells += [f"{r['peak_mem_above_start_per_rank_bytes'] / 2**20:,.1f} MiB",
                      f"{r['peak_mem_above_start_vs_adamw']:.3f}x"]
        cells.append(f"{r['optimizer_state_bytes_per_rank'] / 2**20:,.3f} MiB")
        print("| " + " | ".join(cells) + " |")

    result = {
        "benchmark": "fsdp_throughput",
        "command": " ".join(["python bench/fsdp_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "world_size": args.nproc,
        "model": {"d_model": args.d_model, "n_layer": args.n_layer, "n_head": args.n_head, "vocab": args.vocab,
                  "seq": args.seq, "params": t["params"]},
        "adamw_fused": t["adamw_fused"],
        "global_tokens_per_step": tokens_per_step,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "memory_measure": mem_kind,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
