"""``AdamHD``: AdamW with decoupled Huber decay and a per-layer threshold; a drop-in for torch.optim.AdamW."""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from .layer_stats import (FSDP1_MESSAGE, UNPLACED_FIXES, LayerStats, UnplacedTensorError, auto_strategy,
                          is_dtensor, real_view)
from .stats import DELTA_MODES, DeltaSetting, advance_deltas, delta_setting

__all__ = ["AdamHD"]

# Keys an AdamW param group has that AdamHD does not use; dropped when loading an AdamW state_dict.
_ADAMW_ONLY_KEYS = ("decoupled_weight_decay",)
# Keys this version added to a param group: an older pickle or state_dict gets AdamW's defaults for them.
_ADAMW_DEFAULTS = dict(amsgrad=False, maximize=False, capturable=False, differentiable=False)


def _is_number(x) -> bool:
    if isinstance(x, bool):
        return False
    return isinstance(x, (int, float)) or (isinstance(x, Tensor) and x.numel() == 1)


def _value(x):
    """A hyperparameter as torch.optim prints it (a 1-element tensor as its number)."""
    return x.item() if isinstance(x, Tensor) and x.numel() == 1 else x


def check_hyperparameters(group: dict[str, Any]) -> None:
    """Raise naming the first invalid hyperparameter of a param group (or of the defaults). The checks torch's
    AdamW makes raise what AdamW raises, in its words, followed by the argument's name and what is allowed."""

    def bad(name, value, allowed, torch_words=None):
        head = f"{torch_words}: {_value(value)} " if torch_words else f"Invalid {name}: {value!r} "
        raise ValueError(f"{head}({name}: allowed {allowed})")

    lr, foreach, capturable = group["lr"], group["foreach"], group["capturable"]
    if isinstance(lr, Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not _is_number(lr) or not float(lr) >= 0.0:
        bad("lr", lr, "a number >= 0", "Invalid learning rate")
    eps = group["eps"]
    if not _is_number(eps) or not float(eps) > 0.0:
        bad("eps", eps, "a number > 0", "Invalid epsilon value")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        bad("betas", betas, "a pair (beta1, beta2), each in [0, 1)")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, b in enumerate(betas):
        if isinstance(b, Tensor):
            if foreach and not capturable:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if not _is_number(b) or not 0.0 <= float(b) < 1.0:
            bad(f"betas[{i}]", b, "a number in [0, 1)", f"Invalid beta parameter at index {i}")
    wd = group["weight_decay"]
    if not _is_number(wd) or not float(wd) >= 0.0:
        bad("weight_decay", wd, "a number >= 0", "Invalid weight_decay value")
    mode = group["delta_mode"]
    if mode not in DELTA_MODES:
        bad("delta_mode", mode, " | ".join(repr(m) for m in DELTA_MODES))
    scale = group["delta_scale"]
    if not _is_number(scale) or not (0.0 < float(scale) < math.inf):
        bad("delta_scale", scale, "a finite number > 0")
    dbeta = group["delta_beta"]
    if not _is_number(dbeta) or not 0.0 <= float(dbeta) < 1.0:
        bad("delta_beta", dbeta, "a number in [0, 1)")
    delta = group["delta"]
    if mode == "constant":
        if delta is None:
            raise ValueError("Invalid delta: None (delta_mode='constant' needs delta, a number >= 0; +inf allowed)")
        if not _is_number(delta) or not float(delta) >= 0.0:
            bad("delta", delta, "a number >= 0 (+inf allowed) when delta_mode='constant'")
    elif delta is not None:
        raise ValueError(f"Invalid delta: {delta!r} (only used with delta_mode='constant'; "
                         f"delta_mode is {mode!r}, whose δ = delta_scale * statistic)")
    if group["decay"] not in F.DECAYS:
        bad("decay", group["decay"], " | ".join(repr(d) for d in F.DECAYS))
    for name in ("bias_correction", "amsgrad", "maximize", "capturable", "differentiable"):
        if not isinstance(group[name], bool):
            bad(name, group[name], "True or False")
    for name in ("foreach", "fused"):
        if group[name] not in (None, True, False):
            bad(name, group[name], "None, True or False")
    if group["fused"]:
        if group["differentiable"]:
            raise RuntimeError("`fused` does not support `differentiable`")
        if group["foreach"]:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together. (foreach/fused: choose one, or "
                               "leave both None for the default)")


class AdamHD(Optimizer):
    r"""AdamW with decoupled Huber decay (AdamHD, Guo & Fan 2025) and a per-layer threshold δ.

    .. math::
        \begin{aligned}
        &\textbf{input}: \alpha\ (\text{lr}),\ \beta_1, \beta_2,\ \epsilon,\ \lambda\ (\text{weight decay}),\
            c\ (\text{delta\_scale}),\ \beta_\delta\ (\text{delta\_beta}),\ \tau = \alpha\lambda \\
        &\textbf{for}\ t = 1, 2, \dots\ \textbf{and each layer}\ \theta\ \textbf{do} \\
        &\quad s_t \leftarrow \tfrac{1}{n}\textstyle\sum_i |\theta_{t,i}|
            \quad(\text{over the whole, unsharded layer}) \\
        &\quad \mu_t \leftarrow s_1\ \text{if}\ t = 1\ \text{else}\ \beta_\delta\mu_{t-1} + (1-\beta_\delta)s_t,
            \qquad \delta_t \leftarrow c\,\mu_t \quad(\text{``ema''; ``mean\_abs'': } c\,s_t;
            \text{ ``constant'': } \delta) \\
        &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
               v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        &\quad u_t \leftarrow \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} \\
        &\quad \textbf{prox:}\ \tilde\theta \leftarrow \theta_{t} - \alpha u_t, \quad
            \theta_{t+1} \leftarrow \tilde\theta - \tau\,\mathrm{clip}\big(\tilde\theta/(1+\tau), -\delta_t, \delta_t\big)
            \quad(= \mathrm{prox}_{\tau H_{\delta_t}}(\tilde\theta)) \\
        &\quad \textbf{clip:}\ \theta' \leftarrow \theta_t - \tau\,\mathrm{clip}(\theta_t, -\delta_t, \delta_t), \quad
            \theta_{t+1} \leftarrow \theta' - \alpha u_t
        \end{aligned}

    where the Huber penalty is :math:`H_\delta(a) = a^2/2` for :math:`|a| \le \delta`, else
    :math:`\delta|a| - \delta^2/2`. With :math:`\delta = +\infty` ``clip`` is exactly AdamW; with
    :math:`\lambda = 0` both are Adam. The decay moves a coordinate by at most :math:`\tau\delta` and (``prox``)
    never flips its sign.

    Args:
        params: parameters or param groups (dicts), as for any torch optimizer. Groups may carry
            ``param_names`` (see :func:`adamhd_dist.param_groups`); names are used by
            :func:`adamhd_dist.layer_deltas` and in checkpoints.
        lr: learning rate α (default 1e-3); a float or a 1-element tensor, as torch.optim.AdamW.
        betas: ``(β1, β2)``, the moments' decay rates (default (0.9, 0.999)); floats or 1-element tensors.
        eps: ε added to the denominator (default 1e-8).
        weight_decay: λ, the decay strength, τ = α·λ (default 1e-2, as AdamW); 0 turns the decay (and the
            statistic) off for a group.
        amsgrad: as AdamW: the denominator uses the running maximum of ``v`` (state ``max_exp_avg_sq``, AdamW's
            key) (default False). ``fused=True`` computes it with the foreach ops.
        maximize: as AdamW: ascend the objective (the gradient's sign is flipped) (default False).
        foreach, fused: implementation choice as in torch.optim; None picks the fastest for the device (the fused
            kernel: C++ on the CPU, Triton on CUDA).
        capturable: as AdamW: the step counter lives on the parameter's device and the bias corrections are
            computed there, so a CUDA graph can capture the step (default False). On the CPU, as AdamW, only the
            fused path accepts it; the loop and foreach paths raise AdamW's error.
        differentiable: as AdamW: the step runs with autograd recording it, on the loop path (foreach raises, fused
            is refused at construction); δ is a constant of the update (the statistic is read without gradient),
            and non-finite gradients are not masked (default False).
        delta_mode: ``"ema"`` (default), ``"mean_abs"`` or ``"constant"``.
        delta_scale: ``c`` in ``δ = c·μ`` (default 1.5).
        delta_beta: ``β_δ`` of the EMA of mean ``|θ|`` (default 0.99).
        delta: the fixed δ for ``delta_mode="constant"`` (+inf allowed); must be None otherwise.
        decay: ``"prox"`` (default) or ``"clip"``.
        bias_correction: Adam's bias correction (default True).
        layer_stats: how the parameters map to layers and how a layer's ``Σ|θ|`` is summed across ranks (a
            :class:`~adamhd_dist.optim.layer_stats.LayerStats`). Default: whole layers on this process, or the
            DTensor strategy (one collective per step over the shards) when a parameter is a DTensor, which the
            optimizer sets up by itself. Engine integrations set a flat-layout strategy
            (:func:`adamhd_dist.deepspeed.attach`).

    Every argument can be set per param group. State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` and,
    with amsgrad, ``max_exp_avg_sq`` (as AdamW, so AdamW checkpoints load and AdamHD's load into AdamW) and
    ``delta_ema`` (μ, fp32 0-d) in ``"ema"`` mode with ``weight_decay > 0``. Groups with ``weight_decay == 0`` need
    and compute no statistic.

    Complex parameters are stepped as torch.optim steps them: as their real view (``torch.view_as_real``, the real
    and imaginary parts two independent coordinates). The per-layer statistic and the Huber decay are defined on
    that view: ``s = Σ(|Re θ| + |Im θ|) / (2n)`` and each part is decayed on its own.

    A step that raises changes nothing (parameters, moments, step counters, μ): what torch.optim checks for every
    optimizer is checked, in its words, before anything is written.

    AdamHD never steps a tensor it cannot place in a layer: a tensor in a group that needs the statistic which is
    neither a parameter it was given, nor covered by its layer-statistic strategy, nor a DTensor, stops the step
    with an :class:`~adamhd_dist.optim.layer_stats.UnplacedTensorError` naming the fix (this is what a ZeRO
    partition looks like when DeepSpeed was started without :func:`adamhd_dist.deepspeed.attach`). Parameters
    swapped in place for DTensors (Accelerate's FSDP2 ``prepare``) are recognised and reduced exactly.

    A gradient element that is not finite leaves that element's parameter and moments unchanged and is reported
    with a warning (the run is not silently poisoned); with ``torch.amp.GradScaler`` a step with ``found_inf``
    changes no state at all.

    Example::

        >>> model = torch.nn.Linear(4, 3)
        >>> opt = AdamHD(adamhd_dist.param_groups(model, weight_decay=0.1), lr=1e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    # torch.amp.GradScaler: pass grad_scale / found_inf as attributes instead of unscaling the grads.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        delta_mode: str = "ema",
        delta_scale: float = 1.5,
        delta_beta: float = 0.99,
        delta: float | None = None,
        decay: str = "prox",
        bias_correction: bool = True,
        layer_stats: LayerStats | None = None,
    ):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        delta_mode=delta_mode, delta_scale=delta_scale, delta_beta=delta_beta, delta=delta,
                        decay=decay, bias_correction=bias_correction)
        check_hyperparameters(defaults)
        self._init_attributes()
        super().__init__(params, defaults)
        self.set_layer_stats(layer_stats if layer_stats is not None else self.layer_stats)

    def _init_attributes(self) -> None:
        self.__dict__.setdefault("layer_stats", LayerStats())
        # per-layer state of a flat strategy (μ by layer, world-size independent), else None
        self.__dict__.setdefault("layer_state", None)
        # id(param) -> (weakref, shape): the tensors this optimizer was given (constructor, add_param_group), and
        # per param group (by identity) the shapes it was given in order: all, and those an engine optimizes
        # (trainable, not empty)
        self.__dict__.setdefault("_given", {})
        self.__dict__.setdefault("_given_shapes", {})
        # id(param group) -> (ids, whether it needs the statistic, shapes, the tensors) found placed at its last step;
        # checked again when any of them changes
        self.__dict__.setdefault("_placed", {})
        self.__dict__.setdefault("_loaded_layer_state", None)
        # flat strategy, one training step: (reduced Σ|θ| per layer, δ setting per layer) from begin_step(), and the
        # δ per layer once the first inner step computed it
        self.__dict__.setdefault("_pending", None)
        self.__dict__.setdefault("_layer_delta", None)
        self.__dict__.setdefault("_last_deltas", {})
        self.__dict__.setdefault("_pending_nonfinite", [])

    def __getstate__(self):
        # copies and pickles keep which tensors were given (by position), so a copied optimizer steps as the original
        state = super().__getstate__()
        state["_adamhd_given"] = [[j for j, p in enumerate(g["params"]) if self._is_given(p)] for g in self.param_groups]
        state["_adamhd_given_shapes"] = [self._given_shapes.get(id(g)) for g in self.param_groups]
        return state

    def __setstate__(self, state):
        state = dict(state)
        given, shapes = state.pop("_adamhd_given", None), state.pop("_adamhd_given_shapes", None)
        super().__setstate__(state)
        for group in self.param_groups:  # a group saved before these options existed: AdamW's defaults
            for key, value in _ADAMW_DEFAULTS.items():
                group.setdefault(key, value)
        self._init_attributes()
        for g, idx, sh in zip(self.param_groups, given or [], shapes or []):
            for j in idx:
                self._remember_given(g["params"][j])
            if sh is not None:
                self._given_shapes[id(g)] = sh

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
            check_hyperparameters(group)
            for p in group["params"]:
                if getattr(p, "_fsdp_flattened", False):  # FSDP1 flat-parameter views
                    raise ValueError(f"params: {FSDP1_MESSAGE}")
        except ValueError:
            self.param_groups.pop()
            raise
        for p in group["params"]:
            self._remember_given(p)
        self._given_shapes[id(group)] = ([tuple(p.shape) for p in group["params"]],
                                         [tuple(p.shape) for p in group["params"] if p.requires_grad and p.numel()])
        if self.layer_stats.optimizer is self:
            self.layer_stats.bind(self)  # re-validate against the new group (e.g. a DTensor on another mesh)
        self._adopt_dtensors(group["params"])

    # ----------------------------------------------------------------------------------------------------------
    # the layer-statistic strategy
    def set_layer_stats(self, stats: LayerStats) -> None:
        """Use ``stats`` for where the layers are and how their statistic is summed (see
        :mod:`adamhd_dist.optim.layer_stats`). Engine integrations call this; a flat strategy gets its state up
        front (step 0, zero moments) so engines can map and checkpoint it before the first step, and the per-layer
        state a checkpoint loaded before it existed."""
        if not isinstance(stats, LayerStats):
            raise TypeError(f"layer_stats must be a LayerStats, got {type(stats).__name__}")
        stats.bind(self)
        loaded = self._loaded_layer_state if stats.flat else None
        if loaded is not None:  # a checkpoint loaded before the layout was known: refused before anything changes
            _check_saved_layout(loaded[1], stats.layout)
        self.layer_stats = stats
        self._placed.clear()
        self._pending, self._layer_delta = None, None
        if not stats.flat:
            self.layer_state = None
            return
        self.layer_state = LayerState(stats.layout.names, stats.layout.device)
        for flat in stats.layout.fragments:
            self._init_state(flat)
        if loaded is not None:
            self._loaded_layer_state = None
            self.layer_state.load_state_dict(loaded[0], strict=False)

    def _adopt_dtensors(self, params) -> None:
        """Set up the DTensor strategy when DTensor parameters appear (given, or swapped in place by an engine)."""
        if type(self.layer_stats) is LayerStats and any(is_dtensor(p) for p in params):
            stats = auto_strategy(self, params)
            if stats is None:
                raise UnplacedTensorError("AdamHD has DTensor parameters but no DTensor strategy is registered "
                                          "(import adamhd_dist before building the optimizer)")
            self.set_layer_stats(stats)

    def _remember_given(self, p: Tensor) -> None:
        self._given[id(p)] = (weakref.ref(p), tuple(p.shape))

    def _is_given(self, p: Tensor) -> bool:
        """``p`` is a tensor this optimizer was given, still of the shape it had then (an engine that swaps a
        parameter's data for a shard of it, as FSDP1 does, makes it another tensor)."""
        hit = self._given.get(id(p))
        return hit is not None and hit[0]() is p and hit[1] == tuple(p.shape)

    def _check_placement(self, work) -> None:
        """Refuse to step a tensor whose layer statistic would be wrong. A tensor is placed when it is one this
        optimizer was given (of its shape then), one its strategy places (a flat partition of a layout), a DTensor
        (adopted here: an engine swapped it in place), or a whole-layer replacement: it has the shape of the tensor
        given at its position in the same param group, the group holding as many tensors as given, or as many as
        were given trainable and not empty (an engine's fp32 master copies, e.g. DeepSpeed's stage-0 fp16/bf16
        optimizer) — it then holds every element of that one layer. Under a flat layout, a decayed group's tensors
        must be the layout's."""
        stats = self.layer_stats
        for group, ps, _ in work:
            setting = delta_setting(group)
            needs = setting is not None and setting.needs_statistic
            key = (tuple(map(id, ps)), needs, [p.shape for p in ps])
            last = self._placed.get(id(group))
            if last is not None and last[:3] == key:  # as at the last step (tensors kept alive: no id reuse)
                continue
            shapes = None
            for p in ps:
                if getattr(p, "_fsdp_flattened", False):  # FSDP1 (use_orig_params): the given param now a shard
                    raise UnplacedTensorError(f"params: {FSDP1_MESSAGE}")
                if stats.places(p):
                    continue
                if stats.flat and setting is not None:
                    raise self._unplaced(group, p, "a decayed param group holds a tensor that is not in the "
                                                   "optimizer's flat layout (added after attach?)")
                if self._is_given(p):
                    continue
                if is_dtensor(p):
                    self._adopt_dtensors([p])
                    self._remember_given(p)
                    stats = self.layer_stats
                    if stats.flat:
                        raise UnplacedTensorError("AdamHD has a flat layout and DTensor parameters at once")
                    continue
                if not needs:
                    continue  # elementwise only: exact on any piece of a layer
                if shapes is None:
                    shapes = self._replacement_shapes(group)
                if shapes.get(id(p)) == tuple(p.shape):
                    continue
                raise self._unplaced(group, p, "it was not given and cannot be placed in a layer")
            self._placed[id(group)] = (*key, ps)

    def _replacement_shapes(self, group) -> dict[int, tuple]:
        """{id(tensor): the shape given at its position} when the group holds as many tensors as were given (or as
        were given trainable and not empty); else {}."""
        given = self._given_shapes.get(id(group))
        current = group["params"]
        for shapes in given or ():
            if len(shapes) == len(current):
                return {id(q): shape for q, shape in zip(current, shapes)}
        return {}

    def _unplaced(self, group, p: Tensor, why: str) -> UnplacedTensorError:
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        return UnplacedTensorError(
            f"AdamHD was asked to step a tensor of shape {tuple(p.shape)} ({p.numel():,} elements) in param group "
            f"{gi}: {why}, so it cannot compute that layer's Huber threshold δ (delta_mode={group['delta_mode']!r} "
            f"needs each layer's mean |θ| over the whole layer). This is what an engine that flattens or partitions "
            f"parameters hands the optimizer (DeepSpeed ZeRO, its BF16 optimizer). Fix:\n{UNPLACED_FIXES}")

    # ----------------------------------------------------------------------------------------------------------
    # state
    def _init_state(self, p: Tensor, group: dict | None = None) -> dict:
        """The state of ``p``, created on first use as AdamW creates it (the step counter on the CPU, or on the
        parameter's device with ``capturable``)."""
        state = self.state[p]
        if len(state) == 0 or "exp_avg" not in state:
            capturable = group is not None and group["capturable"]
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device) if capturable \
                else torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group is not None and group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _check_group(self, group: dict, ps: list[Tensor]) -> None:
        """What the step of this group would refuse, raised before any state is created or written."""
        if group["amsgrad"] and self.layer_stats.flat and delta_setting(group) is not None:
            raise ValueError("amsgrad=True is not supported for a decayed param group of a flat layout (ZeRO "
                             "partitions): set amsgrad=False for it")
        path = F.default_path(ps, group["foreach"], group["fused"])
        if group["differentiable"] and not group["foreach"] and not group["fused"]:
            path = "loop"
        states = [self.state.get(p) for p in ps]
        steps = [st["step"] if st and "step" in st else torch.zeros((), device=p.device)
                 for p, st in zip(ps, states)] if group["capturable"] else ()
        F.check_path(path, ps, steps, capturable=group["capturable"], differentiable=group["differentiable"])

    def _collect(self, created: list[Tensor] | None = None):
        """Per group: (group, params with grads, their states); every group checked before any state is made."""
        work = []
        for group in self.param_groups:
            ps = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamHD does not support sparse gradients")
                ps.append(p)
            if ps:
                self._check_group(group, ps)
            work.append((group, ps))
        out = []
        for group, ps in work:
            states = []
            for p in ps:
                if created is not None and not self.state.get(p):
                    created.append(p)
                states.append(self._init_state(p, group))
            out.append((group, ps, states))
        return out

    # ----------------------------------------------------------------------------------------------------------
    # δ: from the strategy's whole-layer sums, by advance_deltas (the one place δ is computed)
    @torch.no_grad()
    def _param_deltas(self, work, undo: list | None = None) -> list[Tensor | None]:
        """One layer per parameter: δ for every param that needs one, across ALL groups, with ONE reduction of the
        layer sums; μ (``delta_ema``) advanced in the state. Returns one fp32 δ vector per entry of ``work``
        (None where the group has no decay)."""
        stats = self.layer_stats
        layers, states, settings, spans = [], [], [], []
        for group, ps, sts in work:
            setting = delta_setting(group)
            if setting is None or not ps:
                spans.append(None)
                continue
            spans.append((len(layers), len(ps)))
            layers += ps
            states += sts
            settings += [setting] * len(ps)
        if not layers:
            return [None] * len(work)
        stat = [i for i, st in enumerate(settings) if st.needs_statistic]
        sums = None
        if stat:
            if len(stat) == len(layers):
                sums = stats.layer_sums(layers)
            else:
                sums = torch.zeros(len(layers), dtype=torch.float64)
                part = stats.layer_sums([layers[i] for i in stat])
                sums = sums.to(part.device)
                sums[torch.tensor(stat, device=part.device)] = part
        device = sums.device if sums is not None else stats.local(layers[0]).device
        has = ["delta_ema" in st for st in states]
        if all(has):
            mus = torch.stack([st["delta_ema"] for st in states]).to(device)
        elif any(has):
            mus = torch.stack([st["delta_ema"].to(device) if h else torch.zeros((), device=device)
                               for st, h in zip(states, has)])
        else:
            mus = torch.zeros(len(layers), device=device)
        numels = [stats.layer_numel(p) for p in layers] if stat else [1] * len(layers)
        deltas, new_mu, new_has = advance_deltas(settings, sums, numels, mus, has)
        ema = [i for i, st in enumerate(settings) if st.mode == "ema"]
        if ema:
            if undo is not None:  # to put μ back if the step raises
                undo += [(states[i], mus[i].clone() if has[i] else None) for i in ema]
            old = [i for i in ema if has[i]]
            if old:  # one foreach copy instead of a copy per layer
                src = new_mu if len(old) == len(layers) else new_mu[torch.tensor(old, device=new_mu.device)]
                torch._foreach_copy_([states[i]["delta_ema"] for i in old], list(src.unbind(0)))
            for i in ema:
                if not has[i]:
                    states[i]["delta_ema"] = new_mu[i].to(layers[i].device).clone()
        return [None if span is None else deltas[span[0]:span[0] + span[1]] for span in spans]

    def _layer_settings(self) -> list[DeltaSetting | None]:
        per_group = [delta_setting(g) for g in self.param_groups]
        return [per_group[g] for g in self.layer_stats.layout.groups]

    @torch.no_grad()
    def begin_step(self) -> None:
        """Start a training step of a flat-layout optimizer: sum this rank's part of every layer's ``Σ|θ|`` over the
        ranks in ONE collective. Engines call it once per training step before they call :meth:`step` (once per
        param group or sub-group); μ changes only when :meth:`step` runs, so a step the engine skips (fp16
        overflow) leaves it untouched. Does nothing without a flat strategy."""
        stats = self.layer_stats
        if not stats.flat:
            return
        settings = self._layer_settings()
        need = {i for i, st in enumerate(settings) if st is not None and st.needs_statistic}
        sums = stats.layer_sums(None if len(need) == len(settings) else need) if need else None
        self._pending = (sums, settings)
        self._layer_delta = None

    def _flat_deltas(self) -> Tensor:
        """δ per layer of a flat layout for this training step (computed, and μ advanced, on the first inner step
        after :meth:`begin_step`)."""
        if self._pending is None:
            if self._layer_delta is not None:
                return self._layer_delta
            raise RuntimeError("AdamHD has a flat layout but begin_step() was not called before step(): step it "
                               "through its engine (adamhd_dist.deepspeed.attach or initialize)")
        sums, settings = self._pending
        self._pending = None
        lay, table = self.layer_stats.layout, self.layer_state
        deltas, new_mu, new_has = advance_deltas(settings, sums, lay.numels, table.mu, table.has_mu)
        table.advance(deltas, new_mu, new_has)
        self._layer_delta = deltas
        return deltas

    def invalidate_layer_stats(self) -> None:
        """Forget the statistics kept from the last update, so the next step re-reads every θ. The optimizer
        notices in-place changes to a parameter by itself (its version counter); call this after writing into a
        parameter's storage behind autograd's back (e.g. ``p.data.copy_(...)``)."""
        self.layer_stats.invalidate()

    # ----------------------------------------------------------------------------------------------------------
    def _report_nonfinite(self):
        still = []
        for step, count in self._pending_nonfinite:
            if count.device.type == "cpu" or torch.cuda.current_stream(count.device).query():
                n = int(count.item())
                if n:
                    warnings.warn(f"AdamHD step {step}: {n} gradient element(s) were not finite; their "
                                  f"parameters and moments were left unchanged", RuntimeWarning, stacklevel=3)
            else:
                still.append((step, count))
        self._pending_nonfinite = still

    def step(self, closure: Callable[[], float] | None = None):
        """One AdamHD step for every parameter that has a gradient (with autograd recording it when the optimizer
        was built with ``differentiable=True``, as torch.optim does). A step that raises changes nothing."""
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            return self._step(closure)

    def _step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            return loss  # GradScaler saw inf/nan: this step changes no state (step, moments and μ included)
        self._report_nonfinite()

        created: list[Tensor] = []
        undo_mu: list = []
        table = self.layer_state
        saved_table = None if table is None else (table.mu.clone(), table.has_mu.clone(), table.delta.clone(),
                                                  self._pending, self._layer_delta)
        try:
            work = self._collect(created)
            self._check_placement(work)
            self._update(work, grad_scale, undo_mu)
        except BaseException:
            # put back what this step made or moved before it raised (checks run before any tensor is written)
            for p in created:
                self.state.pop(p, None)
            for st, mu in reversed(undo_mu):
                if mu is None:
                    st.pop("delta_ema", None)
                else:
                    st["delta_ema"].copy_(mu)
            if saved_table is not None:
                table.mu.copy_(saved_table[0])
                table.has_mu.copy_(saved_table[1])
                table.delta.copy_(saved_table[2])
                self._pending, self._layer_delta = saved_table[3:]
            raise
        self._report_nonfinite()
        return loss

    def _update(self, work, grad_scale, undo_mu) -> None:
        stats = self.layer_stats
        with torch.no_grad():
            if stats.flat:
                layer_delta = self._flat_deltas()
                group_deltas = [None] * len(work)
            else:
                layer_delta = None
                group_deltas = self._param_deltas(work, undo_mu)
        # expanded by last_deltas(), when asked (params and δ vectors only: no state is kept alive by it)
        self._last_deltas = tuple((ps, ds) for (_, ps, _), ds in zip(work, group_deltas) if ds is not None)
        for (group, ps, states), group_delta in zip(work, group_deltas):
            if not ps:
                continue
            step_tensors = [s["step"] for s in states]
            capturable = group["capturable"]
            if capturable:  # the next step numbers, on the device; the counters move once the update is done
                steps = torch._foreach_add(step_tensors, 1.0)
            else:
                steps = (torch.stack(step_tensors) + 1.0).tolist()
            beta1, beta2 = group["betas"]
            setting = delta_setting(group)
            vmax = None
            if stats.flat and setting is not None:
                params, grads, m, v, steps, ds, owners = stats.units(ps, states, steps, layer_delta)
                device = params[0].device if params else ps[0].device
                ds = ds.to(device)
            else:
                owners = None
                params, grads = list(ps), [p.grad for p in ps]
                m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
                if group["amsgrad"]:
                    vmax = [s["max_exp_avg_sq"] for s in states]
                if type(stats).local is not LayerStats.local:  # e.g. DTensor shards
                    params, grads, m, v = ([stats.local(t) for t in ts] for ts in (params, grads, m, v))
                    if vmax is not None:
                        vmax = [stats.local(t) for t in vmax]
                if any(t.is_complex() for t in params):  # as torch.optim: the real view, two coordinates each
                    params, grads, m, v = ([real_view(t) for t in ts] for ts in (params, grads, m, v))
                    if vmax is not None:
                        vmax = [real_view(t) for t in vmax]
                device = params[0].device
                ds = group_delta.to(device) if setting is not None else None
            if params:
                needs = setting is not None and setting.needs_statistic
                sums_out = torch.empty(len(params), dtype=torch.float64, device=device) if needs else None
                count = F.adamhd(
                    params, grads, m, v, steps, ds,
                    foreach=group["foreach"], fused=group["fused"], grad_scale=grad_scale, abs_sums_out=sums_out,
                    max_exp_avg_sqs=vmax, amsgrad=group["amsgrad"], maximize=group["maximize"],
                    capturable=capturable, differentiable=group["differentiable"],
                    lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), decay=group["decay"],
                    bias_correction=group["bias_correction"])
                step_now = int(max(float(t) for t in steps)) if not capturable else None
                self._pending_nonfinite.append((step_now, count))
                if needs and owners is not None:
                    for (p, n), chunk in zip(owners, sums_out.split([n for _, n in owners])):
                        stats.remember(p, chunk)
                elif needs:
                    for p, total in zip(ps, sums_out.unbind(0)):
                        stats.remember(p, total)
            with torch.no_grad():
                torch._foreach_add_(step_tensors, 1.0)

    # ----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """As torch.optim, plus, with a flat layout, ``"layer_state"`` ({layer name: {"delta_ema": μ}}: per-layer
        state keyed by name, independent of how the layers are cut) and ``"flat_layout"`` (which elements of which
        layer each saved flat tensor holds, so that a checkpoint can be loaded at another world size)."""
        sd = super().state_dict()
        if self.layer_stats.flat:
            sd["layer_state"] = self.layer_state.state_dict()
            sd["flat_layout"] = self.layer_stats.layout.describe([p for g in self.param_groups for p in g["params"]])
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an AdamHD state_dict exactly, or an AdamW one, with or without amsgrad (keeps step, moments and
        ``max_exp_avg_sq``; μ starts from the next step's statistic). μ is kept in fp32 whatever the parameter
        dtype. A state dict that does not fit (another number of groups, a bad hyperparameter) changes nothing."""
        state_dict = dict(state_dict)
        layer_state = state_dict.pop("layer_state", None)
        saved_layout = state_dict.pop("flat_layout", None)
        groups = []
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(state_dict['param_groups'])} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        for saved, current in zip(state_dict["param_groups"], self.param_groups):
            saved = dict(saved)
            for k in _ADAMW_ONLY_KEYS:
                saved.pop(k, None)
            for k, v in current.items():
                if k != "params":
                    saved.setdefault(k, v)
            if isinstance(saved.get("betas"), list):
                saved["betas"] = tuple(saved["betas"])
            check_hyperparameters(saved)
            groups.append(saved)
        state_dict["param_groups"] = groups
        before = list(self.param_groups)
        saved_state = state_dict["state"]
        mus = {k: v["delta_ema"] for k, v in saved_state.items() if "delta_ema" in v}
        state_dict["state"] = {k: {kk: vv for kk, vv in v.items() if kk != "delta_ema"}
                               for k, v in saved_state.items()}
        super().load_state_dict(state_dict)
        # torch rebuilds the group dicts: the shapes given per group follow them, in order
        self._given_shapes = {id(new): self._given_shapes[id(old)] for old, new in zip(before, self.param_groups)
                              if id(old) in self._given_shapes}
        self.layer_stats.invalidate()
        index = [p for g in self.param_groups for p in g["params"]]
        for g in self.param_groups:  # the step counter where this optimizer keeps it (see _init_state)
            for p in g["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    where = p.device if g.get("capturable") else "cpu"
                    st["step"] = st["step"].detach().to(where, torch.float32, copy=True) if isinstance(st["step"], Tensor) \
                        else torch.tensor(float(st["step"]), dtype=torch.float32, device=where)
        # saved state keys are the saved groups' "params" entries: positions, or FQNs (torch.distributed.checkpoint)
        keys = {k: p for g, cur in zip(groups, self.param_groups) for k, p in zip(g["params"], cur["params"])}
        for k, mu in mus.items():
            p = keys[k]
            self.state[p]["delta_ema"] = torch.as_tensor(mu).detach().to(p.device, torch.float32).clone()
        self._last_deltas = {}
        self._pending, self._layer_delta = None, None
        self._placed.clear()
        if layer_state is not None or saved_layout is not None:
            if self.layer_state is not None:
                _check_saved_layout(saved_layout, self.layer_stats.layout)
                self.layer_state.load_state_dict(layer_state or {}, strict=False)
            else:
                self._loaded_layer_state = (layer_state or {}, saved_layout)

    def last_deltas(self) -> dict[Tensor, float]:
        """{param: δ used at its most recent step} (params with weight_decay > 0 only; one layer per param)."""
        last = self._last_deltas
        if isinstance(last, tuple):  # ((params, δ vector) per decayed group) of the last step
            expanded = {}
            for ps, ds in last:
                expanded.update(zip(ps, ds.tolist()))
            self._last_deltas = last = expanded
        return {p: float(d) for p, d in last.items()}


def _check_saved_layout(saved: dict | None, layout) -> None:
    """A state saved over flat partitions holds each partition's moments: it loads only where the layers are cut
    the same way (a checkpoint of another world size goes through the engine adapter, which reshards it). The
    partitions are matched by their index in the engine's own list (independent of what the param groups hold at
    the moment: ZeRO-3 empties them between its sub-group steps)."""
    if saved is None:
        return

    def norm(frags):
        return [tuple(f) for f in frags]

    then = {v["engine_index"] if v.get("engine_index") is not None else int(k): norm(v["fragments"])
            for k, v in saved.items()}
    if then != layout.cuts():
        raise ValueError(
            "this optimizer state was saved over flat partitions that cut the layers differently (another world "
            "size, ZeRO stage or bucket setting): its moments would land on the wrong elements. Load it with "
            "engine.load_checkpoint after adamhd_dist.deepspeed.attach(engine), which reshards it, or read it with "
            "`python -m adamhd_dist.deepspeed export`")


class LayerState:
    """Per-layer state of an optimizer whose tensors hold parts of many layers (a flat strategy): μ of every layer
    by its index in the layout's table, the same on every rank, and δ at the latest step. Part of the optimizer's
    state (``state_dict()["layer_state"]``, by layer name: independent of how the layers are cut)."""

    def __init__(self, names: list[str], device: torch.device):
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        n = len(self.names)
        self.mu = torch.zeros(n, dtype=torch.float32, device=device)
        self.has_mu = torch.zeros(n, dtype=torch.bool, device=device)
        self.delta = torch.full((n,), float("nan"), dtype=torch.float32, device=device)  # δ at the latest step

    def advance(self, deltas: Tensor, mu: Tensor, has_mu: Tensor) -> None:
        self.delta.copy_(deltas)
        if mu is not self.mu:
            self.mu.copy_(mu)
        if has_mu is not self.has_mu:
            self.has_mu.copy_(has_mu)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """``{layer name: {"delta_ema": fp32 0-d}}`` for every layer that has a μ."""
        mu, has = self.mu.cpu(), self.has_mu.cpu()
        return {name: {"delta_ema": mu[i].clone()} for i, name in enumerate(self.names) if has[i]}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]], *, strict: bool = True) -> None:
        unknown = sorted(set(state) - set(self.index))
        if unknown and strict:
            raise ValueError(f"checkpoint has layer state for {len(unknown)} layer(s) this model does not have, "
                             f"e.g. {unknown[:3]}")
        self.mu.zero_()
        self.has_mu.zero_()
        for name, st in state.items():
            i = self.index.get(name)
            if i is None or "delta_ema" not in st:
                continue
            self.mu[i] = torch.as_tensor(st["delta_ema"], dtype=torch.float32).reshape(())
            self.has_mu[i] = True
        self.delta.fill_(float("nan"))
