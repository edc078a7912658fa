"""``AdamHD``: AdamW with decoupled Huber decay and a per-layer threshold; a drop-in for torch.optim.AdamW."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from .layer_stats import LayerStats
from .stats import DELTA_MODES, delta_setting

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
            key) (default False); the fused kernels keep it in the same pass.
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

    A step that raises on its inputs changes nothing (parameters, moments, step counters, μ): what torch.optim
    checks for every optimizer, the path's requirements and the fused kernel's presence are checked for every
    group before anything is written (torch's words where torch checks it), a moment of another shape than its
    parameter is refused by :meth:`load_state_dict`, and each kernel call checks all its tensors before it writes
    one. A failure that no check can foresee (memory exhausted, an interrupt) in a later param group leaves the
    groups before it stepped; the state this step created and μ are put back.

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
        if "layer_stats" not in self.__dict__:
            self.layer_stats = LayerStats()
            self.layer_stats.bind(self)
        self.__dict__.setdefault("_last_deltas", {})
        self.__dict__.setdefault("_pending_nonfinite", [])

    def __getstate__(self):
        # a copy or pickle steps with the default strategy, knowing which of its tensors were given
        state = super().__getstate__()
        state["_adamhd_given"] = self.layer_stats.given_state()
        return state

    def __setstate__(self, state):
        state = dict(state)
        given = state.pop("_adamhd_given", None)
        super().__setstate__(state)
        for group in self.param_groups:  # a group saved before these options existed: AdamW's defaults
            for key, value in _ADAMW_DEFAULTS.items():
                group.setdefault(key, value)
        self._init_attributes()
        self.layer_stats.restore_given(given)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
            check_hyperparameters(group)
            self.layer_stats.admit(group)
        except ValueError:
            self.param_groups.pop()
            raise

    @property
    def layer_state(self):
        """The per-layer state (μ by layer name) of a flat-layout strategy, else None."""
        return self.layer_stats.layer_state

    def set_layer_stats(self, stats: LayerStats) -> None:
        """Use ``stats`` for where the layers are and how their statistic is summed (see
        :mod:`adamhd_dist.optim.layer_stats`). Engine integrations call this; a flat strategy gets its state up
        front (step 0, zero moments) so engines can map and checkpoint it before the first step."""
        if not isinstance(stats, LayerStats):
            raise TypeError(f"layer_stats must be a LayerStats, got {type(stats).__name__}")
        stats.bind(self, self.layer_stats)
        self.layer_stats = stats
        for p in stats.eager_params():
            self._init_state(p)

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
        self.layer_stats.check_group(group)
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

    def begin_step(self) -> None:
        """Start a training step of a flat-layout optimizer: its strategy sums this rank's part of every layer's
        ``Σ|θ|`` over the ranks in ONE collective. Engines call it once per training step before they call
        :meth:`step` (once per param group or sub-group); μ changes only when :meth:`step` runs, so a step the
        engine skips (fp16 overflow) leaves it untouched. Does nothing without a flat strategy."""
        self.layer_stats.begin_step()

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
        was built with ``differentiable=True``, as torch.optim does). A step that raises on its inputs changes
        nothing (see the class docstring)."""
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
        undo = None
        try:
            work = self._collect(created)
            self.layer_stats.check_placement(work)  # may set the DTensor strategy: read it afterwards
            undo = self.layer_stats.undo_point()
            self._update(work, grad_scale)
        except BaseException:
            # put back what this step made or moved before it raised (checks run before any tensor is written)
            for p in created:
                self.state.pop(p, None)
            if undo is not None:
                undo()
            raise
        self._report_nonfinite()
        return loss

    def _update(self, work, grad_scale) -> None:
        stats = self.layer_stats
        group_deltas = stats.deltas(work)
        if not stats.flat:  # expanded by last_deltas(), when asked (params and δ vectors only: no state kept alive)
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
            params, grads, m, v, vmax, unit_steps, ds, owners = stats.units(group, ps, states, steps, group_delta)
            if params:
                needs = setting is not None and setting.needs_statistic
                sums_out = torch.empty(len(params), dtype=torch.float64, device=params[0].device) if needs else None
                count = F.adamhd(
                    params, grads, m, v, unit_steps, ds,
                    foreach=group["foreach"], fused=group["fused"], grad_scale=grad_scale, abs_sums_out=sums_out,
                    max_exp_avg_sqs=vmax, amsgrad=group["amsgrad"], maximize=group["maximize"],
                    capturable=capturable, differentiable=group["differentiable"],
                    lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), decay=group["decay"],
                    bias_correction=group["bias_correction"])
                step_now = int(max(float(t) for t in steps)) if not capturable else None
                self._pending_nonfinite.append((step_now, count))
                if needs:
                    stats.record(owners, sums_out)
            with torch.no_grad():
                torch._foreach_add_(step_tensors, 1.0)

    # ----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """As torch.optim, plus, with a flat layout, ``"layer_state"`` ({layer name: {"delta_ema": μ}}: per-layer
        state keyed by name, independent of how the layers are cut) and ``"flat_layout"`` (which elements of which
        layer each saved flat tensor holds, so that a checkpoint can be loaded at another world size)."""
        sd = super().state_dict()
        sd.update(self.layer_stats.state_dict([p for g in self.param_groups for p in g["params"]]))
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an AdamHD state_dict exactly, or an AdamW one, with or without amsgrad (keeps step, moments and
        ``max_exp_avg_sq``; μ starts from the next step's statistic). μ is kept in fp32 whatever the parameter
        dtype. A state dict that does not fit (another number of groups, a bad hyperparameter, a moment of another
        shape than its parameter) changes nothing."""
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
        self.layer_stats.check_saved(layer_state, saved_layout)
        saved_state = state_dict["state"]
        _check_state_shapes(groups, self.param_groups, saved_state)
        mus = {k: v["delta_ema"] for k, v in saved_state.items() if "delta_ema" in v}
        state_dict["state"] = {k: {kk: vv for kk, vv in v.items() if kk != "delta_ema"}
                               for k, v in saved_state.items()}
        super().load_state_dict(state_dict)
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
        self.layer_stats.load_state_dict(layer_state, saved_layout)

    def last_deltas(self) -> dict[Tensor, float]:
        """{param: δ used at its most recent step} (params with weight_decay > 0 only; one layer per param)."""
        last = self._last_deltas
        if isinstance(last, tuple):  # ((params, δ vector) per decayed group) of the last step
            expanded = {}
            for ps, ds in last:
                expanded.update(zip(ps, ds.tolist()))
            self._last_deltas = last = expanded
        return {p: float(d) for p, d in last.items()}


_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _check_state_shapes(saved_groups, groups, saved_state) -> None:
    """Refuse, before anything is loaded, a moment whose shape is not its parameter's: the update would fail on it
    part way through a step, after other tensors were written."""
    for gi, (saved, current) in enumerate(zip(saved_groups, groups)):
        for j, (key, p) in enumerate(zip(saved["params"], current["params"])):
            st = saved_state.get(key) or {}
            for name in _MOMENTS:
                t = st.get(name)
                if isinstance(t, Tensor) and tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"state_dict: the state of param group {gi}, parameter {j} (key {key!r}) has "
                                     f"{name} of shape {tuple(t.shape)}, the parameter has shape {tuple(p.shape)}: "
                                     f"a state saved for another model (or another sharding) cannot be loaded")
