"""The one place that builds the training engine: DeepSpeed (ZeRO, from a config) or FSDP2 (``apply_fsdp``).

    engine = build_engine("deepspeed", model, device=..., make_scheduler=..., ds_config=..., weight_decay=...,
                          grad_clip=..., dtype=...)
    engine.set_accum_steps(n)
    for k in range(n):
        loss = engine.micro_step(window, last=(k == n - 1))
    grad_norm = engine.optimizer_step()

Both engines present the same small interface to the training loop (:mod:`adamhd_train.train`): micro-steps with
gradient accumulation whose count may change from one optimizer step to the next (the batch-size ramp), one
optimizer step (gradient clipping at the configured global norm, the LR schedule), evaluation, the per-layer δ,
and checkpoint save/load into a folder.

- DeepSpeed: :func:`adamhd_dist.deepspeed.initialize` builds AdamHD from the config's ``"optimizer"`` section
  (other optimizer types go to DeepSpeed unchanged); the LR schedule is a ``LambdaLR`` handed to DeepSpeed, which
  steps it after every applied optimizer step. The accumulation count of a step is set with
  ``engine.set_train_batch_size`` (which rescales the loss by the new count) and the boundary with
  ``engine.set_gradient_accumulation_boundary``, so a changing count never misaligns DeepSpeed's micro-step counter.
- FSDP2: :func:`adamhd_dist.fsdp.apply_fsdp` shards each transformer block, then AdamHD over
  :func:`adamhd_dist.param_groups` and :func:`adamhd_train.recipe.lr_scheduler`; gradients are reduced only on the
  last micro-batch of a step (``set_requires_gradient_sync``); checkpoints with ``torch.distributed.checkpoint``.
  With ``tp`` > 1 the ranks form a ("dp", "tp") device mesh (consecutive ranks one tensor-parallel group): the
  model is cut over "tp" (:func:`adamhd_train.tp.parallelize_gpt2`: Megatron-style blocks, sequence-parallel
  norms, vocabulary-parallel embedding and tied head) and FSDP2 shards it over "dp" (:func:`fsdp_over_tp`);
  AdamHD, clipping and checkpoints are the same code on the 2-D DTensors.

:func:`deepspeed_config_for` turns a user's DeepSpeed config (GPU settings) into the one a run passes to DeepSpeed:
batch numbers from the recipe, precision, clipping, LR, and the adaptations a CPU-only machine needs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy

from adamhd_dist import AdamHD, buildlock, layer_deltas, param_groups
from adamhd_dist.fsdp import apply_fsdp
# DeepSpeed's integration, which imports deepspeed itself only when an engine is built
from adamhd_dist import deepspeed as ads

__all__ = ["deepspeed_config_for", "build_engine", "lm_loss", "window_loss", "DeepSpeedEngine", "FSDPEngine",
           "fsdp_over_tp", "RECIPE_KEYS"]

RECIPE_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
"""DeepSpeed config keys the launcher sets from the recipe (the config's values are replaced)."""

_CPU_BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                    "stage3_max_live_parameters", "stage3_max_reuse_distance", "sub_group_size")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (logits of any precision)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def window_loss(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """The language-model loss of token windows of ``seq_len + 1`` tokens: inputs ``window[:, :-1]``, targets
    ``window[:, 1:]``."""
    return lm_loss(model(input_ids=window[:, :-1]).logits, window[:, 1:])


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed config
def _enabled(cfg: dict, key: str) -> bool:
    sec = cfg.get(key)
    return isinstance(sec, dict) and bool(sec.get("enabled", False))


def config_dtype(cfg: dict) -> str:
    """The precision a DeepSpeed config asks for: ``"bf16"``, ``"fp16"`` or ``"fp32"``."""
    if _enabled(cfg, "bf16") or _enabled(cfg, "bfloat16"):
        return "bf16"
    if _enabled(cfg, "fp16"):
        return "fp16"
    return "fp32"


def deepspeed_config_for(
    source: dict,
    *,
    micro_batch: int,
    grad_accum_steps: int,
    world_size: int,
    dtype: str,
    grad_clip: float,
    lr: float,
    weight_decay: Optional[float],
    on_gpu: bool,
    num_params: Optional[int] = None,
    tp: int = 1,
) -> tuple[dict, list[str]]:
    """The config to pass to DeepSpeed for this run, and the notes to print about what was changed.

    Sets ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``train_batch_size`` from the batch
    plan (the full batch; the ramp changes the accumulation per step; ``world_size`` is the data-parallel size),
    ``tensor_parallel.autotp_size`` from ``tp`` (DeepSpeed AutoTP; 1 leaves a config without the section unchanged),
    ``bf16``/``fp16`` from ``dtype``,
    ``gradient_clipping``, and the optimizer's ``lr`` (and ``weight_decay`` when given). On a CPU-only machine it
    also drops ``pin_memory`` from offload sections and caps bucket sizes at the model size (a ZeRO bucket is
    allocated in full on every rank). Raises ``ValueError`` for a config the launcher cannot run: a
    ``"scheduler"`` section (the launcher runs the GPT-3 schedule itself), or no ``"optimizer"`` section.
    """
    cfg = copy.deepcopy(source)
    notes: list[str] = []
    if "scheduler" in cfg:
        raise ValueError('config "scheduler": the launcher runs the GPT-3 LR schedule itself (--warmup-tokens, '
                         '--decay-tokens, --lr); remove the "scheduler" section from the config')
    opt = cfg.get("optimizer")
    if not isinstance(opt, dict) or "type" not in opt:
        raise ValueError('config "optimizer": missing; expected {"type": "AdamHD", "params": {...}} (or another '
                         'DeepSpeed optimizer type)')
    params = opt.setdefault("params", {})
    if not isinstance(params, dict):
        raise ValueError(f'config "optimizer.params" must be an object, got {type(params).__name__}')
    old = {k: cfg.get(k) for k in RECIPE_KEYS}
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum_steps
    # DeepSpeed checks train_batch_size at config time against every rank when AutoTP builds its own groups (no
    # mpu yet), the tp copies of one data-parallel rank included; the engine then steps over the dp group.
    cfg["train_batch_size"] = micro_batch * grad_accum_steps * world_size * tp
    changed = [f"{k} {old[k]} -> {cfg[k]}" for k in RECIPE_KEYS if old[k] is not None and old[k] != cfg[k]]
    if changed:
        notes.append("batch numbers from the recipe replace the config's: " + ", ".join(changed))
    tp_sec = cfg.get("tensor_parallel")
    old_tp = tp_sec.get("autotp_size") if isinstance(tp_sec, dict) else None
    if tp > 1 or old_tp not in (None, 1):
        if old_tp is not None and old_tp != tp:
            notes.append(f"tensor_parallel.autotp_size {old_tp} -> {tp} (--tp)")
        cfg["tensor_parallel"] = {**(tp_sec if isinstance(tp_sec, dict) else {}), "autotp_size": tp}
    for key in ("bf16", "bfloat16", "fp16"):
        if isinstance(cfg.get(key), dict):
            cfg[key]["enabled"] = False
    if dtype == "bf16":
        cfg.setdefault("bf16", {})["enabled"] = True
    elif dtype == "fp16":
        cfg.setdefault("fp16", {})["enabled"] = True
    if cfg.get("gradient_clipping") != grad_clip:
        cfg["gradient_clipping"] = grad_clip
    if params.get("lr") is not None and params.get("lr") != lr:
        notes.append(f"peak LR {lr:g} replaces the config's optimizer.params.lr {params['lr']:g} (--lr)")
    params["lr"] = lr
    if weight_decay is not None:
        if params.get("weight_decay") is not None and params["weight_decay"] != weight_decay:
            notes.append(f"weight decay {weight_decay:g} replaces the config's {params['weight_decay']:g}")
        params["weight_decay"] = weight_decay
    if not on_gpu and isinstance(cfg.get("zero_optimization"), dict):
        notes.extend(_adapt_zero_for_cpu(cfg["zero_optimization"], num_params))
    return cfg, notes


def _adapt_zero_for_cpu(zero: dict, num_params: Optional[int]) -> list[str]:
    """On a CPU-only machine: no pinned memory in offload sections, buckets capped at the model size (a ZeRO bucket
    is allocated in full on every rank). Changes ``zero`` in place; returns the notes."""
    notes = []
    for sec in ("offload_optimizer", "offload_param"):
        off = zero.get(sec)
        if isinstance(off, dict) and off.get("pin_memory"):
            off["pin_memory"] = False
            notes.append(f"CPU: zero_optimization.{sec}.pin_memory dropped (pinned memory needs a GPU)")
    if num_params:
        cap = max(int(num_params), 1_000_000)
        capped = []
        for key in _CPU_BUCKET_KEYS:
            value = zero.get(key)
            if isinstance(value, (int, float)) and value > cap:
                zero[key] = cap
                capped.append(f"{key} {int(value):,} -> {cap:,}")
        if capped:
            notes.append("CPU: buckets capped at the model size (each is allocated on every rank): "
                         + ", ".join(capped))
    return notes


# ----------------------------------------------------------------------------------------------------------------
# engines
class _EngineBase:
    kind = ""
    model: torch.nn.Module
    optimizer: Any

    def __init__(self, device: torch.device):
        self.device = device
        self.accum_steps = 1

    def _loss(self, window: torch.Tensor) -> torch.Tensor:
        return window_loss(self.model, window.to(self.device, non_blocking=True))

    @torch.no_grad()
    def eval_loss(self, window: torch.Tensor) -> torch.Tensor:
        """The mean next-token loss of one validation window (no gradients)."""
        return self._loss(window)

    def train(self, mode: bool = True) -> None:
        """Training mode (dropout on) or evaluation mode."""
        self.model.train(mode)

    def deltas(self) -> dict:
        """{layer name: δ} of the AdamHD optimizer; {} for another optimizer."""
        target = self._delta_source()
        if target is None:
            return {}
        return layer_deltas(target)

    def _delta_source(self):
        return self.optimizer if isinstance(self.optimizer, AdamHD) else None

    def step_applied(self) -> bool:
        """Whether the last optimizer step changed the weights (False: the fp16 loss scaler skipped it)."""
        return True

    def _local_params(self):
        return self.model.parameters()

    @torch.no_grad()
    def local_params_finite(self) -> bool:
        """Whether every element of the weights this rank holds (its shard, under ZeRO-3 or FSDP2) is finite."""
        for p in self._local_params():
            t = getattr(p, "ds_tensor", None)  # ZeRO-3: the rank's partition
            t = p.to_local() if t is None and hasattr(p, "to_local") else (p if t is None else t)
            if t.numel() and not bool(torch.isfinite(t).all()):
                return False
        return True


class DeepSpeedEngine(_EngineBase):
    """A DeepSpeed engine behind the launcher's interface (see the module docstring)."""

    kind = "deepspeed"

    def __init__(self, model, ds_config: dict, *, lr_scheduler: Callable, weight_decay: float, device):
        super().__init__(device)
        params = None if ads.is_adamhd_config(ds_config) else param_groups(model, weight_decay)
        # DeepSpeed JIT-builds its ops inside initialize, where a lock left by a killed build would hang this rank
        # silently: load them first under an owner record (a stale lock is removed, or named with how to clear it)
        buildlock.load_deepspeed_ops(ds_config)
        self.engine, self.optimizer, _, self.lr_scheduler = ads.initialize(
            model=model, config=ds_config, model_parameters=params, lr_scheduler=lr_scheduler)
        self.model = self.engine
        self.world_size = self.engine.dp_world_size
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self._adamhd = ads.is_adamhd_config(ds_config)

    def _delta_source(self):
        return self.engine if self._adamhd else None

    def step_applied(self) -> bool:
        return bool(self.engine.was_step_applied())

    def _local_params(self):
        return self.engine.module.parameters()

    def set_accum_steps(self, n: int) -> None:
        if n != self.engine.gradient_accumulation_steps():
            self.engine.set_train_batch_size(n * self.micro_batch * self.world_size)
            inner = self.engine.optimizer
            if hasattr(inner, "gradient_accumulation_steps"):
                inner.gradient_accumulation_steps = n
        self.accum_steps = n

    def micro_step(self, window: torch.Tensor, last: bool) -> torch.Tensor:
        self.engine.set_gradient_accumulation_boundary(last)
        loss = self._loss(window)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def optimizer_step(self) -> Optional[float]:
        # DeepSpeed stepped inside the last micro_step (the accumulation boundary); report what it saw.
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, root: Path, tag: str) -> None:
        """Every rank: write the engine state into ``root/tag`` (DeepSpeed's own layout)."""
        self.engine.save_checkpoint(str(root), tag=tag, save_latest=False)

    def load(self, root: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {str(Path(root) / tag)!r}")


def fsdp_over_tp(model: torch.nn.Module, *, tp: int, device: torch.device, mp_policy=None) -> torch.nn.Module:
    """FSDP2 over tensor parallelism on a ("dp", "tp") mesh of every rank (dp = world / tp; consecutive ranks form
    a tensor-parallel group, as the trainer's data-parallel rank ``rank // tp`` assumes): ``model`` (a
    ``GPT2LMHeadModel``) is cut over "tp" with :func:`adamhd_train.tp.parallelize_gpt2`, then each block and the
    root are ``fully_shard``-ed over "dp" (a tensor-parallel weight gets ``_StridedShard`` on "dp"). In place;
    returns the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from adamhd_dist.fsdp import transformer_blocks

    from .tp import parallelize_gpt2

    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise ValueError(f"tp: {tp} must divide the world size {world}")
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    parallelize_gpt2(model, mesh["tp"])
    kwargs = dict(mesh=mesh["dp"], mp_policy=mp_policy or MixedPrecisionPolicy())
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


class FSDPEngine(_EngineBase):
    """A model sharded with FSDP2 (over tensor parallelism when ``tp`` > 1) and trained with AdamHD, behind the
    launcher's interface."""

    kind = "fsdp"

    def __init__(self, model, *, optimizer_kwargs: dict, weight_decay: float, grad_clip: float, dtype: str,
                 make_scheduler: Callable, device, tp: int = 1):
        if dtype == "fp16":
            raise ValueError("dtype: fp16 needs loss scaling, which the FSDP2 engine does not do (fp16 gradients "
                             "underflow without it); use bf16 or fp32")
        super().__init__(device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16" else None
        self.tp = tp
        if tp > 1:
            self.model = fsdp_over_tp(model, tp=tp, device=device, mp_policy=mp)
        else:
            self.model = apply_fsdp(model, mp_policy=mp)
        self.optimizer = AdamHD(param_groups(self.model, weight_decay), **optimizer_kwargs)
        self.lr_scheduler = make_scheduler(self.optimizer)
        self.grad_clip = grad_clip
        self._grad_norm: Optional[float] = None

    def set_accum_steps(self, n: int) -> None:
        self.accum_steps = n

    def micro_step(self, window: torch.Tensor, last: bool) -> torch.Tensor:
        self.model.set_requires_gradient_sync(last)
        loss = self._loss(window)
        (loss / self.accum_steps).backward()
        return loss.detach()

    def optimizer_step(self) -> Optional[float]:
        norm = None
        if self.grad_clip > 0:
            total = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            total = total.full_tensor() if hasattr(total, "full_tensor") else total
            norm = float(total)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, root: Path, tag: str) -> None:
        """Every rank: model and optimizer state with torch.distributed.checkpoint (resharded on load), and the
        LR scheduler's state from rank 0."""
        folder = Path(root) / tag
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder / "dcp"))
        if dist.get_rank() == 0:
            torch.save(self.lr_scheduler.state_dict(), folder / "lr_scheduler.pt")
        dist.barrier()

    def load(self, root: Path, tag: str) -> None:
        folder = Path(root) / tag
        if not (folder / "dcp").is_dir():
            raise FileNotFoundError(f"{str(folder)!r} holds no FSDP2 checkpoint (no dcp/ folder): was it written "
                                    f"by a DeepSpeed run?")
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.lr_scheduler.load_state_dict(torch.load(folder / "lr_scheduler.pt", weights_only=False))


def build_engine(
    kind: str,
    model: torch.nn.Module,
    *,
    device: torch.device,
    make_scheduler: Callable,
    ds_config: Optional[dict] = None,
    optimizer_kwargs: Optional[dict] = None,
    weight_decay: float,
    grad_clip: float,
    dtype: str,
    tp: int = 1,
):
    """Build the engine of a run (the only place the launcher builds one).

    Args:
        kind: ``"deepspeed"`` (``ds_config`` required) or ``"fsdp"`` (``optimizer_kwargs`` for AdamHD).
        model: the freshly built fp32 model, the same on every rank (same seed).
        device: where batches go (``cuda:<local rank>`` or ``cpu``).
        make_scheduler: ``optimizer -> LambdaLR`` (the recipe's schedule).
        weight_decay: λ of the decayed group (matrices, embeddings); biases and norms are not decayed.
        grad_clip: global gradient-norm clip (0 disables; FSDP2 only, DeepSpeed reads its config).
        dtype: ``"fp32"`` or ``"bf16"`` (FSDP2's mixed precision; fp16 is refused: it has no loss scaling);
            DeepSpeed reads its config (where fp16 is scaled by DeepSpeed).
        tp: tensor-parallel degree of an FSDP2 engine (:func:`fsdp_over_tp`; 1: FSDP2 alone). DeepSpeed's AutoTP
            degree is in its config.
    """
    if kind == "deepspeed":
        if ds_config is None:
            raise ValueError("ds_config: required for a DeepSpeed engine")
        return DeepSpeedEngine(model, ds_config, lr_scheduler=make_scheduler, weight_decay=weight_decay,
                               device=device)
    if kind == "fsdp":
        return FSDPEngine(model, optimizer_kwargs=optimizer_kwargs or {}, weight_decay=weight_decay,
                          grad_clip=grad_clip, dtype=dtype, make_scheduler=make_scheduler, device=device, tp=tp)
    raise ValueError(f"kind: unknown engine {kind!r} (allowed: deepspeed, fsdp)")
