"""One optimizer step, AdamHD vs the AdamW baselines, measured side by side in one run.

    python bench/optimizer_step.py                       # CPU; also the GPU when one is present
    python bench/optimizer_step.py --d-model 352 --reps 15 --out bench/results/optimizer_step.json

Two layouts, the same number of parameters:
  (a) list:  a GPT-3-XL-shaped model (24 blocks, 292 tensors, d_model scaled to fit the machine; the GPU uses the
             real 2048 = 1.316 B parameters) as a list of separate tensors, through each optimizer's step();
  (b) flat:  the same parameters in ONE flat fp32 buffer (a ZeRO partition): AdamHD with a FlatLayout, stepped
             as the ZeRO integration steps it (per-layer statistic, then one kernel call over 292 layer views);
             the baselines update the flat tensor.

AdamHD runs with delta_mode="ema" (the statistic is computed every step). Candidates are timed in interleaved
rounds (round r times every candidate once) and the median is reported; "GB/s" counts the 7 x 4 bytes per
parameter an Adam step must move (read p, g, m, v; write p, m, v), the same figure for every candidate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adamhd_dist import AdamHD  # noqa: E402
from adamhd_dist.distributed.layout import FlatLayout, Fragment  # noqa: E402

HP = dict(lr=2e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def gpt3_xl_shapes(d_model: int, n_layer: int = 24, vocab: int = 50257, ctx: int = 2048):
    """The 292 parameter shapes of GPT-3 XL (GPT-2 block layout) with a chosen width."""
    d = d_model
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _randn(n_or_shape, gen, device, scale):
    return torch.randn(n_or_shape, generator=gen, device=device).mul_(scale)


# Each candidate owns its parameters and moments (AdamHD keeps next step's statistic from its own update, so a
# parameter another optimizer moved would cost it a re-read that real training never pays); the gradients, which no
# optimizer writes, are shared. A candidate is built only when its group is measured (see run_layout).
def list_candidates(shapes, device):
    """name -> factory; factory() allocates the candidate and returns its step function."""
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [_randn(s, gen, device, 1e-3) for s in shapes]

    def factory(make):
        def build():  # the same initial values for every candidate
            init = torch.Generator(device=device).manual_seed(1)
            params = []
            for s, g in zip(shapes, grads):
                p = torch.nn.Parameter(_randn(s, init, device, 0.02))
                p.grad = g
                params.append(p)
            opt = make(params)
            return opt.step
        return build

    cands = {
        "AdamHD fused": factory(lambda ps: AdamHD(ps, **HP, fused=True)),
        "AdamHD foreach": factory(lambda ps: AdamHD(ps, **HP, foreach=True)),
        "AdamW fused (torch)": factory(lambda ps: torch.optim.AdamW(ps, **HP, fused=True)),
        "AdamW foreach (torch)": factory(lambda ps: torch.optim.AdamW(ps, **HP, foreach=True)),
    }
    ds = deepspeed_candidate(device)
    if ds is not None:
        cands[ds[0]] = factory(ds[1])
    return cands


def deepspeed_candidate(device):
    """DeepSpeedCPUAdam on CPU, FusedAdam on CUDA (JIT-built on first use), or None if it cannot be built."""
    try:
        if device.type == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return "DeepSpeedCPUAdam", lambda ps: DeepSpeedCPUAdam(ps, **HP, adamw_mode=True)
        from deepspeed.ops.adam import FusedAdam

        return "DeepSpeed FusedAdam", lambda ps: FusedAdam(ps, **HP, adam_w_mode=True)
    except Exception as e:  # noqa: BLE001 - report and go on without it
        print(f"[bench] DeepSpeed optimizer unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def flat_candidates(shapes, device):
    numels = [int(torch.Size(s).numel()) for s in shapes]
    total = sum(numels)
    starts = [0]
    for n in numels[:-1]:
        starts.append(starts[-1] + n)
    grad = _randn(total, torch.Generator(device=device).manual_seed(2), device, 1e-3)

    def new_flat():
        flat = torch.nn.Parameter(_randn(total, torch.Generator(device=device).manual_seed(3), device, 0.02))
        flat.grad = grad
        return flat

    def adamhd_flat():
        # AdamHD on a flat partition with per-layer δ: the optimizer with a FlatLayout, stepped as the ZeRO
        # integration steps it (begin_step: the per-layer statistic, then the inner step over 292 layer views)
        flat = new_flat()
        opt = AdamHD([flat], **HP, fused=True)
        frags = [Fragment(i, s, n) for i, (s, n) in enumerate(zip(starts, numels))]
        opt.set_layout(FlatLayout([f"layer{i}" for i in range(len(numels))], numels, [0] * len(numels),
                                  {flat: frags}, None))

        def step():
            opt.begin_step()
            opt.step()
        return step

    def factory(make):
        return lambda: make([new_flat()]).step

    cands = {"AdamHD fused, per-layer δ": adamhd_flat,
             "AdamW fused (torch)": factory(lambda ps: torch.optim.AdamW(ps, **HP, fused=True))}
    ds = deepspeed_candidate(device)
    if ds is not None:
        cands[ds[0]] = factory(ds[1])
    return cands


def group_size_for(n_params: int, n_cands: int, device) -> int:
    """How many candidates can be live at once: all on the CPU; on a GPU as many as fit (gradients once, then
    parameters and two moments per candidate, 12 bytes per parameter; plus 8 bytes per parameter of temporaries,
    which a foreach step allocates, and 15 % headroom), at least 2 (one and the baseline), else a clear refusal
    before anything is allocated."""
    if device.type != "cuda":
        return n_cands
    free, total = torch.cuda.mem_get_info(device)
    k = int((0.85 * free / (4 * n_params) - 1 - 2) // 3)
    if k < 2:
        raise SystemExit(f"--gpu-d-model: {n_params / 1e9:.3f} B parameters need about "
                         f"{(4 + 8 + 24) * n_params / 2**30 / 0.85:.1f} GiB of GPU memory for two optimizers side by side; "
                         f"{free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB is free: choose a smaller --gpu-d-model")
    return min(k, n_cands)


def measure(fns, device, reps, warmup):
    """Median ms per step of each step function, timed in interleaved rounds."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def run_layout(cands, baseline, device, n_params, reps, warmup):
    """Measure every candidate against ``baseline`` in groups that fit the device (one group on the CPU); the
    baseline runs in every group and each ratio is taken against the baseline of its own group."""
    others = [k for k in cands if k != baseline]
    k = group_size_for(n_params, len(cands), device)
    groups = [others[i:i + k - 1] for i in range(0, len(others), k - 1)] or [[]]
    out = {}
    for gi, names in enumerate(groups):
        fns = {name: cands[name]() for name in [*names, baseline]}
        ms = measure(fns, device, reps, warmup)
        del fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for name in names + ([baseline] if gi == 0 else []):
            out[name] = (ms[name], ms[name] / ms[baseline], gi)
    return out


def run_device(device, d_model, reps, warmup, baseline_name):
    shapes = gpt3_xl_shapes(d_model)
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    print(f"[bench] {device.type}: {n / 1e6:.1f} M parameters in {len(shapes)} tensors, {reps} rounds", flush=True)
    rows = []
    for layout, make in (("list", list_candidates), ("flat", flat_candidates)):
        cands = make(shapes, device)
        base = baseline_name if baseline_name in cands else "AdamW fused (torch)"
        for name, (t, ratio, gi) in run_layout(cands, base, device, n, reps, warmup).items():
            rows.append(dict(device=device.type, layout=layout, optimizer=name, params=n, tensors=len(shapes),
                             ms=round(t, 3), gb_s=round(28 * n / (t * 1e-3) / 1e9, 2),
                             ratio_vs_baseline=round(ratio, 3), group=gi))
        del cands
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def machine_info():
    info = dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    try:
        import cpuinfo

        info["cpu"] = cpuinfo.get_cpu_info().get("brand_raw", info["cpu"])
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=352, help="CPU width of the GPT-3-XL-shaped model "
                    "(352: 53 M params in 292 tensors); the GPU uses 2048 unless --gpu-d-model says otherwise")
    ap.add_argument("--gpu-d-model", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                    help="all (default): the CPU, then the GPU when one is present; cpu or cuda: that one only")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "optimizer_step.json")
    args = ap.parse_args(argv)
    if args.d_model <= 0 or args.gpu_d_model <= 0 or args.reps <= 0 or args.warmup < 0:
        ap.error("--d-model, --gpu-d-model and --reps must be positive, --warmup >= 0")

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch")
    rows = []
    if args.device in ("all", "cpu"):
        rows += run_device(torch.device("cpu"), args.d_model, args.reps, args.warmup, "DeepSpeedCPUAdam")
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        rows += run_device(torch.device("cuda"), args.gpu_d_model, args.reps, args.warmup, "AdamW fused (torch)")
    result = dict(machine=machine_info(), hyperparameters=HP, command=" ".join(["python", *sys.argv]), rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)

    print(f"machine: {result['machine']}")
    print("| device | layout | optimizer | params | ms/step | GB/s | ratio vs baseline |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['device']} | {r['layout']} | {r['optimizer']} | {r['params'] / 1e6:.1f} M | {r['ms']:.2f} | "
              f"{r['gb_s']:.1f} | {r['ratio_vs_baseline']:.2f}x |")
    print("baseline: DeepSpeedCPUAdam on the CPU, torch AdamW(fused=True) on the GPU")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
