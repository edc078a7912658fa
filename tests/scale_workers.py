"""The scale test's per-process code (tests/test_scale.py): one process plays rank r of W, for many (W, r) in turn.

torch's fake process group (backend ``"fake"``, ``FakeStore``) makes this process rank r of a world of W without the
other W - 1 processes: collectives return at once and carry no data. So every layout here is computed by the
engines' OWN code running as that rank (DeepSpeed's ZeRO optimizers, torch's ``fully_shard`` and DTensor), and
compared with what adamhd_dist builds from it (``adamhd_dist.deepspeed.initialize`` / ``attach``,
``_layout_stage12`` / ``_layout_stage3``, ``DTensorLayerStats``). Sums over ranks that a real all-reduce would do are
done here, over the per-rank partial sums the library computes.

Where the engines put each element (the references the library's layouts are compared with):

- ZeRO-1/2: DeepSpeed's own views. Every parameter is a view of its group's flat buffer (its storage offset is its
  place there) and ``get_data_parallel_partitions`` cut that buffer into W partition views, so one construction
  shows every rank's partition; for the adversarial model, the values in those buffers too (each element encodes
  its layer and index). At a constructed rank, DeepSpeed's per-parameter map (``_hp_mapping``) as well, where it
  is computed from those offsets.
- ZeRO-3: DeepSpeed's ``grad_position`` (sub-group, offset in its flat buffer, partition size), ``partition_numel()``
  and ``zero3_partitioned_param_info``. Which elements rank r's partition holds, ``[r·pn, min((r+1)·pn, numel))``,
  is the rule of DeepSpeed's checkpoint merge (``zero_to_fp32``: the W partitions in rank order, cut at numel),
  written out here because DeepSpeed has no per-rank function for it; for the adversarial model the fp32
  partitions DeepSpeed filled are read at sampled ranks: each fragment holds exactly the elements it claims.
- FSDP2/HSDP: torch's ``_compute_local_shape_and_global_offset`` at every mesh coordinate, checked against the
  DTensors ``fully_shard`` made at sampled ranks.

What stands in for a real multi-process run, and why:

- GPT-3 shapes are laid out on the meta device: DeepSpeed allocates on its accelerator's device, and with that
  device set to ``"meta"`` it runs all of its partitioning code and keeps every shape, offset and piece of
  bookkeeping while allocating nothing (:func:`deepspeed_on_meta`). FSDP2 shards a meta model as it is.
- ZeRO-3's ``defragment`` copies the partitions through a host buffer; a meta tensor has no data to copy, so on the
  meta device it is replaced by the same flat buffer at the same offsets (DeepSpeed's ``get_mapping_to_flat_buffer``)
  without the copy.
- ZeRO-3's first forward checks that every rank traced the same parameter order (``assert_ints_same_as_other_ranks``:
  a broadcast from rank 0, compared with the local list). A fake broadcast carries nothing, so every rank but 0 reads
  a disagreement. It compares traces, not layouts (the layout is the optimizer's, built before any forward). And
  ZeRO-3 all-gathers parameters and reduce-scatters gradients into buffers that a fake collective leaves as they
  were allocated (uninitialised memory), so the gradient norm may be NaN, and DeepSpeed then skips the step. The
  steps below turn these two checks off (:func:`zero3_fake_world_checks_off`): the inner step always runs (AdamHD
  leaves elements whose gradient is not finite unchanged).
- Tensor parallelism: ``parallelize_module`` runs with ``src_data_rank=None`` (each rank cuts its own copy of the
  whole weight; the default scatters from rank 0, which a fake collective leaves unfilled). AutoTP's set-up
  all-reduces the slices' numels over the TP group; a fake all-reduce returns its input, so the library's
  ``_tp_reduce`` is run again with that all-reduce returning the sum of what the 8 TP coordinates put in. Its
  training steps remove DeepSpeed's first-forward check that the TP ranks got the same batch (a broadcast) and use
  a loss on the rank's logits instead of DeepSpeed's vocabulary-parallel cross-entropy (which all-gathers the
  ranks' vocabulary bounds and checks that they tile the vocabulary).
- DeepSpeed caches its process groups in module globals; they are put back to their import-time values between
  worlds (:func:`fake_world`), and so are DTensor's cached sharding results (they hold the last world's mesh). Its
  shared-memory all-reduce (for peers on one host) is not built: there are none.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import fnmatch
import itertools
import logging
import math
import os
import random
import sys
import time
from collections import defaultdict
from unittest import mock

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.pop("LOCAL_SIZE", None)  # DeepSpeed's shared-memory all-reduce would wait for LOCAL_SIZE local peers

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402

import deepspeed  # noqa: E402,F401
import deepspeed.runtime.zero.partitioned_param_coordinator as ds_coordinator  # noqa: E402
import deepspeed.runtime.zero.stage3 as ds_stage3  # noqa: E402
import deepspeed.utils.groups as ds_groups  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.runtime.zero.utils import get_mapping_to_flat_buffer  # noqa: E402
from deepspeed.utils import logger as ds_logger  # noqa: E402
from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info  # noqa: E402

import adamhd_dist  # noqa: E402
import adamhd_dist.distributed.dtensor as adamhd_dtensor  # noqa: E402
from adamhd_dist import deepspeed as ads  # noqa: E402
from adamhd_dist.distributed.layout import FlatLayout, Fragment  # noqa: E402
from adamhd_dist.integrations.deepspeed import _compat as ds_compat  # noqa: E402
from adamhd_dist.optim.stats import layer_abs_sums  # noqa: E402
from adamhd_train.models import GPT3_VOCAB_SIZE, build_model, count_parameters  # noqa: E402

ds_logger.setLevel(logging.ERROR)
# DeepSpeed's shared-memory all-reduce serves ranks on one host; a fake world has no peers, so it is not built
# (a first build of that extension takes about a minute on two cores)
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # the module, not torch (same name)

# DeepSpeed's process-group caches as they are before any world exists (restored between worlds)
_DS_GROUP_GLOBALS = {k: copy.copy(v) for k, v in vars(ds_groups).items()
                     if (k.startswith("_") and k[1:2].isupper() or k in ("mpu", "mesh_device")) and not callable(v)}

MAX_PROBLEMS = 8  # problems reported per check (the first ones)
STAT_BUDGET = 200_000_000  # the all-rank statistic is computed where the padded model has at most this many elements


# ---------------------------------------------------------------------------------------------------------------
# one process as rank r of W
@contextlib.contextmanager
def fake_world(world: int, rank: int):
    """This process is rank ``rank`` of ``world`` (fake process group) inside the block."""
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
        _forget_meshes()
        for k, v in _DS_GROUP_GLOBALS.items():
            setattr(ds_groups, k, copy.copy(v))
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _forget_meshes() -> None:
    """DTensor caches sharding propagation results, which hold device meshes; meshes of different worlds compare
    equal (same shape and names), so without this a new world's DTensors would get the last world's mesh (its
    rank, its destroyed groups)."""
    from torch.distributed.tensor import DTensor

    torch._C._clear_DTensor_sharding_propagator_cache()  # the C++ fast path's cache
    prop = DTensor._op_dispatcher.sharding_propagator
    prop.propagate_op_sharding.cache_clear()
    prop._propagate_tensor_meta_cached.cache_clear()


def _defragment_on_meta(tensors):
    """ZeRO-3's ``defragment`` without the copy (meta tensors hold no data): one flat buffer, each partition a
    view of it at DeepSpeed's own offsets."""
    infos = get_mapping_to_flat_buffer(tensors)
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    for tensor, offset, numel in infos:
        tensor.data = flat.narrow(0, offset, numel)
    return flat


@contextlib.contextmanager
def deepspeed_on_meta():
    """DeepSpeed's CPU accelerator names the meta device: its partitioning runs unchanged and allocates nothing."""
    acc = get_accelerator()
    with mock.patch.object(acc, "device_name", lambda device_index=None: "meta"), \
            mock.patch.object(acc, "current_device_name", lambda: "meta"), \
            mock.patch.object(ds_stage3, "defragment", _defragment_on_meta):
        yield


@contextlib.contextmanager
def zero3_fake_world_checks_off():
    """Two ZeRO-3 checks that read data a fake collective does not carry, off (see the module docstring)."""
    with mock.patch.object(ds_coordinator, "assert_ints_same_as_other_ranks", lambda ints: None), \
            mock.patch.object(ds_stage3, "is_invalid_grad_norm", lambda norm: False):
        yield


@contextlib.contextmanager
def no_gc_collect():
    """ZeRO-3 runs ``gc.collect()`` while it builds its buffers (about 0.3 s each time in this process, which keeps
    many objects alive); skipped here, for speed only."""
    with mock.patch("gc.collect", lambda *args: 0):
        yield


# ---------------------------------------------------------------------------------------------------------------
# models
class Adversarial(nn.Module):
    """Small shapes that sharding at large W handles badly: tensors smaller than any W (3 and 1 elements), sizes
    prime to W (7x13, 13, 1031 rows and 1031), one of exactly 1,024 elements, an embedding tied with the output
    head, a frozen layer, two param groups (decayed matrices; undecayed vectors), and more matrices than 8 ranks."""

    VOCAB = 11

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(self.VOCAB, 7)
        self.tiny = nn.Parameter(torch.randn(3))
        self.one = nn.Parameter(torch.randn(1))
        self.prime = nn.Linear(7, 13)
        self.wide = nn.Linear(13, 1031)
        self.square = nn.Parameter(torch.randn(8, 128) / 8)
        # more matrices than ranks at W = 8, so that round-robin reordering changes the order
        self.extra = nn.ParameterList([nn.Parameter(torch.randn(2 + i, 3) / 3) for i in range(6)])
        self.frozen = nn.Linear(13, 7)
        self.frozen.requires_grad_(False)
        self.norm = nn.LayerNorm(7)
        self.head = nn.Linear(7, self.VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x, y):
        h = self.norm(self.emb(x)) * self.tiny.sum() + self.one
        h2 = self.prime(h)
        h = h + self.wide(h2).mean(-1, keepdim=True) + self.frozen(h2) + self.square.mean()
        h = h + sum(p.mean() for p in self.extra)
        return Fn.cross_entropy(self.head(h).reshape(-1, self.VOCAB), y.reshape(-1))


CODE_BITS = 17  # element j of the l-th parameter holds ±(l·2^17 + j + 1): exact in fp32 for l < 128, j < 2^17


def encode_(model: nn.Module) -> None:
    """Every element of every parameter gets a value that names it (layer, index); the sign alternates."""
    with torch.no_grad():
        for l, (_, p) in enumerate(model.named_parameters()):
            assert p.numel() < 2 ** CODE_BITS and l < 2 ** (24 - CODE_BITS)
            code = torch.arange(p.numel(), dtype=torch.float64) + (l << CODE_BITS) + 1
            p.copy_((code * (-1) ** l).view(p.shape).to(p.dtype))


def decode(t: torch.Tensor, names: list[str]) -> list[tuple[str, int, int, int]]:
    """Maximal runs of consecutive elements of one layer in a 1-D tensor written by :func:`encode_`:
    ``[(layer name, start in t, numel, offset in the layer)]``; zeros (padding) belong to none."""
    t = t.detach().reshape(-1).to("cpu", torch.float64)
    code = t.abs().round().to(torch.int64) - 1
    real = t != 0
    layer, index = code >> CODE_BITS, code & ((1 << CODE_BITS) - 1)
    runs, n = [], t.numel()
    cut = torch.ones(n, dtype=torch.bool)
    if n > 1:
        cut[1:] = (layer[1:] != layer[:-1]) | (index[1:] != index[:-1] + 1) | (real[1:] != real[:-1])
    starts = cut.nonzero().flatten().tolist() + [n]
    for a, b in zip(starts, starts[1:]):
        if real[a]:
            runs.append((names[int(layer[a])], a, b - a, int(index[a])))
    return runs


# ---------------------------------------------------------------------------------------------------------------
# checks shared by every engine. A fragment is (layer name, flat tensor index, start in it, numel, offset in layer).
def coverage_problems(numels: dict[str, int], frags_by_rank: dict[int, set], ranks=None) -> list[str]:
    """Every layer's elements [0, numel) covered exactly once over ``ranks`` (default all), nothing beyond."""
    pieces = defaultdict(list)
    for r, frags in frags_by_rank.items():
        if ranks is None or r in ranks:
            for name, _, _, n, off in frags:
                pieces[name].append((off, n, r))
    out = []
    for name, total in numels.items():
        at = 0
        for off, n, r in sorted(pieces.get(name, [])):
            if off != at:
                out.append(f"{name}: elements [{min(at, off)}, {max(at, off)}) "
                           f"{'not held by any rank' if off > at else 'held twice'} (rank {r})")
            at = max(at, off + n)
        if at != total:
            out.append(f"{name}: ranks hold elements up to {at}, the layer has {total}")
        if len(out) >= MAX_PROBLEMS:
            break
    extra = sorted(set(pieces) - set(numels))
    if extra:
        out.append(f"fragments of layers that are not trainable parameters: {extra[:3]}")
    return out[:MAX_PROBLEMS]


def table_problems(table: dict, numels: dict[str, int]) -> list[str]:
    """The layout's layer table holds every trainable parameter once, each with its whole-layer numel."""
    out = []
    if sorted(table["names"]) != sorted(numels):
        out.append(f"layer table: {len(table['names'])} layers, the model has {len(numels)} trainable parameters")
    out += [f"layer table: {n} has numel {k}, the layer has {numels[n]}"
            for n, k in zip(table["names"], table["numels"]) if numels.get(n) != k]
    return out[:MAX_PROBLEMS]


def diff_problems(what: str, got: dict[int, set], want: dict[int, set], ranks) -> list[str]:
    out = []
    for r in ranks:
        a, b = got.get(r, set()), want.get(r, set())
        if a != b:
            out.append(f"{what}, rank {r}: {len(a - b)} fragment(s) not in the reference, e.g. "
                       f"{sorted(a - b)[:2]}; {len(b - a)} missing, e.g. {sorted(b - a)[:2]}")
        if len(out) >= MAX_PROBLEMS:
            break
    return out


def value_at(layer: int, numel: int):
    """Deterministic values of a layer: a·s on its first half, 2·a·s on the rest (a in {1, 1.25, ..., 2}, s = ±1),
    so the whole-layer Σ|θ| is known exactly: a·(h + 2·(numel − h))."""
    a, s, h = 1.0 + (layer % 5) / 4, (-1.0) ** layer, numel // 2
    return a * s, 2 * a * s, h, a * (h + 2 * (numel - h))


def fill_(buf: torch.Tensor, start: int, n: int, layer: int, numel: int, offset: int) -> None:
    lo_v, hi_v, h, _ = value_at(layer, numel)
    cut = min(max(h - offset, 0), n)
    buf[start:start + cut] = lo_v
    buf[start + cut:start + n] = hi_v


def flat_statistic(table: dict, flat_sizes: dict[int, list[int]], truth: dict[int, set], library: dict[int, set],
                   ranks) -> tuple[list[str], bool]:
    """Σ over ``ranks`` of the per-rank partial sums that the library's FlatLayout computes (``local_sums``) on
    flat buffers holding deterministic values where the engine put each layer's elements (``truth``) and NaN
    everywhere else (padding): equal to each whole layer's Σ|θ| (rtol 1e-9)? Returns (problems, any NaN)."""
    names, numels, groups = table["names"], table["numels"], table["groups"]
    index = {n: i for i, n in enumerate(names)}
    total = torch.zeros(len(names), dtype=torch.float64)
    for r in ranks:
        bufs = [torch.full((size,), float("nan")) for size in flat_sizes[r]]
        for name, k, start, n, off in truth.get(r, ()):
            fill_(bufs[k], start, n, index[name], numels[index[name]], off)
        frags = {buf: [] for buf in bufs}
        for name, k, start, n, off in library.get(r, ()):
            frags[bufs[k]].append(Fragment(index[name], start, n, off))
        try:
            lay = FlatLayout(names, numels, groups, frags, None)
        except ValueError as e:
            return [f"rank {r}: the library's fragments do not form a layout: {e}"], False
        total += lay.local_sums()
    want = torch.tensor([value_at(i, n)[3] for i, n in enumerate(numels)], dtype=torch.float64)
    nan = bool(total.isnan().any())
    bad = ((total - want).abs() > 1e-9 * want).nonzero().flatten().tolist()
    return [f"{names[i]}: Σ over ranks of partial Σ|θ| = {float(total[i])!r}, whole layer {float(want[i])!r}"
            for i in bad[:MAX_PROBLEMS]], nan


def sample_ranks(world: int, interesting, seed: int, extra: int = 2) -> list[int]:
    """Ranks 0, 1, W−1, the ``interesting`` ones, and ``extra`` seeded random ones; every rank when W ≤ 8."""
    if world <= 8:
        return list(range(world))
    picks = {0, 1, world - 1} | {r for r in interesting if 0 <= r < world}
    rng = random.Random(seed)
    picks |= {rng.randrange(world) for _ in range(extra)}
    return sorted(picks)


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO
def ds_config(stage: int, sub_group_size: int | None = None) -> dict:
    zero = {"stage": stage}
    if stage == 1:  # per-parameter alignment padding inside the flat buffer
        zero.update(parameter_alignment=True)
    if stage == 2:  # parameters reordered round-robin over the ranks before flattening
        zero.update(round_robin_gradients=True)
    if stage == 3:
        zero.update(sub_group_size=sub_group_size)
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamHD", "params": {"lr": 1e-3, "weight_decay": 0.1}},
            "zero_optimization": zero}


def engine_fragments(engine) -> tuple[set, dict]:
    """The FlatLayout that ``adamhd_dist.deepspeed.initialize`` attached, as fragments, and its layer table."""
    lay = engine._adamhd_optimizer.layer_stats.layout
    frags = {(lay.names[f.layer], lay.engine_index[flat], f.start, f.numel, f.offset)
             for flat, fs in lay.fragments.items() for f in fs}
    return frags, {"names": list(lay.names), "numels": list(lay.numels), "groups": list(lay.groups)}


def zero12_placement(zopt, names: dict[int, str]) -> dict[int, set]:
    """Where DeepSpeed put every element, for every rank: each param is a view of its group's flat buffer (its
    storage offset is its place there), and ``get_data_parallel_partitions`` cut that buffer into W views."""
    out = defaultdict(set)
    for g, flat in enumerate(zopt.bit16_groups_flat):
        base = flat.storage_offset()
        spans = [(part.storage_offset() - base, part.numel()) for part in zopt.parallel_partitioned_bit16_groups[g]]
        starts = [lo for lo, _ in spans]
        for p in zopt.bit16_groups[g]:
            at, n = p.storage_offset() - base, p.numel()
            r = max(0, bisect.bisect_right(starts, at) - 1)
            while r < len(spans) and spans[r][0] < at + n:
                lo, size = spans[r]
                a, b = max(at, lo), min(at + n, lo + size)
                if a < b:
                    out[r].add((names[id(p)], g, a - lo, b - a, a - at))
                r += 1
    return out


def zero12_hp_mapping(zopt, names: dict[int, str]) -> set:
    """DeepSpeed's own record, on this rank, of which slice of which param each fp32 partition slice holds
    (``lp._hp_mapping``, used by its checkpoint and ``safe_get_full_fp32_param`` APIs)."""
    out = set()
    for g, lps in enumerate(zopt.bit16_groups):
        for p in lps:
            m = getattr(p, "_hp_mapping", None)
            if m is not None:
                out.add((names[id(p)], g, m.hp_fragment_address.start, m.hp_fragment_address.numel,
                         m.lp_fragment_address.start))
    return out


def zero12_library_all_ranks(zopt, names: dict[int, str], world: int) -> dict[int, set]:
    """The library's ZeRO-1/2 layout of every rank, from DeepSpeed's bookkeeping (``_layout_stage12`` of the view
    ``attach`` reads, with each rank's partition from ``parallel_partitioned_bit16_groups``)."""
    view = ds_compat.stage12_view(zopt, ds_compat.zero_kind(zopt))
    out = {}
    for r in range(world):
        parts = [zopt.parallel_partitioned_bit16_groups[g][r] for g in range(len(view.partitions))]
        lnames, _, _, frags, _, index = ads._layout_stage12(dataclasses.replace(view, partitions=parts), names, r)
        out[r] = {(lnames[f.layer], index[flat], f.start, f.numel, f.offset) for flat, fs in frags.items() for f in fs}
    return out


def zero3_placement(zopt, names: dict[int, str], world: int, only: int | None = None
                    ) -> tuple[dict[int, set], list[str]]:
    """Where DeepSpeed puts every element under ZeRO-3, for every rank: the sub-group and offset of each param's
    partition in the sub-group's flat buffer and the partition's size (``grad_position``), and which elements of
    the param a rank's partition holds by DeepSpeed's checkpoint merge (``zero_to_fp32``: the W partitions in rank
    order, of ``zero3_partitioned_param_info(numel, W)`` elements each, cut at numel)."""
    out, problems = defaultdict(set), []
    for sg, params in enumerate(zopt.fp16_groups):
        for p in params:
            g, at, pn = zopt.grad_position[zopt.get_param_id(p)]
            pn_ckpt, _ = zero3_partitioned_param_info(p.ds_numel, world)
            if g != sg or pn != p.partition_numel() or pn != pn_ckpt:
                problems.append(f"{names[id(p)]}: DeepSpeed's records disagree (sub-group {g} vs {sg}, partition "
                                f"{pn} vs {p.partition_numel()} vs checkpoint {pn_ckpt})")
            for r in range(world) if only is None else (only,):
                a, b = r * pn, min((r + 1) * pn, p.ds_numel)
                if a >= b:
                    break
                out[r].add((names[id(p)], sg, at, b - a, a))
    return out, problems


def zero3_library_all_ranks(zopt, names: dict[int, str], world: int) -> dict[int, set]:
    """The library's ZeRO-3 layout of every rank (``_layout_stage3`` as ``attach`` calls it)."""
    out = {}
    for r in range(world):
        lnames, _, _, frags, _, index = ads._layout_stage3(zopt, names, r)
        out[r] = {(lnames[f.layer], index[flat], f.start, f.numel, f.offset) for flat, fs in frags.items() for f in fs}
    return out


def _zopt_flats(zopt, stage: int) -> list[torch.Tensor]:
    return list(zopt.single_partition_of_fp32_groups if stage < 3 else zopt.fp32_partitioned_groups_flat)


def _interesting_zero_ranks(placement: dict[int, set], flat_count: int, world: int) -> list[int]:
    """Ranks at the edges: for the flat tensor that the fewest ranks hold anything of, the last rank holding some
    of it and the first holding only padding there; the first and last rank holding part of the most-cut layer."""
    held = defaultdict(set)  # flat index -> ranks holding something in it
    spread = defaultdict(set)  # layer -> ranks holding part of it
    for r, frags in placement.items():
        for name, k, _, _, _ in frags:
            held[k].add(r)
            spread[name].add(r)
    out = set()
    sparsest = min(range(flat_count), key=lambda k: len(held.get(k, ())))
    last = max(held.get(sparsest, {0}))
    out |= {last, last + 1}
    if spread:
        widest = max(spread, key=lambda n: len(spread[n]))
        out |= {min(spread[widest]), max(spread[widest])}
    return sorted(r for r in out if r < world)


def deepspeed_case(model_name: str, stage: int, world: int, seed: int = 0) -> dict:
    """One (model, ZeRO stage, W): every rank's layout from DeepSpeed's own bookkeeping and data, compared with the
    library's, at every rank and through the library's real entry point at sampled ranks."""
    t0 = time.perf_counter()
    real = model_name == "adversarial"

    def make_model():
        if real:
            torch.manual_seed(seed)
            m = Adversarial()
            encode_(m)
            return m
        return build_model(model_name, vocab_size=GPT3_VOCAB_SIZE, device="meta")

    probe = make_model()
    all_names = [n for n, _ in probe.named_parameters()]
    true_numels = {n: p.numel() for n, p in probe.named_parameters() if p.requires_grad}
    per_rank = -(-sum(true_numels.values()) // world)
    sub_group_size = max(1, per_rank // 16) if stage == 3 else None  # several sub-groups per param group
    cfg = ds_config(stage, sub_group_size)
    problems, facts = [], {"world": world, "stage": stage, "model": model_name}
    if not real and count_parameters(model_name) != sum(true_numels.values()):
        problems.append(f"{model_name}: {sum(true_numels.values())} trainable elements, the preset counts "
                        f"{count_parameters(model_name)}")

    def construct(rank):  # as rank `rank`; rank 0 also computes every rank's layout from its bookkeeping
        full = rank == 0
        model = make_model()
        names = {id(p): n for n, p in model.named_parameters()}
        with fake_world(world, rank), no_gc_collect(), (contextlib.nullcontext() if real else deepspeed_on_meta()):
            engine, *_ = ads.initialize(model=model, config=cfg)
            zopt = engine.optimizer
            got = {"frags": engine_fragments(engine)}
            got["group"] = sorted(dist.get_process_group_ranks(ds_compat.dp_group(zopt)))
            flats = _zopt_flats(zopt, stage)
            lay = engine._adamhd_optimizer.layer_stats.layout
            # the layout describes exactly the engine's fp32 partitions, each under its index in the engine's list
            got["flat_ok"] = [id(f) for f in lay.fragments] == [id(f) for f in flats] and \
                [lay.engine_index[f] for f in lay.fragments] == list(range(len(flats)))
            got["flat_sizes"] = [f.numel() for f in flats]
            got["reduce"] = lay.reduce is not None
            if stage < 3:
                got["hp"] = zero12_hp_mapping(zopt, names)
                # DeepSpeed 0.19.8 computes the hp mapping in the unreordered order unless it is given offsets,
                # which it is only when the flat buffer has alignment padding between params
                got["hp_reference"] = not zopt.round_robin_gradients or \
                    any(any(pad) for pad in zopt.round_robin_bit16_padding)
                got["placement"] = zero12_placement(zopt, names)
            if full and stage < 3:
                got["library_all"] = zero12_library_all_ranks(zopt, names, world)
                got["sizes_all"] = {r: [parts[r].numel() for parts in zopt.parallel_partitioned_bit16_groups]
                                    for r in range(world)}
                if real:  # the data itself: DeepSpeed's flat buffer, cut into every rank's partition
                    got["decoded_all"] = {r: {(n, g, s, k, o) for g, parts in
                                              enumerate(zopt.parallel_partitioned_bit16_groups)
                                              for n, s, k, o in decode(parts[r], all_names)} for r in range(world)}
            elif full:
                got["placement"], got["ds_problems"] = zero3_placement(zopt, names, world)
                got["library_all"] = zero3_library_all_ranks(zopt, names, world)
                got["sizes_all"] = {r: got["flat_sizes"] for r in range(world)}
            elif stage == 3:  # this rank's own records
                got["placement"], got["ds_problems"] = zero3_placement(zopt, names, world, only=rank)
            if real:  # this rank's fp32 partitions as DeepSpeed filled them, read at the library's fragments
                got["decoded_here"] = _decode_at(flats, got["frags"][0], all_names)
        return got

    first = construct(0)
    placement, library_all = first["placement"], first["library_all"]
    problems += first.get("ds_problems", [])
    table = first["frags"][1]
    problems += table_problems(table, true_numels)
    problems += diff_problems("library vs DeepSpeed placement", library_all, placement, range(world))
    if real and stage < 3:
        problems += diff_problems("DeepSpeed placement vs the data in its buffers", placement,
                                  first["decoded_all"], range(world))
    problems += coverage_problems(true_numels, library_all)
    flats = len(first["flat_sizes"])
    ranks = sample_ranks(world, _interesting_zero_ranks(placement, flats, world), seed=world * 10 + stage)
    hp_disagrees = 0
    for r in ranks:
        got = first if r == 0 else construct(r)
        frags, tab = got["frags"]
        where = f"rank {r}"
        if tab != table:
            problems.append(f"{where}: layer table differs from rank 0's (the reduced vector would not line up)")
        if frags != library_all[r]:
            problems += diff_problems(f"{where}: attach vs the library at every rank", {r: frags},
                                      library_all, [r])
        if stage < 3 and got["placement"] != placement:
            problems.append(f"{where}: DeepSpeed placed the buffers differently than as rank 0")
        if stage == 3 and r != 0:
            problems += got["ds_problems"]
            if got["placement"].get(r, set()) != placement.get(r, set()):
                problems.append(f"{where}: DeepSpeed's records as this rank differ from rank 0's")
        if stage < 3 and got["hp_reference"] and got["hp"] != placement.get(r, set()):
            problems += diff_problems(f"{where}: DeepSpeed's hp mapping vs its placement", {r: got["hp"]},
                                      placement, [r])
        if stage < 3 and not got["hp_reference"]:
            hp_disagrees += got["hp"] != placement.get(r, set())
        if real:
            problems += [f"{where}: {p}" for p in got["decoded_here"]]
        if got["group"] != list(range(world)) or not got["reduce"]:
            problems.append(f"{where}: the statistic is reduced over {len(got['group'])} ranks "
                            f"(reduce set: {got['reduce']}), not the {world} data-parallel ranks")
        if not got["flat_ok"]:
            problems.append(f"{where}: the layout's flat tensors are not the engine's fp32 partitions")
        if got["flat_sizes"] != first["sizes_all"][r]:
            problems.append(f"{where}: partition sizes {got['flat_sizes']} vs {first['sizes_all'][r]}")
        del got
    stat_nan = None
    padded = sum(sum(s) for s in first["sizes_all"].values())
    if padded <= STAT_BUDGET:
        truth = first["decoded_all"] if real and stage < 3 else placement
        stat, stat_nan = flat_statistic(table, first["sizes_all"], truth, library_all, range(world))
        problems += stat
        if stat_nan:
            problems.append("the reduced statistic is NaN: a rank counted padding")
    facts.update(_zero_facts(placement, true_numels, first["sizes_all"], world),
                 ranks=ranks, statistic=padded <= STAT_BUDGET, seconds=round(time.perf_counter() - t0, 2),
                 sub_groups=flats if stage == 3 else None,
                 hp_mapping_unreliable_disagrees=hp_disagrees)
    result = {"problems": problems[:4 * MAX_PROBLEMS], "facts": facts}
    if real or model_name == "gpt3-small":
        result["negative"] = _zero_negative_controls(table, true_numels, first["sizes_all"], placement, library_all,
                                                     world)
    del first
    return result


def _decode_at(flats, frags, all_names) -> list[str]:
    """The library's fragments on this rank, read from the engine's fp32 partitions: each must hold exactly the
    elements it claims (DeepSpeed copied them there from the encoded parameters)."""
    out = []
    for name, k, start, n, off in sorted(frags):
        runs = decode(flats[k][start:start + n], all_names)
        if runs != [(name, 0, n, off)]:
            out.append(f"fragment {(name, k, start, n, off)} holds {runs[:3]} in the engine's partition")
            if len(out) >= MAX_PROBLEMS:
                break
    return out


def _zero_facts(placement, numels, sizes, world) -> dict:
    """What the layout at this W looks like: how far layers are cut, who holds nothing."""
    spread = defaultdict(set)
    per_rank_layers = defaultdict(set)
    for r, frags in placement.items():
        for name, _, _, _, _ in frags:
            spread[name].add(r)
            per_rank_layers[r].add(name)
    holds_nothing = [r for r in range(world) if not per_rank_layers.get(r)]
    missing_some = [r for r in range(world) if 0 < len(per_rank_layers.get(r, ())) < len(numels)]
    return {"max_ranks_per_layer": max((len(s) for s in spread.values()), default=0),
            "ranks_holding_nothing": len(holds_nothing), "ranks_missing_some_layer": len(missing_some),
            "layers_smaller_than_world": sum(n < world for n in numels.values()),
            "empty_flat_slots": sum(1 for r in range(world) for k in range(len(sizes[r]))
                                    if not any(f[1] == k for f in placement.get(r, ())))}


def _zero_negative_controls(table, numels, sizes, placement, library_all, world) -> dict[str, list[str]]:
    """The same checks on layouts that are wrong on purpose: each must report a problem."""
    out = {}
    # 1) a fragment read one element late in its flat tensor, where the element after it is padding: the layer's
    #    elements are still all claimed once (coverage cannot see it), but the statistic counts padding
    starts = {r: {(k, s) for _, k, s, _, _ in fs} for r, fs in placement.items()}
    pick = next(((r, f) for r, fs in sorted(library_all.items()) for f in sorted(fs)
                 if f[2] + f[3] < sizes[r][f[1]] and (f[1], f[2] + f[3]) not in starts.get(r, set())), None)
    if pick is not None:
        r, (name, k, start, n, off) = pick
        wrong = copy.deepcopy(library_all)
        wrong[r] = (wrong[r] - {(name, k, start, n, off)}) | {(name, k, start + 1, n, off)}
        stat, nan = flat_statistic(table, sizes, placement, wrong, [r])
        out["a fragment read one element late (its last element is padding)"] = \
            (["the statistic is NaN (padding counted)"] if nan else []) + \
            diff_problems("late", wrong, placement, [r])
    # 2) a fragment's offset in its layer shifted by one
    wrong = copy.deepcopy(library_all)
    r, frag = next((r, f) for r, fs in sorted(library_all.items()) for f in sorted(fs) if f[4] > 0)
    wrong[r] = (wrong[r] - {frag}) | {frag[:4] + (frag[4] - 1,)}
    out["offset shifted by one"] = coverage_problems(numels, wrong) + diff_problems("shifted", wrong, placement, [r])
    # 3) the statistic taken from one rank only (no reduction)
    stat, _ = flat_statistic(table, sizes, placement, library_all, [0])
    out["no reduction (rank 0's partial sums)"] = stat
    # 4) per-shard numel: the table holding rank 0's own share of each layer instead of the whole layer's numel
    local = defaultdict(int)
    for name, _, _, n, _ in library_all[0]:
        local[name] += n
    out["per-shard numel"] = table_problems(dict(table, numels=[local[n] for n in table["names"]]), numels)
    return out


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 and HSDP (DTensor)
def _mesh_shape(world: int, hsdp: bool) -> tuple[int, ...]:
    if not hsdp:
        return (world,)
    replicas = {8: 2, 64: 4, 1024: 8, 4096: 16}[world]
    return (replicas, world // replicas)


def fsdp_case(model_name: str, world: int, hsdp: bool, seed: int = 0) -> dict:
    """One (model, W, FSDP2 or HSDP): every rank's shard of every layer from torch's own sharding arithmetic
    (``_compute_local_shape_and_global_offset`` at each mesh coordinate), the library's plan (group, numel, local
    tensors) through ``fully_shard`` + AdamHD as sampled ranks, and the statistic over the library's group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset, \
        compute_local_shape_and_global_offset

    from adamhd_dist.distributed.fsdp import transformer_blocks

    t0 = time.perf_counter()
    real = model_name == "adversarial"
    shape = _mesh_shape(world, hsdp)
    dim_names = ("replicate", "shard") if hsdp else ("shard",)
    shard_dim = len(shape) - 1
    problems, facts = [], {"world": world, "model": model_name, "mesh": shape}

    def make_model():
        if real:
            torch.manual_seed(seed)
            return Adversarial()
        return build_model(model_name, vocab_size=GPT3_VOCAB_SIZE, device="meta")

    probe = make_model()
    true_numels = {n: p.numel() for n, p in probe.named_parameters() if p.requires_grad}
    shapes = {n: tuple(p.shape) for n, p in probe.named_parameters() if p.requires_grad}
    names = list(true_numels)
    mesh_ranks = torch.arange(world).view(shape)  # init_device_mesh's rank layout (row-major)
    coord = {int(mesh_ranks[idx]): list(idx) for idx in itertools.product(*[range(s) for s in shape])}

    def shard_group(r):  # the ranks that differ from r only in the shard coordinate
        return sorted(int(x) for x in mesh_ranks[tuple(coord[r][:-1])].reshape(-1))

    def construct(rank, step=False):
        model = make_model()
        with fake_world(world, rank):
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=dim_names)
            if not real:
                for block in transformer_blocks(model):
                    fully_shard(block, mesh=mesh)
            else:
                fully_shard(model.wide, mesh=mesh)
            fully_shard(model, mesh=mesh)
            want = _fill_shards(model, shapes, true_numels) if step else None
            opt = adamhd_dist.AdamHD(adamhd_dist.param_groups(model, 0.1), lr=1e-3)
            stats = opt.layer_stats
            plan = stats.plan()
            got = {"dims": plan.dims, "group": sorted(dist.get_process_group_ranks(plan.group)),
                   # every local sum counts in full: no layer is replicated along a summed dimension
                   "uniform": all(stats._weight(p, plan.dims) == 1.0 for p in stats._stat_params()),
                   "numel": {}, "local": {}, "utility": {}, "placements": {}}
            for n, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                got["numel"][n] = stats.layer_numel(p)
                got["local"][n] = tuple(stats.local(p).shape)
                got["utility"][n] = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                got["placements"][n] = tuple(p.placements)
            if step:
                got["step"] = _fsdp_step(model, opt, want)
        return got

    # one real step as a few ranks (where a rank's shards are small enough to allocate): the partial sums AdamHD
    # hands to its one collective, and the collective count
    small_local = sum(true_numels.values()) // shape[-1] <= 40_000_000  # elements per rank
    first = construct(0, step=small_local)
    placements = first["placements"]
    seen = {}

    def torch_shard(n, r):  # torch's (local shape, global offset) of layer n at rank r's mesh coordinate
        key = (shapes[n], tuple(coord[r]), placements[n])
        if key not in seen:
            seen[key] = _compute_local_shape_and_global_offset(shapes[n], shape, coord[r], placements[n])
        return seen[key]

    # every rank's shard of every layer, by torch's arithmetic: (layer, 0, 0, numel, offset) element ranges
    frags = defaultdict(set)
    for r in range(world):
        for n in names:
            local, offset = torch_shard(n, r)
            row = math.prod(shapes[n][1:])
            k = math.prod(local)
            if k:
                frags[r].add((n, 0, 0, k, offset[0] * row if shapes[n] else 0))
    group0 = first["group"]
    if first["dims"] != (shard_dim,) or group0 != shard_group(0):
        problems.append(f"rank 0: the plan reduces over mesh dims {first['dims']} = ranks {group0[:4]}..., "
                        f"not the shard dimension {shard_dim}")
    problems += coverage_problems(true_numels, frags, set(group0))
    if hsdp:  # every element is held once per replica: R times over the world
        held = defaultdict(int)
        for r in range(world):
            for n, _, _, k, _ in frags[r]:
                held[n] += k
        problems += [f"{n}: held {held[n]} times over the world, want {shape[0]} x {true_numels[n]}"
                     for n in names if held[n] != shape[0] * true_numels[n]][:MAX_PROBLEMS]
    widest_empty = [r for r in range(world) if len(frags[r]) < len(names)]
    interesting = ([min(widest_empty) - 1, min(widest_empty)] if widest_empty else []) + \
        [max(r for r in range(world) if frags[r])]
    ranks = sample_ranks(world, interesting, seed=world + hsdp, extra=1)
    step_ranks = {0, world - 1, interesting[-1]} if small_local else set()
    steps = {}
    for r in ranks:
        got = first if r == 0 else construct(r, step=r in step_ranks)
        if "step" in got:
            steps[r] = got["step"]
            problems += [f"rank {r} step: {p}" for p in steps[r]["problems"]]
        where = f"rank {r}"
        if got["group"] != shard_group(r) or got["dims"] != (shard_dim,):
            problems.append(f"{where}: reduces over ranks {got['group'][:4]}..., want its shard group "
                            f"{shard_group(r)[:4]}...")
        if not got["uniform"]:
            problems.append(f"{where}: the plan weights some layer's local sum other than 1 (no replica to skip)")
        for n in names:
            local, offset = torch_shard(n, r)
            if got["numel"][n] != true_numels[n]:
                problems.append(f"{where}: {n} layer numel {got['numel'][n]}, true {true_numels[n]}")
            if got["local"][n] != tuple(local) or tuple(got["utility"][n][0]) != tuple(local) or \
                    tuple(got["utility"][n][1]) != tuple(offset):
                problems.append(f"{where}: {n} local tensor {got['local'][n]} / DTensor {got['utility'][n]} vs "
                                f"torch's sharding at coordinate {coord[r]}: {tuple(local)} at {tuple(offset)}")
        del got
    # the statistic: Σ over the library's group of per-rank partial sums (layer_abs_sums, as AdamHD computes them)
    stat_ranks = None
    if sum(true_numels.values()) <= STAT_BUDGET:
        stat_ranks = group0
        problems += _dtensor_statistic(names, true_numels, frags, group0)
    facts.update(ranks=ranks, statistic_ranks=len(stat_ranks or ()), steps=sorted(steps),
                 ranks_with_empty_shards=len(widest_empty),
                 layers_smaller_than_shard_group=sum(n < len(group0) for n in true_numels.values()),
                 comm=[steps[r]["comm"] for r in sorted(steps)], seconds=round(time.perf_counter() - t0, 2))
    result = {"problems": problems[:4 * MAX_PROBLEMS], "facts": facts}
    if hsdp and stat_ranks is not None:
        result["negative"] = {"HSDP statistic summed over the whole world (replicas counted R times)":
                              _dtensor_statistic(names, true_numels, frags, list(range(world)))}
    return result


def _dtensor_statistic(names, numels, frags, ranks) -> list[str]:
    total = torch.zeros(len(names), dtype=torch.float64)
    index = {n: i for i, n in enumerate(names)}
    for r in ranks:
        locals_, which = [], []
        for n, _, _, k, off in sorted(frags.get(r, ())):
            buf = torch.empty(k)
            fill_(buf, 0, k, index[n], numels[n], off)
            locals_.append(buf)
            which.append(index[n])
        if locals_:
            total.index_add_(0, torch.tensor(which), layer_abs_sums(locals_).to(torch.float64))
    want = torch.tensor([value_at(i, numels[n])[3] for i, n in enumerate(names)], dtype=torch.float64)
    bad = ((total - want).abs() > 1e-9 * want).nonzero().flatten().tolist()
    return [f"{names[i]}: Σ over the group of partial Σ|θ| = {float(total[i])!r}, whole layer {float(want[i])!r}"
            for i in bad[:MAX_PROBLEMS]]


def _fill_shards(model, shapes, numels) -> dict[str, float]:
    """Give the sharded model real local storage and fill each local shard with the values of the elements it
    holds (by the DTensor's own global offset); zero gradients. Returns each layer's Σ|θ| over this rank's shard."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    index = {n: i for i, n in enumerate(numels)}
    model.to_empty(device="cpu")
    want = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if not p.requires_grad:
                local.fill_(1.0)
                continue
            _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            flat = local.view(-1)
            fill_(flat, 0, flat.numel(), index[n], numels[n], offset[0] * math.prod(shapes[n][1:]))
            want[n] = float(flat.abs().sum(dtype=torch.float64))
            p.grad = torch.zeros_like(p)
    return want


def _fsdp_step(model, opt, want: dict[str, float], decayed: set[str] | None = None) -> dict:
    """One optimizer step of the filled model (:func:`_fill_shards`): AdamHD must send its one collective the
    partial sums of exactly the elements this rank holds (``want``: with the weight of the elements this rank
    counts), of exactly the decayed layers (default: the trainable ones with ndim >= 2)."""
    from torch.distributed.tensor.debug import CommDebugMode

    problems = []
    stats, params_of_step, sent = opt.layer_stats, [], []
    reduce, all_reduce_sums = stats.reduce, adamhd_dtensor.all_reduce_sums

    def record_params(sums, params):  # which layers the stacked sums are of
        params_of_step.append(list(params))
        return reduce(sums, params)

    def record_sent(sums, group, device_type):  # what enters the one collective
        sent.append(sums.clone())
        return all_reduce_sums(sums, group, device_type)

    stats.reduce = record_params
    with CommDebugMode() as comm, mock.patch.object(adamhd_dtensor, "all_reduce_sums", record_sent):
        opt.step()
    counts = {str(k): v for k, v in comm.get_comm_counts().items()}
    param_names = {id(p): n for n, p in model.named_parameters()}
    if len(params_of_step) != 1 or len(sent) != 1:
        problems.append(f"the layer sums were reduced {len(params_of_step)} time(s), sent {len(sent)} time(s)")
    else:
        for p, s in zip(params_of_step[0], sent[0].tolist()):
            n = param_names[id(p)]
            if abs(s - want[n]) > 1e-6 * max(want[n], 1.0):
                problems.append(f"{n}: partial Σ|θ| sent to the collective {s!r}, its elements sum to {want[n]!r}")
        if decayed is None:
            decayed = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}
        if {param_names[id(p)] for p in params_of_step[0]} != decayed:
            problems.append("the collective did not carry exactly the decayed layers")
    if counts != {"c10d.allreduce_": 1}:
        problems.append(f"collectives in one optimizer step: {counts}")
    steps = {float(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"] if p.grad is not None}
    if steps != {1.0}:
        problems.append(f"state steps after one step: {sorted(steps)}")
    return {"problems": problems[:MAX_PROBLEMS], "comm": counts}


# ---------------------------------------------------------------------------------------------------------------
# tensor parallelism: torch TP under FSDP2 (2-D mesh) and HSDP (3-D mesh); DeepSpeed AutoTP under ZeRO-1
TP_VOCAB, TP_DIM, TP_FFN, TP_BLOCKS = 1031, 48, 196, 2  # 1,031 and 196 rows split unevenly over 8 TP ranks
# the library sums each local tensor in fp32 (``layer_abs_sums``), so a partial sum of these large encoded values
# is within 2^-24 of its exact value; a miscounted element would move a layer's sum by more than 1e-5 of it
# (exact element counts are checked separately)
STAT_RTOL = 1e-6
TP_DECAY = ("*ln_*.weight", "*.proj.bias", "*.fc2.bias")  # replicated (TP) layers with a statistic too


class TPBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(TP_DIM), nn.LayerNorm(TP_DIM)
        self.q, self.k, self.v, self.proj = (nn.Linear(TP_DIM, TP_DIM) for _ in range(4))
        self.fc, self.fc2 = nn.Linear(TP_DIM, TP_FFN), nn.Linear(TP_FFN, TP_DIM)


class TPGPT(nn.Module):
    """A GPT-shaped stack for torch tensor parallelism (only its layout and an optimizer step are used)."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(TP_VOCAB, TP_DIM)
        self.h = nn.ModuleList(TPBlock() for _ in range(TP_BLOCKS))
        self.ln_f = nn.LayerNorm(TP_DIM)
        self.lm_head = nn.Linear(TP_DIM, TP_VOCAB, bias=False)


def _tp_plans():
    """(root plan, block plan): a vocabulary-parallel embedding and head, column-wise q/k/v/fc, row-wise
    proj/fc2, sequence-parallel norms (torchtitan's plan)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    root = {"wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)), "ln_f": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    block = {"ln_1": SequenceParallel(), "q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(),
             "proj": RowwiseParallel(output_layouts=Shard(1)), "ln_2": SequenceParallel(), "fc": ColwiseParallel(),
             "fc2": RowwiseParallel(output_layouts=Shard(1))}
    return root, block


def tp_split_dim(name: str) -> int | None:
    """The dimension the plan above splits a parameter on over "tp" (None: replicated), by what each style does:
    column-wise splits a Linear's output rows (weight and bias), row-wise its input columns (its bias stays
    whole), a row-wise embedding its vocabulary rows; sequence-parallel norms are replicated."""
    module, kind = name.split(".")[-2:]
    if module in ("wte", "lm_head", "q", "k", "v", "fc"):
        return 0
    if module in ("proj", "fc2"):
        return 1 if kind == "weight" else None
    return None


def _chunk(t: torch.Tensor, parts: int, i: int, dim: int) -> torch.Tensor:
    """Part i of ``torch.chunk`` (empty past the last part): how DTensor's Shard and FSDP2 cut a dimension."""
    pieces = t.chunk(parts, dim) if t.shape[dim] else ()
    return pieces[i] if i < len(pieces) else t.narrow(dim, 0, 0)


def _decoded(local: torch.Tensor, layer: int) -> torch.Tensor | str:
    """Indices in the whole layer of the elements a local tensor holds (values written by :func:`encode_`), in
    the local tensor's order; a message if some element is not of ``layer``."""
    code = local.detach().reshape(-1).to(torch.float64).abs().round().to(torch.int64) - 1
    if code.numel() and (bool((code < 0).any()) or bool(((code >> CODE_BITS) != layer).any())):
        return f"holds elements of other layers (or uninitialised memory): {local.reshape(-1)[:3].tolist()}"
    return code & ((1 << CODE_BITS) - 1)


def tp_case(hsdp: bool, world: int = 1024, tp: int = 8, replicas: int = 4) -> dict:
    """FSDP2 over TP on a ("dp", "tp") mesh, or HSDP over TP on ("replicate", "shard", "tp"), at ``world`` ranks:

    - the expectation, from the whole model's shapes: each mesh coordinate (d, t) holds, of each layer, part t of
      its TP split (:func:`tp_split_dim`, ``torch.chunk``), then part d of that along dim 0 (FSDP2's cut);
    - as sampled ranks (every TP coordinate, the last rank, edges, a random one), through ``parallelize_module``
      + ``fully_shard`` + AdamHD: each local tensor holds exactly the expected elements (values name them), the
      plan reduces over the flattened (dp, tp) sub-mesh (HSDP: (shard, tp) of the rank's replica), every layer's
      numel is the whole layer's, and the library counts a TP-replicated layer at TP coordinate 0 only;
    - over every coordinate of the statistic's group, with the library's weights: every element of every layer
      counted exactly once (HSDP: R times over the world), and the partial sums (``layer_abs_sums``) add up to
      each whole layer's Σ|θ|;
    - one optimizer step as ranks 0, a rank with TP coordinate ≠ 0, and the last: ONE all-reduce, carrying
      this rank's weighted partial sums of exactly the decayed layers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    t0 = time.perf_counter()
    shape = (replicas, world // replicas // tp, tp) if hsdp else (world // tp, tp)
    dim_names = ("replicate", "shard", "tp") if hsdp else ("dp", "tp")
    dp = shape[-2]
    problems = []
    facts = {"world": world, "mesh": dict(zip(dim_names, shape))}

    def make_model():
        torch.manual_seed(0)
        model = TPGPT()
        encode_(model)
        return model

    probe = make_model()
    full = {n: p.detach().clone() for n, p in probe.named_parameters()}
    names = list(full)
    layer_id = {n: i for i, n in enumerate(names)}
    numels = {n: t.numel() for n, t in full.items()}
    decayed = {n for n, p in full.items() if p.ndim >= 2 or any(fnmatch.fnmatch(n, pat) for pat in TP_DECAY)}
    mesh_ranks = torch.arange(world).view(shape)  # init_device_mesh's rank layout (row-major)
    coord = {int(mesh_ranks[idx]): tuple(idx) for idx in itertools.product(*[range(s) for s in shape])}

    def group_of(r):  # the statistic's group: every rank of r's replica (all ranks without HSDP)
        return sorted(int(x) for x in (mesh_ranks[coord[r][0]] if hsdp else mesh_ranks).reshape(-1))

    # the expectation: (d, t) -> {layer: indices in the whole layer, in local order}
    expected = {(d, t): {} for d in range(dp) for t in range(tp)}
    for n, w in full.items():
        whole, k = torch.arange(w.numel()).view(w.shape), tp_split_dim(n)
        for t in range(tp):
            part = _chunk(whole, tp, t, k) if k is not None else whole
            for d in range(dp):
                expected[d, t][n] = _chunk(part, dp, d, 0).reshape(-1)

    def counted(n, t):  # the independent rule: a TP-replicated layer counts at TP coordinate 0 only
        return 1.0 if tp_split_dim(n) is not None or t == 0 else 0.0

    def construct(rank, step=False):
        model = make_model()
        with fake_world(world, rank):
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=dim_names)
            root, block = _tp_plans()
            # src_data_rank=None: each rank cuts its own copy (the default scatters from rank 0, which a fake
            # collective leaves unfilled)
            parallelize_module(model, mesh["tp"], root, src_data_rank=None)
            for b in model.h:
                parallelize_module(b, mesh["tp"], block, src_data_rank=None)
            dp_mesh = mesh["replicate", "shard"] if hsdp else mesh["dp"]
            for b in model.h:
                fully_shard(b, mesh=dp_mesh)
            fully_shard(model, mesh=dp_mesh)
            opt = adamhd_dist.AdamHD(adamhd_dist.param_groups(model, 0.1, decay=TP_DECAY), lr=1e-3)
            stats = opt.layer_stats
            plan = stats.plan()
            got = {"dims": plan.dims, "group": sorted(dist.get_process_group_ranks(plan.group)),
                   "coordinate": tuple(mesh.get_coordinate()), "weight": {}, "numel": {}, "local": {},
                   "placements": {}}
            params = dict(model.named_parameters())
            for n, p in params.items():
                got["weight"][n] = stats._weight(p, plan.dims)
                got["numel"][n] = stats.layer_numel(p)
                got["local"][n] = _decoded(p.to_local(), layer_id[n])
                got["placements"][n] = str(p.placements)
            if step:
                t = coord[rank][-1]
                with torch.no_grad():
                    want = {n: counted(n, t) * float(p.to_local().abs().sum(dtype=torch.float64))
                            for n, p in params.items()}
                for p in params.values():
                    p.grad = torch.zeros_like(p)
                got["step"] = _fsdp_step(model, opt, want, decayed)
        return got

    # sampled ranks: every TP coordinate at the first data-parallel coordinate, then the last rank, the last
    # data-parallel coordinate holding a norm element and the first holding none, and a random rank
    first = [int(mesh_ranks[(0,) * (len(shape) - 1) + (t,)]) for t in range(tp)]
    last_norm = min(TP_DIM, dp) - 1
    edges = [int(mesh_ranks[(shape[0] - 1,) * hsdp + (last_norm, 1)]),
             int(mesh_ranks[(shape[0] - 1,) * hsdp + (min(last_norm + 1, dp - 1), 2)])]
    ranks = sorted(set(first + edges + [world - 1, random.Random(world + hsdp).randrange(world)]))
    step_ranks = {0, first[tp // 2 + 1], world - 1}
    want_dims = tuple(range(len(shape) - 2, len(shape)))
    weights_at_t = {}
    steps = {}
    for r in ranks:
        got = construct(r, step=r in step_ranks)
        where = f"rank {r} {coord[r]}"
        d, t = coord[r][-2:]
        if got["coordinate"] != coord[r]:
            problems.append(f"{where}: the mesh puts it at {got['coordinate']}")
        if got["dims"] != want_dims or got["group"] != group_of(r):
            problems.append(f"{where}: the plan reduces over mesh dims {got['dims']} = {len(got['group'])} ranks "
                            f"{got['group'][:3]}..., want dims {want_dims} = {len(group_of(r))} ranks")
        for n in names:
            local, want = got["local"][n], expected[d, t][n]
            if isinstance(local, str) or not torch.equal(local, want):
                problems.append(f"{where}: {n} ({got['placements'][n]}) local tensor "
                                f"{local if isinstance(local, str) else local[:4].tolist()}..., the plan puts "
                                f"{want[:4].tolist()}... ({want.numel()} elements) there")
            if got["numel"][n] != numels[n]:
                problems.append(f"{where}: {n} layer numel {got['numel'][n]}, the whole layer has {numels[n]}")
            if got["weight"][n] != counted(n, t):
                problems.append(f"{where}: {n} counted with weight {got['weight'][n]}, want {counted(n, t)}")
        if t in weights_at_t and weights_at_t[t] != got["weight"]:
            problems.append(f"{where}: weights differ from another rank of TP coordinate {t}")
        weights_at_t.setdefault(t, got["weight"])
        if "step" in got:
            steps[r] = got["step"]
            problems += [f"{where} step: {p}" for p in got["step"]["problems"]]
        if r == 0:
            facts["placements"] = {n: got["placements"][n] for n in ("wte.weight", "h.0.proj.weight",
                                                                     "h.0.ln_1.weight")}
    # the group's coordinates, each with the library's weights for its TP coordinate (the sampled ranks showed
    # them the same at every data-parallel coordinate); HSDP: one replica's (every replica holds the same)
    group = [(t, held) for (d, t), held in expected.items()]
    problems += _tp_coverage(full, group, weights_at_t)
    facts.update(ranks=ranks, group=len(group_of(0)), steps=sorted(steps),
                 comm=[steps[r]["comm"] for r in sorted(steps)],
                 uneven_tp_layers=sum(1 for n, w in full.items() if tp_split_dim(n) is not None
                                      and w.shape[tp_split_dim(n)] % tp),
                 empty_local_shards=sum(1 for key in expected for n in names if expected[key][n].numel() == 0),
                 replicated_decayed=sorted(n for n in decayed if tp_split_dim(n) is None)[:3],
                 seconds=round(time.perf_counter() - t0, 2))
    negative = {"TP replicas counted on every tensor-parallel rank":
                _tp_coverage(full, group, {t: {n: 1.0 for n in names} for t in range(tp)}),
                "reduced over the data-parallel dimension only (TP slices of other ranks missing)":
                _tp_coverage(full, [(t, held) for t, held in group if t == 0], weights_at_t)}
    if hsdp:
        negative["HSDP statistic summed over the whole world (replicas counted R times)"] = \
            _tp_coverage(full, group * replicas, weights_at_t)
    return {"problems": problems[:4 * MAX_PROBLEMS], "facts": facts, "negative": negative}


def _tp_coverage(full, group, weights_at_t) -> list[str]:
    """Over the statistic's group (``[(TP coordinate, {layer: indices held})]``, one entry per rank), each
    element of each layer counted with the library's weight for its TP coordinate: exactly once, and the weighted
    partial sums (``layer_abs_sums``, as AdamHD computes them) equal each whole layer's Σ|θ|."""
    names = list(full)
    count = {n: torch.zeros(w.numel(), dtype=torch.float64) for n, w in full.items()}
    total = torch.zeros(len(names), dtype=torch.float64)
    for t, held in group:
        w = [float(weights_at_t[t][n]) for n in names]
        for n, wn in zip(names, w):
            if wn:
                count[n].index_add_(0, held[n], torch.full((held[n].numel(),), wn, dtype=torch.float64))
        total += torch.tensor(w, dtype=torch.float64) * \
            layer_abs_sums([full[n].reshape(-1)[held[n]] for n in names]).to(torch.float64)
    out = []
    for n in names:
        c = count[n]
        if not bool((c == 1).all()):
            bad = (c != 1).nonzero().flatten()
            out.append(f"{n}: {bad.numel()} of {c.numel()} elements counted {sorted(set(c[bad].tolist()))[:3]} "
                       f"times over the group (e.g. element {int(bad[0])})")
    want = torch.tensor([float(full[n].abs().sum(dtype=torch.float64)) for n in names], dtype=torch.float64)
    bad = ((total - want).abs() > STAT_RTOL * want).nonzero().flatten().tolist()
    out += [f"{names[i]}: Σ over the group of partial Σ|θ| = {float(total[i])!r}, whole layer {float(want[i])!r}"
            for i in bad]
    return out[:MAX_PROBLEMS]


AUTOTP_VOCAB, AUTOTP_FFN = 1031, 196  # both split unevenly over 8 TP ranks (129 x 7 + 128; 25 x 4 + 24 x 4)
# what AutoTP splits in a LLaMA (the expectation): the attention and MLP projections and the vocabulary-parallel
# head; the embedding (not tied) and the RMS norms stay whole on every TP rank
AUTOTP_SLICED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def autotp_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=AUTOTP_VOCAB, hidden_size=64, intermediate_size=AUTOTP_FFN, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).float()
    encode_(model)
    return model


def autotp_config(tp: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamHD", "params": {"lr": 1e-3, "weight_decay": 0.1}},
            "zero_optimization": {"stage": 1},
            "tensor_parallel": {"autotp_size": tp, "vocab_parallel_lm_head": True}, "steps_per_print": 10 ** 9}


def autotp_case(world: int = 1024, tp: int = 8) -> dict:
    """DeepSpeed AutoTP (tp 8) with ZeRO-1 over the data-parallel ranks (dp 128), at ``world`` ranks, through
    ``adamhd_dist.deepspeed.initialize`` run as one rank per TP coordinate (and a second rank per coordinate):

    - every dp rank's layout at that TP coordinate is the library's (``_layout_stage12`` on DeepSpeed's W/tp
      partition views, as ``attach`` calls it; the attached one at the constructed rank); the values in the
      engine's buffers name the elements of the whole layer each fragment holds;
    - the one collective's weights and scale are the library's own (``_tp_reduce`` run at each TP coordinate, the
      all-reduce of the slices' numels over the TP group made to return their sum over the 8 coordinates; the
      weights read as what it hands the collective);
    - over all tp × dp ranks, every element of every layer (whole model, unsharded shapes) counted exactly once,
      TP-replicated layers from TP rank 0 only; and every layer's mean |θ| from the emulated all-reduce of the
      library's partial sums (``FlatLayout.local_sums`` on the engine's buffers) divided by the library's numel
      is the whole layer's, at every TP coordinate."""
    import deepspeed.utils.groups as groups
    import adamhd_dist.integrations.deepspeed as ds_integration

    t0 = time.perf_counter()
    dp = world // tp
    probe = autotp_model()
    full = {n: p.detach().clone() for n, p in probe.named_parameters()}
    names = list(full)
    layer_id = {n: i for i, n in enumerate(names)}
    problems, facts = [], {"world": world, "tp": tp, "dp": dp}
    mean_want = {n: float(w.abs().sum(dtype=torch.float64)) / w.numel() for n, w in full.items()}

    def build(rank):
        eng, *_ = ads.initialize(model=autotp_model(), config=autotp_config(tp))
        zopt = eng.optimizer
        tpg, dpg = groups.get_tensor_model_parallel_group(), zopt.dp_process_group
        where = (dist.get_rank(group=dpg), dist.get_rank(group=tpg))
        lnames = {id(p): n for n, p in eng.module.named_parameters()}
        view = ds_compat.stage12_view(zopt, ds_compat.zero_kind(zopt))
        layer_params = [p for lps in view.lp_groups for p in lps]
        return eng, zopt, tpg, dpg, where, lnames, view, layer_params

    def tp_reduce(layer_params, dpg, tpg, numel_sum=None):
        """The library's reduce at this rank; the slices' numels all-reduced over TP: recorded, and (given
        ``numel_sum``) returned as the real all-reduce would (the fake one returns its input)."""
        seen = []

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            seen.append(tensor.clone())
            if numel_sum is not None:
                tensor.copy_(numel_sum)
        with mock.patch.object(dist, "all_reduce", all_reduce):
            reduce = ads._tp_reduce(layer_params, dpg, tpg)
        return reduce, seen

    def sent_and_result(reduce, sums, reduced=None):
        """(what ``reduce`` hands its all-reduce, what it returns when the all-reduce gives ``reduced``)."""
        box = []

        def all_reduce_sums(t, group, device_type):
            box.append(t.clone())
            return t.clone() if reduced is None else reduced.clone()
        with mock.patch.object(ds_integration, "all_reduce_sums", all_reduce_sums):
            out = reduce(sums)
        return box[0], out

    # pass 1, one rank per TP coordinate (at data-parallel coordinates 0, dp-1, and between): the library's
    # layout of every dp rank, what each fragment holds, its partial sums; the slices' numels as TP reduces them
    first = {t: ((0, dp - 1, dp // 2, 1)[t % 4] * tp + t) for t in range(tp)}
    per_t = {}
    for t, rank in first.items():
        with fake_world(world, rank), no_gc_collect():
            eng, zopt, tpg, dpg, where, lnames, view, layer_params = build(rank)
            if where != (rank // tp, t) or dist.get_world_size(group=dpg) != dp:
                problems.append(f"rank {rank}: DeepSpeed puts it at (dp, tp) = {where} of {dp} dp ranks, "
                                f"want ({rank // tp}, {t})")
            sliced = {lnames[id(p)]: ds_compat.is_tp_sliced(p) for p in layer_params}
            wrong = [n for n, s in sliced.items() if s != any(k in n for k in AUTOTP_SLICED)]
            if wrong:
                problems.append(f"TP coordinate {t}: AutoTP sliced {wrong[:3]} otherwise than expected")
            lay = eng._adamhd_optimizer.layer_stats.layout
            held, sums, table = {}, {}, None
            for d in range(dp):
                parts = [zopt.parallel_partitioned_bit16_groups[g][d] for g in range(len(view.partitions))]
                lnames_d, numels_d, groups_d, frags, shapes_d, _ = ads._layout_stage12(
                    dataclasses.replace(view, partitions=parts), lnames, d)
                table = table or (lnames_d, numels_d)
                if (lnames_d, numels_d) != table:
                    problems.append(f"TP coordinate {t}, dp rank {d}: another layer table")
                if d == rank // tp and lay.cuts() != {i: [(lnames_d[f.layer], f.start, f.numel, f.offset)
                                                          for f in frags[flat]] for i, flat in enumerate(frags)}:
                    problems.append(f"rank {rank}: the attached layout is not _layout_stage12's for its dp rank")
                sums[d] = FlatLayout(lnames_d, numels_d, groups_d, frags, None).local_sums()
                held[d] = defaultdict(list)
                for flat, fs in frags.items():
                    for f in fs:
                        n = lnames_d[f.layer]
                        idx = _decoded(flat[f.start:f.start + f.numel], layer_id[n])
                        if isinstance(idx, str):
                            problems.append(f"TP {t}, dp {d}: the fragment of {n} {idx}")
                            continue
                        held[d][n].append(idx)
            reduce, seen = tp_reduce(layer_params, dpg, tpg)
            per_t[t] = {"held": held, "sums": sums, "names": table[0], "numels": table[1], "numel_in": seen[0],
                        "sliced": sliced, "rank": rank}
            if rank == 0:
                facts["local_numels_tp0"] = dict(zip(table[0], table[1]))
        if len(seen) != 1:
            problems.append(f"TP coordinate {t}: _tp_reduce all-reduced {len(seen)} tensors at set-up, want 1")
    lib_names = per_t[0]["names"]
    if sorted(lib_names) != sorted(names) or any(per_t[t]["names"] != lib_names for t in per_t):
        problems.append("the layer table does not hold every parameter once, in one order on every TP rank")
    numel_sum = sum(per_t[t]["numel_in"] for t in per_t)  # what the real all-reduce over TP returns

    # pass 2, another rank per TP coordinate: its attached layout is the one pass 1 predicted for its dp rank;
    # the library's reduce with the real numel sum: its weights (what it sends) and, later, its scale
    second = {t: (first[t] + (dp // 4 + 3) * tp) % world for t in range(tp)}
    reduces = {}
    for t, rank in second.items():
        with fake_world(world, rank), no_gc_collect():
            eng, zopt, tpg, dpg, where, lnames, view, layer_params = build(rank)
            lay = eng._adamhd_optimizer.layer_stats.layout
            d = where[0]
            got = defaultdict(list)
            for flat, fs in lay.fragments.items():
                for f in fs:
                    got[lay.names[f.layer]].append(_decoded(flat[f.start:f.start + f.numel],
                                                            layer_id[lay.names[f.layer]]))
            pred = per_t[t]["held"][d]
            if where[1] != t or sorted(got) != sorted(pred) or any(
                    not torch.equal(torch.cat(got[n]), torch.cat(pred[n])) for n in pred):
                problems.append(f"rank {rank} (dp {d}, tp {where[1]}): its fragments hold other elements than "
                                f"the layout computed at rank {per_t[t]['rank']} for dp rank {d}")
            reduces[t], _ = tp_reduce(layer_params, dpg, tpg, numel_sum)
    weights = {t: sent_and_result(reduces[t], torch.ones(len(lib_names), dtype=torch.float64))[0]
               for t in per_t}

    # over all tp × dp ranks: every element counted once, with the library's weights
    count = {n: torch.zeros(w.numel(), dtype=torch.float64) for n, w in full.items()}
    held_raw = {n: 0 for n in names}
    total = torch.zeros(len(lib_names), dtype=torch.float64)
    for t in per_t:
        w = dict(zip(lib_names, weights[t].tolist()))
        for d in range(dp):
            for n, pieces in per_t[t]["held"][d].items():
                idx = torch.cat(pieces)
                held_raw[n] += idx.numel()
                count[n].index_add_(0, idx, torch.full((idx.numel(),), w[n], dtype=torch.float64))
            total += sent_and_result(reduces[t], per_t[t]["sums"][d])[0]  # what this rank adds to the sum
    for n in names:
        if not bool((count[n] == 1).all()):
            bad = (count[n] != 1).nonzero().flatten()
            problems.append(f"{n}: {bad.numel()} of {full[n].numel()} elements counted "
                            f"{sorted(set(count[n][bad].tolist()))[:3]} times over tp x dp")
    # every TP coordinate's δ statistic: the reduced sum, scaled by the library, over the library's numel
    for t in per_t:
        _, out = sent_and_result(reduces[t], per_t[t]["sums"][0], reduced=total)
        for i, n in enumerate(lib_names):
            mean = float(out[i]) / per_t[t]["numels"][i]
            if abs(mean - mean_want[n]) > STAT_RTOL * mean_want[n]:
                problems.append(f"TP coordinate {t}: {n} mean |θ| {mean!r}, whole layer {mean_want[n]!r}")
    uneven = sorted({n.split(".")[-2] for n in names if per_t[0]["sliced"][n] and
                     len({per_t[t]["numels"][lib_names.index(n)] for t in per_t}) > 1})
    replicated = [n for n in names if not per_t[0]["sliced"][n]]
    facts.update(ranks=sorted(set(first.values()) | set(second.values())), layers=len(names),
                 sliced=sum(per_t[0]["sliced"].values()), uneven=uneven,
                 replicated_held=sorted({held_raw[n] // full[n].numel() for n in replicated}),
                 sliced_held=sorted({held_raw[n] // full[n].numel() for n in names if n not in replicated}),
                 seconds=round(time.perf_counter() - t0, 2))
    # negative controls: every TP copy counted (no rank-0 rule); the slice's numel taken as the layer's
    ones = {t: {n: 1.0 for n in names} for t in per_t}
    group = [(t, {n: torch.cat(p) for n, p in per_t[t]["held"][d].items()}) for t in per_t for d in range(dp)]
    for _, held in group:
        for n in names:
            held.setdefault(n, torch.zeros(0, dtype=torch.long))
    negative = {"TP replicas counted on every tensor-parallel rank": _tp_coverage(full, group, ones)}
    naive = []
    for i, n in enumerate(lib_names):
        mean = float(total[i]) / per_t[0]["numels"][i]  # no local/whole scale
        if abs(mean - mean_want[n]) > STAT_RTOL * mean_want[n]:
            naive.append(f"{n}: mean |θ| {mean!r} over the slice's numel, whole layer {mean_want[n]!r}")
    negative["AutoTP slice's numel taken as the layer's"] = naive[:MAX_PROBLEMS]
    return {"problems": problems[:4 * MAX_PROBLEMS], "facts": facts, "negative": negative}


def _counting(fn, counts, recording):
    """``fn`` counting, per call, DTensor's collective ops into ``counts`` and every ``dist.all_reduce`` through
    ``recording``."""
    from torch.distributed.tensor.debug import CommDebugMode

    def wrapper(*args, **kwargs):
        with CommDebugMode() as comm, mock.patch.object(dist, "all_reduce", recording):
            out = fn(*args, **kwargs)
        for k, v in comm.get_comm_counts().items():
            counts[str(k)] += v
        return out
    return wrapper


def autotp_step(world: int, rank: int, tp: int = 8, steps: int = 2) -> dict:
    """Two training steps of the AutoTP model as rank ``rank`` of ``world``: AdamHD's collectives per step."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, AUTOTP_VOCAB, (1, 8), generator=g)
    per_step, groups_seen = [], []
    with fake_world(world, rank), no_gc_collect():
        eng, *_ = ads.initialize(model=autotp_model(), config=autotp_config(tp))
        # DeepSpeed checks at the first forward that the TP ranks got the same batch (a broadcast of the inputs
        # from TP rank 0, compared): a fake broadcast carries nothing, so that check is removed (the engine's handle)
        eng.first_dataloader_check.remove()
        opt = eng._adamhd_optimizer
        counts = defaultdict(int)
        real_all_reduce = dist.all_reduce

        def recording(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            groups_seen.append(dist.get_world_size(group))
            return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

        for h in ("begin_step", "step"):
            setattr(opt, h, _counting(getattr(opt, h), counts, recording))
        for _ in range(steps):
            counts.clear()
            # a loss on this rank's logits: DeepSpeed's vocabulary-parallel cross-entropy first all-gathers every TP
            # rank's vocabulary bounds and checks that they tile the vocabulary, which a fake all-gather leaves
            # unfilled (what AdamHD does in the step does not depend on the loss)
            eng.backward(eng(input_ids=x).logits.float().square().mean())
            eng.step()
            per_step.append(dict(counts))
        state_steps = sorted({float(st["step"]) for st in opt.state.values() if "step" in st})
        deltas = torch.tensor(list(adamhd_dist.layer_deltas(opt).values()))
    return {"per_step": per_step, "groups": groups_seen, "want_group": world, "state_steps": state_steps,
            "deltas": deltas.numel(), "delta_finite": bool(torch.isfinite(deltas).all())}


# ---------------------------------------------------------------------------------------------------------------
# each rank steps through its engine: one collective per step
def step_case(engine: str, world: int, rank: int, steps: int = 2) -> dict:
    """Train the adversarial model ``steps`` steps as rank ``rank`` of ``world`` through the engine; count the
    collectives AdamHD issues per training step (the engine's own gradient and parameter collectives are not
    counted) and where the statistic is reduced."""
    torch.manual_seed(0)
    model = Adversarial()
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, Adversarial.VOCAB, (1, 5), generator=g) for _ in range(2))
    per_step, groups = [], []
    with fake_world(world, rank), no_gc_collect(), \
            (zero3_fake_world_checks_off() if engine == "zero3" else contextlib.nullcontext()):
        if engine.startswith("zero"):
            stage = int(engine[-1])
            per_rank = -(-sum(p.numel() for p in model.parameters() if p.requires_grad) // world)
            eng, *_ = ads.initialize(model=model, config=ds_config(stage, max(1, per_rank // 4)))
            opt = eng._adamhd_optimizer
            hooks = ["begin_step", "step"]
            run = lambda: (eng.backward(eng(x, y)), eng.step())  # noqa: E731
            sub_groups = len(_zopt_flats(eng.optimizer, stage))
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            hsdp = engine == "hsdp"
            mesh = init_device_mesh("cpu", _mesh_shape(world, hsdp),
                                    mesh_dim_names=("replicate", "shard") if hsdp else ("shard",))
            fully_shard(model.wide, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = adamhd_dist.AdamHD(adamhd_dist.param_groups(model, 0.1), lr=1e-3)
            hooks = ["step"]
            sub_groups = None

            def run():
                model(x, y).backward()
                opt.step()
                opt.zero_grad()
        counts = defaultdict(int)
        real_all_reduce = dist.all_reduce

        def recording(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            groups.append(dist.get_world_size(group))
            return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

        for h in hooks:
            setattr(opt, h, _counting(getattr(opt, h), counts, recording))
        for _ in range(steps):
            counts.clear()
            run()
            per_step.append(dict(counts))
        state_steps = sorted({float(st["step"]) for st in opt.state.values() if "step" in st})
        # δ of every decayed layer (0 where this rank holds nothing: a fake all-reduce moves no data)
        deltas = torch.tensor(list(adamhd_dist.layer_deltas(opt).values()))
    want_group = world if engine != "hsdp" else _mesh_shape(world, True)[1]
    return {"per_step": per_step, "groups": groups, "want_group": want_group, "state_steps": state_steps,
            "sub_groups": sub_groups, "deltas": deltas.numel(), "delta_finite": bool(torch.isfinite(deltas).all())}


# ---------------------------------------------------------------------------------------------------------------
WORLDS = (8, 64, 1024)
EXTRA_WORLDS = (4096,)  # cheap there: the adversarial model's layouts and the steps
GPT3 = ("gpt3-small", "gpt3-xl")
STEP_ENGINES = ("zero1", "zero2", "zero3", "fsdp", "hsdp")


def run(parts: int = 2) -> dict:
    """This process's share of every case, one after another (the cases are split over ``parts`` processes by
    RANK: 0 takes the DeepSpeed layouts and AutoTP, 1 the FSDP2/HSDP layouts, FSDP2/HSDP over TP and the
    steps). Returns {"deepspeed": {key: result}, "fsdp": {...}, "tp": {...}, "steps": {...},
    "seconds": {part: seconds}}."""
    part = int(os.environ.get("RANK", "0")) if parts > 1 else None
    t0 = time.perf_counter()
    out = {"deepspeed": {}, "fsdp": {}, "tp": {}, "steps": {}}
    if part in (None, 0):
        out["tp"]["autotp-W1024"] = autotp_case(1024)
        for rank in (0, 1023):
            out["steps"][f"autotp-W1024-r{rank}"] = autotp_step(1024, rank)
    if part in (None, 1):
        for hsdp in (False, True):
            out["tp"][f"{'hsdp' if hsdp else 'fsdp'}-tp-W1024"] = tp_case(hsdp, 1024)
    for world in WORLDS + EXTRA_WORLDS:
        models = ("adversarial",) + (GPT3 if world in WORLDS else ())
        if part in (None, 0):
            for model in models:
                for stage in (1, 2, 3):
                    out["deepspeed"][f"{model}-zero{stage}-W{world}"] = deepspeed_case(model, stage, world)
        if part in (None, 1):
            for model in models:
                for hsdp in (False, True):
                    out["fsdp"][f"{model}-{'hsdp' if hsdp else 'fsdp'}-W{world}"] = fsdp_case(model, world, hsdp)
            for engine in STEP_ENGINES:
                for rank in (0, world - 1):
                    t = time.perf_counter()
                    key = f"{engine}-W{world}-r{rank}"
                    out["steps"][key] = step_case(engine, world, rank)
                    out["steps"][key]["seconds"] = round(time.perf_counter() - t, 2)
    out["seconds"] = {part: round(time.perf_counter() - t0, 1)}
    out["cpu_seconds"] = {part: round(time.process_time(), 1)}
    return out
