"""Per-rank code for the ecosystem's doors (transformers Trainer, Accelerate, plain ``deepspeed.initialize``) on CPU
ranks (gloo), run through tests/dist_utils.run_ranks.

One launch per world size runs many cases one after another (process start-up and the transformers / DeepSpeed
imports are the expensive part): :func:`suite` takes a list of ``(label, function name, kwargs)`` and returns
``{label: result}``; a case that raises returns ``{"error": traceback}`` instead, so one broken door does not hide
the others. Each case returns, on every rank, the final parameters by name (fp32, whole tensors: gathered where
sharded), plus what it observed. The single-process reference (:func:`reference`) trains the same model from the
same seed on the same global batches in the same order with the same AdamHD (or AdamW) settings, clipping the
way the engine does (torch's rule at global norm 1.0, DeepSpeed 0.19's default); tests/test_hf_harness_probe.py
compares.

The model is a tiny GPT-2 built from a config (nothing is downloaded), dropout off, every position and (with the
fixed data) every vocabulary row used, eps = 1e-3: reduction-order noise is not amplified into ±lr steps on
parameters whose true gradient is ~0, so AdamW agrees across world sizes to ~1e-6.

Environment every rank needs (tests pass it to run_ranks): ``DS_ACCELERATOR=cpu``, ``CUDA_VISIBLE_DEVICES=``,
``MASTER_ADDR=127.0.0.1`` (run_ranks sets it with the other torchrun variables), ``TORCH_EXTENSIONS_DIR`` (a
writable folder) — see :data:`RANK_ENV`. Per door, on CPU ranks:

- Trainer + DeepSpeed: ``TrainingArguments(deepspeed=cfg, use_cpu=True, report_to="none", ...)`` (or a gloo
  ``PartialState`` made first + ``accelerator_config={"use_configured_state": True}``); ``ddp_backend="gloo"`` alone
  is not enough (:func:`trainer_ds`, :func:`deepspeed_partial_state`).
- Trainer + FSDP2 and Accelerate's FSDP2 plugin: Accelerate enables FSDP only for MULTI_<device> states; CPU ranks
  get DDP (``use_cpu`` / ``cpu=True``) or no distribution at all. The harness marks the state MULTI_GPU with the
  device left on CPU (:func:`_force_accelerate_multi_device`) to run the rest of the stack.
- Accelerate + DeepSpeed plugin: a gloo ``PartialState`` made first (:func:`deepspeed_partial_state`).
"""

from __future__ import annotations

import faulthandler
import gc
import os
import shutil
import sys
import tempfile
import time
import traceback
import types

import torch
import torch.distributed as dist

faulthandler.enable(all_threads=True)

STEPS = 6
GLOBAL_BATCH = 12  # rows per optimizer step: divisible by 1, 2, 3 and 4 ranks
SEQ = 32  # = n_positions: every position embedding gets a gradient
VOCAB = 97
# lr large enough that the Huber threshold matters within a few steps; eps = 1e-3 (see the module docstring)
HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1, delta_scale=1.0, delta_beta=0.9)
CLIP = 1.0

RANK_ENV = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "MASTER_ADDR": "127.0.0.1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------------------------------
# model, data, reference
def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)


def build_model(seed: int = 0, spread: bool = True):
    """The tiny GPT-2 from ``seed``. ``spread``: the i-th matrix (ndim 2, in parameter order) is scaled by
    (i + 1) / 2 after init, so the layers' mean |θ| differ (0.5x to 5x GPT-2's init): a statistic taken over a
    flat partition or a sub-group (many layers) is then clearly not any one layer's."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config())
    if spread:
        with torch.no_grad():
            for i, p in enumerate(p for p in model.parameters() if p.ndim == 2):
                p.mul_((i + 1) / 2)
    return model


def data(steps: int = STEPS) -> torch.Tensor:
    """(steps * GLOBAL_BATCH, SEQ) token ids; row i is the i-th sample of a sequential sampler. Every vocabulary id
    occurs (the first rows cycle through them), so every embedding row gets a real gradient."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randint(0, VOCAB, (steps * GLOBAL_BATCH, SEQ), generator=g)
    x.view(-1)[:VOCAB] = torch.arange(VOCAB)
    return x


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": labels(self.ids[i])}


def labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels with the first position masked (-100). The model shifts labels by one, so position 0 is never a
    target; the Trainer divides the summed loss by its count of labels != -100 (num_items_in_batch), which with
    unmasked labels is SEQ per row, not the SEQ - 1 terms there are, and the gradient would be scaled by
    (SEQ - 1) / SEQ against a plain mean (visible through eps). Masked, both are the mean over the global batch."""
    out = ids.clone()
    out[..., 0] = -100
    return out


def decay_names(model) -> set[str]:
    """The Trainer's decayed parameters (its create_optimizer grouping: no biases, no norm weights)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))


def trainer_groups(model, weight_decay=HP["weight_decay"]):
    """Param groups exactly as Trainer.create_optimizer builds them (decayed first, then the rest), with names."""
    dec = decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n in dec], "param_names": [n for n, p in named if n in dec],
             "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in dec], "param_names": [n for n, p in named if n not in dec],
             "weight_decay": 0.0}]


def make_optimizer(kind: str, groups, hp=None):
    import adamhd_dist

    hp = dict(HP if hp is None else hp)
    hp.pop("weight_decay", None)  # per group
    if kind == "adamhd":
        return adamhd_dist.AdamHD(groups, **hp)
    if kind == "adamw":
        groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
        return torch.optim.AdamW(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"])
    raise ValueError(kind)


def optimizer_cls_and_kwargs(kind: str):
    """What the Trainer gets: (class, kwargs). weight_decay comes from TrainingArguments (the Trainer puts it on
    its decayed group)."""
    import adamhd_dist

    hp = {k: v for k, v in HP.items() if k != "weight_decay"}
    if kind == "adamhd":
        return adamhd_dist.AdamHD, hp
    return torch.optim.AdamW, {k: hp[k] for k in ("lr", "betas", "eps")}


def reference(kind: str = "adamhd", steps: int = STEPS, clip: float | None = CLIP, hp=None):
    """One process, unsharded fp32 model, the whole global batch per step, Trainer-style groups, torch's
    clipping rule (what DeepSpeed does at fp32)."""
    import adamhd_dist

    model = build_model()
    model.train()
    opt = make_optimizer(kind, trainer_groups(model, HP["weight_decay"] if hp is None else hp["weight_decay"]), hp)
    x = data(steps)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for t in range(steps):
        b = x[t * GLOBAL_BATCH:(t + 1) * GLOBAL_BATCH]
        opt.zero_grad()
        loss = model(input_ids=b, labels=labels(b)).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        losses.append(loss.item())
    out = {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "losses": losses}
    if kind == "adamhd":
        out["deltas"] = adamhd_dist.layer_deltas(opt)
        out["mu"] = {n: float(opt.state[p]["delta_ema"]) for g in opt.param_groups
                     for n, p in zip(g["param_names"], g["params"]) if "delta_ema" in opt.state[p]}
    return out


# ------------------------------------------------------------------------------------------------------------
# small helpers
def describe(obj, depth: int = 4) -> list[str]:
    """``type`` of obj, obj.optimizer, obj.optimizer.optimizer, ... (qualified names)."""
    chain = []
    while obj is not None and depth > 0:
        chain.append(f"{type(obj).__module__}.{type(obj).__qualname__}")
        obj = getattr(obj, "optimizer", None)
        depth -= 1
    return chain


def find_instances(roots: dict, cls, max_depth: int = 3) -> list[str]:
    """Attribute paths (``root.attr.attr``) from the given objects to instances of ``cls`` (breadth first, plain
    attributes only, no containers)."""
    found, seen = [], set()
    frontier = [(name, obj) for name, obj in roots.items() if obj is not None]
    for _ in range(max_depth + 1):
        nxt = []
        for path, obj in frontier:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, cls):
                found.append(path)
                continue
            d = getattr(obj, "__dict__", None)
            if not isinstance(d, dict):
                continue
            for k, v in list(d.items()):
                if isinstance(v, (torch.Tensor, str, int, float, bool, type(None), types.FunctionType)):
                    continue
                nxt.append((f"{path}.{k}", v))
        frontier = nxt
    return found


def referrer_types(obj) -> list[str]:
    """Types of the objects that refer to obj (gc), a hint at who holds it."""
    gc.collect()
    return sorted({f"{type(r).__module__}.{type(r).__qualname__}" for r in gc.get_referrers(obj)
                   if not isinstance(r, (types.FrameType, list, tuple))})


def gather_params(engine_or_model) -> dict[str, torch.Tensor]:
    """Whole fp32 parameters by name: from a DeepSpeed engine (ZeRO-3 gathered), an FSDP2 module (full_tensor) or
    a plain module."""
    from torch.distributed.tensor import DTensor

    module = getattr(engine_or_model, "module", engine_or_model)
    params = list(module.named_parameters())
    if params and hasattr(params[0][1], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone().float() for n, p in params}
    out = {}
    for n, p in params:
        t = p.detach()
        out[n] = (t.full_tensor() if isinstance(t, DTensor) else t).clone().float()
    return out


def zero_optimizer_of(optimizer):
    """The DeepSpeed ZeRO / BF16 optimizer in an ``.optimizer`` chain (accelerate wrapper -> ZeRO -> AdamHD)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = optimizer
    while opt is not None:
        if isinstance(opt, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer)):
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


def zero_optimizer_of_safe(optimizer):
    try:
        return zero_optimizer_of(optimizer)
    except ImportError:
        return None


def attach_dtensor(optimizer) -> str:
    """FSDP2 counterpart of the fix: Accelerate rebinds ``param_group["params"]`` to DTensors in place, which
    bypasses AdamHD.add_param_group (where AdamHD installs its DTensor hooks by itself); install them now."""
    from torch.distributed.tensor import DTensor

    from adamhd_dist.distributed.dtensor import install_dtensor_hooks

    adam = _adamhd_of(optimizer)
    if adam is None:
        return "no AdamHD"
    if not any(isinstance(p, DTensor) for g in adam.param_groups for p in g["params"]):
        return "no DTensor params"
    if adam.reduce_layer_sums is not None:
        return "hooks already installed"
    install_dtensor_hooks(adam)
    return "install_dtensor_hooks"


def gc_owners(obj) -> list[str]:
    """Who holds ``obj`` through an attribute or a dict entry of an attribute (gc referrers, one level):
    ``["DeepSpeedEngine._modules['module']", ...]``."""
    gc.collect()
    out = set()
    for r in gc.get_referrers(obj):
        if not isinstance(r, dict):
            continue
        keys = [k for k, v in r.items() if v is obj]
        for o in gc.get_referrers(r):
            if isinstance(o, (dict, list, types.FrameType)):
                continue
            d = getattr(o, "__dict__", None)
            if d is r:
                out.update(f"{type(o).__qualname__}.{k}" for k in keys)
            elif isinstance(d, dict):
                for a, v in d.items():
                    if v is r:
                        out.update(f"{type(o).__qualname__}.{a}[{k!r}]" for k in keys)
    return sorted(out)


def engine_by_gc(model):
    """The DeepSpeedEngine whose ``module`` is ``model``, found through the garbage collector (the engine keeps
    the model in ``_modules["module"]``), else None."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    gc.collect()
    for r in gc.get_referrers(model):
        if isinstance(r, dict):
            for o in gc.get_referrers(r):
                if isinstance(o, DeepSpeedEngine) and getattr(o, "module", None) is model:
                    return o
    return None


def engine_of(*objs):
    """The DeepSpeedEngine reachable from objs by attributes (depth 3), else None."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    for o in objs:
        if isinstance(o, DeepSpeedEngine):
            return o
    paths = find_instances({f"o{i}": o for i, o in enumerate(objs)}, DeepSpeedEngine)
    if not paths:
        return None
    obj = objs[int(paths[0].split(".")[0][1:])]
    for attr in paths[0].split(".")[1:]:
        obj = getattr(obj, attr)
    return obj


def attach_from(model, optimizer, how: str = "gc"):
    """Today's ``attach_layout`` reached from what a Trainer callback is given (the unwrapped model and the
    Accelerate-wrapped optimizer). Under DeepSpeed: the engine if an attribute path leads to it; else, with
    ``how="gc"``, the engine found by :func:`engine_by_gc`; else (or with ``how="stand-in"``) a stand-in with the
    two attributes attach_layout reads (``optimizer``: the ZeRO optimizer, ``module``: the model) — the engine's
    checkpoint methods are then not wrapped. Under FSDP2: :func:`attach_dtensor`. Returns what was used."""
    from adamhd_dist.integrations.deepspeed import attach_layout

    zopt = zero_optimizer_of_safe(optimizer)
    if zopt is None:
        return attach_dtensor(optimizer)
    eng = engine_of(model, optimizer)
    if eng is not None:
        attach_layout(eng)
        return "engine (attribute path)"
    if how == "gc":
        eng = engine_by_gc(model)
        if eng is not None and eng.optimizer is zopt:
            attach_layout(eng)
            return "engine (gc: DeepSpeedEngine whose .module is model)"
    shim = types.SimpleNamespace(optimizer=zopt, module=model, save_checkpoint=lambda *a, **k: None,
                                 load_checkpoint=lambda *a, **k: None, global_steps=0)
    attach_layout(shim)
    return "stand-in (ZeRO optimizer + model)"


EVENTS: list[str] = []


def _trace_deepspeed_checkpoints():
    """Record, in EVENTS, when DeepSpeedEngine.load_checkpoint / save_checkpoint run (to order them against
    callback events)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    if getattr(DeepSpeedEngine, "_hf_harness_traced", False):
        return
    load, save = DeepSpeedEngine.load_checkpoint, DeepSpeedEngine.save_checkpoint

    def traced_load(self, *a, **k):
        EVENTS.append("DeepSpeedEngine.load_checkpoint")
        return load(self, *a, **k)

    def traced_save(self, *a, **k):
        EVENTS.append("DeepSpeedEngine.save_checkpoint")
        return save(self, *a, **k)

    DeepSpeedEngine.load_checkpoint, DeepSpeedEngine.save_checkpoint = traced_load, traced_save
    DeepSpeedEngine._hf_harness_traced = True


def _adamhd_of(optimizer):
    import adamhd_dist

    o = optimizer
    while o is not None and not isinstance(o, adamhd_dist.AdamHD):
        o = getattr(o, "optimizer", None)
    return o


def _inner_state_summary(optimizer) -> dict:
    """The innermost torch optimizer's step counters and whether it holds μ (AdamHD) at this moment."""
    inner = optimizer
    while getattr(inner, "optimizer", None) is not None:
        inner = inner.optimizer
    steps = sorted({float(st["step"]) for st in inner.state.values() if "step" in st})
    out = {"type": type(inner).__name__, "steps": steps}
    if hasattr(inner, "layout"):
        out["layout"] = inner.layout is not None
        out["pending_layer_state"] = getattr(inner, "_loaded_layer_state", None) is not None
        if inner.layout is not None:
            out["layer_state"] = {n: float(v["delta_ema"]) for n, v in inner.layout.state_dict().items()}
    return out


def _make_probe_callback(fix):
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        """Records what on_train_begin is given; with ``fix`` (True / "gc" / "stand-in", see :func:`attach_from`),
        makes AdamHD exact from it."""

        def __init__(self):
            self.seen = {}
            self.how = None
            self.saved = {}

        def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                           train_dataloader=None, **kw):
            from deepspeed.runtime.engine import DeepSpeedEngine

            EVENTS.append("callback.on_train_begin")
            roots = {"model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
                     "train_dataloader": train_dataloader}
            self.seen = {
                "kwargs": sorted(["model", "optimizer", "lr_scheduler", "train_dataloader", *kw]),
                "model": describe(model, 1),
                "optimizer_chain": describe(optimizer),
                "lr_scheduler": describe(lr_scheduler, 1),
                "train_dataloader": describe(train_dataloader, 1),
                "engine_paths": find_instances(roots, DeepSpeedEngine),
                "model_is_engine": isinstance(model, DeepSpeedEngine),
                "model_referrers": referrer_types(model),
                "model_held_by": gc_owners(model),
                "zero_optimizer_held_by": gc_owners(zero_optimizer_of_safe(optimizer))
                if zero_optimizer_of_safe(optimizer) is not None else [],
                "global_step": state.global_step,
                "state_at_begin": _inner_state_summary(optimizer),
            }
            if fix:
                self.how = attach_from(model, optimizer, "stand-in" if fix == "stand-in" else "gc")
                EVENTS.append(f"attach ({self.how})")
                self.seen["state_after_attach"] = _inner_state_summary(optimizer)

        def on_step_end(self, args, state, control, **kw):
            EVENTS.append(f"step {state.global_step}")

        def on_save(self, args, state, control, optimizer=None, **kw):
            EVENTS.append(f"callback.on_save {state.global_step}")
            self.saved[state.global_step] = _inner_state_summary(optimizer)

    return Probe()


# ------------------------------------------------------------------------------------------------------------
# 1. transformers Trainer + DeepSpeed
def trainer_ds_config(stage: int, offload: bool = False) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 2000, "allgather_bucket_size": 2000},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        cfg["zero_optimization"].update({"sub_group_size": 20000, "stage3_param_persistence_threshold": 0,
                                         "stage3_prefetch_bucket_size": 1000, "stage3_max_live_parameters": 100000})
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def training_args(outdir: str, world: int, *, steps: int = STEPS, save_steps: int | None = None, **extra):
    from transformers import TrainingArguments

    kw = dict(
        output_dir=outdir,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=HP["lr"],
        weight_decay=HP["weight_decay"],
        max_grad_norm=CLIP,
        lr_scheduler_type="constant",
        warmup_steps=0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        report_to="none",
        logging_strategy="no",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_only_model=False,
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo",
    )
    kw.update(extra)
    return TrainingArguments(**kw)


def _reset_accelerate():
    """Forget the process-wide Accelerate state and the transformers HfDeepSpeedConfig between cases (the
    torch.distributed process group stays)."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except Exception:
        pass
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    for k in [k for k in os.environ if k.startswith("ACCELERATE_") or k.startswith("FSDP_")]:
        del os.environ[k]
    gc.collect()


def deepspeed_partial_state():
    """Accelerate's process state for DeepSpeed on CPU ranks, made before TrainingArguments / Accelerator. Without
    it (and without ``use_cpu=True``), ``TrainingArguments(deepspeed=...)`` on a machine without an accelerator
    builds ``PartialState`` with no backend (``_prepare_backend`` picks one only for a device or for ``cpu=True``;
    TrainingArguments passes ``ddp_backend`` only on its non-DeepSpeed paths), so Accelerate counts ONE process on
    every rank: the Trainer asks DeepSpeed for train_batch_size = micro * 1 and DeepSpeed's batch assertion fails
    at world 2 ("6 != 6 * 1 * 2"). Built here with backend "gloo" while ACCELERATE_USE_DEEPSPEED is set; kept by
    ``TrainingArguments(accelerator_config={"use_configured_state": True})`` or used as is by ``Accelerator``."""
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    assert state.num_processes == dist.get_world_size(), (state.num_processes, dist.get_world_size())
    return state


def trainer_ds(world: int, stage: int = 2, kind: str = "adamhd", fix=False, steps: int = STEPS,
               offload: bool = False, save_steps: int | None = None, resume: str | None = None,
               outdir: str | None = None, setup: str = "use_cpu"):
    """transformers Trainer + DeepSpeed ZeRO-``stage``: AdamHD (or AdamW) through ``optimizer_cls_and_kwargs``; a
    probe callback records what on_train_begin gets and, with ``fix`` (True / "gc" / "stand-in"), attaches AdamHD's
    layout from it (:func:`attach_from`).
    ``save_steps``: Trainer checkpoints every that many steps into ``outdir``; ``resume``: a checkpoint folder to
    resume from (``trainer.train(resume_from_checkpoint=resume)``).
    ``setup``: how Accelerate's process state gets a backend on CPU ranks. ``"use_cpu"``:
    ``TrainingArguments(use_cpu=True, deepspeed=...)`` (PartialState(cpu=True) picks gloo and counts the ranks; the
    Accelerator the Trainer builds is not told cpu=True, so DeepSpeed stays on); ``"configured"``:
    :func:`deepspeed_partial_state` + ``accelerator_config={"use_configured_state": True}``; ``"plain"``: neither
    (``ddp_backend="gloo"`` alone is ignored on the DeepSpeed path): Accelerate counts one process per rank and
    DeepSpeed's batch-size assertion fails at world > 1."""
    _reset_accelerate()
    EVENTS.clear()
    _trace_deepspeed_checkpoints()
    model = build_model()
    extra = {}
    if setup == "configured":
        deepspeed_partial_state()
        extra["accelerator_config"] = {"use_configured_state": True}
    elif setup == "use_cpu":
        extra["use_cpu"] = True
    scratch = None
    if outdir is None:
        scratch = outdir = tempfile.mkdtemp(prefix="hf-trainer-")
    try:
        return _trainer_ds_run(world, model, stage, kind, fix, steps, offload, save_steps, resume, outdir, extra)
    finally:
        _destroy_engines()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _trainer_ds_run(world, model, stage, kind, fix, steps, offload, save_steps, resume, outdir, extra):
    from transformers import Trainer

    args = training_args(outdir, world, steps=steps, save_steps=save_steps,
                         deepspeed=trainer_ds_config(stage, offload), **extra)
    probe = _make_probe_callback(fix)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(data(steps)),
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(kind), callbacks=[probe])
    trainer.train(resume_from_checkpoint=resume)
    engine = trainer.model_wrapped
    out = {"params": gather_params(engine), "seen": probe.seen, "how": probe.how, "events": list(EVENTS),
           "engine": describe(engine, 1), "model_wrapped_is_engine": type(engine).__name__,
           "is_deepspeed_enabled": trainer.is_deepspeed_enabled,
           "world": dist.get_world_size(), "accelerate_num_processes": trainer.accelerator.num_processes,
           "accelerate_distributed_type": str(trainer.accelerator.distributed_type),
           "ds_config": {k: engine.config.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                            "gradient_accumulation_steps", "gradient_clipping",
                                                            "zero_allow_untested_optimizer")}
           if trainer.is_deepspeed_enabled else None,
           "state_at_end": _inner_state_summary(trainer.optimizer)}
    adam = _adamhd_of(trainer.optimizer)
    if adam is not None:
        import adamhd_dist

        if adam.layout is not None:
            out["deltas"] = adamhd_dist.layer_deltas(adam)
            out["mu"] = {n: float(v["delta_ema"]) for n, v in adam.layout.state_dict().items()}
    if save_steps:
        out["checkpoints"] = sorted(os.listdir(outdir))
        out["saved"] = probe.saved
        out["saved_files"] = saved_optimizer_state(outdir)
    return out


def saved_optimizer_state(outdir: str) -> dict:
    """What the Trainer's DeepSpeed checkpoints hold for the inner optimizer (this rank's ZeRO file): the keys of
    its state_dict and, if present, μ per layer ("layer_state")."""
    out = {}
    for ck in sorted(os.listdir(outdir)):
        d = os.path.join(outdir, ck)
        if not ck.startswith("checkpoint-") or not os.path.isdir(d):
            continue
        tags = [t for t in os.listdir(d) if t.startswith("global_step")]
        files = {}
        for tag in tags:
            for f in sorted(os.listdir(os.path.join(d, tag))):
                if f"rank_{dist.get_rank()}_" not in f or "optim_states" not in f:
                    continue
                sd = torch.load(os.path.join(d, tag, f), map_location="cpu", weights_only=False)
                osd = sd.get("optimizer_state_dict", {})
                # the inner optimizer's state_dict: "base_optimizer_state" (ZeRO-1/2), "optimizer_state_dict" (ZeRO-3)
                key = "base_optimizer_state" if "base_optimizer_state" in osd else "optimizer_state_dict"
                base = osd.get(key, {})
                files[f"{tag}/{f}"] = {"optimizer_state_dict": sorted(osd), "inner_key": key,
                                       "inner_state_dict": sorted(base),
                                       "layer_state": {n: float(v["delta_ema"]) for n, v in
                                                       (base.get("layer_state") or {}).items()}}
        out[ck] = {"entries": sorted(os.listdir(d)), "tags": tags, "files": files,
                   "tag_entries": {t: sorted(os.listdir(os.path.join(d, t))) for t in tags}}
    return out


def trainer_ds_resume(world: int, outdir: str, stage: int = 2, fix=True, steps: int = STEPS,
                      save_steps: int = 3):
    """Trainer + DeepSpeed: an uninterrupted run that saves every ``save_steps`` steps into ``outdir``, then a
    fresh Trainer resumed from ``outdir/checkpoint-<save_steps>`` with ``trainer.train(resume_from_checkpoint=...)``
    to the same ``steps``. Returns both runs (see :func:`trainer_ds`)."""
    full = trainer_ds(world, stage=stage, fix=fix, steps=steps, save_steps=save_steps, outdir=outdir)
    dist.barrier()
    ck = os.path.join(outdir, f"checkpoint-{save_steps}")
    resumed = trainer_ds(world, stage=stage, fix=fix, steps=steps, resume=ck)
    return {"full": full, "resumed": resumed}


def _destroy_engines():
    gc.collect()
    try:
        from deepspeed.runtime.zero.partition_parameters import shutdown_init_context

        shutdown_init_context()
    except Exception:
        pass


# ------------------------------------------------------------------------------------------------------------
# 2. transformers Trainer + FSDP2
def _force_accelerate_multi_device():
    """Accelerate enables FSDP only when PartialState's distributed type is a MULTI_<device> one (state.py,
    AcceleratorState.__init__); CPU ranks are MULTI_CPU (cpu=True) or NO (no backend / no device), neither in that
    list. This marks the shared state MULTI_GPU while the device stays "cpu": a harness-only override to see
    whether the rest of the stack runs on CPU ranks."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(backend="gloo")
    state.device  # noqa: B018  (set before the type changes: set_device() maps MULTI_GPU to cuda)
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    return state


def trainer_fsdp2(world: int, kind: str = "adamhd", mode: str = "forced", fix: bool = False, steps: int = STEPS):
    """transformers Trainer + FSDP2 (``fsdp="full_shard"``, ``fsdp_config={"fsdp_version": 2, ...}``).
    ``mode``: how Accelerate's process state is made on CPU ranks:
    ``"use_cpu"`` (TrainingArguments(use_cpu=True)); ``"configured"`` (PartialState(backend="gloo") first, as for
    DeepSpeed); ``"forced"`` (:func:`_force_accelerate_multi_device`). ``fix``: the probe callback installs
    AdamHD's DTensor hooks at on_train_begin (:func:`attach_dtensor`). A setup the stack refuses gives
    ``{"error": ...}`` (not an exception), so the launch goes on."""
    _reset_accelerate()
    EVENTS.clear()
    model = build_model()
    extra = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True,
                                                    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                    "transformer_layer_cls_to_wrap": ["GPT2Block"]}}
    if mode == "use_cpu":
        extra["use_cpu"] = True
    elif mode == "configured":
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        from accelerate.state import PartialState

        PartialState(backend="gloo")
        extra["accelerator_config"] = {"use_configured_state": True}
    elif mode == "forced":
        _force_accelerate_multi_device()
        extra["accelerator_config"] = {"use_configured_state": True}
    scratch = tempfile.mkdtemp(prefix="hf-fsdp-")
    try:
        return _trainer_fsdp2_run(world, model, kind, fix, steps, scratch, extra)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _trainer_fsdp2_run(world, model, kind, fix, steps, outdir, extra):
    from torch.distributed.tensor import DTensor
    from transformers import Trainer

    args = training_args(outdir, world, steps=steps, **extra)
    probe = _make_probe_callback(fix)
    info = {}
    try:
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(data(steps)),
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(kind), callbacks=[probe])
    except Exception as e:  # e.g. "Using fsdp only works in distributed training."
        info["refused"] = f"Trainer(...): {type(e).__name__}: {e}"
        return info
    info.update(accelerate_distributed_type=str(trainer.accelerator.distributed_type),
                accelerate_num_processes=trainer.accelerator.num_processes, is_fsdp_enabled=trainer.is_fsdp_enabled,
                device=str(trainer.args.device))
    try:
        trainer.train()
    except Exception:
        info["error"] = traceback.format_exc()[-4000:]
        info["seen"] = probe.seen
        return info
    m = trainer.model_wrapped
    info.update(params=gather_params(m), seen=probe.seen, events=list(EVENTS), how=probe.how,
                dtensor_params=sum(isinstance(p, DTensor) for p in m.parameters()),
                n_params=len(list(m.parameters())), model_wrapped=describe(m, 1),
                state_at_end=_inner_state_summary(trainer.optimizer))
    _add_deltas(info, trainer.optimizer)
    return info


def _add_deltas(info: dict, optimizer) -> None:
    """δ per layer name of the last step, where the inner AdamHD knows its layers (has hooks or a layout). Groups
    without "param_names" (the Trainer's own grouping) give positions: mapped to names in the Trainer's order."""
    import adamhd_dist

    adam = _adamhd_of(optimizer)
    if adam is not None and (adam.layout is not None or adam.reduce_layer_sums is not None):
        deltas = adamhd_dist.layer_deltas(adam)
        if any(isinstance(k, int) for k in deltas):
            names = [n for g in trainer_groups(build_model()) for n in g["param_names"]]
            deltas = {names[k] if isinstance(k, int) else k: v for k, v in deltas.items()}
            info["deltas_keyed_by_position"] = True
        info["deltas"] = deltas


# ------------------------------------------------------------------------------------------------------------
# 3. Accelerate + DeepSpeed plugin
def plain_ds_config(world: int, stage: int, offload: bool = False, allow_untested: bool = True) -> dict:
    cfg = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
           "gradient_accumulation_steps": 1, "gradient_clipping": CLIP, "steps_per_print": 10**9,
           "wall_clock_breakdown": False,
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 2000, "allgather_bucket_size": 2000}}
    if allow_untested:
        cfg["zero_allow_untested_optimizer"] = True
    if stage == 3:
        cfg["zero_optimization"].update({"sub_group_size": 20000, "stage3_param_persistence_threshold": 0,
                                         "stage3_prefetch_bucket_size": 1000, "stage3_max_live_parameters": 100000})
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def rank_batches(steps: int = STEPS):
    """This rank's rows of each global batch (rank r: rows [r * B / W, (r + 1) * B / W)), as (input_ids, labels)."""
    r, w = dist.get_rank(), dist.get_world_size()
    x = data(steps)
    per = GLOBAL_BATCH // w
    out = []
    for t in range(steps):
        b = x[t * GLOBAL_BATCH + r * per: t * GLOBAL_BATCH + (r + 1) * per]
        out.append((b, labels(b)))
    return out


def accelerate_ds(world: int, stage: int = 2, kind: str = "adamhd", fix: bool = False, steps: int = STEPS,
                  allow_untested: bool = True, premade_state: bool = True):
    """``Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))``; ``model, opt, dl =
    accelerator.prepare(model, AdamHD(groups), dl)``; ``accelerator.backward(loss); opt.step(); opt.zero_grad()``.
    With ``fix``: ``attach_layout`` on the prepared model (the engine) before the first step. ``premade_state``:
    make the gloo PartialState first (:func:`deepspeed_partial_state`); without it, see what Accelerate does."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.engine import DeepSpeedEngine

    _reset_accelerate()
    if premade_state:
        deepspeed_partial_state()
    model = build_model()
    opt = make_optimizer(kind, trainer_groups(model, HP["weight_decay"]))
    cfg = plain_ds_config(world, stage, allow_untested=allow_untested)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
    ids = data(steps)
    dl = torch.utils.data.DataLoader(TokenDataset(ids), batch_size=GLOBAL_BATCH // world, shuffle=False)
    pm, popt, pdl = accelerator.prepare(model, opt, dl)
    info = {"prepared": {"model": describe(pm, 1), "optimizer_chain": describe(popt), "dataloader": describe(pdl, 1)},
            "model_is_engine": isinstance(pm, DeepSpeedEngine),
            "engine_module_is_model": getattr(pm, "module", None) is model,
            "accelerator_engine_wrapper": describe(accelerator.deepspeed_engine_wrapped, 1),
            "wrapper_engine_is_model": getattr(accelerator.deepspeed_engine_wrapped, "engine", None) is pm,
            "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
            "client_config_allow_untested": cfg.get("zero_allow_untested_optimizer"),
            "engine_allow_untested": pm.config.get("zero_allow_untested_optimizer")}
    if fix:
        from adamhd_dist.integrations.deepspeed import attach_layout

        attach_layout(pm)
    pm.train()
    for batch in pdl:
        loss = pm(**batch).loss
        accelerator.backward(loss)
        popt.step()
        popt.zero_grad()
    info["params"] = gather_params(pm)
    info["state_at_end"] = _inner_state_summary(popt)
    adam = _adamhd_of(popt)
    if adam is not None and adam.layout is not None:
        import adamhd_dist

        info["deltas"] = adamhd_dist.layer_deltas(adam)
    del accelerator, pm, popt, pdl
    _destroy_engines()
    return info


# ------------------------------------------------------------------------------------------------------------
# 4. Accelerate's FSDP2 parameter swap, and the real FSDP2 plugin
def _shard_like_accelerate(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def native_backtrace_on_crash(path: str):
    """Attach gdb to this very process, continue, and on a fatal signal write every thread's native backtrace to
    ``path`` (the Python stack comes from faulthandler in the rank's log)."""
    import ctypes
    import subprocess

    try:
        ctypes.CDLL(None).prctl(0x59616D61, ctypes.c_ulong(-1 & 0xFFFFFFFFFFFFFFFF), 0, 0, 0)  # PR_SET_PTRACER_ANY
    except Exception:
        pass
    cmd = ["gdb", "-p", str(os.getpid()), "-batch", "-nx", "-ex", "set pagination off",
           "-ex", "handle SIGUSR1 SIGUSR2 SIGPIPE SIGCHLD nostop noprint pass", "-ex", "continue",
           "-ex", "thread apply all bt 40"]
    log = open(path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    time.sleep(8.0)  # let gdb attach before going on
    return proc


def dump_on_hang(seconds: float, gdb_path: str | None = None):
    """After ``seconds``: print every thread's Python stack (faulthandler), optionally write every thread's native
    stack to ``gdb_path`` (a gdb snapshot of this process), and exit with status 4."""
    import subprocess
    import threading

    def fire():
        if gdb_path:
            with open(gdb_path, "w") as log:
                subprocess.run(["gdb", "-p", str(os.getpid()), "-batch", "-nx", "-ex", "thread apply all bt 30"],
                               stdout=log, stderr=subprocess.STDOUT, timeout=120)
        print(f"[rank {dist.get_rank()}] still running after {seconds} s:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(all_threads=True)
        sys.stderr.flush()
        os._exit(4)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


def accelerate_fsdp2_swap(world: int, kind: str = "adamhd", fused: bool | None = None, foreach: bool | None = None,
                          steps: int = STEPS, fix: bool = False, gdb_dir: str | None = None,
                          hang_after_s: float | None = None):
    """What ``Accelerator.prepare(model, optimizer)`` does under FSDP2 (accelerate 1.15 ``_prepare_fsdp2``), by
    hand: the optimizer is built on the unsharded model; each of its params is replaced by a 1-element
    placeholder whose ``data_ptr`` attribute is the old storage address; the model is ``fully_shard``-ed (blocks,
    then root); ``accelerate.utils.fsdp2_switch_optimizer_parameters`` rebinds ``param_group["params"]`` in place
    to the DTensor params by that address. Then ``steps`` optimizer steps. ``gdb_dir``: write a native
    backtrace of a crash there (``gdb<rank>.txt``). ``fix``: :func:`attach_dtensor` after the swap.
    ``hang_after_s``: :func:`dump_on_hang` (native stacks to ``gdb_dir/hang<rank>.txt`` if ``gdb_dir``)."""
    import adamhd_dist
    from accelerate.utils import fsdp2_switch_optimizer_parameters
    from torch.distributed.tensor import DTensor

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    model = build_model()
    groups = trainer_groups(model, HP["weight_decay"])
    hp = {k: v for k, v in HP.items() if k != "weight_decay"}
    if kind == "adamhd":
        opt = adamhd_dist.AdamHD(groups, **hp, fused=fused, foreach=foreach)
    else:
        opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups],
                                lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], fused=fused, foreach=foreach)
    old = {n: p.data_ptr() for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for i, p in enumerate(g["params"]):
            g["params"][i] = torch.empty(1, dtype=p.dtype, device=p.device)
            g["params"][i].data_ptr = p.data_ptr()
    _shard_like_accelerate(model)
    new = dict(model.named_parameters())
    mapping = {old[n]: new[n] for n in old}
    fsdp2_switch_optimizer_parameters(opt, mapping)
    info = {"dtensor_params_in_optimizer": sum(isinstance(p, DTensor) for g in opt.param_groups for p in g["params"]),
            "n_params": sum(len(g["params"]) for g in opt.param_groups),
            "group_keys": sorted(opt.param_groups[0]), "param_names_kept": "param_names" in opt.param_groups[0],
            "hooks_before": getattr(opt, "reduce_layer_sums", None) is not None}
    if fix:
        info["how"] = attach_dtensor(opt)
    gdb = None
    if hang_after_s:
        dump_on_hang(hang_after_s, os.path.join(gdb_dir, f"hang{dist.get_rank()}.txt") if gdb_dir else None)
    elif gdb_dir:
        gdb = native_backtrace_on_crash(os.path.join(gdb_dir, f"gdb{dist.get_rank()}.txt"))
    model.train()
    batches = rank_batches(steps)
    for t, (x, y) in enumerate(batches):
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), CLIP)
        print(f"[rank {dist.get_rank()}] before opt.step() {t + 1}", file=sys.stderr, flush=True)
        opt.step()
        print(f"[rank {dist.get_rank()}] after opt.step() {t + 1}", file=sys.stderr, flush=True)
        opt.zero_grad()
    if gdb is not None:
        gdb.kill()
    info["params"] = gather_params(model)
    if kind == "adamhd" and fix:
        info["deltas"] = adamhd_dist.layer_deltas(opt)
    return info


def accelerate_fsdp2_plugin(world: int, mode: str = "forced", kind: str = "adamhd", fix: bool = False,
                            steps: int = STEPS):
    """The real ``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2, ...))`` on CPU ranks.
    ``mode``: ``"cpu"`` (``Accelerator(cpu=True)``), ``"configured"`` (PartialState(backend="gloo") first) or
    ``"forced"`` (:func:`_force_accelerate_multi_device`). Records whether the model got sharded, then trains;
    ``fix``: :func:`attach_dtensor` on the prepared optimizer first."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.tensor import DTensor

    _reset_accelerate()
    kw = {}
    if mode == "cpu":
        kw["cpu"] = True
    elif mode == "configured":
        from accelerate.state import PartialState

        PartialState(backend="gloo")
    elif mode == "forced":
        _force_accelerate_multi_device()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                            auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["GPT2Block"])
    accelerator = Accelerator(fsdp_plugin=plugin, **kw)
    model = build_model()
    opt = make_optimizer(kind, trainer_groups(model, HP["weight_decay"]))
    dl = torch.utils.data.DataLoader(TokenDataset(data(steps)), batch_size=GLOBAL_BATCH // world, shuffle=False)
    info = {"distributed_type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes,
            "device": str(accelerator.device)}
    pm, popt, pdl = accelerator.prepare(model, opt, dl)
    info.update(prepared={"model": describe(pm, 1), "optimizer_chain": describe(popt)},
                dtensor_params=sum(isinstance(p, DTensor) for p in pm.parameters()),
                n_params=len(list(pm.parameters())))
    if fix:
        info["how"] = attach_dtensor(popt)
    pm.train()
    for batch in pdl:
        loss = pm(**batch).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(pm.parameters(), CLIP)
        popt.step()
        popt.zero_grad()
    info["params"] = gather_params(pm)
    _add_deltas(info, popt)
    return info


# ------------------------------------------------------------------------------------------------------------
# 5. plain deepspeed.initialize with a client AdamHD
def plain_ds(world: int, stage: int = 2, kind: str = "adamhd", fix: bool = False, offload: bool = False,
             steps: int = STEPS):
    """``deepspeed.initialize(model=m, optimizer=AdamHD(groups), config=...)`` with
    ``zero_allow_untested_optimizer``; with ``fix``: ``attach_layout(engine)`` right after."""
    import deepspeed

    model = build_model()
    opt = make_optimizer(kind, trainer_groups(model, HP["weight_decay"]))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=plain_ds_config(world, stage, offload))
    if fix:
        from adamhd_dist.integrations.deepspeed import attach_layout

        attach_layout(engine)
    engine.train()
    for x, y in rank_batches(steps):
        loss = engine(input_ids=x, labels=y).loss
        engine.backward(loss)
        engine.step()
    info = {"params": gather_params(engine), "zero_optimizer": type(engine.optimizer).__name__,
            "state_at_end": _inner_state_summary(engine.optimizer)}
    adam = _adamhd_of(engine.optimizer)
    if adam is not None and adam.layout is not None:
        import adamhd_dist

        info["deltas"] = adamhd_dist.layer_deltas(adam)
    del engine
    _destroy_engines()
    return info


# ------------------------------------------------------------------------------------------------------------
def _load_kernels():
    """Load AdamHD's JIT-built CPU kernel on every rank before any case runs. torch's cpp_extension.load takes a
    lock file in TORCH_EXTENSIONS_DIR on every first load in a process (even when nothing is rebuilt); a rank
    SIGKILLed while holding it (run_ranks kills the others when one rank crashes) leaves a stale lock, and every
    later process that loads the kernel waits on it forever."""
    from adamhd_dist.optim.kernels import cpu

    cpu.available()
    dist.barrier()


def suite(cases):
    """Run ``cases`` (``(label, function name in this module, kwargs)``) one after another in this launch; each
    result gets ``"seconds"``; a case that raises gives ``{"error": traceback text}``."""
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    _load_kernels()
    out = {}
    for label, fn, kw in cases:
        t0 = time.monotonic()
        try:
            res = globals()[fn](**kw)
        except Exception:
            res = {"error": traceback.format_exc()[-4000:]}
            print(f"[rank {dist.get_rank()}] case {label} failed:\n{res['error']}", file=sys.stderr, flush=True)
        res["seconds"] = time.monotonic() - t0
        out[label] = res
        dist.barrier()
    return out
