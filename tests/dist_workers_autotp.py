"""Per-rank code of the DeepSpeed AutoTP tests (run through tests/dist_utils.run_ranks; CPU ranks, gloo).

A tiny LLaMA built from its config (no download) trains a few steps under ``"tensor_parallel": {"autotp_size":
2}`` with ZeRO-1/2: AutoTP splits q/k/v/gate/up column-wise and o/down row-wise, and keeps the embeddings, the
norms and the head whole on every tensor-parallel rank. Each rank returns its (local) parameters and every layer's
δ; the pytest side puts the slices back together and compares them with one process on the whole model over the
same global batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

VOCAB, SEQ, GLOBAL_ROWS = 41, 6, 8
OPT = {"lr": 2e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "delta_scale": 1.0, "delta_beta": 0.9}


def make_model(seed=1234):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).float()


def batches(steps, seed=99):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (GLOBAL_ROWS, SEQ), generator=g) for _ in range(steps)]


def ds_config(world, tp, stage, **extra):
    dp = world // tp
    # no train_batch_size: DeepSpeed's check counts every rank, tensor-parallel ones too, as data-parallel
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_ROWS // dp,
           "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "optimizer": {"type": "AdamHD", "params": dict(OPT)},
           "zero_optimization": {"stage": stage}, "tensor_parallel": {"autotp_size": tp},
           "steps_per_print": 10**9, "wall_clock_breakdown": False}
    cfg.update(extra)
    return cfg


def _loss(model, x):
    return model(input_ids=x, labels=x).loss


def dp_rows(x):
    from deepspeed.utils import groups

    try:
        r, w = groups.get_data_parallel_rank(), groups.get_data_parallel_world_size()
    except AssertionError:  # no AutoTP: DeepSpeed set up no groups, every rank is data-parallel
        r, w = dist.get_rank(), dist.get_world_size()
    micro = GLOBAL_ROWS // w
    return x[r * micro:(r + 1) * micro]


def init_dist():
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def _engine(world, tp, stage, door, **extra):
    import deepspeed

    import adamhd_dist
    from adamhd_dist import deepspeed as ads

    cfg = ds_config(world, tp, stage, **extra)
    model = make_model()
    if door == "initialize":
        return ads.initialize(model=model, config=cfg)[0]
    kw = dict(cfg["optimizer"]["params"], betas=tuple(cfg["optimizer"]["params"]["betas"]))
    opt = adamhd_dist.AdamHD(adamhd_dist.param_groups(model, kw.pop("weight_decay")), **kw)
    cfg = {k: v for k, v in cfg.items() if k != "optimizer"}
    cfg["zero_allow_untested_optimizer"] = True
    engine = deepspeed.initialize(model=model, optimizer=opt, config=cfg)[0]
    if door == "attach":
        ads.attach(engine)
    else:  # "wrapper": DeepSpeed's optimizer wrapper and the module, as Accelerate's prepared optimizer gives it
        ads.attach(engine.optimizer, module=engine.module)
    return engine


def _local(engine):
    from adamhd_dist.integrations.deepspeed import _compat

    return {n: (p.detach().clone().float(), _compat.is_tp_sliced(p)) for n, p in engine.module.named_parameters()}


def run_case(world, tp, stage, door="initialize", steps=4, naive=False, ckdir=None):
    """Train ``steps`` steps; with ``ckdir``: save after 2, train on, then load and train the last steps again (the
    resumed run must land where the uninterrupted one did)."""
    import adamhd_dist

    engine = _engine(world, tp, stage, door)
    opt = engine._adamhd_optimizer if door != "wrapper" else adamhd_dist.optim.deltas.find_adamhd(engine)
    lay = opt.layer_stats.layout
    reduce, counts = lay.reduce, {"reduce": 0}
    if naive:  # the data-parallel-only sum: what the layout computed before AutoTP was known
        from adamhd_dist.distributed.collectives import all_reduce_sums

        group = engine.optimizer.dp_process_group
        reduce = (lambda s: all_reduce_sums(s, group, "cpu")) if dist.get_world_size(group=group) > 1 else \
            (lambda s: s)

    def counted(t):
        counts["reduce"] += 1
        return reduce(t)

    lay.reduce = counted
    data = batches(steps)
    for i, x in enumerate(data):
        if ckdir is not None and i == 2:
            engine.save_checkpoint(ckdir, tag="mid")
        loss = _loss(engine, dp_rows(x))
        engine.backward(loss)
        engine.step()
    out = {"params": _local(engine), "deltas": adamhd_dist.layer_deltas(opt), "counts": counts,
           "tp_rank": _tp_rank()}
    if ckdir is not None:
        engine.load_checkpoint(ckdir, tag="mid")
        for x in data[2:]:
            engine.backward(_loss(engine, dp_rows(x)))
            engine.step()
        out["resumed"] = {"params": _local(engine), "deltas": adamhd_dist.layer_deltas(opt)}
    return out


def _tp_rank():
    from deepspeed.utils import groups

    try:
        return dist.get_rank(group=groups.get_tensor_model_parallel_group())
    except AssertionError:  # no AutoTP: DeepSpeed set up no tensor-parallel group
        return 0


def refusal(world, tp, stage, door):
    try:
        _engine(world, tp, stage, door)
    except ValueError as e:
        return str(e)
    return None


def reference(steps=4):
    """One process, the whole model, the same global batches."""
    import adamhd_dist

    model = make_model()
    kw = dict(OPT, betas=tuple(OPT["betas"]))
    opt = adamhd_dist.AdamHD(adamhd_dist.param_groups(model, kw.pop("weight_decay")), **kw, foreach=False,
                             fused=False)
    for x in batches(steps):
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "deltas": adamhd_dist.layer_deltas(opt)}


def universal_resume(world, tp, stage, ckdir, start=2, steps=4):
    """A fresh AutoTP engine loads the universal checkpoint in ``ckdir`` (``"load_universal": true``) and trains
    the remaining steps."""
    import adamhd_dist

    engine = _engine(world, tp, stage, "initialize", checkpoint={"load_universal": True})
    engine.load_checkpoint(ckdir)
    for x in batches(steps)[start:]:
        engine.backward(_loss(engine, dp_rows(x)))
        engine.step()
    return {"params": _local(engine), "deltas": adamhd_dist.layer_deltas(engine), "tp_rank": _tp_rank()}


def suite(world, tp, cases=(), refusals=(), ckpt_dir=None, universal=()):
    """``universal``: ZeRO stages at which a universal checkpoint of a tp-1 run (all ranks data-parallel, ZeRO-2,
    saved at step 2, before any AutoTP engine exists: DeepSpeed's groups live for the process) is loaded under
    AutoTP; the tp-1 checkpoint's plain load there must refuse."""
    import os
    import traceback

    init_dist()
    out = {}
    plain = os.path.join(ckpt_dir or "", "ck_tp1")
    if universal:
        out["tp1"] = run_case(world, 1, 2, ckdir=plain)
        if dist.get_rank() == 0:
            from adamhd_dist import deepspeed as ads

            ads.to_universal(os.path.join(plain, "mid"), os.path.join(plain, "mid_universal"), workers=2)
        dist.barrier()
    for c in cases:
        kw = dict(c)
        if kw.pop("ckpt", False):
            kw["ckdir"] = os.path.join(ckpt_dir, "ck_%s" % "_".join(f"{k}{v}" for k, v in sorted(c.items())))
        try:
            out[tuple(sorted(c.items()))] = run_case(world, tp, **kw)
        except Exception:  # reported per case; the others still run
            out[tuple(sorted(c.items()))] = {"error": traceback.format_exc()}
    for stage, door in refusals:
        out[("refuse", stage, door)] = refusal(world, tp, stage, door)
    for stage in universal:
        try:
            out[("universal", stage)] = universal_resume(world, tp, stage, plain)
        except Exception:  # reported per case; the others still run
            out[("universal", stage)] = {"error": traceback.format_exc()}
    if universal:
        try:
            _engine(world, tp, 2, "initialize").load_checkpoint(plain, tag="mid")
            out["plain_reshard"] = None
        except ValueError as e:
            out["plain_reshard"] = str(e)
    if dist.get_rank() == 0:
        out["reference"] = reference()
    return out
