"""Measurements for comparing optimizers on one model: magnitude pruning, weight-magnitude histograms by layer
type, steps-to-target speed-up, and a deterministic outlier-gradient injector (the rule that judges a difference
is :mod:`adamhd_study.stats`).

Everything here is a pure function of tensors or curves (no process group, no files), so each part is
unit-tested on hand-made inputs; :mod:`adamhd_study.collect` and :mod:`adamhd_study.summary` call these.

    >>> import torch
    >>> w = {"h.0.mlp.c_fc.weight": torch.tensor([[0.5, -0.1], [0.02, 3.0]])}
    >>> pruned, res = magnitude_prune(w, 0.5)
    >>> pruned["h.0.mlp.c_fc.weight"].tolist(), res.achieved_sparsity
    ([[0.5, 0.0], [0.0, 3.0]], 0.5)
    >>> steps_to_target([0, 10, 20], [4.0, 3.0, 2.0], target=2.5)
    15.0

Pruning and histograms cover the *decayed* tensors only: the floating-point tensors with ``ndim >= 2`` (matmul
weights and embeddings), the same rule as :func:`adamhd_dist.param_groups`. Biases and norm weights are never
pruned and are left out of the histograms. Tied tensors (GPT-2's LM head is the token embedding) count once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LAYER_TYPES",
    "layer_type",
    "decayed_tensors",
    "PruneResult",
    "magnitude_prune",
    "prune_model_",
    "Histogram",
    "magnitude_edges",
    "magnitude_histograms",
    "small_weight_fraction",
    "steps_to_target",
    "speedup",
    "OutlierSchedule",
    "OutlierInjector",
    "trainable_parameters",
]

LAYER_TYPES = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "embedding", "other")
"""Layer types of a decoder block, in display order. ``other`` holds any decayed tensor not matched below."""

# (layer type, pattern on the parameter name). GPT-2 names first (the models this project builds), then the
# common names of other decoder families, so histograms of a user's own model group sensibly too.
_TYPE_PATTERNS: tuple[tuple[str, re.Pattern], ...] = tuple((t, re.compile(p)) for t, p in (
    ("embedding", r"(^|\.)(wte|wpe|embed_tokens|embed_positions|tok_embeddings|word_embeddings|"
                  r"position_embeddings|embeddings?)(\.|$)|(^|\.)lm_head(\.|$)"),
    ("attn.qkv", r"(^|\.)(c_attn|qkv|qkv_proj|query_key_value|Wqkv|q_proj|k_proj|v_proj|query|key|value|wq|wk|wv)"
                 r"(\.|$)"),
    ("attn.proj", r"(attn|attention)\.(c_proj|o_proj|out_proj|dense|wo|proj)(\.|$)|(^|\.)(o_proj|out_proj)(\.|$)"),
    ("mlp.fc", r"(^|\.)(c_fc|fc1|up_proj|gate_proj|w1|w3|dense_h_to_4h|fc_in)(\.|$)"),
    ("mlp.proj", r"(mlp|feed_forward|ffn)\.(c_proj|down_proj|fc2|w2|dense_4h_to_h|fc_out|proj)(\.|$)|"
                 r"(^|\.)(down_proj|fc2|dense_4h_to_h|fc_out)(\.|$)"),
))


def layer_type(name: str) -> str:
    """The layer type of a parameter, from its name: one of :data:`LAYER_TYPES`.

    GPT-2: ``attn.c_attn`` → ``attn.qkv``, ``attn.c_proj`` → ``attn.proj``, ``mlp.c_fc`` → ``mlp.fc``,
    ``mlp.c_proj`` → ``mlp.proj``, ``wte``/``wpe``/``lm_head`` → ``embedding``; Llama/NeoX/OPT names map the same
    way (``q_proj``, ``o_proj``, ``up_proj``, ``down_proj``, ``embed_tokens``, ...).
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a parameter name (str), got {type(name).__name__}")
    for kind, pattern in _TYPE_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


def decayed_tensors(named: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """The decayed tensors of a state dict or ``named_parameters()``: floating point with ``ndim >= 2``, each
    storage once (a tied alias is dropped under its later name), in the given order."""
    items = named.items() if isinstance(named, Mapping) else named
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int, tuple]] = set()
    for name, t in items:
        if not torch.is_tensor(t) or not t.is_floating_point() or t.dim() < 2:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


# ----------------------------------------------------------------------------------------------------------------
# magnitude pruning
@dataclass
class PruneResult:
    """What :func:`magnitude_prune` did."""

    target_sparsity: float
    """The requested fraction of zeros."""
    achieved_sparsity: float
    """Fraction of zeros over all pruned tensors afterwards (exact zeros that were already there count)."""
    scope: str
    """``"global"`` (one threshold over all tensors) or ``"layer"`` (the target fraction in every tensor)."""
    zeroed: int
    """Elements set to zero (previous zeros among the selected smallest count too)."""
    total: int
    """Elements of the tensors considered."""
    threshold: float
    """Largest magnitude that was zeroed (global scope; the largest over layers for ``"layer"``); 0 for none."""
    per_layer: dict[str, float] = field(default_factory=dict)
    """Fraction of zeros per tensor afterwards."""


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0 \
            or not math.isfinite(sparsity):
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    return float(sparsity)


def _check_scope(scope) -> str:
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    return scope


def _smallest_mask(mags: Tensor, k: int) -> tuple[Tensor, float]:
    """Boolean mask of exactly ``k`` smallest entries of the 1-D ``mags`` (ties at the threshold: the first in
    index order), and the threshold magnitude."""
    n = mags.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool), 0.0
    if k >= n:
        return torch.ones(n, dtype=torch.bool), float(mags.max())
    thr = torch.kthvalue(mags, k).values
    mask = mags < thr
    need = k - int(mask.sum())
    if need > 0:
        at = torch.nonzero(mags == thr).flatten()[:need]
        mask[at] = True
    return mask, float(thr)


@torch.no_grad()
def magnitude_prune(
    tensors: Mapping[str, Tensor],
    sparsity: float,
    *,
    scope: str = "global",
) -> tuple[dict[str, Tensor], PruneResult]:
    """Zero the smallest-magnitude entries of ``tensors``, returning pruned copies (inputs are not modified).

    Exactly ``k = round(sparsity · N)`` entries are zeroed: over all tensors together (``scope="global"``, N the
    total count) or ``round(sparsity · n_i)`` in each tensor (``scope="layer"``). Magnitudes are compared in
    float64; entries tied at the threshold are zeroed in flat index order (first tensor, first element first), so
    the count is exact and the result deterministic. Give only the tensors to prune, e.g.
    :func:`decayed_tensors` of a state dict.

    Returns:
        ``({name: pruned copy}, PruneResult)``.
    """
    sparsity = _check_sparsity(sparsity)
    scope = _check_scope(scope)
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise ValueError(f"tensors[{name!r}] must be a floating-point tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
    names = list(tensors)
    flat = {n: tensors[n].detach().reshape(-1).to("cpu", torch.float64).abs() for n in names}
    total = sum(v.numel() for v in flat.values())
    masks: dict[str, Tensor] = {}
    thresholds: list[float] = []
    if scope == "global" and total:
        allm = torch.cat([flat[n] for n in names])
        mask, thr = _smallest_mask(allm, int(round(sparsity * total)))
        thresholds.append(thr)
        start = 0
        for n in names:
            masks[n] = mask[start:start + flat[n].numel()]
            start += flat[n].numel()
    else:
        for n in names:
            mask, thr = _smallest_mask(flat[n], int(round(sparsity * flat[n].numel())))
            masks[n] = mask
            thresholds.append(thr)
    out: dict[str, Tensor] = {}
    zeroed = zeros = 0
    per_layer: dict[str, float] = {}
    for n in names:
        t = tensors[n].detach().clone()
        m = masks.get(n, torch.zeros(t.numel(), dtype=torch.bool)).to(t.device).view(t.shape)
        t[m] = 0
        out[n] = t
        zeroed += int(m.sum())
        z = int((t == 0).sum())
        zeros += z
        per_layer[n] = z / t.numel() if t.numel() else 0.0
    return out, PruneResult(sparsity, zeros / total if total else 0.0, scope, zeroed, total,
                            max(thresholds, default=0.0), per_layer)


@torch.no_grad()
def prune_model_(
    model: torch.nn.Module,
    sparsity: float,
    *,
    scope: str = "global",
    select: Optional[Callable[[str, Tensor], bool]] = None,
) -> PruneResult:
    """Magnitude-prune a model's decayed parameters in place (see :func:`magnitude_prune`).

    ``select(name, param)``: further restrict which decayed parameters are pruned (default: all of them).
    Parameters are taken from ``named_parameters()``, so a tied LM head is pruned together with its embedding.
    """
    params = decayed_tensors(model.named_parameters())
    if select is not None:
        params = {n: p for n, p in params.items() if select(n, p)}
    pruned, result = magnitude_prune(params, sparsity, scope=scope)
    for n, p in params.items():
        p.copy_(pruned[n])
    return result


# ----------------------------------------------------------------------------------------------------------------
# histograms
@dataclass
class Histogram:
    """Counts of ``|w|`` in log-spaced bins; entries below the first edge (zeros included) fall in the first bin
    and entries above the last edge in the last, so ``counts.sum() == numel``."""

    edges: np.ndarray
    counts: np.ndarray
    numel: int
    zeros: int
    """Exact zeros among the entries."""
    names: list[str]
    """The tensors pooled into this histogram."""


def magnitude_edges(tensors: Iterable[Tensor], bins: int = 60, *, lo: Optional[float] = None,
                    hi: Optional[float] = None) -> np.ndarray:
    """``bins + 1`` log-spaced bin edges spanning the non-zero magnitudes of ``tensors`` (or ``[lo, hi]``), so
    histograms of several models share bins and can be overlaid."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    mins, maxs = [], []
    for t in tensors:
        a = t.detach().abs().float()
        nz = a[a > 0]
        if nz.numel():
            mins.append(float(nz.min()))
            maxs.append(float(nz.max()))
    lo = lo if lo is not None else (min(mins) if mins else 1e-8)
    hi = hi if hi is not None else (max(maxs) if maxs else 1.0)
    if not (lo > 0 and hi > 0 and math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"lo and hi must be positive finite magnitudes, got lo={lo!r}, hi={hi!r}")
    if hi <= lo:
        hi = lo * 10.0
    return np.logspace(math.log10(lo), math.log10(hi), bins + 1)


def magnitude_histograms(
    tensors: Mapping[str, Tensor],
    edges: Optional[np.ndarray] = None,
    *,
    bins: int = 60,
    group: Callable[[str], str] = layer_type,
) -> dict[str, Histogram]:
    """Histograms of ``|w|`` pooled by layer type (``group(name)``, default :func:`layer_type`).

    ``tensors``: e.g. :func:`decayed_tensors` of a state dict. ``edges``: shared bin edges (default:
    :func:`magnitude_edges` of these tensors). Returns ``{type: Histogram}`` in :data:`LAYER_TYPES` order for the
    types present (other group names after them, sorted).
    """
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}")
    edges = magnitude_edges(tensors.values(), bins) if edges is None else np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or not np.all(np.diff(edges) > 0):
        raise ValueError("edges must be an increasing 1-D array of at least 2 bin edges")
    pooled: dict[str, list[tuple[str, Tensor]]] = {}
    for name, t in tensors.items():
        pooled.setdefault(group(name), []).append((name, t))
    order = [k for k in LAYER_TYPES if k in pooled] + sorted(k for k in pooled if k not in LAYER_TYPES)
    out: dict[str, Histogram] = {}
    for kind in order:
        a = np.concatenate([t.detach().reshape(-1).abs().double().cpu().numpy() for _, t in pooled[kind]])
        idx = np.clip(np.searchsorted(edges, a, side="right") - 1, 0, len(edges) - 2)
        counts = np.bincount(idx, minlength=len(edges) - 1).astype(np.int64)
        out[kind] = Histogram(edges, counts, int(a.size), int((a == 0).sum()), [n for n, _ in pooled[kind]])
    return out


def small_weight_fraction(tensors: Mapping[str, Tensor], threshold: float) -> float:
    """Fraction of entries with ``|w| <= threshold`` over all ``tensors`` (0 for no entries)."""
    if not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    n = small = 0
    for t in tensors.values():
        n += t.numel()
        small += int((t.detach().abs() <= threshold).sum())
    return small / n if n else 0.0


# ----------------------------------------------------------------------------------------------------------------
# curves
def steps_to_target(xs: Sequence[float], losses: Sequence[float], target: float) -> Optional[float]:
    """The first ``x`` (step, token count or seconds) at which a loss curve reaches ``target``, interpolated
    linearly between the two measurements around the crossing; None when the curve never reaches it.

    ``xs`` must increase. A curve that starts at or below the target reaches it at ``xs[0]``.
    """
    if len(xs) != len(losses):
        raise ValueError(f"xs and losses must have the same length, got {len(xs)} and {len(losses)}")
    if not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f"target must be a finite number, got {target!r}")
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise ValueError("xs must be strictly increasing")
    prev = None
    for x, y in zip(xs, losses):
        if y is None or not math.isfinite(y):
            continue
        if y <= target:
            if prev is None:
                return float(x)
            x0, y0 = prev
            return float(x0 + (x - x0) * (y0 - target) / (y0 - y))
        prev = (x, y)
    return None


def speedup(reference: tuple[Sequence[float], Sequence[float]], candidate: tuple[Sequence[float], Sequence[float]],
            target: float) -> Optional[float]:
    """How many times fewer steps (or tokens, or seconds: whatever ``xs`` counts) the candidate needs than the
    reference to reach ``target``: ``x_ref / x_cand``. Each curve is ``(xs, losses)``.

    None when the reference never reaches the target; 0.0 when only the candidate does not (it is slower than any
    finite factor within the measured budget).
    """
    ref = steps_to_target(*reference, target)
    cand = steps_to_target(*candidate, target)
    if ref is None:
        return None
    if cand is None:
        return 0.0
    if cand == 0:
        return math.inf if ref > 0 else 1.0
    return ref / cand


# ----------------------------------------------------------------------------------------------------------------
# outlier gradients
_OUTLIER_MODES = ("spike", "scale")


@dataclass(frozen=True)
class OutlierSchedule:
    """Which micro-batches get an outlier gradient, and where: a pure function of ``(seed, micro-batch index,
    parameter index)``, so two runs with the same schedule see the same events whatever their optimizer.

    Micro-batch ``i`` (0-based, counting training forward passes) is an event when a generator seeded with
    ``(seed, i)`` draws a uniform number below ``rate``. At an event:

    - ``mode="spike"`` (default): in every trainable tensor, ``max(1, round(fraction · numel))`` entries (drawn
      with a generator seeded ``(seed, i, parameter index)``) get ``± scale · rms(grad)`` added, signs drawn
      from the same generator. A sparse spike like this survives global-norm clipping as a change of direction
      (it dominates the norm, so the rest of the step shrinks), which is what an outlier does in practice.
    - ``mode="scale"``: the whole gradient is multiplied by ``scale``. Under global-norm clipping this mostly
      rescales back, so it tests little unless clipping is off.
    """

    seed: int = 0
    rate: float = 0.02
    """Probability that a micro-batch is an event."""
    scale: float = 100.0
    """Spike size in units of the tensor's gradient RMS (``spike``), or the gradient multiplier (``scale``)."""
    fraction: float = 1e-3
    """Share of each tensor's entries spiked at an event (``spike`` mode)."""
    mode: str = "spike"
    start: int = 0
    """No event before this micro-batch index (e.g. to spare the LR warmup)."""

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"outlier seed must be an integer >= 0, got {self.seed!r}")
        if not (isinstance(self.rate, (int, float)) and 0.0 <= self.rate <= 1.0):
            raise ValueError(f"outlier rate must be in [0, 1], got {self.rate!r}")
        if not (isinstance(self.scale, (int, float)) and self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"outlier scale must be a positive finite number, got {self.scale!r}")
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction <= 1.0):
            raise ValueError(f"outlier fraction must be in (0, 1], got {self.fraction!r}")
        if self.mode not in _OUTLIER_MODES:
            raise ValueError(f"outlier mode must be one of {', '.join(_OUTLIER_MODES)}, got {self.mode!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"outlier start must be an integer >= 0, got {self.start!r}")

    def is_event(self, index: int) -> bool:
        """Whether micro-batch ``index`` gets an outlier."""
        if index < self.start or self.rate == 0.0:
            return False
        return bool(np.random.default_rng([self.seed, index]).random() < self.rate)

    def events(self, n: int) -> list[int]:
        """The event indices among the first ``n`` micro-batches."""
        return [i for i in range(n) if self.is_event(i)]

    def spike(self, index: int, param_index: int, numel: int) -> tuple[np.ndarray, np.ndarray]:
        """``(flat positions, signs ±1)`` of the spiked entries of parameter ``param_index`` at event ``index``."""
        k = max(1, int(round(self.fraction * numel)))
        k = min(k, numel)
        rng = np.random.default_rng([self.seed, index, param_index])
        pos = np.sort(rng.choice(numel, size=k, replace=False))
        signs = rng.choice(np.array([-1.0, 1.0]), size=k)
        return pos, signs

    @torch.no_grad()
    def apply(self, grad: Tensor, index: int, param_index: int) -> Tensor:
        """The gradient with this event's outlier added (a new tensor; ``grad`` is not modified)."""
        if self.mode == "scale":
            return grad * self.scale
        out = grad.clone()
        flat = out.view(-1)
        pos, signs = self.spike(index, param_index, flat.numel())
        rms = grad.detach().float().pow(2).mean().sqrt()
        size = (self.scale * rms).to(flat.dtype)
        flat[torch.from_numpy(pos).to(flat.device)] += size * torch.from_numpy(signs).to(flat.device, flat.dtype)
        return out

    def to_dict(self) -> dict:
        return {"seed": self.seed, "rate": self.rate, "scale": self.scale, "fraction": self.fraction,
                "mode": self.mode, "start": self.start}


class OutlierInjector:
    """Applies an :class:`OutlierSchedule` to a model's gradients during training.

    ``install(model)`` counts training forward passes (a forward pre-hook; passes in eval mode are not counted)
    and registers a gradient hook on every trainable parameter, which runs before the gradient is accumulated, so
    any engine that reads gradients after accumulation (DeepSpeed ZeRO-1/2, plain DDP, no engine) sees the
    outlier. FSDP2 replaces the parameters after this point and is not supported. ``events`` lists what happened:
    ``{"micro_batch", "params", "spiked_elements"}`` per event.
    """

    def __init__(self, schedule: OutlierSchedule):
        if not isinstance(schedule, OutlierSchedule):
            raise ValueError(f"schedule must be an OutlierSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.micro_batch = -1
        self.events: list[dict] = []
        self._handles: list = []

    def install(self, model: torch.nn.Module) -> "OutlierInjector":
        def count(module, args):
            if module.training:
                self.micro_batch += 1

        self._handles.append(model.register_forward_pre_hook(count))
        params = [p for _, p in trainable_parameters(model)]
        for j, p in enumerate(params):
            self._handles.append(p.register_hook(self._hook(j, len(params))))
        return self

    def _hook(self, j: int, n_params: int):
        def hook(grad: Tensor):
            i = self.micro_batch
            if i < 0 or not self.schedule.is_event(i):
                return None
            if not self.events or self.events[-1]["micro_batch"] != i:
                self.events.append({"micro_batch": i, "params": 0, "spiked_elements": 0})
            ev = self.events[-1]
            ev["params"] += 1
            if self.schedule.mode == "spike":
                ev["spiked_elements"] += min(grad.numel(), max(1, int(round(self.schedule.fraction * grad.numel()))))
            else:
                ev["spiked_elements"] += grad.numel()
            return self.schedule.apply(grad, i, j)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """Every trainable parameter of ``model`` (tied ones once), in ``named_parameters()`` order: the index a
    parameter gets in :meth:`OutlierSchedule.spike`."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
