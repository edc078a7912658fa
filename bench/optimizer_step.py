"""One optimizer step, AdamHD vs the AdamW baselines, measured side by side in one run.

    python bench/optimizer_step.py                       # CPU (every x86 ISA this CPU runs); also the GPU if present
    python bench/optimizer_step.py --cpu-isa avx2,avx512 --d-model 352 --reps 21 --out bench/results/optimizer_step.json

Two layouts, the same number of parameters:
  (a) list:  a GPT-3-XL-shaped model (24 blocks, 292 tensors, d_model scaled to fit the machine; the GPU uses the
             real 2048 = 1.316 B parameters) as a list of separate tensors, through each optimizer's step();
  (b) flat:  the same parameters in ONE flat fp32 buffer (a ZeRO partition): AdamHD with a FlatLayout, stepped
             as the ZeRO integration steps it (per-layer statistic, then one kernel call over 292 layer views);
             the baselines update the flat tensor.

CPU instruction sets (--cpu-isa, a comma-separated list; default: avx2 and avx512 where this CPU runs them, generic
elsewhere): for each one, AdamHD's kernel (ADAMHD_CPU_ISA) AND DeepSpeedCPUAdam's C++ op are built for that ISA
(avx2: -march=x86-64-v3 and DeepSpeed's __AVX256__ code; avx512: -march=x86-64-v4 and __AVX512__; generic: no target
flags and DeepSpeed's scalar code; native: both builds' own defaults, -march=native), and measured as one group
against that group's DeepSpeedCPUAdam. torch's optimizers do not depend on the choice; they run in every group (the
foreach ones in the first group only).

AdamHD runs with delta_mode="ema" (the statistic is computed every step). Candidates are timed in interleaved
rounds (round r times every candidate of the group once, in an order reversed every other round); "ms" is the
median time, "ratio" the median over rounds of the candidate's time over the baseline's time in the same round (a
run whose speed drifts, as on a shared machine, moves both). "GB/s" counts the 7 x 4 bytes per parameter an Adam
step must move (read p, g, m, v; write p, m, v), the same figure for every candidate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from adamhd_dist import AdamHD  # noqa: E402
from adamhd_dist.distributed.layout import FlatLayerStats, FlatLayout, Fragment  # noqa: E402
from adamhd_dist.fsutil import atomic_write  # noqa: E402
from adamhd_dist.optim.kernels import cpu as kcpu  # noqa: E402

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
def list_candidates(shapes, device, cpu_isa=None, foreach=True):
    """name -> factory; factory() allocates the candidate and returns its step function. ``cpu_isa``: the ISA
    DeepSpeedCPUAdam is built for (AdamHD's kernel follows ADAMHD_CPU_ISA, see cpu_isa_env); ``foreach``: include
    the foreach candidates."""
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

    cands = {"AdamHD fused": factory(lambda ps: AdamHD(ps, **HP, fused=True))}
    if foreach:
        cands["AdamHD foreach"] = factory(lambda ps: AdamHD(ps, **HP, foreach=True))
    cands["AdamW fused (torch)"] = factory(lambda ps: torch.optim.AdamW(ps, **HP, fused=True))
    if foreach:
        cands["AdamW foreach (torch)"] = factory(lambda ps: torch.optim.AdamW(ps, **HP, foreach=True))
    ds = deepspeed_candidate(device, cpu_isa)
    if ds is not None:
        cands[ds[0]] = factory(ds[1])
    return cands


# DeepSpeedCPUAdam's op picks its SIMD code when it is built: OpBuilder.cpu_arch() gives the -march flag and
# simd_width() the __AVX512__ / __AVX256__ / __SCALAR__ define, both from this machine's CPU. For another ISA the
# bench builds the op through a subclass of the builder DeepSpeedCPUAdam uses that returns the ISA's flags, under its
# own name (its own extension module and build folder, so several can be loaded in one process), and hands that
# builder to DeepSpeedCPUAdam while it is constructed. (DeepSpeed 0.19: deepspeed.ops.adam.cpu_adam.CPUAdamBuilder,
# OpBuilder.cpu_arch / simd_width / load; checked below, so a DeepSpeed that changed them fails loudly.)
DS_CPU_FLAGS = {
    "avx2": ("-march=x86-64-v3", "-D__AVX256__"),
    "avx512": ("-march=x86-64-v4", "-D__AVX512__"),
    "generic": ("", "-D__SCALAR__"),  # (an empty flag is dropped by the builder)
}


def deepspeed_cpu_adam(cpu_isa):
    """A factory ``params -> DeepSpeedCPUAdam`` whose C++ op is built (now, if not cached) for ``cpu_isa``; ``native``
    or None: DeepSpeed's own build."""
    import deepspeed.ops.adam.cpu_adam as ds_cpu_adam
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    if cpu_isa in (None, "native"):
        return lambda ps: DeepSpeedCPUAdam(ps, **HP, adamw_mode=True)
    base = ds_cpu_adam.CPUAdamBuilder
    if not all(callable(getattr(base, a, None)) for a in ("cpu_arch", "simd_width", "load")):
        raise RuntimeError(f"DeepSpeed {getattr(sys.modules.get('deepspeed'), '__version__', '?')}: its CPU Adam "
                           "builder has no cpu_arch / simd_width / load: cannot build DeepSpeedCPUAdam for "
                           f"--cpu-isa {cpu_isa}")
    march, simd = DS_CPU_FLAGS[cpu_isa]

    class IsaBuilder(base):
        def __init__(self):
            super().__init__()
            self.name = f"{self.name}_{cpu_isa}"

        def cpu_arch(self):
            return march

        def simd_width(self):
            return simd

    builder = IsaBuilder()
    op = builder.load()

    def make(ps):
        ds_cpu_adam.CPUAdamBuilder = lambda: builder
        try:
            opt = DeepSpeedCPUAdam(ps, **HP, adamw_mode=True)
        finally:
            ds_cpu_adam.CPUAdamBuilder = base
        if opt.ds_opt_adam is not op:
            raise RuntimeError(f"DeepSpeedCPUAdam did not take the {cpu_isa} build of its op")
        return opt
    return make


def deepspeed_candidate(device, cpu_isa=None):
    """DeepSpeedCPUAdam (built for ``cpu_isa``) on CPU, FusedAdam on CUDA (JIT-built on first use), or None if it
    cannot be built."""
    try:
        if device.type == "cpu":
            return "DeepSpeedCPUAdam", deepspeed_cpu_adam(cpu_isa)
        from deepspeed.ops.adam import FusedAdam

        return "DeepSpeed FusedAdam", lambda ps: FusedAdam(ps, **HP, adam_w_mode=True)
    except Exception as e:  # noqa: BLE001 - report and go on without it
        print(f"[bench] DeepSpeed optimizer unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def flat_candidates(shapes, device, cpu_isa=None, foreach=True):
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
        opt.set_layer_stats(FlatLayerStats(FlatLayout([f"layer{i}" for i in range(len(numels))], numels,
                                                      [0] * len(numels), {flat: frags}, None)))

        def step():
            opt.begin_step()
            opt.step()
        return step

    def factory(make):
        return lambda: make([new_flat()]).step

    cands = {"AdamHD fused, per-layer δ": adamhd_flat,
             "AdamW fused (torch)": factory(lambda ps: torch.optim.AdamW(ps, **HP, fused=True))}
    ds = deepspeed_candidate(device, cpu_isa)
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
    """ms per step of each step function in each of ``reps`` interleaved rounds (the order reversed every other
    round, so no candidate always runs after the same one)."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    order = list(fns)
    for r in range(reps):
        for name in (order if r % 2 == 0 else order[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def run_layout(cands, baseline, device, n_params, reps, warmup):
    """Measure every candidate against ``baseline`` in groups that fit the device (one group on the CPU); the
    baseline runs in every group and each ratio is taken against the baseline of its own group: the median over
    rounds of candidate time / baseline time in the same round. Returns name -> (median ms, ratio, group, ms per
    round)."""
    others = [k for k in cands if k != baseline]
    k = group_size_for(n_params, len(cands), device)
    groups = [others[i:i + k - 1] for i in range(0, len(others), k - 1)] or [[]]
    out = {}
    for gi, names in enumerate(groups):
        fns = {name: cands[name]() for name in [*names, baseline]}
        times = measure(fns, device, reps, warmup)
        del fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
        base = times[baseline]
        for name in names + ([baseline] if gi == 0 else []):
            ratio = statistics.median(t / b for t, b in zip(times[name], base))
            out[name] = (statistics.median(times[name]), ratio, gi, times[name])
    return out


@contextlib.contextmanager
def cpu_isa_env(isa):
    """ADAMHD_CPU_ISA = ``isa`` inside (AdamHD's CPU kernel is the build for it); None: left as it is."""
    if isa is None:
        yield
        return
    old = os.environ.get(kcpu.ISA_ENV)
    os.environ[kcpu.ISA_ENV] = isa
    try:
        yield
    finally:
        if old is None:
            del os.environ[kcpu.ISA_ENV]
        else:
            os.environ[kcpu.ISA_ENV] = old


def cpu_isas_arg(text):
    """--cpu-isa: "auto" (avx2 and avx512 where this CPU runs them, else generic) or a comma-separated list of
    kernel ISAs, each one this CPU can execute."""
    if text == "auto":
        return [i for i in ("avx2", "avx512") if not kcpu.missing_cpu_features(i)] or ["generic"]
    isas = [t.strip().lower() for t in text.split(",") if t.strip()]
    for isa in isas:
        if isa not in kcpu.ISAS:
            raise argparse.ArgumentTypeError(f"{isa!r}: expected auto or a list of {', '.join(kcpu.ISAS)}")
        missing = kcpu.missing_cpu_features(isa)
        if missing:
            raise argparse.ArgumentTypeError(f"{isa}: this CPU cannot execute it (it lacks {', '.join(missing)})")
    if not isas or len(set(isas)) != len(isas):
        raise argparse.ArgumentTypeError(f"{text!r}: a list of distinct ISAs")
    return isas


def run_device(device, d_model, reps, warmup, baseline_name, cpu_isas=None):
    """Rows for one device; on the CPU one group of candidates per ISA of ``cpu_isas`` (None: the default build)."""
    shapes = gpt3_xl_shapes(d_model)
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    isas = (cpu_isas or [None]) if device.type == "cpu" else [None]
    print(f"[bench] {device.type}: {n / 1e6:.1f} M parameters in {len(shapes)} tensors, {reps} rounds"
          + (f", CPU ISAs {', '.join(isas)}" if isas != [None] else ""), flush=True)
    rows = []
    for ii, isa in enumerate(isas):
        with cpu_isa_env(isa):
            if device.type == "cpu" and isa is not None:
                kcpu.load()  # build before anything is timed; a build that fails stops the run here
            for layout, make in (("list", list_candidates), ("flat", flat_candidates)):
                cands = make(shapes, device, isa, foreach=ii == 0)
                base = baseline_name if baseline_name in cands else "AdamW fused (torch)"
                for name, (t, ratio, gi, rounds) in run_layout(cands, base, device, n, reps, warmup).items():
                    rows.append(dict(device=device.type, cpu_isa=isa, layout=layout, optimizer=name, params=n,
                                     tensors=len(shapes), ms=round(t, 3), gb_s=round(28 * n / (t * 1e-3) / 1e9, 2),
                                     ratio_vs_baseline=round(ratio, 3), baseline=base, group=gi,
                                     rounds_ms=[round(x, 3) for x in rounds]))
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
    flags = kcpu.cpu_flags() or set()
    info["cpu_simd_flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "sse4", "asimd", "sve")))
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001
        info["deepspeed"] = None
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
    ap.add_argument("--cpu-isa", type=cpu_isas_arg, default="auto", metavar="auto|ISA[,ISA...]",
                    help="the ISAs to build AdamHD's kernel and DeepSpeedCPUAdam for, one group each: auto (default: "
                         "avx2 and avx512 where this CPU runs them, else generic) or a list of generic, avx2, avx512, "
                         "native")
    ap.add_argument("--reps", type=int, default=21)
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
        rows += run_device(torch.device("cpu"), args.d_model, args.reps, args.warmup, "DeepSpeedCPUAdam",
                           args.cpu_isa)
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        rows += run_device(torch.device("cuda"), args.gpu_d_model, args.reps, args.warmup, "AdamW fused (torch)")
    result = dict(machine=machine_info(), hyperparameters=HP, command=" ".join(["python", *sys.argv]), rows=rows)
    atomic_write(args.out, lambda f: json.dump(result, f, indent=1))

    print(f"machine: {result['machine']}")
    print("| device | ISA | layout | optimizer | params | ms/step | GB/s | ratio vs baseline |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['device']} | {r['cpu_isa'] or '-'} | {r['layout']} | {r['optimizer']} | "
              f"{r['params'] / 1e6:.1f} M | {r['ms']:.2f} | {r['gb_s']:.1f} | {r['ratio_vs_baseline']:.3f}x |")
    print("baseline: DeepSpeedCPUAdam built for the row's ISA on the CPU, torch AdamW(fused=True) on the GPU; "
          "ratio: median over rounds of time / baseline time")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
