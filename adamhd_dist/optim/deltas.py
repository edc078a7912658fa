"""``layer_deltas``: read the current Huber threshold δ of every layer, by parameter name."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .stats import ema_delta

__all__ = ["layer_deltas", "register_layer_deltas"]

_HANDLERS: list[tuple[Callable[[Any], bool], Callable[[Any], dict]]] = []


def register_layer_deltas(matches: Callable[[Any], bool], handler: Callable[[Any], dict]) -> None:
    """Let an engine integration answer ``layer_deltas(obj)`` for objects it recognises (e.g. a ZeRO engine)."""
    _HANDLERS.insert(0, (matches, handler))


def layer_deltas(obj) -> dict[str | int, float]:
    """{parameter name: δ} for every layer with weight decay, as used at its most recent step.

    ``obj`` is an :class:`~adamhd_dist.AdamHD` (or an engine an integration registered). Layers are named by the
    group's ``param_names`` when present, else by their index in ``state_dict()`` order. A layer that has not
    stepped yet is listed only when its δ is known without a statistic (``delta_mode="constant"``). In ``"ema"``
    mode the value is ``delta_scale · μ`` from the state, so it is known right after ``load_state_dict``.
    """
    for matches, handler in _HANDLERS:
        if matches(obj):
            return handler(obj)
    from .optimizer import AdamHD

    if not isinstance(obj, AdamHD):
        raise TypeError(f"layer_deltas expects an AdamHD optimizer or a supported engine, got {type(obj).__name__}")
    if obj.layout is not None:
        return _flat_layout_deltas(obj)
    out: dict[str | int, float] = {}
    last = obj.last_deltas()
    index = 0
    for group in obj.param_groups:
        names = group.get("param_names")
        for j, p in enumerate(group["params"]):
            key = names[j] if names is not None else index
            index += 1
            state = obj.state.get(p, {})
            mu = state["delta_ema"] if "delta_ema" in state else None
            d = _delta_of(group, mu, last.get(p))
            if d is not None:
                out[key] = d
    return out


def _delta_of(group: dict, mu, last: float | None) -> float | None:
    """A layer's current δ: None without weight decay, or while unknown (no step yet and not constant)."""
    if float(group["weight_decay"]) == 0.0:
        return None
    mode = group["delta_mode"]
    if mode == "constant":
        return float(group["delta"])
    if mode == "ema":
        if mu is None:
            return None
        return float(ema_delta(torch.as_tensor(mu, dtype=torch.float32), float(group["delta_scale"])))
    return last


def _flat_layout_deltas(opt) -> dict[str, float]:
    """{layer name: δ} of an optimizer over flat buffers: from the per-layer state, identical on every rank."""
    lay = opt.layout
    mu, has_mu, last = lay.mu.cpu(), lay.has_mu.cpu(), lay.delta.cpu()
    out: dict[str, float] = {}
    for i, name in enumerate(lay.names):
        d = _delta_of(opt.param_groups[lay.groups[i]], mu[i] if bool(has_mu[i]) else None,
                      None if torch.isnan(last[i]) else float(last[i]))
        if d is not None:
            out[name] = d
    return out
