"""Per-rank code of tests/test_fsdp.py: AdamHD under FSDP2 (CPU, gloo), compared with one process.

Every rank builds the same tiny GPT-2 (odd shapes, tied embeddings, an MLP of width 2 so that some shards are
empty at 3 ranks) from the same seed. The sharded run feeds each data-parallel rank its slice of the global batch;
the reference runs plain AdamHD on the unsharded fp32 model with the whole batch (the losses are means over equal
slices, so the averaged gradient is the whole batch's). Each launch runs many configurations and returns numbers
(errors, collective counts, δ per step) and a few full tensors; tests/test_fsdp.py asserts on them.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from adamhd_dist import AdamHD, layer_deltas, param_groups
from adamhd_dist.distributed.dtensor import DTensorLayerStats
from adamhd_dist.fsdp import apply_fsdp


class PerShard(DTensorLayerStats):
    """A deliberately wrong strategy: each rank's shard taken as the layer (local sums, local numel, no reduction)."""

    def reduce(self, sums, params):
        return sums

    def layer_numel(self, p):
        return p.to_local().numel()

STEPS = 10
GLOBAL_BATCH = 12  # divisible by 2, 3 and 4 ranks
SEQ = 16
HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
WD = 0.1


def _config():
    from transformers import GPT2Config

    # dim-0 sizes 97 (tied wte), 17, 25, 75 and 2 split unevenly by FSDP2's row chunks (25: 13/12 on 2 ranks,
    # 9/9/7 on 3); n_inner=2 leaves rank 2 of 3 an empty shard of the MLP's (2, 25) weight and (2,) bias.
    return GPT2Config(vocab_size=97, n_positions=17, n_embd=25, n_layer=2, n_head=5, n_inner=2,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                      tie_word_embeddings=True)


def build_model(seed: int = 0):
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(_config())
    assert model.lm_head.weight is model.transformer.wte.weight  # tied embeddings
    return model


def batches(steps: int = STEPS):
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, _config().vocab_size, (steps, GLOBAL_BATCH, SEQ), generator=g)


def _init(backend: str = "gloo"):
    if not dist.is_initialized():
        dist.init_process_group(backend)
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------------------
# reference: one process, unsharded fp32 model, the whole batch
def train_reference(steps=STEPS, *, clip=None, frozen=(), group_options=None, emulate_bf16_slices=0):
    """Plain AdamHD on the unsharded model. ``emulate_bf16_slices=W``: gradients as FSDP2's bf16
    MixedPrecisionPolicy makes them on W data-parallel ranks (forward/backward of a bf16 copy of the fp32
    master weights on each slice, gradients cast to fp32 and averaged)."""
    model = build_model()
    _freeze(model, frozen)
    opt = AdamHD(param_groups(model, WD), **HP, **(group_options or {}))
    data = batches(steps)
    out = {"deltas": [], "params": None}
    for t in range(steps):
        x = data[t]
        if emulate_bf16_slices:
            low = copy.deepcopy(model).to(torch.bfloat16)
            lows = dict(low.named_parameters())
            grads = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
            for x_r in x.chunk(emulate_bf16_slices):
                low.zero_grad(set_to_none=True)
                low(input_ids=x_r, labels=x_r).loss.backward()
                for n in grads:
                    grads[n] += lows[n].grad.float()
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.grad = grads[n] / emulate_bf16_slices
        else:
            model(input_ids=x, labels=x).loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["deltas"].append(layer_deltas(opt))
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["model"], out["opt"] = model, opt
    return out


# ------------------------------------------------------------------------------------------------------------
# sharded runs
def dp_slice(x, mesh):
    """This rank's slice of a global batch: every rank of the mesh is data parallel (FSDP and HSDP)."""
    return x.chunk(mesh.size())[dist.get_rank(mesh.get_group(0)) if mesh.ndim == 1 else _flat_rank(mesh)]


def _flat_rank(mesh):
    coord = mesh.get_coordinate()
    rank = 0
    for c, size in zip(coord, mesh.shape):
        rank = rank * size + c
    return rank


def build_sharded(mesh, *, mp_policy=None, offload_policy=None, frozen=(), group_options=None):
    model = build_model()
    _freeze(model, frozen)
    apply_fsdp(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    opt = AdamHD(param_groups(model, WD), **HP, **(group_options or {}))
    return model, opt


def train_sharded(model, opt, mesh, steps, *, start=0, clip=None, compile_model=False, shadow=None):
    """Steps ``start .. start+steps-1`` of the global batches; the collectives of each ``opt.step()`` counted.

    ``shadow``: an unsharded (model, AdamHD) pair stepped with the sharded run's own gathered gradients, so that
    it differs from the sharded optimizer only by how the optimizer itself reduces."""
    data = batches(start + steps)
    fwd = torch.compile(model, backend="aot_eager") if compile_model else model
    out = {"deltas": [], "comm": [], "allreduce": [], "groups": [], "shadow_deltas": []}
    for t in range(start, start + steps):
        x = dp_slice(data[t], mesh)
        fwd(input_ids=x, labels=x).loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if shadow is not None:
            grads = {n: p.grad.full_tensor().float() for n, p in model.named_parameters() if p.grad is not None}
            for n, p in shadow[0].named_parameters():
                p.grad = grads.get(n)
        with CommDebugMode() as comm, record_all_reduce_groups() as groups:
            opt.step()
        counts = comm.get_comm_counts()
        out["comm"].append(comm.get_total_counts())
        out["groups"].append(groups)
        out["allreduce"].append(sum(v for k, v in counts.items() if "allreduce" in str(k)))
        opt.zero_grad(set_to_none=True)
        out["deltas"].append(layer_deltas(opt))
        if shadow is not None:
            shadow[1].step()
            shadow[1].zero_grad(set_to_none=True)
            out["shadow_deltas"].append(layer_deltas(shadow[1]))
    return out


def full_params(model):
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone()
            for n, p in model.named_parameters()}


def full_optim_state(model, opt):
    """{name: {step, exp_avg, exp_avg_sq, delta_ema}} with full (gathered) tensors."""
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            out[names[p]] = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
                             for k, v in st.items()}
    return out


def _key_bias_mask(name, r):
    """False on the key third of an attention ``c_attn.bias``: its gradient is zero in exact arithmetic (softmax is
    invariant to adding q·b_k to every score of a row), so what it gets is fp32 rounding noise of the forward and
    backward, which Adam normalises into full-size steps that differ with any change of summation order."""
    mask = torch.ones_like(r, dtype=torch.bool)
    if name.endswith("attn.c_attn.bias"):
        d = r.numel() // 3
        mask[d:2 * d] = False
    return mask


def params_error(params, ref_params, mask_key_bias=False):
    """The exactness measure: max|θ − θ_ref| / max|θ_ref|, both maxima over the whole model."""
    masks = {n: _key_bias_mask(n, r) if mask_key_bias else torch.ones_like(r, dtype=torch.bool)
             for n, r in ref_params.items()}
    diff = max((params[n] - r)[masks[n]].abs().max().item() for n, r in ref_params.items())
    return diff / max(r.abs().max().item() for r in ref_params.values())


def layer_error(params, ref_params):
    """The same bound layer by layer: max over layers of max|θ − θ_ref| / max|θ_ref| (of that layer)."""
    return max((params[n] - r).abs().max().item() / max(r.abs().max().item(), 1e-30) for n, r in ref_params.items())


def deltas_error(deltas, ref_deltas):
    """max relative difference of δ over layers and steps; both sides must list the same layers."""
    err = 0.0
    for ds, dr in zip(deltas, ref_deltas, strict=True):
        assert set(ds) == set(dr), (sorted(ds), sorted(dr))
        for n in dr:
            err = max(err, abs(ds[n] - dr[n]) / abs(dr[n]))
    return err


def _freeze(model, frozen):
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)


def run_config(mesh, ref, *, steps=STEPS, mp_policy=None, offload_policy=None, clip=None, frozen=(),
               group_options=None, compile_model=False, naive=False):
    """One FSDP2 configuration for ``steps`` steps, compared with (a) ``ref``, the whole-batch single-process run
    (params within 1e-5·max|θ_ref|, every δ within 1e-5 relative; the key biases masked, see :func:`_key_bias_mask`) and (b) a single-process
    AdamHD fed the sharded run's own gradients (every layer, nothing masked: the optimizer alone)."""
    model, opt = build_sharded(mesh, mp_policy=mp_policy, offload_policy=offload_policy, frozen=frozen,
                               group_options=group_options)
    shadow_model = build_model()
    _freeze(shadow_model, frozen)
    shadow = (shadow_model, AdamHD(param_groups(shadow_model, WD), **HP, **(group_options or {})))
    if naive:
        # What a per-shard statistic would give: local sums, local numel, no reduction.
        opt.set_layer_stats(PerShard())
    run = train_sharded(model, opt, mesh, steps, clip=clip, compile_model=compile_model, shadow=shadow)
    params = full_params(model)
    shadow_params = {n: p.detach().clone() for n, p in shadow_model.named_parameters()}
    local_state = {k: v for st in opt.state.values() for k, v in st.items()}
    return dict(param_err=params_error(params, ref["params"], mask_key_bias=True),
                delta_err=deltas_error(run["deltas"], ref["deltas"]),
                same_grad_layer_err=layer_error(params, shadow_params),
                same_grad_delta_err=deltas_error(run["deltas"], run["shadow_deltas"]),
                comm=run["comm"], allreduce=run["allreduce"], groups=run["groups"], deltas=run["deltas"][-1],
                n_decay_layers=len(run["deltas"][-1]),
                param_dtypes=sorted({str(p.dtype) for p in model.parameters()}),
                state_dtypes=sorted({str(v.dtype) for v in local_state.values() if v.dim() > 0}),
                mu_dtypes=sorted({str(st["delta_ema"].dtype) for st in opt.state.values() if "delta_ema" in st}),
                param_devices=sorted({str(p.device) for p in model.parameters()}),
                model=model, opt=opt, params=params)


def _public(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in ("model", "opt", "params")}


# ------------------------------------------------------------------------------------------------------------
# checkpoints
def dcp_save(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)


def dcp_load(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a)


def _params_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ------------------------------------------------------------------------------------------------------------
# launches
def world2(ckpt_dir: str):
    """World size 2: every FSDP2 configuration, the naive per-shard statistic, a DCP save/resume, FSDP1."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    _init()
    mesh = init_device_mesh("cpu", (2,))
    res = {}
    ref = train_reference()

    fp32 = run_config(mesh, ref)
    res["fp32"] = _public(fp32)
    res["fp32"]["dtensor_stat"] = dtensor_reduction_oracle(fp32["model"], fp32["opt"])
    res["offload"] = _public(run_config(mesh, ref, offload_policy=CPUOffloadPolicy(pin_memory=False)))
    from torch._dynamo.utils import counters

    res["compiled"] = _public(run_config(mesh, ref, compile_model=True))
    res["compiled"]["graphs"] = counters["stats"]["unique_graphs"]
    res["naive"] = _public(run_config(mesh, ref, naive=True))

    frozen = ("transformer.wpe.weight",)
    opts = dict(delta_mode="mean_abs", decay="clip")
    ref_clip = train_reference(clip=0.05, frozen=frozen, group_options=opts)
    res["clip_frozen"] = _public(run_config(mesh, ref_clip, clip=0.05, frozen=frozen, group_options=opts))
    res["clip_frozen"]["ref_grad_clipped"] = _clip_was_active(0.05)

    ref_bf16 = train_reference(emulate_bf16_slices=2)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    bf16 = run_config(mesh, ref_bf16, mp_policy=mp)
    res["bf16"] = _public(bf16)
    res["bf16"]["vs_fp32_ref"] = params_error(bf16["params"], ref["params"], mask_key_bias=True)
    res["bf16"]["mu_exact"] = mu_matches_master(bf16["model"], bf16["opt"])

    res["resume"] = save_and_resume(mesh, ckpt_dir, fp32)
    res["mixed_meshes_error"] = mixed_meshes_error()
    res["fsdp1_error"] = fsdp1_error()
    return res


def world3(ckpt_dir: str):
    """World size 3 (empty shards): a full run against the reference, and the world-2 checkpoint resumed."""
    _init()
    mesh = init_device_mesh("cpu", (3,))
    ref = train_reference()
    fp32 = run_config(mesh, ref)
    res = {"fp32": _public(fp32)}
    res["empty_shards"] = sorted(n for n, p in fp32["model"].named_parameters() if p.to_local().numel() == 0)

    model, opt = build_sharded(mesh)
    dcp_load(model, opt, os.path.join(ckpt_dir, "step5"))
    res["loaded_state"] = full_optim_state(model, opt)
    res["loaded_params"] = full_params(model)
    res["loaded_deltas"] = layer_deltas(opt)
    run = train_sharded(model, opt, mesh, STEPS - 5, start=5)
    res["resumed"] = dict(param_err=params_error(full_params(model), ref["params"], mask_key_bias=True),
                          delta_err=deltas_error(run["deltas"], ref["deltas"][5:]),
                          comm=run["comm"], allreduce=run["allreduce"])
    return res


def world4_hsdp():
    """4 ranks: HSDP on a 2x2 (replicate, shard) mesh; and a 2-D sharded DTensor layout (FSDP + TP style)."""
    _init()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    ref = train_reference()
    hsdp = run_config(mesh, ref)
    res = {"hsdp": _public(hsdp), "shard_ranks": dist.get_process_group_ranks(mesh.get_group("shard")),
           "replicate_ranks": dist.get_process_group_ranks(mesh.get_group("replicate")),
           "placements": sorted({str(p.placements) for p in hsdp["model"].parameters()})}
    res["tp_like"] = two_dim_sharded(mesh)
    return res


# ------------------------------------------------------------------------------------------------------------
# individual checks
def dtensor_reduction_oracle(model, opt):
    """mean|θ| of every decayed layer computed the slow way, by DTensor's own reduction (one collective PER
    layer), against the optimizer's hooks on the same θ: (max relative difference, collectives, layers)."""
    mu = {}
    names = {p: n for n, p in model.named_parameters()}
    with CommDebugMode() as comm:
        for group in opt.param_groups:
            if group["weight_decay"] == 0:
                continue
            for p in group["params"]:
                mu[names[p]] = p.detach().abs().float().mean().full_tensor().item()
    reduced = opt.layer_stats.layer_sums([p for g in opt.param_groups if g["weight_decay"] != 0
                                          for p in g["params"]])
    ours = {}
    i = 0
    for group in opt.param_groups:
        if group["weight_decay"] == 0:
            continue
        for p in group["params"]:
            ours[names[p]] = reduced[i].item() / opt.layer_stats.layer_numel(p)
            i += 1
    err = max(abs(ours[n] - mu[n]) / mu[n] for n in mu)
    return dict(err=err, collectives=comm.get_total_counts(), layers=len(mu))


def _clip_was_active(max_norm):
    model = build_model()
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    return float(norm) > max_norm


def mu_matches_master(model, opt):
    """Under bf16 mixed precision the statistic is taken over the fp32 master shards: after one more step,
    μ_new = β·μ_old + (1−β)·mean|θ_master| recomputed from the gathered fp32 parameters (max rel. error)."""
    decay = [p for g in opt.param_groups if g["weight_decay"] != 0 for p in g["params"]]
    beta = opt.param_groups[0]["delta_beta"]
    before = {p: opt.state[p]["delta_ema"].double().item() for p in decay}
    s = {p: p.full_tensor().double().abs().mean().item() for p in decay}
    x = dp_slice(batches(1)[0], model_mesh(model))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    err = 0.0
    for p in decay:
        want = beta * before[p] + (1 - beta) * s[p]
        err = max(err, abs(opt.state[p]["delta_ema"].double().item() - want) / want)
    return err


def model_mesh(model):
    return next(model.parameters()).device_mesh


def save_and_resume(mesh, ckpt_dir, uninterrupted):
    """5 steps, DCP save, and a fresh model/optimizer that loads it and runs steps 6-10: bitwise equal to the
    uninterrupted run (same world size, CPU). Also DCP's full (gathered) optimizer state dict, as used to export
    or inspect a run, against the gathered state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model, opt = build_sharded(mesh)
    train_sharded(model, opt, mesh, 5)
    path = os.path.join(ckpt_dir, "step5")
    dcp_save(model, opt, path)
    saved_state = full_optim_state(model, opt)
    saved_params = full_params(model)
    saved_deltas = layer_deltas(opt)
    full_sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))["state"]
    full_sd = {n: {k: torch.as_tensor(v).cpu() for k, v in st.items()} for n, st in full_sd.items()}
    del model, opt

    model, opt = build_sharded(mesh)
    dcp_load(model, opt, path)
    loaded_equal = _states_equal(full_optim_state(model, opt), saved_state)
    loaded_deltas = layer_deltas(opt)
    train_sharded(model, opt, mesh, STEPS - 5, start=5)
    return dict(
        saved_state=saved_state, saved_params=saved_params, saved_deltas=saved_deltas,
        full_state_dict_equal=_states_equal(full_sd, saved_state),
        loaded_equal=loaded_equal, loaded_deltas_equal=loaded_deltas == saved_deltas,
        params_bitwise=_params_equal(full_params(model), uninterrupted["params"]),
        state_bitwise=_states_equal(full_optim_state(model, opt),
                                    full_optim_state(uninterrupted["model"], uninterrupted["opt"])),
        mu_keys=sorted(n for n, st in saved_state.items() if "delta_ema" in st))


def mixed_meshes_error():
    """Parameters on two different meshes in one optimizer: a ValueError naming ``params``."""
    a = init_device_mesh("cpu", (2,))
    b = init_device_mesh("cpu", (1, 2), mesh_dim_names=("x", "y"))
    p1 = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), a, [Shard(0)]))
    p2 = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), b, [Replicate(), Shard(0)]))
    try:
        AdamHD([p1, p2])
    except ValueError as e:
        return str(e)
    return None


def fsdp1_error():
    """FSDP1, with and without use_orig_params: AdamHD refuses with a ValueError that points to FSDP2."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out = {}
    for orig in (True, False):
        torch.manual_seed(0)
        model = FSDP(torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)), use_orig_params=orig,
                     device_id=torch.device("cpu"))
        try:
            AdamHD(model.parameters())
            out[orig] = None
        except ValueError as e:
            out[orig] = str(e)
    return out


@contextmanager
def record_all_reduce_groups():
    """Record the ranks of the group of every ``dist.all_reduce`` issued inside the block."""
    seen = []
    orig = dist.all_reduce

    def spy(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        seen.append(dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size())))
        return orig(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = spy
    try:
        yield seen
    finally:
        dist.all_reduce = orig


def two_dim_sharded(mesh):
    """DTensor parameters sharded on BOTH dims of a 2x2 mesh (FSDP + TP style), one replicated along the second
    dim, and a plain (per-rank, local) tensor in the same optimizer: one collective over all 4 ranks, δ equal to
    the unsharded reference, the plain tensor's δ its own local one."""
    g = torch.Generator().manual_seed(7)
    shapes = [(9, 7), (5,), (3, 11)]
    full = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    placements = [[Shard(0), Shard(1)], [Shard(0), Replicate()], [Replicate(), Shard(0)]]
    params = [torch.nn.Parameter(distribute_tensor(f, mesh, pl)) for f, pl in zip(full, placements)]
    rank = dist.get_rank()
    plain = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(100 + rank)))
    plain_grads = [torch.randn(4, 4, generator=torch.Generator().manual_seed(200 + 10 * rank + t)) for t in range(3)]
    opt = AdamHD([{"params": params + [plain], "weight_decay": WD}], **HP)
    ref_params = [torch.nn.Parameter(f.clone()) for f in full]
    ref_plain = torch.nn.Parameter(plain.detach().clone())
    ref = AdamHD([{"params": ref_params + [ref_plain], "weight_decay": WD}], **HP)
    comm_counts, group_ranks = [], []
    for t in range(3):
        for p, rp, gr in zip(params, ref_params, grads[t]):
            p.grad = distribute_tensor(gr, mesh, p.placements)
            rp.grad = gr.clone()
        plain.grad = plain_grads[t].clone()
        ref_plain.grad = plain_grads[t].clone()
        with record_all_reduce_groups() as seen, CommDebugMode() as comm:
            opt.step()
        ref.step()
        comm_counts.append(comm.get_total_counts())
        group_ranks += seen
    d, dr = opt.last_deltas(), ref.last_deltas()
    delta_err = max(abs(d[p] - dr[rp]) / dr[rp] for p, rp in zip(params + [plain], ref_params + [ref_plain]))
    param_err = max((p.full_tensor() - rp).abs().max().item() / rp.abs().max().item()
                    for p, rp in zip(params, ref_params))
    plain_err = (plain - ref_plain).abs().max().item()
    return dict(delta_err=delta_err, param_err=param_err, plain_err=plain_err, comm=comm_counts,
                group_ranks=group_ranks, plan_dims=opt.layer_stats.plan().dims)


def complex_dtensor_delta() -> dict:
    """A complex layer sharded Shard(0) over the ranks: δ (mean_abs) of the DTensor layer and of the whole tensor
    stepped by a plain AdamHD, each rank holding its rows of the same seeded tensor (no scatter of complex data)."""
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    full = torch.randn(4 * world, 3, dtype=torch.complex64)
    grad = torch.randn_like(full)
    rows = slice(4 * rank, 4 * (rank + 1))
    sharded = torch.nn.Parameter(DTensor.from_local(full[rows].clone(), mesh, [Shard(0)], run_check=False))
    sharded.grad = DTensor.from_local(grad[rows].clone(), mesh, [Shard(0)], run_check=False)
    whole = torch.nn.Parameter(full.clone())
    whole.grad = grad.clone()
    kw = dict(weight_decay=0.1, delta_mode="mean_abs", foreach=True)
    opts = [AdamHD([sharded], **kw), AdamHD([whole], **kw)]
    for opt in opts:
        opt.step()
    return dict(sharded=opts[0].last_deltas()[sharded], whole=opts[1].last_deltas()[whole],
                expected=1.5 * torch.view_as_real(full).abs().double().mean().item(),
                rows=sharded.to_local().detach().clone(), whole_rows=whole.detach()[rows].clone())
