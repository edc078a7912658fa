"""``layer_deltas``: read the current Huber threshold δ of every layer, by parameter name."""

from __future__ import annotations

import torch

from .stats import current_delta, delta_setting

__all__ = ["layer_deltas", "find_adamhd"]


def find_adamhd(obj):
    """The :class:`~adamhd_dist.AdamHD` inside ``obj``: the optimizer itself, or any object that holds it through a
    chain of ``.optimizer`` attributes — a DeepSpeed engine (engine.optimizer is its ZeRO optimizer, whose
    .optimizer is AdamHD), a ZeRO/BF16/FP16 optimizer, Accelerate's prepared optimizer, a transformers Trainer
    (after it built its optimizer). Raises TypeError naming what was found instead."""
    from .optimizer import AdamHD

    seen, cur, chain = set(), obj, []
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, AdamHD):
            return cur
        seen.add(id(cur))
        chain.append(type(cur).__name__)
        cur = getattr(cur, "optimizer", None)
    raise TypeError(f"layer_deltas expects AdamHD, or an object holding it through .optimizer (a DeepSpeed engine "
                    f"or ZeRO optimizer, an Accelerate prepared optimizer, a transformers Trainer); found "
                    f"{' -> '.join(chain)} and no AdamHD")


def layer_deltas(obj) -> dict[str | int, float]:
    """{parameter name: δ} for every layer with weight decay, as used at its most recent step.

    ``obj`` is an :class:`~adamhd_dist.AdamHD` or anything that holds one (see :func:`find_adamhd`): a DeepSpeed
    engine, its ZeRO optimizer, an Accelerate prepared optimizer, a transformers Trainer. Layers are named by the
    group's ``param_names`` (or, under a flat layout, the layout's names) when present, else by their index in
    ``state_dict()`` order. A layer that has not stepped yet is listed only when its δ is known without a statistic
    (``delta_mode="constant"``). In ``"ema"`` mode the value is ``delta_scale · μ`` from the state, so it is known
    right after ``load_state_dict``; under sharding it is the same on every rank.
    """
    opt = find_adamhd(obj)
    if opt.layer_state is not None:
        return _flat_layout_deltas(opt)
    out: dict[str | int, float] = {}
    last = opt.last_deltas()
    index = 0
    for group in opt.param_groups:
        names = group.get("param_names")
        setting = delta_setting(group)
        for j, p in enumerate(group["params"]):
            key = names[j] if names is not None else index
            index += 1
            mu = opt.state.get(p, {}).get("delta_ema")
            d = current_delta(setting, mu, last.get(p))
            if d is not None:
                out[key] = d
    return out


def _flat_layout_deltas(opt) -> dict[str, float]:
    """{layer name: δ} of an optimizer over flat buffers: from its per-layer state, identical on every rank."""
    table = opt.layer_state
    groups = opt.layer_stats.layout.groups
    settings = [delta_setting(g) for g in opt.param_groups]
    mu, has_mu, last = table.mu.cpu(), table.has_mu.cpu(), table.delta.cpu()
    out: dict[str, float] = {}
    for i, name in enumerate(table.names):
        d = current_delta(settings[groups[i]], mu[i] if bool(has_mu[i]) else None,
                          None if torch.isnan(last[i]) else float(last[i]))
        if d is not None:
            out[name] = d
    return out
