"""Exact at any world size: every rank's layout at W = 8, 64, 1,024 (and 4,096 for the small model), and a step as
sampled ranks of each W with exactly one collective, without starting W processes.

One process plays rank r of W through torch's fake process group, for many (W, r) in turn; the per-rank code is in
tests/scale_workers.py (its docstring says what stands in for a real multi-process run and why). The cases are
split over two such processes (DeepSpeed layouts; FSDP2 layouts and the steps), run side by side.

Layouts, per W, for ZeRO-1 (with per-parameter alignment padding), ZeRO-2 (with round-robin reordering), ZeRO-3
(several sub-groups per param group), FSDP2 (1-D mesh) and HSDP ((R, W/R) mesh), on gpt3-small and gpt3-xl (built on
the meta device: DeepSpeed and FSDP2 lay them out without allocating) and on an adversarial model with real values
(tensors of 1 and 3 elements, sizes prime to W, 1,024 elements, a tied embedding, a frozen layer, more matrices
than 8 ranks):

- every rank: the library's layout (``_layout_stage12`` / ``_layout_stage3`` exactly as ``attach`` calls
  them) equals where the engine put each element: ZeRO-1/2 the storage offsets of DeepSpeed's parameter views in its
  flat buffers and of its W partition views (and, for the adversarial model, the values in those buffers); ZeRO-3
  DeepSpeed's ``grad_position`` and its checkpoint merge (``zero3_partitioned_param_info``); FSDP2/HSDP torch's
  ``_compute_local_shape_and_global_offset`` at each mesh coordinate;
- over all ranks (for HSDP: over the statistic's group, and R times over the world): every layer's elements
  exactly once; the layer table holds every trainable parameter with its true numel (GPT-3: the preset's count);
- the statistic: the per-rank partial sums the library computes (``FlatLayout.local_sums``, ``layer_abs_sums``),
  on buffers holding known values where the engine put each element and NaN everywhere else (padding), summed over
  the ranks the library reduces over, equal each whole layer's Σ|θ| (rtol 1e-9) — where the padded model has at
  most 2e8 elements (gpt3-small, adversarial; gpt3-xl is checked for coverage only);
- sampled ranks, through the real entry points run as that rank (``adamhd_dist.deepspeed.initialize``;
  ``fully_shard`` + ``AdamHD``): the same fragments and the same layer table as rank 0 (the reduced vector lines
  up), the engine's own per-rank records (DeepSpeed's hp mapping where it is a reference — see
  ``scale_workers.deepspeed_case``), the adversarial model's values in the engine's fp32 partitions, the
  reduction group (all W ranks; HSDP: the rank's shard group), layer numel = whole layer, and for FSDP2 where a
  rank's shards are small enough to allocate, one real step whose partial sums handed to the collective are those
  of the elements the rank holds.

Ranks sampled: every rank at W = 8; otherwise 0, 1 and W−1, the edges (ZeRO: for the flat tensor the fewest ranks
hold anything of, the last rank holding some and the first holding only padding there, and the first and last rank
holding part of the most-cut layer; FSDP2: the last rank with every shard non-empty, the first with an empty one, and
the last holding anything) and one or two seeded random ranks. Every rank's layout is still computed and checked from
the engine's bookkeeping; the sampling bounds only the full constructions.

Steps: each engine trains the adversarial model 2 steps as ranks 0 and W−1 of each W; AdamHD issues exactly one
collective per training step (an all_reduce over W ranks; HSDP: over the shard group), whatever W and however many
ZeRO-3 sub-groups; its state advances and every δ is finite.

Tensor parallelism, at W = 1,024 (``scale_workers.tp_case`` / ``autotp_case``): FSDP2 over TP on a (dp 128, tp 8)
mesh and HSDP over TP on (replicate 4, shard 32, tp 8), a GPT-shaped stack through ``parallelize_module``
(vocabulary-parallel embedding and head, column-wise q/k/v/fc, row-wise proj/fc2, sequence-parallel norms) and
``fully_shard``; and DeepSpeed AutoTP (tp 8) with ZeRO-1 (dp 128) on a LLaMA built from its config. Vocabulary
1,031 and FFN 196 split unevenly over 8. Sampled ranks (every TP coordinate, edges, the last) hold exactly the
elements the plan puts at their coordinate (values name them); over every coordinate of the statistic's group,
with the library's own weights, every element of every layer (from the whole model's shapes) counts exactly once,
TP-replicated layers from TP coordinate 0 only; the partial sums add up to each whole layer's Σ|θ| (AutoTP: the
library's scale and numel give each layer's mean |θ| at every TP rank); one all-reduce per step (FSDP2/HSDP x TP
as ranks 0, 5 and 1,023; AutoTP: two training steps as ranks 0 and 1,023).

Negative controls: the same checks on layouts that are wrong on purpose (a fragment read one element late, into the
padding; an offset shifted by one; no reduction; a per-shard numel; HSDP summed over replicas; TP replicas counted
on every TP rank; a reduction over the data-parallel dimension only; AutoTP's slice numel taken as the layer's) must
report problems.

Run time: each process takes about 35-40 s of CPU (imports included) and about 1.5 GB at its peak; side by side
on two free cores the fixture takes under a minute. The tensor-parallel cases add about 18 s of CPU, split over the
two processes (measured alone: FSDP2 x TP 6.5 s, HSDP x TP 5.6 s, AutoTP 5.7 s and its steps 0.8 s, plus importing
transformers).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from dist_utils import run_ranks

WORLDS = (8, 64, 1024)
SMALL_ONLY = (4096,)
MODELS = ("adversarial", "gpt3-small", "gpt3-xl")
DS_CASES = [f"{m}-zero{s}-W{w}" for w in WORLDS for m in MODELS for s in (1, 2, 3)] + \
    [f"adversarial-zero{s}-W{w}" for w in SMALL_ONLY for s in (1, 2, 3)]
FSDP_CASES = [f"{m}-{k}-W{w}" for w in WORLDS for m in MODELS for k in ("fsdp", "hsdp")] + \
    [f"adversarial-{k}-W{w}" for w in SMALL_ONLY for k in ("fsdp", "hsdp")]
STEP_CASES = [f"{e}-W{w}-r{r}" for w in WORLDS + SMALL_ONLY for e in ("zero1", "zero2", "zero3", "fsdp", "hsdp")
              for r in (0, w - 1)] + ["autotp-W1024-r0", "autotp-W1024-r1023"]
TP_CASES = ["fsdp-tp-W1024", "hsdp-tp-W1024", "autotp-W1024"]
HSDP_REPLICAS = {8: 2, 64: 4, 1024: 8, 4096: 16}


@pytest.fixture(scope="module")
def scale():
    parts = run_ranks("scale_workers:run", 2, timeout=420, env={"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""})
    out = {"deepspeed": {}, "fsdp": {}, "tp": {}, "steps": {}, "seconds": {}}
    for part in parts:
        for key in out:
            out[key].update(part[key])
    return out


def test_every_case_ran(scale):
    assert sorted(scale["deepspeed"]) == sorted(DS_CASES)
    assert sorted(scale["fsdp"]) == sorted(FSDP_CASES)
    assert sorted(scale["steps"]) == sorted(STEP_CASES)
    assert sorted(scale["tp"]) == sorted(TP_CASES)


@pytest.mark.parametrize("case", DS_CASES)
def test_deepspeed_layout_exact_at_scale(scale, case):
    res = scale["deepspeed"][case]
    assert res["problems"] == [], f"{case}:\n" + "\n".join(res["problems"])
    facts = res["facts"]
    world = facts["world"]
    assert 0 in facts["ranks"] and world - 1 in facts["ranks"] and (world > 8 or len(facts["ranks"]) == world)
    assert facts["statistic"] == (facts["model"] != "gpt3-xl")
    if facts["stage"] == 3:
        assert facts["sub_groups"] >= 3, "ZeRO-3 should run with several sub-groups"


def test_deepspeed_adversarial_situations_occur(scale):
    """The situations the layouts are meant to survive did occur (else the checks above proved little)."""
    ds = scale["deepspeed"]
    f = ds["adversarial-zero1-W1024"]["facts"]
    assert f["ranks_holding_nothing"] > 0 and f["empty_flat_slots"] > 0  # ranks with only padding
    assert f["layers_smaller_than_world"] >= 5
    f = ds["adversarial-zero3-W1024"]["facts"]
    assert f["ranks_missing_some_layer"] >= 1000  # a 3-element tensor over 1,024 ranks: 1,021 hold only padding
    assert ds["gpt3-xl-zero1-W1024"]["facts"]["max_ranks_per_layer"] >= 50  # the embedding cut across many ranks
    assert ds["gpt3-small-zero3-W1024"]["facts"]["layers_smaller_than_world"] > 0  # 768-element vectors
    # DeepSpeed's round-robin reordering changed the order (its hp mapping, computed unreordered, then disagrees)
    assert ds["adversarial-zero2-W8"]["facts"]["hp_mapping_unreliable_disagrees"] > 0


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp2_layout_exact_at_scale(scale, case):
    res = scale["fsdp"][case]
    assert res["problems"] == [], f"{case}:\n" + "\n".join(res["problems"])
    facts = res["facts"]
    world = facts["world"]
    group = world // HSDP_REPLICAS[world] if "hsdp" in case else world
    assert 0 in facts["ranks"] and world - 1 in facts["ranks"]
    if facts["model"] != "gpt3-xl":
        assert facts["statistic_ranks"] == group
    if facts["steps"]:
        assert facts["comm"] == [{"c10d.allreduce_": 1}] * len(facts["steps"])


def test_fsdp2_adversarial_situations_occur(scale):
    f = scale["fsdp"]["adversarial-fsdp-W1024"]["facts"]
    assert f["ranks_with_empty_shards"] >= 1000 and f["layers_smaller_than_shard_group"] >= 5
    assert len(f["steps"]) == 3  # a step as rank 0, the last rank holding anything, and an all-empty rank
    f = scale["fsdp"]["gpt3-small-fsdp-W1024"]["facts"]
    assert f["ranks_with_empty_shards"] > 0 and f["steps"]


@pytest.mark.parametrize("case", ["fsdp-tp-W1024", "hsdp-tp-W1024"])
def test_fsdp2_over_tensor_parallel_exact_at_1024_ranks(scale, case):
    """FSDP2 x TP on a (dp 128, tp 8) mesh and HSDP x TP on (replicate 4, shard 32, tp 8): every sampled rank
    holds exactly the elements the plan puts at its coordinate, and over the statistic's group every element of
    every layer counts once (TP-replicated layers from TP coordinate 0); one all-reduce per step."""
    res = scale["tp"][case]
    assert res["problems"] == [], f"{case}:\n" + "\n".join(res["problems"])
    f = res["facts"]
    hsdp = case.startswith("hsdp")
    assert f["world"] == 1024 and f["mesh"] == ({"replicate": 4, "shard": 32, "tp": 8} if hsdp else
                                                 {"dp": 128, "tp": 8})
    assert f["group"] == (256 if hsdp else 1024)
    assert set(range(8)) <= set(f["ranks"]) and 1023 in f["ranks"]  # every TP coordinate, and the last rank
    assert f["comm"] == [{"c10d.allreduce_": 1}] * 3 and len(f["steps"]) == 3
    # the layouts the rule must survive: FSDP2's strided shard over TP, a 2-D split, replicated decayed layers,
    # uneven TP splits (vocabulary 1,031 and FFN 196 over 8) and empty local shards
    assert "_StridedShard" in f["placements"]["wte.weight"]
    assert "Shard(dim=1)" in f["placements"]["h.0.proj.weight"]
    assert "Replicate()" in f["placements"]["h.0.ln_1.weight"] and f["replicated_decayed"]
    assert f["uneven_tp_layers"] >= 4 and f["empty_local_shards"] > 0


def test_autotp_counting_exact_at_1024_ranks(scale):
    """DeepSpeed AutoTP (tp 8) with ZeRO-1 (dp 128): over all 1,024 ranks every element of every layer counted
    once by the library's layout and weights, TP-replicated layers from TP rank 0 only, and every layer's mean
    |θ| from the reduced partial sums (the library's scale and numel) the whole layer's, at every TP rank."""
    res = scale["tp"]["autotp-W1024"]
    assert res["problems"] == [], "\n".join(res["problems"])
    f = res["facts"]
    assert (f["world"], f["tp"], f["dp"]) == (1024, 8, 128) and len(f["ranks"]) == 16
    assert f["layers"] == 21 and f["sliced"] == 15
    assert f["uneven"] == ["down_proj", "gate_proj", "lm_head", "up_proj"]  # 1,031 and 196 over 8 TP ranks
    assert f["replicated_held"] == [8] and f["sliced_held"] == [1]  # held: replicas 8 times, slices once


@pytest.mark.parametrize("case", STEP_CASES)
def test_each_rank_steps_with_one_collective(scale, case):
    res = scale["steps"][case]
    engine, world = case.split("-")[0], int(case.split("-W")[1].split("-")[0])
    want_group = world // HSDP_REPLICAS[world] if engine == "hsdp" else world
    assert res["per_step"] == [{"c10d.allreduce_": 1}] * 2, f"{case}: AdamHD's collectives per step"
    assert res["groups"] == [want_group] * 2 and res["want_group"] == want_group
    assert res["state_steps"] == [2.0], f"{case}: optimizer state steps {res['state_steps']}"
    assert res["deltas"] > 0 and res["delta_finite"]
    if engine == "zero3":
        assert res["sub_groups"] >= 2


def test_negative_controls_are_detected(scale):
    """The checks fail on layouts that are wrong on purpose."""
    controls = {}
    for section in ("deepspeed", "fsdp", "tp"):
        for case, res in scale[section].items():
            for name, found in res.get("negative", {}).items():
                controls.setdefault(name, []).append((case, found))
    assert set(controls) == {"a fragment read one element late (its last element is padding)",
                             "offset shifted by one", "no reduction (rank 0's partial sums)", "per-shard numel",
                             "HSDP statistic summed over the whole world (replicas counted R times)",
                             "TP replicas counted on every tensor-parallel rank",
                             "reduced over the data-parallel dimension only (TP slices of other ranks missing)",
                             "AutoTP slice's numel taken as the layer's"}
    for name, runs in controls.items():
        undetected = [case for case, found in runs if not found]
        assert not undetected, f"{name!r} went undetected in {undetected}"
    late = controls["a fragment read one element late (its last element is padding)"]
    assert all("the statistic is NaN (padding counted)" in found for _, found in late)


# ----------------------------------------------------------------------------------------------------------------
# the README's cost model: its layer counts and message sizes are the presets'
README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_cost_model_counts_match_presets():
    """The README's message sizes and parameter counts are those of the library's GPT-3 presets."""
    from adamhd_train.models import GPT3_VOCAB_SIZE, build_model, count_parameters

    text = README.read_text()
    section = re.search(r"## Scale: one all-reduce per step at 8 to 10,000\+ ranks\n(.*?)\n## ", text, re.S).group(1)
    rows = re.findall(r"^\| (gpt3-\w+) \| ([\d,]+) \| ([\d,]+) B \| ([\d,]+) \| ([\d,]+) B \| ([\d,]+) M \|",
                      section, re.M)
    assert [r[0] for r in rows] == ["gpt3-small", "gpt3-xl", "gpt3-175b"]
    for name, *numbers in rows:
        tensors, flat_bytes, decayed, dtensor_bytes, millions = (int(x.replace(",", "")) for x in numbers)
        params = list(build_model(name, vocab_size=GPT3_VOCAB_SIZE, device="meta").parameters())
        n_decayed = sum(p.ndim >= 2 for p in params)  # adamhd_dist.param_groups decays tensors with ndim >= 2
        assert (tensors, flat_bytes) == (len(params), 8 * len(params)), name
        assert (decayed, dtensor_bytes) == (n_decayed, 8 * n_decayed), name
        assert millions == round(count_parameters(name) / 1e6), name


# the tensor-parallel cost model (bench/cost_model.py): its table is the README's, and its α-β model is the one the
# README's ring/tree table was computed with
TP_HEADING = "**Under tensor parallelism**"


def _cost_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cost_model", README.parent / "bench" / "cost_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cost_model"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _seconds(value: str, unit: str) -> float:
    return float(value) * {"µs": 1e-6, "ms": 1e-3}[unit]


def test_tensor_parallel_cost_model_is_the_readmes():
    cost = _cost_model()
    text = README.read_text()
    assert TP_HEADING in text
    assert cost.tp_table() in text, "the README's tensor-parallel table is not what bench/cost_model.py computes"
    # the function's ring and tree times are the README's W table (its largest message, gpt3-175b under ZeRO)
    section = re.search(r"## Scale: one all-reduce per step at 8 to 10,000\+ ranks\n(.*?)\n## ", README.read_text(),
                        re.S).group(1)
    rows = re.findall(r"^\| ([\d,]+) \| ([\d.]+) (µs|ms) \| ([\d.]+) (µs|ms) \|", section, re.M)
    assert [int(r[0].replace(",", "")) for r in rows] == [8, 64, 1024, 4096]
    n = cost.message_bytes(cost.layer_counts("gpt3-175b")[0])
    assert n == 9248
    for w, ring, ring_unit, tree, tree_unit in rows:
        w = int(w.replace(",", ""))
        assert cost.ring_seconds(n, w) == pytest.approx(_seconds(ring, ring_unit), rel=0.01), w
        assert cost.tree_seconds(n, w) == pytest.approx(_seconds(tree, tree_unit), rel=0.01), w
    # the layer counts are the main table's (tensors under a flat layout, decayed ones on the DTensor path)
    main = {r[0]: (int(r[1].replace(",", "")), int(r[3].replace(",", ""))) for r in re.findall(
        r"^\| (gpt3-\w+) \| ([\d,]+) \| ([\d,]+) B \| ([\d,]+) \|", section, re.M)}
    for row in cost.tp_rows():
        tensors, decayed = main[row["model"]]
        assert row["layers"] == (tensors if "AutoTP" in row["layout"] else decayed)
        assert row["bytes"] == 8 * row["layers"] and row["world"] == 1024
        assert row["group"] == (256 if "HSDP" in row["layout"] else 1024)
    # the gradient traffic: a reduce-scatter sends (D-1)/D of the slice; HSDP adds a ring all-reduce of the shard
    assert cost.gradient_bytes(8_000, 8, 128) == pytest.approx(127 / 128 * 1_000 * 2)
    assert cost.gradient_bytes(8_000, 8, 32, 4) == pytest.approx(31 / 32 * 2_000 + 2 * 3 / 4 * 2_000 / 32)
