"""Decay / no-decay parameter groups, and the check that every trainable parameter is in exactly one group."""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Sequence

import torch
from torch import nn

__all__ = ["param_groups", "check_param_groups"]


def _matches(name: str, patterns: Sequence[str]) -> list[str]:
    return [pat for pat in patterns if fnmatch.fnmatchcase(name, pat)]


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    decay: Sequence[str] = (),
    no_decay: Sequence[str] = (),
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Two param groups for AdamHD/AdamW: tensors with ``ndim >= 2`` (matmul weights, embeddings) decay with
    ``weight_decay``; biases and norm weights (``ndim < 2``) do not.

    Args:
        model: the module; frozen parameters (``requires_grad=False``) are left out, tied parameters appear once
            (under their first name, as ``named_parameters()`` gives them).
        weight_decay: λ of the decay group.
        decay, no_decay: glob patterns (``fnmatch``, e.g. ``"*.bias"``, ``"transformer.wte.weight"``) that force a
            parameter into that group whatever its ndim. A pattern that matches no trainable parameter, or a
            parameter matched by both lists, is an error.
        **group_options: further keys for both groups (e.g. ``lr``, ``delta_mode``).
    Returns:
        ``[{"params", "param_names", "weight_decay"}, ...]`` — the decay group first; an empty group is omitted.
    """
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (allowed: a number >= 0)")
    for label, pats in (("decay", decay), ("no_decay", no_decay)):
        if isinstance(pats, str):
            raise ValueError(f"{label} must be a list of glob patterns, got the string {pats!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    used: set[str] = set()
    dec, nodec = ([], []), ([], [])
    for name, p in named:
        hit_d, hit_n = _matches(name, decay), _matches(name, no_decay)
        used.update(hit_d)
        used.update(hit_n)
        if hit_d and hit_n:
            raise ValueError(f"parameter {name!r} matches decay pattern(s) {hit_d} and no_decay pattern(s) {hit_n}: "
                             f"a parameter must land in exactly one group")
        wants_decay = True if hit_d else False if hit_n else len(getattr(p, "ds_shape", p.shape)) >= 2
        target = dec if wants_decay else nodec
        target[0].append(p)
        target[1].append(name)
    unused = [pat for pat in (*decay, *no_decay) if pat not in used]
    if unused:
        raise ValueError(f"pattern(s) {unused} matched no trainable parameter of {type(model).__name__}")
    groups = []
    if dec[0]:
        groups.append({"params": dec[0], "param_names": dec[1], "weight_decay": float(weight_decay), **group_options})
    if nodec[0]:
        groups.append({"params": nodec[0], "param_names": nodec[1], "weight_decay": 0.0, **group_options})
    return groups


def check_param_groups(model: nn.Module, groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor]) -> None:
    """Raise ``ValueError`` unless every trainable parameter of ``model`` is in exactly one group and every
    grouped tensor is a parameter of ``model`` (names in the message)."""
    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    names = {}
    for n, p in model.named_parameters():
        names.setdefault(p, n)
    seen: dict[torch.Tensor, int] = {}
    for gi, g in enumerate(groups):
        params = g["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if p not in names:
                raise ValueError(f"param group {gi} holds a tensor of shape {tuple(p.shape)} that is not a "
                                 f"parameter of the model")
            if p in seen:
                raise ValueError(f"parameter {names[p]!r} is in param groups {seen[p]} and {gi}: "
                                 f"a parameter must land in exactly one group")
            seen[p] = gi
    missing = [n for p, n in names.items() if p.requires_grad and p not in seen]
    if missing:
        raise ValueError(f"trainable parameter(s) in no param group: {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}")
