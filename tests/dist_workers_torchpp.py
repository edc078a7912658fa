"""Per-rank code of tests/test_torch_pipelining.py: AdamHD under ``torch.distributed.pipelining``, alone and with
FSDP2 on each stage's data-parallel sub-mesh (CPU, gloo), compared with one process on the full model.

A small stack of Linear / LayerNorm / GELU layers, built from a config by seeded constructors, is cut into 2
pipeline stages; each rank builds the whole model from the same seed and keeps its stage's layers under their
full-model names (``layers.<i>.*``), as torchtitan cuts a model. A manual ``PipelineStage`` per rank holds that
submodule, a schedule (``ScheduleGPipe`` or ``Schedule1F1B``) runs ``N_MICRO`` microbatches with the mean-squared
loss on the last stage (the schedule divides the accumulated gradients by ``N_MICRO``), and each rank's AdamHD
holds only its stage's parameters. The mesh is ("pp", "dp"): at world 2 (dp 1) the stage modules are plain, at
world 4 (dp 2) each stage's module is ``fully_shard``-ed over its "dp" sub-mesh and every dp rank trains on its
half of the global batch.

Cases (each returns numbers and tensors; the test asserts on them):

- ``gpipe`` / ``1f1b``: both stages hold decayed layers; the second with ``reshard_after_forward=False`` (what
  torchtitan uses under pipelining) at dp 2;
- ``interleaved``: 4 stages, two per rank (0 and 2, 1 and 3), ``ScheduleInterleaved1F1B``, one AdamHD over the
  rank's two stage modules (each ``fully_shard``-ed on its own at dp 2);
- ``clip``: 1F1B with the gradients clipped to a norm of the whole model, summed over the stages (torchtitan's
  way), against the reference's ``clip_grad_norm_``;
- ``nodecay``: the second stage holds only a LayerNorm and a bias (no decayed layer): AdamHD's step there must
  issue no collective at all, while the first stage reduces once per step over its own dp group (none at dp 1);
- ``resume``: a DCP checkpoint of each stage (model + optimizer state dict, μ included) written at step
  ``SAVE_AT`` over the stage's dp group, loaded by fresh modules, optimizers, stages and schedules on a freshly
  built device mesh (new process groups), trained on: equal to the uninterrupted run; and the pp 2 × dp 2
  checkpoint resumed at pp 2 × dp 1 (DCP reshards the FSDP2 shards into the plain stage modules);
- ``naive`` (dp 2 only): the negative control, each rank's shard taken as the layer.

The reference is AdamHD (its per-tensor loop) on the full model in one process with the whole global batch.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode

import adamhd_dist.distributed.dtensor as dtensor_mod
from adamhd_dist import AdamHD, layer_deltas, param_groups
from dist_workers_tp import PerShard  # the negative control: each rank's shard taken as the layer

D_IN, D_OUT = 6, 5
ROWS, N_MICRO, STEPS, SAVE_AT = 16, 4, 6, 3  # ROWS divisible by dp · N_MICRO for dp 1 and 2
WD = 0.1
HP = dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-8, delta_scale=1.0, delta_beta=0.9)
CLIP = 0.3  # below the gradient norm of every step (the test checks): the clipping is active
SHARDED_OPT = dict(fused=False)  # the multi-tensor update path
REF_OPT = dict(foreach=False, fused=False)  # the per-tensor loop: shares least with the sharded path


class Bias(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x + self.bias


# The configs: (layer type, args) in order. Widths 9 and 7 split unevenly over 2 dp ranks.
CONFIGS = {
    "main": ([("linear", (D_IN, 9)), ("gelu", ()), ("norm", (9,)), ("linear", (9, 9)),
              ("norm", (9,)), ("linear", (9, 7)), ("gelu", ()), ("linear", (7, D_OUT))]),
    "nodecay": ([("linear", (D_IN, 9)), ("gelu", ()), ("linear", (9, D_OUT)),
                 ("norm", (D_OUT,)), ("bias", (D_OUT,))]),
}


def _layer(kind, args):
    return {"linear": nn.Linear, "gelu": nn.GELU, "norm": nn.LayerNorm, "bias": Bias}[kind](*args)


class Stack(nn.Module):
    """The full model of ``CONFIGS[config]``, layer ``i`` named ``layers.<i>``."""

    def __init__(self, config: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        specs = CONFIGS[config]
        self.layers = nn.ModuleDict({str(i): _layer(k, a) for i, (k, a) in enumerate(specs)})
        with torch.no_grad():  # norms and biases away from their init, so they move visibly
            for name, p in self.named_parameters():
                if isinstance(self.layers[name.split(".")[1]], (nn.LayerNorm, Bias)):
                    p.add_(0.1 * torch.randn_like(p))

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        return x


CUTS = {("main", 2): (0, 4, 8), ("main", 4): (0, 2, 4, 6, 8), ("nodecay", 2): (0, 3, 5)}
"""Where each stage's layers begin and end, by (config, number of stages)."""


def stage_module(config: str, stage: int, n_stages: int = 2) -> Stack:
    """Stage ``stage`` of the full model cut into ``n_stages``: the full model built from the seed, the other
    stages' layers deleted (torchtitan's way of cutting a model for manual pipeline stages)."""
    model = Stack(config)
    lo, hi = CUTS[config, n_stages][stage:stage + 2]
    for i in list(model.layers.keys()):
        if not lo <= int(i) < hi:
            del model.layers[i]
    return model


def batches(steps=STEPS, seed=99):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(ROWS, D_IN, generator=g), torch.randn(ROWS, D_OUT, generator=g)) for _ in range(steps)]


def reference(config: str, steps: int = STEPS, clip: float | None = None) -> dict:
    model = Stack(config)
    opt = AdamHD(param_groups(model, WD), **HP, **REF_OPT)
    deltas, norms = [], []
    for x, y in batches(steps):
        F.mse_loss(model(x), y).backward()
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        deltas.append(layer_deltas(opt))
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "deltas": deltas,
            "grad_norms": norms}


@contextlib.contextmanager
def count_collectives():
    """Inside the block: the ranks of the group of every call of AdamHD's statistic collective (``all_reduce_sums``)
    and of every ``dist.all_reduce`` issued by anyone, and DTensor's own count of every collective op."""
    seen = {"statistic": [], "all_reduce": [], "comm": 0}
    orig_stat, orig_ar = dtensor_mod.all_reduce_sums, dist.all_reduce

    def _ranks(group):
        return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))

    def stat_spy(sums, group, *a, **k):
        seen["statistic"].append(_ranks(group))
        return orig_stat(sums, group, *a, **k)

    def ar_spy(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        seen["all_reduce"].append(_ranks(group))
        return orig_ar(tensor, op=op, group=group, async_op=async_op)

    dtensor_mod.all_reduce_sums, dist.all_reduce = stat_spy, ar_spy
    try:
        with CommDebugMode() as comm:
            yield seen
        seen["comm"] = comm.get_total_counts()
    finally:
        dtensor_mod.all_reduce_sums, dist.all_reduce = orig_stat, orig_ar


FSDP_COLLECTIVES = ("reduce_scatter_single", "reduce_scatter_tensor", "all_gather_single", "all_gather_into_tensor",
                    "all_reduce")


@contextlib.contextmanager
def count_calls(*names):
    """{name: calls} of the ``torch.distributed`` functions ``names`` inside the block (those that exist).
    (``CommDebugMode`` is not used around a schedule step: under it the pp 2 × dp 2 gloo run hung, torch 2.13.)"""
    counts, origs = {}, {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def spy(name, fn):
        def wrapped(*a, **k):
            counts[name] = counts.get(name, 0) + 1
            return fn(*a, **k)
        return wrapped

    for n, fn in origs.items():
        setattr(dist, n, spy(n, fn))
    try:
        yield counts
    finally:
        for n, fn in origs.items():
            setattr(dist, n, fn)


def make_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("pp", "dp"))


class Pipeline:
    """One rank of the pipeline: its stage module(s) (each FSDP2 over "dp" when dp > 1), ONE AdamHD over all their
    parameters, a PipelineStage per module, the schedule. ``virtual=2``: two stages per rank, 0 and 2 on the first,
    1 and 3 on the second ("loop" placement), run by ``ScheduleInterleaved1F1B``. ``self.stage`` is the rank's
    position on "pp" (0 feeds the inputs, 1 computes the loss)."""

    def __init__(self, config, mesh, schedule="gpipe", reshard_after_forward=True, naive=False, virtual=1,
                 clip=None):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                  ScheduleInterleaved1F1B)

        self.config, self.mesh, self.clip = config, mesh, clip
        self.stage, self.dp, self.dpr = mesh["pp"].get_local_rank(), mesh["dp"].size(), mesh["dp"].get_local_rank()
        n_stages = 2 * virtual
        ids = [self.stage + 2 * k for k in range(virtual)]
        self.chunks = [stage_module(config, i, n_stages) for i in ids]
        for chunk in self.chunks:
            if self.dp > 1:
                fully_shard(chunk, mesh=mesh["dp"], reshard_after_forward=reshard_after_forward)
        if virtual == 1:
            self.module = self.chunks[0]
        else:  # the rank's layers of every chunk under their full-model names, for the optimizer and the results
            self.module = nn.Module()
            self.module.layers = nn.ModuleDict({i: m for c in self.chunks for i, m in c.layers.items()})
        self.opt = AdamHD(param_groups(self.module, WD), **HP, **SHARDED_OPT)
        if naive:
            self.opt.set_layer_stats(PerShard())
        group = mesh["pp"].get_group()
        self.pstages = [PipelineStage(c, i, n_stages, torch.device("cpu"), group=group)
                        for c, i in zip(self.chunks, ids)]
        if virtual > 1:
            self.schedule = ScheduleInterleaved1F1B(self.pstages, n_microbatches=N_MICRO, loss_fn=F.mse_loss)
        else:
            cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
            self.schedule = cls(self.pstages[0], n_microbatches=N_MICRO, loss_fn=F.mse_loss)
        self.deltas, self.calls, self.losses, self.schedule_comms = [], [], [], []

    def train(self, start, stop):
        rows = ROWS // self.dp
        for x, y in batches()[start:stop]:
            x, y = x[self.dpr * rows:][:rows], y[self.dpr * rows:][:rows]
            with count_calls(*FSDP_COLLECTIVES) as comms:
                if self.stage == 0:
                    self.schedule.step(x)
                else:
                    losses = []
                    self.schedule.step(target=y, losses=losses)
                    self.losses.append(torch.stack(losses).mean().item())
            self.schedule_comms.append(comms)
            if self.clip is not None:
                self.clip_across_stages()
            with count_collectives() as seen:
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.calls.append(seen)
            self.deltas.append(layer_deltas(self.opt))
        return self

    def clip_across_stages(self):
        """The gradient norm of the whole model, as torchtitan clips under pipelining: each stage's norm (over its
        dp shards), its square summed over "pp", every gradient scaled by the same factor."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        sq = norm.detach().double() ** 2
        dist.all_reduce(sq, group=self.mesh["pp"].get_group())
        torch.nn.utils.clip_grads_with_norm_(self.module.parameters(), self.clip, sq.sqrt().float())

    def params(self):
        from torch.distributed.tensor import DTensor

        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in self.module.named_parameters()}

    def mu(self):
        names = {p: n for n, p in self.module.named_parameters()}
        return {names[p]: float(st["delta_ema"]) for p, st in self.opt.state.items() if "delta_ema" in st}

    def result(self, **extra):
        ids = [None] * dist.get_world_size()
        dist.all_gather_object(ids, self.stage)
        return dict(stage=self.stage, stage_ranks=[r for r, s in enumerate(ids) if s == self.stage],
                    dp_ranks=dist.get_process_group_ranks(self.mesh["dp"].get_group()),
                    params=self.params(), deltas=self.deltas, calls=self.calls, losses=self.losses,
                    schedule_comms=self.schedule_comms,
                    decayed=sum(len(g["params"]) for g in self.opt.param_groups if g["weight_decay"]),
                    sharded=self.dp > 1, chunks=len(self.chunks), **extra)


def _state_dicts(pipe):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(pipe.module), "optim": get_optimizer_state_dict(pipe.module, pipe.opt)}


def resume(ckdir: str, schedule="gpipe") -> dict:
    """SAVE_AT steps, a DCP checkpoint per stage (over the stage's dp group), then fresh everything on a new mesh
    loads it and trains to STEPS."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    mesh = make_mesh()
    first = Pipeline("main", mesh, schedule).train(0, SAVE_AT)
    path = os.path.join(ckdir, f"stage{first.stage}")
    dcp.save(_state_dicts(first), checkpoint_id=path, process_group=mesh["dp"].get_group())
    saved_deltas, saved_mu = layer_deltas(first.opt), first.mu()
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    mu_keys = sorted(k for k in meta if k.endswith(".delta_ema"))
    del first

    fresh_mesh = make_mesh()  # new process groups for "pp" and "dp"
    pipe = Pipeline("main", fresh_mesh, schedule)
    sd = _state_dicts(pipe)
    dcp.load(sd, checkpoint_id=path, process_group=fresh_mesh["dp"].get_group())
    set_model_state_dict(pipe.module, sd["model"])
    set_optimizer_state_dict(pipe.module, pipe.opt, sd["optim"])
    loaded_deltas, loaded_mu = layer_deltas(pipe.opt), pipe.mu()
    pipe.train(SAVE_AT, STEPS)
    return pipe.result(saved_deltas=saved_deltas, loaded_deltas=loaded_deltas, saved_mu=saved_mu,
                       loaded_mu=loaded_mu, mu_keys=mu_keys, files=sorted(os.listdir(path)))


def resume_from(ckdir: str) -> dict:
    """Load the checkpoint another layout wrote (pp 2 × dp 2, FSDP2 shards) into this one's stages, train to STEPS."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    mesh = make_mesh()
    pipe = Pipeline("main", mesh)
    sd = _state_dicts(pipe)
    dcp.load(sd, checkpoint_id=os.path.join(ckdir, f"stage{pipe.stage}"), process_group=mesh["dp"].get_group())
    set_model_state_dict(pipe.module, sd["model"])
    set_optimizer_state_dict(pipe.module, pipe.opt, sd["optim"])
    loaded_mu = pipe.mu()
    pipe.train(SAVE_AT, STEPS)
    return pipe.result(loaded_mu=loaded_mu)


def run(config, schedule="gpipe", reshard_after_forward=True, naive=False, virtual=1, clip=None):
    pipe = Pipeline(config, make_mesh(), schedule, reshard_after_forward, naive, virtual, clip)
    return pipe.train(0, STEPS).result()


def _attempt(fn, *args, **kwargs):
    import time
    t = time.perf_counter()
    try:
        r = fn(*args, **kwargs)
        r["seconds"] = time.perf_counter() - t
        return r
    except Exception as e:  # the outcome is the result: the test asserts which configurations must run
        import traceback

        return {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}


def suite(ckdir: str, load_from: str | None = None) -> dict:
    """One launch: every case at this world size (2 stages × dp = world / 2); ``load_from``: the checkpoint
    directory of a launch at another dp to resume from."""
    dist.init_process_group("gloo")
    dp = dist.get_world_size() // 2
    out = {"gpipe": _attempt(run, "main", "gpipe"),
           "1f1b": _attempt(run, "main", "1f1b", reshard_after_forward=False),
           "interleaved": _attempt(run, "main", virtual=2),
           "clip": _attempt(run, "main", "1f1b", clip=CLIP),
           "nodecay": _attempt(run, "nodecay", "1f1b"),
           "resume": _attempt(resume, ckdir)}
    if load_from is not None:
        out["resume_other_dp"] = _attempt(resume_from, load_from)
    if dp > 1:
        out["naive"] = _attempt(run, "main", "gpipe", naive=True)
    if dist.get_rank() == 0:
        out["reference"] = {c: reference(c) for c in CONFIGS}
        out["reference"]["clip"] = reference("main", clip=CLIP)
    return out
