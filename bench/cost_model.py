"""The cost model of AdamHD's one collective per step (README, "Scale"): arithmetic, not a measurement.

    python bench/cost_model.py          # the tensor-parallel table of the README, as Markdown

The statistic's message is one fp64 per layer in the optimizer's table: every trainable tensor under a flat
layout (ZeRO-1/2/3, and AutoTP, whose flat table holds each rank's slices), the decayed ones on the DTensor path
(FSDP2, HSDP, and torch tensor parallelism over them: a TP-sharded or TP-replicated parameter is still one
DTensor, one entry). Times follow the α-β model: a ring all-reduce of n bytes over W ranks takes
2(W−1)·α + 2·(W−1)/W·n/β, a tree (reduce, then broadcast) about 2·⌈log2 W⌉·(α + n/β).

Beside it, the gradient traffic the engine itself moves in the same step: each rank reduce-scatters the gradients
of its TP slice (≈ N/tp parameters; the few TP-replicated norms and biases are left out) over its data-parallel
ranks, sending (D−1)/D of them (ZeRO-2 and FSDP2; ZeRO-1 all-reduces, twice that), and under HSDP then
all-reduces its shard over the R replicas, sending 2·(R−1)/R of the shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 5e-6  # seconds per message (an inter-node hop)
BETA = 25e9  # bytes per second per rank (200 Gb/s)
GRAD_BYTES = 2  # bf16 gradients (an fp32 reduction doubles the gradient traffic)
TP_MODELS = ("gpt3-xl", "gpt3-175b")


def layer_counts(model: str) -> tuple[int, int]:
    """(trainable tensors, decayed tensors) of a preset, from its shapes (built on the meta device);
    ``adamhd_dist.param_groups`` decays the tensors with ndim >= 2."""
    from adamhd_train.models import GPT3_VOCAB_SIZE, build_model

    params = list(build_model(model, vocab_size=GPT3_VOCAB_SIZE, device="meta").parameters())
    return len(params), sum(p.ndim >= 2 for p in params)


def message_bytes(layers: int) -> int:
    """The statistic's all-reduce: one fp64 per layer."""
    return 8 * layers


def ring_seconds(n_bytes: float, ranks: int, alpha: float = ALPHA, beta: float = BETA) -> float:
    return 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * n_bytes / beta


def tree_seconds(n_bytes: float, ranks: int, alpha: float = ALPHA, beta: float = BETA) -> float:
    return 2 * math.ceil(math.log2(ranks)) * (alpha + n_bytes / beta)


def gradient_bytes(params: int, tp: int, shard: int, replicas: int = 1, grad_bytes: int = GRAD_BYTES) -> float:
    """Bytes one rank sends per step for its gradients: a reduce-scatter of its TP slice over ``shard`` ranks,
    then (HSDP) an all-reduce of its shard over ``replicas`` ranks."""
    slice_bytes = params / tp * grad_bytes
    return (shard - 1) / shard * slice_bytes + 2 * (replicas - 1) / replicas * slice_bytes / shard


@dataclass(frozen=True)
class TPLayout:
    name: str
    tp: int
    shard: int  # the data-parallel ranks a gradient is reduce-scattered over
    replicas: int  # HSDP replicas (1 otherwise)
    flat: bool  # the flat (ZeRO) table: every trainable tensor; else the decayed ones

    @property
    def world(self) -> int:
        return self.tp * self.shard * self.replicas

    @property
    def group(self) -> int:
        """Ranks the statistic is summed over: the sharded mesh dimensions (tp and dp; HSDP: not the replicas)."""
        return self.tp * self.shard


TP_LAYOUTS = (TPLayout("FSDP2 × TP (dp 128 × tp 8)", 8, 128, 1, False),
              TPLayout("HSDP × TP (4 × 32 × tp 8)", 8, 32, 4, False),
              TPLayout("AutoTP + ZeRO-2 (tp 8 × dp 128)", 8, 128, 1, True))


def tp_rows(models=TP_MODELS, layouts=TP_LAYOUTS) -> list[dict]:
    from adamhd_train.models import count_parameters

    rows = []
    for model in models:
        tensors, decayed = layer_counts(model)
        params = count_parameters(model)
        for lay in layouts:
            layers = tensors if lay.flat else decayed
            n = message_bytes(layers)
            grads = gradient_bytes(params, lay.tp, lay.shard, lay.replicas)
            rows.append({"model": model, "layout": lay.name, "world": lay.world, "layers": layers, "bytes": n,
                         "group": lay.group, "tree_s": tree_seconds(n, lay.group),
                         "ring_s": ring_seconds(n, lay.group), "grad_bytes": grads, "ratio": n / grads})
    return rows


def _time(s: float) -> str:
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.3g} ms"


def tp_table(rows=None) -> str:
    """The Markdown table of :func:`tp_rows` (as the README prints it)."""
    rows = tp_rows() if rows is None else rows
    out = ["| model | layout, W = 1,024 | layers | message | summed over | tree | ring | gradients sent per rank "
           "| message / gradients |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['model']} | {r['layout']} | {r['layers']:,} | {r['bytes']:,} B | {r['group']:,} ranks "
                   f"| {_time(r['tree_s'])} | {_time(r['ring_s'])} | {r['grad_bytes'] / 1e9:.3g} GB "
                   f"| {r['ratio']:.1e} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(tp_table())
