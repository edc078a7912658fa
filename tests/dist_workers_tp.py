"""Per-rank code of tests/test_tp.py: AdamHD under torch tensor parallelism (CPU, gloo), compared with one process.

Every rank builds the same small Llama-style transformer (plain ``nn`` modules, as torchtitan writes them) from the
same seed, keeps an unsharded copy as the reference, and parallelizes the other one:

- ``mlp``: a two-layer MLP, ColwiseParallel -> RowwiseParallel, on a 1-D mesh of every rank;
- ``mlp_sp``: the same behind a SequenceParallel norm (its replicated weight gets a ``Partial`` gradient);
- ``block``: torchtitan's plan: vocabulary-parallel embedding (Rowwise, output sequence-sharded), sequence-parallel
  norms, colwise q/k/v and w1, rowwise wo and w2, colwise head gathering the logits;
- ``block_lp``: the same with loss parallel (the head's logits stay vocabulary-sharded into the loss);
- ``fsdp_tp``: the ``block`` plan on the "tp" dimension of a ("dp", "tp") mesh, then ``fully_shard`` over "dp"
  (FSDP2 over TP: colwise weights get ``_StridedShard`` on "dp");
- ``hsdp_tp``: the same on a ("replicate", "shard", "tp") mesh with HSDP.

Every rank of a data-parallel group trains on its slice of the global batch; TP ranks share theirs. The reference
runs AdamHD (or AdamW) on the unsharded model with the whole batch, so every sharded run must match it: params
within 1e-5·max|θ_ref| and every δ within 1e-5 relative after ``STEPS`` steps. The norm weights are decayed too (a
``decay`` pattern), so replicated parameters have a statistic on every mesh.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)

import adamhd_dist.distributed.dtensor as dtensor_mod
from adamhd_dist import AdamHD, layer_deltas, param_groups
from adamhd_dist.distributed.dtensor import DTensorLayerStats, is_sharded

STEPS = 6
HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
WD = 0.1
VOCAB, DIM, HEADS, FFN, LAYERS = 48, 32, 4, 64, 2
BATCH, SEQ = 4, 8  # BATCH divisible by every dp degree used, SEQ by every tp degree
DECAY = ("*norm.weight",)  # norms decay too: replicated parameters with a statistic


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.head_dim = DIM // HEADS
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # the heads of this TP rank
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Linear(DIM, FFN), nn.Linear(FFN, DIM)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm, self.attention = nn.LayerNorm(DIM), Attention()
        self.ffn_norm, self.feed_forward = nn.LayerNorm(DIM), FeedForward()

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


class SPMLP(nn.Module):
    """norm -> MLP on sequence-sharded activations (``mlp_sp``), or the MLP alone (``mlp``)."""

    def __init__(self, with_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(DIM) if with_norm else nn.Identity()
        self.feed_forward = FeedForward()

    def forward(self, x):
        return self.feed_forward(self.norm(x))


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SPMLP(with_norm=kind == "mlp_sp") if kind.startswith("mlp") else Transformer()
    with torch.no_grad():  # norms away from their init, so their statistic is not trivially 1
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def data(kind: str, steps: int = STEPS):
    g = torch.Generator().manual_seed(1234)
    if kind.startswith("mlp"):
        return [(torch.randn(BATCH, SEQ, DIM, generator=g), torch.randn(BATCH, SEQ, DIM, generator=g))
                for _ in range(steps)]
    return [(t[:, :-1], t[:, 1:]) for t in torch.randint(0, VOCAB, (steps, BATCH, SEQ + 1), generator=g)]


def loss_fn(kind: str, out, target):
    if kind.startswith("mlp"):
        return F.mse_loss(out, target)
    return F.cross_entropy(out.flatten(0, 1), target.flatten(0, 1))


def tp_plan(kind: str):
    """(root plan, per-block plan) for ``parallelize_module``."""
    mlp = {"feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()}
    if kind == "mlp":
        return mlp, None
    if kind == "mlp_sp":
        return {"norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Replicate())}, None
    head = (ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
            if kind == "block_lp" else ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()))
    root = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(), "output": head}
    block = {"attention_norm": SequenceParallel(),
             "attention": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
             "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
             "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
             "ffn_norm": SequenceParallel(),
             "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
             "feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1))}
    return root, block


def parallelize(model: nn.Module, kind: str, tp_mesh, dp_mesh=None) -> nn.Module:
    root, block = tp_plan(kind)
    parallelize_module(model, tp_mesh, root)
    if block is not None:
        for layer in model.layers:
            parallelize_module(layer, tp_mesh, block)
    if dp_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    return model


def full(p) -> torch.Tensor:
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


PATHS = {"adamhd": {}, "adamhd_foreach": {"foreach": True}, "adamhd_loop": {"foreach": False, "fused": False}}
"""AdamHD's update paths: the default (the fused kernel on the CPU), the multi-tensor one and the per-tensor loop."""


def _optimizer(model, which: str):
    groups = param_groups(model, WD, decay=DECAY if any("norm" in n for n, _ in model.named_parameters()) else ())
    if which in PATHS:
        return AdamHD(groups, **HP, **PATHS[which])
    return torch.optim.AdamW(groups, **HP, weight_decay=WD)


def _dp_slice(x, dp_mesh):
    if dp_mesh is None:
        return x
    sizes = dp_mesh.shape
    coord = dp_mesh.get_coordinate()
    rank = 0
    for c, size in zip(coord, sizes):
        rank = rank * size + c
    return x.chunk(dp_mesh.size())[rank]


class PerShard(DTensorLayerStats):
    """A deliberately wrong strategy, the negative control: each rank's shard taken as the layer (local sums,
    local numel, no reduction)."""

    def reduce(self, sums, params):
        return sums

    def layer_numel(self, p):
        return p.to_local().numel()


@contextlib.contextmanager
def count_statistic_collectives():
    """Count the collectives the layer statistic issues (every one goes through ``all_reduce_sums``)."""
    calls = []
    orig = dtensor_mod.all_reduce_sums

    def spy(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    dtensor_mod.all_reduce_sums = spy
    try:
        yield calls
    finally:
        dtensor_mod.all_reduce_sums = orig


def run(kind: str, which: str, tp_mesh, dp_mesh=None, *, naive=False):
    """``kind`` sharded and unsharded, trained side by side on the same global batch by ``which``."""
    ref_model = build(kind)
    model = parallelize(copy.deepcopy(ref_model), kind, tp_mesh, dp_mesh)
    opt, ref_opt = _optimizer(model, which), _optimizer(ref_model, which)
    if naive:
        opt.set_layer_stats(PerShard())
    deltas, ref_deltas, comms, stat_calls, partial = [], [], [], [], []
    for x, y in data(kind):
        loss_fn(kind, ref_model(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        xs, ys = _dp_slice(x, dp_mesh), _dp_slice(y, dp_mesh)
        if kind == "mlp_sp":  # a sequence-parallel norm takes this TP rank's part of the sequence
            xs = xs.chunk(tp_mesh.size(), dim=1)[tp_mesh.get_local_rank()]
        with loss_parallel() if kind == "block_lp" else contextlib.nullcontext():
            loss_fn(kind, model(xs), ys).backward()
        partial.append(sum(isinstance(q.grad, DTensor) and any(pl.is_partial() for pl in q.grad.placements)
                           for q in model.parameters()))
        with CommDebugMode() as comm, count_statistic_collectives() as calls:
            opt.step()
        comms.append(comm.get_total_counts())
        stat_calls.append(len(calls))
        opt.zero_grad(set_to_none=True)
        if which in PATHS:
            deltas.append(layer_deltas(opt))
            ref_deltas.append(layer_deltas(ref_opt))
    ref = dict(ref_model.named_parameters())
    scale = max(p.abs().max().item() for p in ref.values())
    param_err = max((full(p) - ref[n].detach()).abs().max().item() for n, p in model.named_parameters()) / scale
    out = dict(param_err=param_err, comms=comms, stat_calls=stat_calls, partial_grads=partial)
    if which in PATHS:
        assert set(deltas[-1]) == set(ref_deltas[-1]), (sorted(deltas[-1]), sorted(ref_deltas[-1]))
        out["delta_err"] = max(abs(d[n] - r[n]) / abs(r[n]) for d, r in zip(deltas, ref_deltas) for n in r)
        out["n_deltas"] = len(ref_deltas[-1])
        out["deltas"], out["ref_deltas"] = deltas[-1], ref_deltas[-1]
    # every TP copy of a replicated parameter must be the same tensor on every rank
    replicas = {n: p.to_local() for n, p in model.named_parameters()
                if isinstance(p, DTensor) and not any(is_sharded(pl) for pl in p.placements)}
    out["replica_spread"] = _replica_spread(replicas)
    return out


def _replica_spread(tensors: dict) -> float:
    """max over tensors of max|t_rank − t_rank0| across all ranks (0: the replicas agree)."""
    worst = 0.0
    for t in tensors.values():
        t0 = t.detach().clone()
        dist.broadcast(t0, src=0)
        worst = max(worst, (t.detach() - t0).abs().max().item())
    spread = torch.tensor([worst])
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return spread.item()


def _attempt(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # the outcome is the result: the test asserts which configurations must run
        return dict(error=f"{type(e).__name__}: {e}"[:2000])


def suite4() -> dict:
    """World 4: 1-D TP over all ranks (mlp, mlp_sp, block), and FSDP2 over TP on a (dp 2, tp 2) mesh."""
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    tp1 = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    out = {}
    for kind in ("mlp", "mlp_sp", "block", "block_lp"):
        for which in ("adamhd", "adamw"):
            out[(kind, which)] = _attempt(run, kind, which, tp1)
    for which in ("adamhd_foreach", "adamhd_loop"):
        out[("block", which)] = _attempt(run, "block", which, tp1)
    for which in ("adamhd", "adamw"):
        out[("fsdp_tp", which)] = _attempt(run, "block", which, mesh2["tp"], mesh2["dp"])
    out[("fsdp_tp", "per_shard")] = _attempt(run, "block", "adamhd", mesh2["tp"], mesh2["dp"], naive=True)
    out[("partial_param", "adamhd")] = _attempt(partial_parameter, tp1)
    return _public(out)


def partial_parameter(mesh) -> dict:
    """A parameter with a ``Partial`` placement has no layer to take the statistic of: refused when the optimizer
    is built, before any parameter moves."""
    p = nn.Parameter(DTensor.from_local(torch.ones(3, 4), mesh, [Partial()]))
    before = p.to_local().clone()
    try:
        AdamHD([{"params": [p], "weight_decay": WD}], **HP)
    except ValueError as e:
        return dict(refused=str(e), unchanged=bool(torch.equal(p.to_local(), before)))
    return dict(refused=None)


def suite8() -> dict:
    """World 8: HSDP over TP on a ("replicate", "shard", "tp") = (2, 2, 2) mesh."""
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("replicate", "shard", "tp"))
    out = {}
    for which in ("adamhd", "adamw"):
        out[("hsdp_tp", which)] = _attempt(run, "block", which, mesh["tp"], mesh["replicate", "shard"])
    return _public(out)


def _public(out: dict) -> dict:
    """Rank 0 returns everything; other ranks only what the test compares across ranks."""
    if dist.get_rank() == 0:
        return out
    return {k: {n: v[n] for n in ("deltas",) if n in v} for k, v in out.items()}
