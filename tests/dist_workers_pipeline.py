"""Per-rank code of tests/test_pipeline.py: AdamHD under pipeline parallelism on CPU ranks (gloo), compared with one
process on the full (unpipelined) model with the same global batch.

DeepSpeed ``PipelineModule`` (2 stages × dp 1 at world 2, × dp 2 at world 4, ZeRO-1, ``engine.train_batch``):

- ``main``: six layers cut uniformly, both stages holding decayed matrices;
- ``tied``: a ``TiedLayerSpec`` square matrix used by the first and the last stage (a tied embedding/head's layout:
  each stage holds a whole copy, DeepSpeed sums the copies' gradients over the tie group);
- ``nodecay``: the second stage holds only a norm and a bias (nothing decayed): AdamHD's statistic on it must issue
  no collective at all;
- through ``adamhd_dist.deepspeed.initialize`` and through the user's own ``deepspeed.initialize`` + ``attach``;
- save at step 3, resume in a fresh engine, continue: equal to the uninterrupted run;
- ZeRO-2 / ZeRO-3 with a pipeline: DeepSpeed's own refusal;
- the negative control: each flat partition taken as one layer.

Every layer is built by a seeded constructor, so the reference builds the same weights without DeepSpeed.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

D_IN, D_OUT, ROWS, STEPS, SAVE_AT = 5, 4, 8, 6, 3
OPT = {"lr": 2e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "delta_scale": 1.0, "delta_beta": 0.9,
       "fused": False}  # the multi-tensor path: no kernel build inside the timed launch
CLIP = 1.0


class SeededLinear(nn.Linear):
    def __init__(self, i, o, seed, bias=True):
        torch.manual_seed(seed)
        super().__init__(i, o, bias=bias)


class SeededNorm(nn.LayerNorm):
    def __init__(self, n, seed):
        super().__init__(n)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # away from the init so the weights move visibly
            self.weight.add_(0.1 * torch.randn(n, generator=g))


class Bias(nn.Module):
    def __init__(self, n, seed):
        super().__init__()
        self.bias = nn.Parameter(0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return x + self.bias


def specs(kind: str):
    """(class, args, kwargs, tie key or None) per layer, in pipeline order."""
    if kind == "main":
        return [(SeededLinear, (D_IN, 9, 1), {}, None), (nn.GELU, (), {}, None), (SeededLinear, (9, 7, 2), {}, None),
                (nn.GELU, (), {}, None), (SeededNorm, (7, 3), {}, None), (SeededLinear, (7, D_OUT, 4), {}, None)]
    if kind == "tied":  # the tied matrix opens stage 0 and closes stage 1
        return [(SeededLinear, (D_IN, D_IN, 5), {"bias": False}, "tie"), (SeededLinear, (D_IN, 7, 1), {}, None),
                (nn.GELU, (), {}, None), (SeededLinear, (7, D_IN, 2), {}, None), (SeededNorm, (D_IN, 3), {}, None),
                (SeededLinear, (D_IN, D_IN, 5), {"bias": False}, "tie")]
    if kind == "nodecay":  # stage 1: a norm and a bias, nothing with weight decay
        return [(SeededLinear, (D_IN, 9, 1), {}, None), (SeededLinear, (9, D_OUT, 2), {}, None),
                (SeededNorm, (D_OUT, 3), {}, None), (Bias, (D_OUT, 4), {}, None)]
    raise ValueError(kind)


def out_dim(kind):
    return D_IN if kind == "tied" else D_OUT


def pipeline_module(kind: str, stages: int = 2):
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    layers = [TiedLayerSpec(tie, cls, *a, **kw) if tie else LayerSpec(cls, *a, **kw) for cls, a, kw, tie in specs(kind)]
    return PipelineModule(layers=layers, num_stages=stages, loss_fn=F.mse_loss, partition_method="uniform")


class Reference(nn.Module):
    """The full model in one process: layer i is ``str(i)`` as in the pipeline; a tied layer is one module."""

    def __init__(self, kind):
        super().__init__()
        self.order, self.tied = [], {}
        for i, (cls, a, kw, tie) in enumerate(specs(kind)):
            if tie and tie in self.tied:
                self.order.append(self.tied[tie])
                continue
            self.add_module(str(i), cls(*a, **kw))
            self.order.append(str(i))
            if tie:
                self.tied[tie] = str(i)

    def forward(self, x):
        for name in self.order:
            x = getattr(self, name)(x)
        return x


def ref_name(kind: str, name: str) -> str:
    """The reference's name of a pipeline parameter (a tied module is ``tied_modules.<key>.<attr>``)."""
    if name.startswith("tied_modules."):
        _, key, attr = name.split(".", 2)
        return f"{[i for i, s in enumerate(specs(kind)) if s[3] == key][0]}.{attr}"
    return name


def batches(kind, steps=STEPS, seed=99):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(ROWS, D_IN, generator=g), torch.randn(ROWS, out_dim(kind), generator=g)) for _ in range(steps)]


def reference(kind, steps=STEPS, clip=CLIP):
    import adamhd_dist

    model = Reference(kind)
    kw = dict(OPT, betas=tuple(OPT["betas"]))
    kw.update(foreach=False, fused=False)  # the per-tensor loop: shares least with the sharded path
    opt = adamhd_dist.AdamHD(adamhd_dist.param_groups(model, kw.pop("weight_decay")), **kw)
    deltas = []
    for x, y in batches(kind, steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        deltas.append(adamhd_dist.layer_deltas(opt))
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "deltas": deltas}


def ds_config(dp, stage=1, gas=2, door="initialize"):
    micro = ROWS // (dp * gas)
    cfg = {"train_batch_size": ROWS, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
           "gradient_clipping": CLIP, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
           "wall_clock_breakdown": False}
    if door == "initialize":
        cfg["optimizer"] = {"type": "AdamHD", "params": dict(OPT)}
    else:
        cfg["zero_allow_untested_optimizer"] = True
    return cfg


def engine_for(kind, dp, door="initialize", stage=1):
    import deepspeed

    import adamhd_dist
    from adamhd_dist import deepspeed as ads

    model = pipeline_module(kind)
    cfg = ds_config(dp, stage, door=door)
    if door == "initialize":
        engine, *_ = ads.initialize(model=model, config=cfg)
    else:
        kw = dict(OPT, betas=tuple(OPT["betas"]))
        groups = adamhd_dist.param_groups(model, kw.pop("weight_decay"))
        if door == "attach_split" and len(groups) == 1:  # a stage without decay: two undecayed groups, as the others
            groups = [dict(groups[0], params=groups[0]["params"][:1], param_names=groups[0]["param_names"][:1]),
                      dict(groups[0], params=groups[0]["params"][1:], param_names=groups[0]["param_names"][1:])]
        opt = adamhd_dist.AdamHD(groups, **kw)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        if door.startswith("attach"):
            assert ads.attach(engine) is ads.attach(engine)
    return engine


def micro_batches(engine, batch):
    """This data-parallel rank's micro-batches of one global batch (every stage of a pipeline reads the same)."""
    x, y = batch
    dp, r, gas = engine.grid.get_data_parallel_world_size(), engine.grid.get_data_parallel_id(), \
        engine.gradient_accumulation_steps()
    micro = ROWS // (dp * gas)
    return [(x[(k * dp + r) * micro:][:micro], y[(k * dp + r) * micro:][:micro]) for k in range(gas)]


class StatisticCollectives:
    """Every collective AdamHD's statistic issues (all go through the DeepSpeed adapter's ``all_reduce_sums``): the
    ranks of its group, per call."""

    def __init__(self):
        import adamhd_dist.integrations.deepspeed as mod

        self.mod, self.orig, self.calls = mod, mod.all_reduce_sums, []

    def __enter__(self):
        def spy(sums, group, *a, **k):
            self.calls.append(dist.get_process_group_ranks(group))
            return self.orig(sums, group, *a, **k)

        self.mod.all_reduce_sums = spy
        return self

    def __exit__(self, *exc):
        self.mod.all_reduce_sums = self.orig


def params_of(engine):
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def train(engine, kind, steps, start=0):
    import adamhd_dist

    deltas, calls = [], []
    for batch in batches(kind)[start:steps]:
        with StatisticCollectives() as spy:
            engine.train_batch(iter(micro_batches(engine, batch)))
        calls.append(spy.calls)
        deltas.append(adamhd_dist.layer_deltas(engine))
    return deltas, calls


def run(kind, dp, door="initialize", naive=False):
    engine = engine_for(kind, dp, door)
    if naive:
        from dist_workers_deepspeed import PerPartition

        engine._adamhd_optimizer.set_layer_stats(PerPartition())
    deltas, calls = train(engine, kind, STEPS)
    stage = engine.stage_id
    ids = [None] * dist.get_world_size()
    dist.all_gather_object(ids, stage)
    return {"stage": stage, "stage_ranks": [r for r, s in enumerate(ids) if s == stage], "params": params_of(engine),
            "deltas": deltas, "calls": calls, "optimizer": type(engine.optimizer).__name__,
            "decayed": sum(len(g["params"]) for g in engine._adamhd_optimizer.param_groups if g["weight_decay"])}


def resume(kind, dp, ckdir):
    """Train to SAVE_AT, save, then a fresh engine loads the checkpoint and trains to STEPS."""
    import adamhd_dist

    engine = engine_for(kind, dp)
    train(engine, kind, SAVE_AT)
    saved_deltas = adamhd_dist.layer_deltas(engine)
    engine.save_checkpoint(ckdir, tag="mid")
    fresh = engine_for(kind, dp)
    fresh.load_checkpoint(ckdir, tag="mid")
    loaded_deltas = adamhd_dist.layer_deltas(fresh)
    deltas, _ = train(fresh, kind, STEPS, start=SAVE_AT)
    return {"params": params_of(fresh), "deltas": deltas, "saved_deltas": saved_deltas,
            "loaded_deltas": loaded_deltas, "files": sorted(os.listdir(os.path.join(ckdir, "mid")))}


def refused(kind, dp, stage):
    try:
        engine_for(kind, dp, stage=stage)
    except Exception as e:  # the outcome is the result: the test asserts DeepSpeed's refusal
        return f"{type(e).__name__}: {e}"
    return None


def _attempt(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # the outcome is the result: the test asserts which configurations must run
        import traceback

        return {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}


def deepspeed_suite(ckdir: str, kinds=("main", "tied", "nodecay"), only=False) -> dict:
    """One launch: every DeepSpeed pipeline case at this world size (2 stages × dp = world / 2)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    dp = dist.get_world_size() // 2
    out = {}
    for kind in kinds:
        out[kind] = _attempt(run, kind, dp)
    if only:
        return out
    out["attach"] = _attempt(run, "main", dp, door="attach")
    out["nodecay_split"] = _attempt(run, "nodecay", dp, door="attach_split")
    out["plain"] = _attempt(run, "main", dp, door="plain")
    out["resume"] = _attempt(resume, "main", dp, ckdir)
    out["naive"] = _attempt(run, "main", dp, naive=True)
    out["zero2"], out["zero3"] = refused("main", dp, 2), refused("main", dp, 3)
    if dist.get_rank() == 0:
        out["reference"] = {kind: reference(kind) for kind in ("main", "tied", "nodecay")}
    return out
