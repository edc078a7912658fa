"""Per-rank code of the DeepSpeed tests (run through tests/dist_utils.run_ranks; CPU ranks, gloo).

Each case trains the same small model for a few steps under a DeepSpeed config and returns plain numbers and
full (gathered) tensors; the pytest side compares them with a single-process AdamHD run on the unsharded model.
The model has odd shapes (layers straddle rank boundaries, ZeRO pads), tied input/output embeddings, a frozen
layer, and two param groups (decayed matrices; undecayed biases and norms).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as Fn

VOCAB, D, HIDDEN, SEQ, GLOBAL_ROWS = 37, 13, 29, 5, 12


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.l1 = nn.Linear(D, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.l2 = nn.Linear(HIDDEN, D)
        self.frozen = nn.Linear(D, D)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied
        # a persistent buffer that training changes (tokens seen): checkpoints must carry it
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    def forward(self, x, y):
        with torch.no_grad():
            self.tokens_seen += x.numel()
        h = self.emb(x)
        h = h + self.l2(Fn.gelu(self.norm(self.l1(h))))
        h = self.frozen(h)
        logits = self.head(h).float()
        return Fn.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def make_model(seed=1234):
    torch.manual_seed(seed)
    return TinyLM()


def batches(steps, seed=99):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (GLOBAL_ROWS, SEQ), generator=g)
        y = torch.randint(0, VOCAB, (GLOBAL_ROWS, SEQ), generator=g)
        out.append((x, y))
    return out


OPT = {"lr": 2e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "delta_scale": 1.0, "delta_beta": 0.9}


def ds_config(world, stage, gas=2, offload=False, dtype="fp32", round_robin=False, clip=1.0, **extra):
    micro = GLOBAL_ROWS // (world * gas)
    cfg = {
        "train_batch_size": GLOBAL_ROWS,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "optimizer": {"type": "AdamHD", "params": dict(OPT)},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 200, "allgather_bucket_size": 200},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if stage in (1, 2):
        cfg["zero_optimization"]["round_robin_gradients"] = round_robin
    if stage == 3:
        cfg["zero_optimization"].update({"sub_group_size": 400, "stage3_param_persistence_threshold": 0,
                                         "stage3_prefetch_bucket_size": 100, "stage3_max_live_parameters": 1000})
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 4, "loss_scale_window": 1000, "hysteresis": 1}
    for k, v in extra.items():
        cfg[k] = v
    return cfg


def init_dist():
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def rank_rows(step_batch, gas, micro):
    """Rows rank r feeds at micro-step k: every rank and micro-step a disjoint, equal-sized slice."""
    import torch.distributed as dist

    x, y = step_batch
    r, w = dist.get_rank(), dist.get_world_size()
    out = []
    for k in range(gas):
        lo = (k * w + r) * micro
        out.append((x[lo:lo + micro], y[lo:lo + micro]))
    return out


def module_params(engine) -> dict[str, torch.Tensor]:
    """The model's parameters as the engine's module holds them after a step (gathered under ZeRO-3): read
    without the optimizer's layout, so they check it independently."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {n: p.detach().clone().float() for n, p in engine.module.named_parameters()}


def module_buffers(engine) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in engine.module.named_buffers()}


def sharded_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """fp32 master weights, moments and μ by name, gathered through the optimizer's layout."""
    from adamhd_dist import deepspeed as ads

    return ads.full_state(engine)


def train(engine, data, gas, micro, steps=None):
    losses = []
    for batch in data[:steps]:
        for x, y in rank_rows(batch, gas, micro):
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
        losses.append(float(loss))
    return losses


def layout_summary(engine):
    """Per flat tensor on this rank: its size and its fragments (layer name, start, numel, offset in layer)."""
    lay = engine._adamhd_optimizer.layer_stats.layout
    return [{"numel": flat.numel(), "fragments": [(lay.names[f.layer], f.start, f.numel, f.offset) for f in frags]}
            for flat, frags in lay.fragments.items()], dict(zip(lay.names, lay.numels))


class PerPartition:
    """A deliberately wrong layer-statistic strategy: every tensor the optimizer steps taken as one whole layer
    (a flat partition included), as a layout-unaware optimizer does. Built lazily: the class needs adamhd_dist."""

    def __new__(cls):
        from adamhd_dist.optim.layer_stats import LayerStats

        class _PerPartition(LayerStats):
            def places(self, p):
                return True

        return _PerPartition()


def plain_initialize(model, cfg):
    """What a user who builds the optimizer does: their own deepspeed.initialize with an AdamHD client optimizer
    (and the settings DeepSpeed asks of a client optimizer)."""
    import deepspeed

    import adamhd_dist

    kw = dict(cfg["optimizer"]["params"], betas=tuple(cfg["optimizer"]["params"]["betas"]))
    opt = adamhd_dist.AdamHD(adamhd_dist.param_groups(model, kw.pop("weight_decay")), **kw)
    cfg = {k: v for k, v in cfg.items() if k != "optimizer"}
    cfg["zero_allow_untested_optimizer"] = True
    if "offload_optimizer" in cfg["zero_optimization"]:
        cfg["zero_force_ds_cpu_optimizer"] = False
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def run_case(world, stage, steps=10, naive=False, zero_init=False, door="initialize", **cfg_kw):
    """``door``: "initialize" (adamhd_dist.deepspeed.initialize), "attach" (the user's own deepspeed.initialize,
    then adamhd_dist.deepspeed.attach, called twice: it must be idempotent) or "plain" (the user's own
    deepspeed.initialize and nothing else: the first step must refuse, and change nothing)."""
    import deepspeed

    import adamhd_dist
    from adamhd_dist import deepspeed as ads

    cfg = ds_config(world, stage, **cfg_kw)
    gas = cfg["gradient_accumulation_steps"]
    micro = cfg["train_micro_batch_size_per_gpu"]
    if zero_init:  # ZeRO-3 partitions every parameter as the model is built: shapes read (0,) from then on
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = make_model()
    else:
        model = make_model()
    if door == "initialize":
        engine, *_ = ads.initialize(model=model, config=cfg)
    else:
        engine = plain_initialize(model, cfg)
    if door == "plain":
        before = module_params(engine)
        x, y = rank_rows(batches(1)[0], gas, micro)[0]
        try:
            for x, y in rank_rows(batches(1)[0], gas, micro):
                engine.backward(engine(x, y))
                engine.step()
        except adamhd_dist.UnplacedTensorError as e:
            after = module_params(engine)
            return {"refused": str(e), "changed": max(float((after[n] - before[n]).abs().max()) for n in before)}
        return {"refused": None}
    if door == "attach":
        assert ads.attach(engine) is ads.attach(engine)
    opt = engine._adamhd_optimizer
    summary = layout_summary(engine)
    counts = {"reduce": 0, "inner_step": 0}
    lay = opt.layer_stats.layout
    reduce = lay.reduce

    def counted_reduce(t):
        counts["reduce"] += 1
        return reduce(t)

    lay.reduce = counted_reduce
    inner = opt.step

    def counted_step(*a, **k):
        counts["inner_step"] += 1
        return inner(*a, **k)

    opt.step = counted_step
    if naive:  # what an optimizer unaware of the layout computes: one "layer" per flat partition
        opt.set_layer_stats(PerPartition())
    losses = train(engine, batches(steps), gas, micro)
    out = {"params": module_params(engine), "counts": counts, "layout": summary, "losses": losses,
           "optimizer": type(engine.optimizer).__name__}
    if not naive:
        out.update(deltas=adamhd_dist.layer_deltas(engine), state=sharded_state(engine),
                   deltas_of_zero_optimizer=adamhd_dist.layer_deltas(engine.optimizer))
    return out


def reference(steps=10, clip=1.0, **opt_overrides):
    """Single-process AdamHD on the unsharded model over the same global batches (torch's clipping rule)."""
    import adamhd_dist

    model = make_model()
    kw = {**OPT, **opt_overrides}
    kw["betas"] = tuple(kw["betas"])
    groups = adamhd_dist.param_groups(model, kw.pop("weight_decay"))
    opt = adamhd_dist.AdamHD(groups, **kw, foreach=False, fused=False)
    params = [p for p in model.parameters() if p.requires_grad]
    for x, y in batches(steps):
        opt.zero_grad()
        model(x, y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "deltas": adamhd_dist.layer_deltas(opt),
            "state": {n: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                      for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}}


def _engine(world, stage, **cfg_kw):
    from adamhd_dist import deepspeed as ads

    cfg = ds_config(world, stage, **cfg_kw)
    engine, *_ = ads.initialize(model=make_model(), config=cfg)
    return engine, cfg["gradient_accumulation_steps"], cfg["train_micro_batch_size_per_gpu"]


def save_partial(world, stage, ckdir, steps=5, tag="part", **cfg_kw):
    """Train ``steps`` steps, save a checkpoint, return the gathered state at that point."""
    init_dist()
    engine, gas, micro = _engine(world, stage, **cfg_kw)
    train(engine, batches(steps), gas, micro)
    engine.save_checkpoint(ckdir, tag=tag)
    return {"state": sharded_state(engine), "params": module_params(engine), "buffers": module_buffers(engine)}


def resume(world, stage, ckdir, tag="part", start=5, steps=10, **cfg_kw):
    """Load a checkpoint into a fresh engine, return the state right after loading and after training on."""
    import adamhd_dist

    init_dist()
    engine, gas, micro = _engine(world, stage, **cfg_kw)
    engine.load_checkpoint(ckdir, tag=tag)
    loaded, buffers = sharded_state(engine), module_buffers(engine)
    train(engine, batches(steps)[start:], gas, micro)
    return {"loaded": loaded, "loaded_buffers": buffers, "state": sharded_state(engine),
            "params": module_params(engine), "deltas": adamhd_dist.layer_deltas(engine)}


def resume_universal(world, stage, ckdir, start=5, steps=10, **cfg_kw):
    """Load the universal checkpoint named in ``ckdir/latest_universal`` (``"load_universal": true``), train on;
    a refusal is returned as its message (every rank raises the same)."""
    import adamhd_dist

    init_dist()
    engine, gas, micro = _engine(world, stage, checkpoint={"load_universal": True}, **cfg_kw)
    try:
        engine.load_checkpoint(ckdir)
    except ValueError as e:
        return {"error": str(e), "state": sharded_state(engine)}
    loaded = sharded_state(engine)
    train(engine, batches(steps)[start:], gas, micro)
    return {"loaded": loaded, "state": sharded_state(engine), "params": module_params(engine),
            "deltas": adamhd_dist.layer_deltas(engine)}


def reload_rereads_statistic(world, stage, ckdir, **cfg_kw):
    """Save at step 3, train 2 more, then roll the weights back with load_checkpoint(load_optimizer_states=False):
    DeepSpeed writes the fp32 masters through .data (no version-counter bump), so the statistic the last update
    left must not be trusted. Returns the largest relative difference between the sums the next step would use and
    a fresh read of the loaded weights."""
    init_dist()
    engine, gas, micro = _engine(world, stage, **cfg_kw)
    data = batches(5)
    train(engine, data[:3], gas, micro)
    engine.save_checkpoint(ckdir, tag="rollback")
    train(engine, data[3:], gas, micro)
    engine.load_checkpoint(ckdir, tag="rollback", load_optimizer_states=False)
    stats = engine._adamhd_optimizer.layer_stats
    lay = stats.layout
    used = stats.layer_sums()
    fresh = lay.local_sums()
    fresh = lay.reduce(fresh) if lay.reduce is not None else fresh
    return float(((used - fresh).abs() / fresh.abs().clamp_min(1e-30)).max())


def low_precision_deltas(world, stage, steps=4, **cfg_kw):
    """bf16/fp16 training: before every optimizer step, gather the fp32 master weights and compute what δ must be
    (μ ← mean|θ| at the first step, then the EMA); after the step, compare with the engine's δ. Returns the
    largest relative error, the engine's optimizer class and the per-step losses."""
    import numpy as np

    import adamhd_dist
    from adamhd_dist import deepspeed as ads

    init_dist()
    engine, gas, micro = _engine(world, stage, **cfg_kw)
    lay = engine._adamhd_optimizer.layer_stats.layout
    c, beta = OPT["delta_scale"], OPT["delta_beta"]
    mu: dict[str, float] = {}
    worst, losses, checked = 0.0, [], 0
    for batch in batches(steps):
        rows = rank_rows(batch, gas, micro)
        for k, (x, y) in enumerate(rows):
            loss = engine(x, y)
            engine.backward(loss)
            if k == gas - 1:
                masters = ads.full_state(engine, keys=("param",))
                decayed = [n for n in adamhd_dist.layer_deltas(engine)] or [
                    lay.names[i] for i in range(len(lay)) if engine._adamhd_optimizer.param_groups[lay.groups[i]][
                        "weight_decay"] > 0]
                for n in decayed:
                    s = float(np.abs(masters[n]["param"].double().numpy()).mean())
                    mu[n] = s if n not in mu else beta * mu[n] + (1 - beta) * s
            engine.step()
        losses.append(float(loss))
        got = adamhd_dist.layer_deltas(engine)
        for n, m in mu.items():
            worst = max(worst, abs(got[n] - c * m) / (c * m))
            checked += 1
    return {"worst": worst, "checked": checked, "optimizer": type(engine.optimizer).__name__, "losses": losses,
            "skipped": int(engine.skipped_steps)}


def fp16_overflow(world, stage, **cfg_kw):
    """fp16 with dynamic loss scaling: an injected inf gradient makes DeepSpeed skip the step; every piece of
    optimizer state (masters, moments, step, μ) must be as before, and the next clean step must move it."""
    from adamhd_dist import deepspeed as ads

    from deepspeed.accelerator import get_accelerator

    init_dist()
    # DeepSpeed's CPU accelerator reports no fp16 support; torch computes fp16 on the CPU, and the loss-scaling
    # and overflow-skip logic under test does not depend on the device.
    get_accelerator().is_fp16_supported = lambda: True
    engine, gas, micro = _engine(world, stage, dtype="fp16", **cfg_kw)
    opt = engine._adamhd_optimizer
    poison = {"on": False}
    engine.module.l1.weight.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    data = batches(6)

    def snapshot():
        full = ads.full_state(engine)
        steps = sorted({float(st["step"]) for st in opt.state.values() if "step" in st})
        return full, steps

    train(engine, data[:3], gas, micro)
    before, steps_before = snapshot()
    skipped_before = int(engine.skipped_steps)
    poison["on"] = True
    train(engine, data[3:4], gas, micro)
    poison["on"] = False
    after, steps_after = snapshot()
    skipped_after = int(engine.skipped_steps)
    train(engine, data[4:5], gas, micro)
    moved, steps_moved = snapshot()

    def maxdiff(a, b):
        return max(float((a[n][k] - b[n][k]).abs().max()) for n in a for k in a[n])

    return {"skipped": skipped_after - skipped_before, "diff_skipped": maxdiff(before, after),
            "steps": (steps_before, steps_after, steps_moved), "diff_next": maxdiff(after, moved)}


def suite(world, fp32=(), ckpt_dir=None, save=(), reshard=(), same_world=(), lowp=(), overflow=(), reload=(),
          universal=()):
    """Everything one launch at this world size checks (DeepSpeed engines are built one after another):

    - ``fp32``: ``(label, stage, kwargs)`` 10-step runs (see :func:`run_case`);
    - ``save``: ``(label, stage, kwargs)``: train 5 steps, save to ``ckpt_dir/label``;
    - ``same_world``: labels of ``save`` to load into a fresh engine here and train to step 10;
    - ``reshard``: ``(label, stage, kwargs)``: load ``ckpt_dir/label`` (written at another world size), train on;
    - ``lowp``: ``(label, stage, kwargs)`` for :func:`low_precision_deltas`;
    - ``overflow``: ``(label, stage, kwargs)`` for :func:`fp16_overflow`;
    - ``reload``: ``(label, stage, kwargs)`` for :func:`reload_rereads_statistic` (into ``ckpt_dir/label``);
    - ``universal``: ``(label, stage, kwargs)``: load the universal checkpoint of ``ckpt_dir/label`` (see
      :func:`resume_universal`), train on.
    """
    init_dist()
    out = {"fp32": {}, "save": {}, "resume": {}, "lowp": {}, "overflow": {}, "reload": {}, "universal": {}}
    for label, stage, kw in fp32:
        out["fp32"][label] = run_case(world, stage, **kw)
    specs = {label: (stage, kw) for label, stage, kw in save}
    for label, (stage, kw) in specs.items():
        out["save"][label] = save_partial(world, stage, os.path.join(ckpt_dir, label), **kw)
    for label in same_world:
        stage, kw = specs[label]
        out["resume"][label] = resume(world, stage, os.path.join(ckpt_dir, label), **kw)
    for label, stage, kw in reshard:
        out["resume"][label] = resume(world, stage, os.path.join(ckpt_dir, label), **kw)
    for label, stage, kw in lowp:
        out["lowp"][label] = low_precision_deltas(world, stage, **kw)
    for label, stage, kw in overflow:
        out["overflow"][label] = fp16_overflow(world, stage, **kw)
    for label, stage, kw in reload:
        out["reload"][label] = reload_rereads_statistic(world, stage, os.path.join(ckpt_dir, label), **kw)
    for label, stage, kw in universal:
        out["universal"][label] = resume_universal(world, stage, os.path.join(ckpt_dir, label), **kw)
    return out


def mpi_main():
    """Entry for ``mpirun -np N python -c 'import dist_workers_deepspeed as W; W.mpi_main()'``: DeepSpeed finds
    rank and world size through mpi4py; the result of each rank goes to ``$ADAMHD_OUT/rank<r>.pt``."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=True,
                               distributed_port=int(os.environ["ADAMHD_PORT"]))
    world = dist.get_world_size()
    res = run_case(world, 2)
    res["master_addr"] = os.environ.get("MASTER_ADDR")
    torch.save(res, os.path.join(os.environ["ADAMHD_OUT"], f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()
