"""``AdamHD``: AdamW with decoupled Huber decay and a per-layer threshold; a drop-in for torch.optim.AdamW."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from ..distributed.layout import FlatLayout
from .stats import DELTA_MODES, layer_abs_sums, update_deltas

__all__ = ["AdamHD"]

# Keys an AdamW param group has that AdamHD does not use; dropped when loading an AdamW state_dict.
_ADAMW_ONLY_KEYS = ("amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay")


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or (hasattr(t, "to_local") and hasattr(t, "device_mesh"))


def _is_number(x) -> bool:
    if isinstance(x, bool):
        return False
    return isinstance(x, (int, float)) or (isinstance(x, Tensor) and x.numel() == 1)


def check_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter of a param group (or of the defaults)."""

    def bad(name, value, allowed):
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")

    lr = group["lr"]
    if not _is_number(lr) or not float(lr) >= 0.0:
        bad("lr", lr, "a number >= 0")
    eps = group["eps"]
    if not _is_number(eps) or not float(eps) > 0.0:
        bad("eps", eps, "a number > 0")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        bad("betas", betas, "a pair (beta1, beta2), each in [0, 1)")
    for i, b in enumerate(betas):
        if not _is_number(b) or not 0.0 <= float(b) < 1.0:
            bad(f"betas[{i}]", b, "a number in [0, 1)")
    wd = group["weight_decay"]
    if not _is_number(wd) or not float(wd) >= 0.0:
        bad("weight_decay", wd, "a number >= 0")
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
    if not isinstance(group["bias_correction"], bool):
        bad("bias_correction", group["bias_correction"], "True or False")
    for name in ("foreach", "fused"):
        if group[name] not in (None, True, False):
            bad(name, group[name], "None, True or False")
    if group["foreach"] and group["fused"]:
        raise ValueError("Invalid foreach/fused: both True (choose one, or leave both None for the default)")


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
        lr, betas, eps, weight_decay: as torch.optim.AdamW (same defaults).
        delta_mode: ``"ema"`` (default), ``"mean_abs"`` or ``"constant"``.
        delta_scale: ``c`` in ``δ = c·μ`` (default 1.5).
        delta_beta: ``β_δ`` of the EMA of mean ``|θ|`` (default 0.99).
        delta: the fixed δ for ``delta_mode="constant"`` (+inf allowed); must be None otherwise.
        decay: ``"prox"`` (default) or ``"clip"``.
        bias_correction: Adam's bias correction (default True).
        foreach, fused: implementation choice as in torch.optim; None picks the fastest for the device.

    Every argument can be set per param group. State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (as
    AdamW, so AdamW checkpoints load) and ``delta_ema`` (μ, fp32 0-d) in ``"ema"`` mode with
    ``weight_decay > 0``. Groups with ``weight_decay == 0`` need and compute no statistic.

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
        *,
        delta_mode: str = "ema",
        delta_scale: float = 1.5,
        delta_beta: float = 0.99,
        delta: float | None = None,
        decay: str = "prox",
        bias_correction: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, delta_mode=delta_mode, delta_scale=delta_scale,
                        delta_beta=delta_beta, delta=delta, decay=decay, bias_correction=bias_correction,
                        foreach=foreach, fused=fused)
        check_hyperparameters(defaults)
        # Engine integrations set this: called with the stacked local partial sums of every layer, returns the
        # sums over the ranks that shard them (one collective). None: layers are whole on this process.
        self.reduce_layer_sums: Callable[[Tensor], Tensor] | None = None
        # Engine integrations may set this: param -> number of elements of the WHOLE layer it belongs to.
        self.layer_numel: Callable[[Tensor], int] | None = None
        # Engine integrations may set this: param -> the local tensor to update (e.g. DTensor.to_local()).
        self.local_tensor: Callable[[Tensor], Tensor] | None = None
        # Engine integrations set this when the optimizer's params are flat per-rank buffers holding parts of many
        # layers (ZeRO): see adamhd_dist.distributed.layout. The engine then calls begin_step() once per training step.
        self.layout: FlatLayout | None = None
        self._loaded_layer_state: dict | None = None
        self._last_deltas: dict[Tensor, float] | tuple = {}
        self._pending_nonfinite: list[tuple[int, Tensor]] = []
        # param -> (Σ|θ| after its last update, version counter and address of the updated tensor): the next
        # step's statistic, produced by the update itself. Used only while the tensor is provably unchanged.
        self._abs_sum_cache: dict[Tensor, tuple[Tensor, int, int]] = {}
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("reduce_layer_sums", None)
        self.__dict__.setdefault("layer_numel", None)
        self.__dict__.setdefault("local_tensor", None)
        self.__dict__.setdefault("layout", None)
        self.__dict__.setdefault("_loaded_layer_state", None)
        self.__dict__.setdefault("_last_deltas", {})
        self.__dict__.setdefault("_pending_nonfinite", [])
        self.__dict__.setdefault("_abs_sum_cache", {})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
            check_hyperparameters(group)
        except ValueError:
            self.param_groups.pop()
            raise
        for p in group["params"]:
            if p.is_complex():
                self.param_groups.pop()
                raise ValueError("AdamHD does not support complex parameters (use torch.view_as_real)")
        if any(getattr(p, "_fsdp_flattened", False) for p in group["params"]):  # FSDP1 flat-parameter views
            self.param_groups.pop()
            from ..distributed.fsdp import fsdp1_unsupported_error

            raise fsdp1_unsupported_error()
        if self.reduce_layer_sums is None and any(_is_dtensor(p) for p in group["params"]):
            # FSDP2 / DTensor parameters: the layer statistic is reduced over the shard dimension(s).
            from ..distributed.dtensor import install_dtensor_hooks

            install_dtensor_hooks(self)

    # ----------------------------------------------------------------------------------------------------------
    # state
    def _needs_delta(self, group) -> bool:
        return float(group["weight_decay"]) != 0.0 and group["delta_mode"] != "constant"

    def _init_state(self, p: Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0 or "exp_avg" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _local(self, t: Tensor) -> Tensor:
        return self.local_tensor(t) if self.local_tensor is not None else t

    def _numel(self, p: Tensor) -> int:
        return self.layer_numel(p) if self.layer_numel is not None else p.numel()

    # ----------------------------------------------------------------------------------------------------------
    def _collect(self):
        """Per group: (group, params with grads, their states)."""
        work = []
        for group in self.param_groups:
            ps, states = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamHD does not support sparse gradients")
                ps.append(p)
                states.append(self._init_state(p))
            work.append((group, ps, states))
        return work

    @torch.no_grad()
    def _group_deltas(self, work) -> list[Tensor | None]:
        """δ for every param that needs one, across ALL groups, with ONE reduction of the layer sums; updates μ
        (``delta_ema``) in place. Returns one fp32 δ vector per entry of ``work`` (None where the group has no
        decay). The statistic's params are the decayed groups' params that have a gradient, in order, so with one
        δ setting each group's δ is a slice of one vector."""
        stat_params, stat_states, stat_groups, spans = [], [], [], []
        for group, ps, states in work:
            if self._needs_delta(group):
                spans.append((len(stat_params), len(ps)))
                stat_params += ps
                stat_states += states
                stat_groups += [group] * len(ps)
            else:
                spans.append(None)
        out: list[Tensor | None] = [None] * len(work)
        if stat_params:
            sums = self._local_abs_sums(stat_params)
            if self.reduce_layer_sums is not None:
                sums = self.reduce_layer_sums(sums)
            numels = [self._numel(p) for p in stat_params]
            # groups may differ in mode/scale/beta: run the (cheap, vectorised) rule per distinct setting
            settings: dict[tuple, list[int]] = {}
            for i, g in enumerate(stat_groups):
                settings.setdefault((g["delta_mode"], float(g["delta_scale"]), float(g["delta_beta"])), []).append(i)
            d_all = None
            for (mode, scale, beta), idx in settings.items():
                # the usual case, one setting for every layer, needs no gather (an index tensor would be a
                # host-to-device copy, which waits for the GPU)
                whole = len(settings) == 1
                sts = stat_states if whole else [stat_states[i] for i in idx]
                has_mu = [("delta_ema" in st) for st in sts] if mode == "ema" else None
                mus = None
                if mode == "ema" and any(has_mu):
                    old_mu = [st["delta_ema"] for st, h in zip(sts, has_mu) if h]
                    if len(old_mu) == len(sts) and all(t.device == sums.device for t in old_mu):
                        mus = torch.stack(old_mu)
                    else:
                        mus = torch.stack([st["delta_ema"].to(sums.device) if h
                                           else torch.zeros((), device=sums.device) for st, h in zip(sts, has_mu)])
                sel = None if whole else torch.tensor(idx, device=sums.device)
                d, new_mu = update_deltas(sums if whole else sums[sel], numels if whole else [numels[i] for i in idx],
                                          mus, has_mu, mode=mode, scale=scale, beta=beta)
                if new_mu is not None:
                    old = [j for j, h in enumerate(has_mu) if h]
                    if old:  # one foreach copy instead of a copy per layer
                        src = new_mu if len(old) == len(sts) else new_mu[torch.tensor(old, device=new_mu.device)]
                        torch._foreach_copy_([sts[j]["delta_ema"] for j in old], list(src.unbind(0)))
                    if len(old) < len(sts):
                        ps = stat_params if whole else [stat_params[i] for i in idx]
                        for j, h in enumerate(has_mu):
                            if not h:
                                sts[j]["delta_ema"] = new_mu[j].to(ps[j].device).clone()
                if whole:
                    d_all = d
                else:
                    if d_all is None:
                        d_all = torch.empty(len(stat_params), dtype=torch.float32, device=d.device)
                    d_all[sel] = d
            for k, span in enumerate(spans):
                if span is not None:
                    out[k] = d_all[span[0]:span[0] + span[1]]
        for k, (group, ps, _) in enumerate(work):
            if group["delta_mode"] == "constant" and float(group["weight_decay"]) != 0.0 and ps:
                out[k] = torch.full((len(ps),), float(group["delta"]), dtype=torch.float32, device=ps[0].device)
        return out

    def _local_abs_sums(self, params: list[Tensor]) -> Tensor:
        """Σ|θ_local| per param: from the previous update's by-product when the tensor is unchanged since (same
        version counter and address), else one fresh :func:`layer_abs_sums` call for the rest."""
        locals_ = params if self.local_tensor is None else [self.local_tensor(p) for p in params]
        cached, missing = {}, []
        for i, (p, t) in enumerate(zip(params, locals_)):
            hit = self._abs_sum_cache.get(p)
            if hit is not None and hit[1] == t._version and hit[2] == t.data_ptr():
                cached[i] = hit[0]
            else:
                missing.append(i)
        if not cached:
            return layer_abs_sums(locals_)
        device = locals_[0].device
        if not missing:  # the steady state: every sum comes from the last update
            return torch.stack([cached[i] for i in range(len(params))]).to(device)
        out = torch.empty(len(params), dtype=torch.float64, device=device)
        idx = list(cached)
        out[torch.tensor(idx, device=device)] = torch.stack([cached[i] for i in idx]).to(device)
        if missing:
            out[torch.tensor(missing, device=device)] = layer_abs_sums([locals_[i] for i in missing]).to(device)
        return out

    def invalidate_layer_stats(self) -> None:
        """Forget the statistics kept from the last update, so the next step re-reads every θ. The optimizer
        notices in-place changes to a parameter by itself (its version counter); call this after writing into a
        parameter's storage behind autograd's back (e.g. ``p.data.copy_(...)``)."""
        self._abs_sum_cache.clear()
        if self.layout is not None:
            self.layout.clear_views()

    # ----------------------------------------------------------------------------------------------------------
    # flat layouts (ZeRO partitions)
    def set_layout(self, layout: FlatLayout | None) -> None:
        """Declare that this optimizer's params are flat per-rank buffers described by ``layout`` (engine
        integrations call this). Every flat tensor of a group with weight decay must be in the layout."""
        self.layout = layout
        if layout is not None:
            # state up front (step 0, zero moments), so engines can map and checkpoint it before the first step
            for flat in layout.fragments:
                self._init_state(flat)
        if layout is not None and self._loaded_layer_state is not None:
            layout.load_state_dict(self._loaded_layer_state, strict=False)
            self._loaded_layer_state = None

    def _delta_setting(self, group) -> tuple | None:
        if float(group["weight_decay"]) == 0.0:
            return None
        if group["delta_mode"] == "constant":
            return ("constant", 0.0, 0.0, float(group["delta"]))
        return (group["delta_mode"], float(group["delta_scale"]), float(group["delta_beta"]), None)

    @torch.no_grad()
    def begin_step(self) -> None:
        """Start a training step of a flat-layout optimizer: read this rank's part of every layer's ``Σ|θ|`` and
        sum them over the ranks in ONE collective. Engines call it once per training step before they call
        :meth:`step` (once per param group or sub-group); μ changes only when :meth:`step` runs, so a step the
        engine skips (fp16 overflow) leaves it untouched."""
        lay = self.layout
        if lay is None:
            return
        per_group = [self._delta_setting(g) for g in self.param_groups]
        settings = [per_group[g] for g in lay.groups]
        need = {i for i, st in enumerate(settings) if st is not None and st[0] != "constant"}
        sums = lay.local_sums(None if len(need) == len(settings) else need) if need else None
        if need and lay.reduce is not None:
            sums = lay.reduce(sums)
        lay.pending_sums = (sums, settings)
        lay.ready = False

    def _layout_deltas(self) -> Tensor:
        """δ per layer for this training step (computed, and μ advanced, on the first inner step after
        :meth:`begin_step`)."""
        lay = self.layout
        if lay.pending_sums is None:
            if lay.ready:
                return lay.delta
            raise RuntimeError("AdamHD has a flat layout but begin_step() was not called before step(): step it "
                               "through its engine (adamhd_dist.deepspeed.initialize)")
        sums, settings = lay.pending_sums
        lay.pending_sums = None
        by_setting: dict[tuple, list[int]] = {}
        for i, st in enumerate(settings):
            if st is not None:
                by_setting.setdefault(st, []).append(i)
        if len(by_setting) == 1 and len(next(iter(by_setting.values()))) == len(settings):
            (mode, scale, beta, const), = by_setting
            if mode != "constant":  # the usual case: one rule for every layer, whole-vector ops, no gather
                d, new_mu = update_deltas(sums, lay.numels, lay.mu, lay.has_mu, mode=mode, scale=scale, beta=beta)
                lay.delta.copy_(d)
                if new_mu is not None:
                    lay.mu.copy_(new_mu)
                    lay.has_mu.fill_(True)
                lay.ready = True
                return lay.delta
        for (mode, scale, beta, const), idx in by_setting.items():
            sel = torch.tensor(idx, dtype=torch.long, device=lay.device)
            if mode == "constant":
                lay.delta[sel] = const
                continue
            d, new_mu = update_deltas(sums[sel], [lay.numels[i] for i in idx], lay.mu[sel], lay.has_mu[sel],
                                      mode=mode, scale=scale, beta=beta)
            lay.delta[sel] = d.to(lay.device)
            if new_mu is not None:
                lay.mu[sel] = new_mu.to(lay.device)
                lay.has_mu[sel] = True
        lay.ready = True
        return lay.delta

    def _expand_flat(self, group, ps, states, steps, deltas):
        """Replace each flat tensor of a decayed group by its layer fragments (views), each with its layer's δ."""
        lay = self.layout
        out_p, out_g, out_m, out_v, out_t, out_d, owners = [], [], [], [], [], [], []
        for p, st, t in zip(ps, states, steps):
            frags = lay.fragments.get(p)
            if frags is None:
                raise RuntimeError(f"a tensor of {p.numel()} elements in a decayed param group is not in the "
                                   f"optimizer's flat layout")
            lo = self._local
            out_p += lay.persistent_views(p, lo(p), "param")
            out_g += lay.fragment_views(p, lo(p.grad))
            out_m += lay.persistent_views(p, lo(st["exp_avg"]), "exp_avg")
            out_v += lay.persistent_views(p, lo(st["exp_avg_sq"]), "exp_avg_sq")
            out_t += [t] * len(frags)
            out_d.append(deltas[lay.fragment_layers(p)])
            owners.append((p, len(frags)))
        ds = torch.cat(out_d) if out_d else torch.zeros(0)
        return out_p, out_g, out_m, out_v, out_t, ds, owners

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

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One AdamHD step for every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            return loss  # GradScaler saw inf/nan: this step changes no state (step, moments and μ included)
        self._report_nonfinite()

        work = self._collect()
        lay = self.layout
        if lay is not None:
            layer_delta = self._layout_deltas()
            group_deltas = [None] * len(work)
        else:
            group_deltas = self._group_deltas(work)
        # expanded by last_deltas(), when asked (params and δ vectors only: no state is kept alive by it)
        self._last_deltas = tuple((ps, ds) for (_, ps, _), ds in zip(work, group_deltas) if ds is not None)
        local = self._local
        for (group, ps, states), group_delta in zip(work, group_deltas):
            if not ps:
                continue
            step_tensors = [s["step"] for s in states]
            torch._foreach_add_(step_tensors, 1.0)
            steps = torch.stack(step_tensors).tolist()
            beta1, beta2 = group["betas"]
            wd = float(group["weight_decay"])
            owners = None
            if lay is not None and wd != 0.0:
                params, grads, m, v, steps, ds, owners = self._expand_flat(group, ps, states, steps, layer_delta)
                device = params[0].device if params else ps[0].device
                ds = ds.to(device)
                needs = group["delta_mode"] != "constant"
            else:
                if self.local_tensor is None:  # the tensors themselves
                    params, grads = list(ps), [p.grad for p in ps]
                    m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
                else:
                    params, grads = [local(p) for p in ps], [local(p.grad) for p in ps]
                    m, v = [local(s["exp_avg"]) for s in states], [local(s["exp_avg_sq"]) for s in states]
                ds = group_delta.to(ps[0].device) if wd != 0.0 else None
                needs = self._needs_delta(group)
                device = params[0].device
            if not params:
                continue
            sums_out = torch.empty(len(params), dtype=torch.float64, device=device) if needs else None
            count = F.adamhd(
                params, grads, m, v, steps, ds,
                foreach=group["foreach"], fused=group["fused"], grad_scale=grad_scale, abs_sums_out=sums_out,
                lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                weight_decay=wd, decay=group["decay"], bias_correction=group["bias_correction"])
            self._pending_nonfinite.append((int(max(steps)), count))
            if needs and owners is not None:
                for (p, n), chunk in zip(owners, sums_out.split([n for _, n in owners])):
                    lay.remember_sums(p, chunk)
            elif needs:
                for p, total in zip(ps, sums_out.unbind(0)):
                    t = local(p)
                    self._abs_sum_cache[p] = (total, t._version, t.data_ptr())
        self._report_nonfinite()
        return loss

    # ----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """As torch.optim, plus, when the optimizer has a flat layout, ``"layer_state"`` ({layer name:
        {"delta_ema": μ}}: per-layer state keyed by name, independent of how the layers are cut) and
        ``"flat_layout"`` (which elements of which layer each saved flat tensor holds, so that a checkpoint can be
        loaded at another world size)."""
        sd = super().state_dict()
        if self.layout is not None:
            sd["layer_state"] = self.layout.state_dict()
            sd["flat_layout"] = self.layout.describe([p for g in self.param_groups for p in g["params"]])
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an AdamHD state_dict exactly, or an AdamW one (keeps step and moments; μ starts from the next
        step's statistic). μ is kept in fp32 whatever the parameter dtype."""
        state_dict = dict(state_dict)
        layer_state = state_dict.pop("layer_state", None)
        state_dict.pop("flat_layout", None)
        groups = []
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(state_dict['param_groups'])} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        for saved, current in zip(state_dict["param_groups"], self.param_groups):
            saved = dict(saved)
            if saved.get("amsgrad"):
                raise ValueError("cannot continue an AdamW state with amsgrad=True as AdamHD (no max_exp_avg_sq)")
            if saved.get("maximize"):
                raise ValueError("cannot continue an optimizer state with maximize=True as AdamHD")
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
        saved_state = state_dict["state"]
        mus = {k: v["delta_ema"] for k, v in saved_state.items() if "delta_ema" in v}
        state_dict["state"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("delta_ema", "max_exp_avg_sq")}
                               for k, v in saved_state.items()}
        super().load_state_dict(state_dict)
        self._abs_sum_cache.clear()
        if self.layout is not None:
            self.layout.clear_views()
        index = [p for g in self.param_groups for p in g["params"]]
        for p in index:
            st = self.state.get(p)
            if st and "step" in st:
                st["step"] = st["step"].detach().to("cpu", torch.float32) if isinstance(st["step"], Tensor) \
                    else torch.tensor(float(st["step"]), dtype=torch.float32)
        # saved state keys are the saved groups' "params" entries: positions, or FQNs (torch.distributed.checkpoint)
        keys = {k: p for g, cur in zip(groups, self.param_groups) for k, p in zip(g["params"], cur["params"])}
        for k, mu in mus.items():
            p = keys[k]
            self.state[p]["delta_ema"] = torch.as_tensor(mu).detach().to(p.device, torch.float32).clone()
        self._last_deltas = {}
        if layer_state is not None:
            if self.layout is not None:
                self.layout.load_state_dict(layer_state, strict=False)
            else:
                self._loaded_layer_state = layer_state

    def last_deltas(self) -> dict[Tensor, float]:
        """{param: δ used at its most recent step} (params with weight_decay > 0 only)."""
        last = self._last_deltas
        if isinstance(last, tuple):  # ((params, δ vector) per decayed group) of the last step
            expanded = {}
            for ps, ds in last:
                expanded.update(zip(ps, ds.tolist()))
            self._last_deltas = last = expanded
        return {p: float(d) for p, d in last.items()}
