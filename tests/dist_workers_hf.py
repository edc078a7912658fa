"""Per-rank code for the ecosystem's doors on CPU ranks (gloo): the transformers Trainer with DeepSpeed and FSDP2,
Accelerate's DeepSpeed plugin, and Accelerate's FSDP2 in-place parameter swap (run through
tests/dist_utils.run_ranks; tests/test_hf.py compares).

One launch per world size runs many cases one after another (process start-up and the transformers / DeepSpeed
imports are the expensive part): :func:`suite` takes ``(label, function name, kwargs)`` triples and returns
``{label: result}``; a case that raises returns ``{"error": traceback}``, so one broken door does not hide the
others. Each case returns, on every rank, the final parameters by name (fp32, whole tensors: gathered where
sharded) and per-layer δ. The single-process reference (:func:`reference`) trains the same model from the same
seed on the same global batches in the same order with the same AdamHD settings and the Trainer's param groups,
clipping as the engine does (torch's rule at global norm 1.0, DeepSpeed 0.19's default).

The model is a tiny GPT-2 built from a config (nothing is downloaded), dropout off, every position and vocabulary
row used, eps = 1e-3 (reduction-order noise is not amplified into ±lr steps on parameters whose true gradient is
~0), and its matrices scaled apart so that the layers' mean |θ| differ: a statistic taken over a flat partition or
a sub-group (many layers) is then clearly not any one layer's.

What each door needs on CPU ranks (every rank: ``DS_ACCELERATOR=cpu``, ``CUDA_VISIBLE_DEVICES=``, see
:data:`RANK_ENV`):
- Trainer + DeepSpeed: ``TrainingArguments(deepspeed=cfg, use_cpu=True, ...)``. Without ``use_cpu`` (or a gloo
  ``PartialState`` made first), Accelerate counts one process per rank and DeepSpeed's batch check fails.
- Trainer + FSDP2: Accelerate enables FSDP only for MULTI_<device> states, and CPU ranks are MULTI_CPU; the harness
  marks the state MULTI_GPU with the device left on CPU (:func:`_force_accelerate_multi_device`), test-only.
- Accelerate + DeepSpeed plugin: a gloo ``PartialState`` made first (:func:`deepspeed_partial_state`); without it
  Accelerate counts one process and does not shard the data (silently wrong, whatever the optimizer).
- Accelerate's FSDP2 ``prepare`` swap, done as accelerate 1.15's ``_prepare_fsdp2`` does it
  (:func:`accelerate_fsdp2_swap`), with its own ``fsdp2_switch_optimizer_parameters``.
- DeepSpeed AutoTP (``"tensor_parallel": {"autotp_size": 2}``, :func:`trainer_autotp`, :func:`accelerate_autotp`):
  nothing more. transformers' ``deepspeed_init`` calls ``deepspeed.tp_model_init``; Accelerate's ``prepare`` under
  DeepSpeed makes a "tp" device mesh before it prepares a data loader (also the Trainer's, prepared on its own
  before the engine), so both tensor-parallel ranks get the same batch; ``deepspeed.initialize`` applies AutoTP
  from the config. Batch sizes are per data-parallel rank; leave ``train_batch_size`` out of a config given to
  Accelerate (DeepSpeed's batch check counts the tensor-parallel ranks as data-parallel). These cases go last in a
  launch: DeepSpeed's tensor-parallel groups live for the process.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

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


def build_llama(seed: int = 0, spread: bool = True):
    """A tiny LLaMA for the AutoTP cases (DeepSpeed AutoTP splits q/k/v/gate/up column-wise and o/down row-wise;
    GPT-2's fused Conv1D c_attn is not a training AutoTP layer): 4 heads / 2 key-value heads (both split by 2),
    untied head, eager attention; matrices spread as in :func:`build_model`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).float()
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


def reference(kind: str = "adamhd", steps: int = STEPS, clip: float | None = CLIP, hp=None, arch: str = "gpt2"):
    """One process, unsharded fp32 model, the whole global batch per step, Trainer-style groups, torch's
    clipping rule (what DeepSpeed does at fp32). ``arch``: "gpt2" (:func:`build_model`) or "llama"
    (:func:`build_llama`, the AutoTP cases)."""
    import adamhd_dist

    model = build_model() if arch == "gpt2" else build_llama()
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


def zero_section(stage: int, offload: bool = False) -> dict:
    """The ZeRO settings of every DeepSpeed case (buckets small enough that layers straddle them)."""
    z = {"stage": stage, "reduce_bucket_size": 2000, "allgather_bucket_size": 2000}
    if stage == 3:
        z.update({"sub_group_size": 20000, "stage3_param_persistence_threshold": 0,
                  "stage3_prefetch_bucket_size": 1000, "stage3_max_live_parameters": 100000})
    if offload:
        z["offload_optimizer"] = {"device": "cpu"}
    return z


def trainer_ds_config(stage: int, offload: bool = False) -> dict:
    """The Trainer fills the batch sizes and clipping from TrainingArguments ("auto")."""
    cfg = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
           "zero_optimization": zero_section(stage, offload), "steps_per_print": 10**9,
           "wall_clock_breakdown": False}
    if offload:
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


def _destroy_engines():
    gc.collect()
    try:
        from deepspeed.runtime.zero.partition_parameters import shutdown_init_context

        shutdown_init_context()
    except Exception:
        pass


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


def plain_ds_config(world: int, stage: int, offload: bool = False) -> dict:
    cfg = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
           "gradient_accumulation_steps": 1, "gradient_clipping": CLIP, "steps_per_print": 10**9,
           "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True,
           "zero_optimization": zero_section(stage, offload)}
    if offload:
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


def _shard_like_accelerate(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def _adamhd_result(trainer_or_opt) -> dict:
    """δ per layer (through :func:`adamhd_dist.layer_deltas` on what the user holds) and μ per layer."""
    import adamhd_dist

    opt = adamhd_dist.optim.find_adamhd(trainer_or_opt)
    deltas = adamhd_dist.layer_deltas(trainer_or_opt)
    if opt.layer_state is not None:
        mu = {n: float(v["delta_ema"]) for n, v in opt.layer_state.state_dict().items()}
    else:
        mu = {n: float(opt.state[p]["delta_ema"]) for g in opt.param_groups
              for n, p in zip(g.get("param_names", ()), g["params"]) if "delta_ema" in opt.state.get(p, {})}
    return {"deltas": deltas, "mu": mu, "strategy": type(opt.layer_stats).__name__}


# ------------------------------------------------------------------------------------------------------------
# 1. transformers Trainer + DeepSpeed
def trainer_ds(world: int, stage: int = 2, callback: bool = True, steps: int = STEPS, offload: bool = False,
               save_steps: int | None = None, resume: str | None = None, outdir: str | None = None):
    """Trainer + DeepSpeed ZeRO-``stage`` with AdamHD through ``optimizer_cls_and_kwargs`` and, with
    ``callback``, ``AdamHDCallback``. Logs every 3 steps. ``save_steps``: Trainer checkpoints into ``outdir``;
    ``resume``: ``trainer.train(resume_from_checkpoint=resume)``. Without the callback the run must refuse at its
    first step: ``{"refused": message, "changed": largest parameter change}``."""
    import adamhd_dist
    from adamhd_dist.integrations.transformers import AdamHDCallback
    from transformers import Trainer

    _reset_accelerate()
    model = build_model()
    scratch = None
    if outdir is None:
        scratch = outdir = tempfile.mkdtemp(prefix="hf-trainer-")
    try:
        args = training_args(outdir, world, steps=steps, save_steps=save_steps, use_cpu=True,
                             deepspeed=trainer_ds_config(stage, offload), logging_strategy="steps", logging_steps=3)
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(data(steps)),
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("adamhd"),
                          callbacks=[AdamHDCallback()] if callback else [])
        before = {n: p.detach().clone() for n, p in model.named_parameters()} if stage != 3 else None
        try:
            trainer.train(resume_from_checkpoint=resume)
        except adamhd_dist.UnplacedTensorError as e:
            changed = None if before is None else max(
                float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters())
            return {"refused": str(e), "changed": changed}
        out = {"params": gather_params(trainer.model_wrapped), "log_history": trainer.state.log_history,
               "engine": type(trainer.model_wrapped).__name__, **_adamhd_result(trainer)}
        if save_steps:
            out["checkpoints"] = sorted(c for c in os.listdir(outdir) if c.startswith("checkpoint-"))
        return out
    finally:
        _destroy_engines()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def trainer_ds_resume(world: int, outdir: str, stage: int = 2, steps: int = STEPS, save_steps: int = 3):
    """An uninterrupted Trainer run that saves every ``save_steps`` steps into ``outdir``, then a fresh Trainer
    resumed from ``outdir/checkpoint-<save_steps>`` to the same ``steps`` (DeepSpeed loads the checkpoint before
    the callbacks run: the loaded μ waits in AdamHD until AdamHDCallback attaches the layout)."""
    full = trainer_ds(world, stage=stage, steps=steps, save_steps=save_steps, outdir=outdir)
    dist.barrier()
    resumed = trainer_ds(world, stage=stage, steps=steps, resume=os.path.join(outdir, f"checkpoint-{save_steps}"))
    return {"full": full, "resumed": resumed}


# ------------------------------------------------------------------------------------------------------------
# 2. transformers Trainer + FSDP2
def trainer_fsdp2(world: int, steps: int = STEPS):
    """Trainer + FSDP2 (``fsdp="full_shard"``, ``fsdp_config={"fsdp_version": 2, ...}``) with AdamHDCallback: the
    Trainer builds AdamHD on the unsharded model and Accelerate swaps the DTensor parameters in."""
    from adamhd_dist.integrations.transformers import AdamHDCallback
    from torch.distributed.tensor import DTensor
    from transformers import Trainer

    _reset_accelerate()
    _force_accelerate_multi_device()
    model = build_model()
    scratch = tempfile.mkdtemp(prefix="hf-fsdp-")
    try:
        args = training_args(scratch, world, steps=steps, accelerator_config={"use_configured_state": True},
                             fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                                             "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                             "transformer_layer_cls_to_wrap": ["GPT2Block"]})
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(data(steps)),
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("adamhd"), callbacks=[AdamHDCallback()])
        trainer.train()
        m = trainer.model_wrapped
        return {"params": gather_params(m), "dtensor_params": sum(isinstance(p, DTensor) for p in m.parameters()),
                "n_params": len(list(m.parameters())), **_adamhd_result(trainer)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------
# 3. Accelerate + DeepSpeed plugin
def accelerate_ds(world: int, stage: int = 2, attach: bool = True, steps: int = STEPS):
    """``Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))``; ``model, opt, dl =
    accelerator.prepare(model, AdamHD(groups), dl)``; with ``attach``: ``adamhd_dist.deepspeed.attach(model)`` (the
    prepared model is the engine). Without it the first step must refuse."""
    import adamhd_dist
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    _reset_accelerate()
    deepspeed_partial_state()
    model = build_model()
    opt = make_optimizer("adamhd", trainer_groups(model, HP["weight_decay"]))
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=plain_ds_config(world, stage)))
    dl = torch.utils.data.DataLoader(TokenDataset(data(steps)), batch_size=GLOBAL_BATCH // world, shuffle=False)
    pm, popt, pdl = accelerator.prepare(model, opt, dl)
    if attach:
        adamhd_dist.deepspeed.attach(pm)
    pm.train()
    try:
        for batch in pdl:
            accelerator.backward(pm(**batch).loss)
            popt.step()
            popt.zero_grad()
    except adamhd_dist.UnplacedTensorError as e:
        return {"refused": str(e)}
    finally:
        _destroy_engines()
    return {"params": gather_params(pm), "engine": type(pm).__name__, **_adamhd_result(popt)}


# ------------------------------------------------------------------------------------------------------------
# 4. Accelerate's FSDP2 in-place parameter swap
def accelerate_fsdp2_swap(world: int, fused: bool | None = None, steps: int = STEPS):
    """What ``Accelerator.prepare(model, optimizer)`` does under FSDP2 (accelerate 1.15 ``_prepare_fsdp2``), by
    hand: the optimizer is built on the unsharded model; each of its params is replaced by a 1-element placeholder
    whose ``data_ptr`` attribute is the old storage address; the model is ``fully_shard``-ed (blocks, then root);
    accelerate's own ``fsdp2_switch_optimizer_parameters`` rebinds ``param_group["params"]`` in place to the
    DTensor params by that address (no ``add_param_group``). Then ``steps`` steps."""
    import adamhd_dist
    from accelerate.utils import fsdp2_switch_optimizer_parameters
    from torch.distributed.tensor import DTensor

    model = build_model()
    hp = {k: v for k, v in HP.items() if k != "weight_decay"}
    opt = adamhd_dist.AdamHD(trainer_groups(model, HP["weight_decay"]), **hp, fused=fused)
    old = {n: p.data_ptr() for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for i, p in enumerate(g["params"]):
            g["params"][i] = torch.empty(1, dtype=p.dtype, device=p.device)
            g["params"][i].data_ptr = p.data_ptr()
    _shard_like_accelerate(model)
    new = dict(model.named_parameters())
    fsdp2_switch_optimizer_parameters(opt, {old[n]: new[n] for n in old})
    swapped = sum(isinstance(p, DTensor) for g in opt.param_groups for p in g["params"])
    model.train()
    for x, y in rank_batches(steps):
        model(input_ids=x, labels=y).loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), CLIP)
        opt.step()
        opt.zero_grad()
    return {"params": gather_params(model), "swapped": swapped, **_adamhd_result(opt)}


# ------------------------------------------------------------------------------------------------------------
# 5. DeepSpeed AutoTP ("tensor_parallel": {"autotp_size": tp}) through the Trainer and Accelerate. DeepSpeed's
# tensor-parallel groups live for the process: these cases come LAST in a launch (an engine built after an AutoTP
# one fails in DeepSpeed's group look-ups).
def _tp_local(module) -> dict:
    """This rank's parameters by name: (fp32 tensor, whether AutoTP sliced it); the test joins the slices."""
    from adamhd_dist.integrations.deepspeed import _compat

    return {n: (p.detach().clone().float(), bool(_compat.is_tp_sliced(p))) for n, p in module.named_parameters()}


def _tp_info() -> dict:
    from deepspeed.utils import groups

    return {"tp_rank": dist.get_rank(group=groups.get_tensor_model_parallel_group()),
            "dp_world": groups.get_data_parallel_world_size()}


def _count_reduces(opt, counts):
    """Wrap the layout's all-reduce of the per-layer sums: counts["reduce"] goes up once per call."""
    lay = opt.layer_stats.layout
    reduce = lay.reduce

    def counted(t):
        counts["reduce"] += 1
        return reduce(t)

    lay.reduce = counted


def _record_inputs(model, seen):
    """Every forward's input_ids on this rank (what the data loader gave it)."""
    return model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].detach().clone()),
                                           with_kwargs=True)


def trainer_autotp(world: int, tp: int = 2, stage: int = 2, callback: bool = True, steps: int = STEPS):
    """Trainer + DeepSpeed ZeRO-``stage`` + ``"tensor_parallel": {"autotp_size": tp}`` (transformers'
    deepspeed_init calls deepspeed.tp_model_init) with AdamHDCallback; per_device_train_batch_size is the global
    batch over the data-parallel ranks (world / tp). A counting callback after AdamHDCallback counts the layout's
    all-reduces. Without ``callback`` the first step must refuse: ``{"refused": message, "changed": largest
    parameter change}``."""
    import adamhd_dist
    from adamhd_dist.integrations.transformers import AdamHDCallback
    from transformers import Trainer, TrainerCallback

    counts = {"reduce": 0}

    class Count(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            if callback:
                _count_reduces(adamhd_dist.optim.find_adamhd(optimizer), counts)

    _reset_accelerate()
    model = build_llama()
    seen = []
    _record_inputs(model, seen)
    cfg = trainer_ds_config(stage)
    cfg["tensor_parallel"] = {"autotp_size": tp}
    scratch = tempfile.mkdtemp(prefix="hf-autotp-")
    try:
        args = training_args(scratch, world // tp, steps=steps, use_cpu=True, deepspeed=cfg)
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(data(steps)),
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("adamhd"),
                          callbacks=[AdamHDCallback(), Count()] if callback else [Count()])
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        try:
            trainer.train()
        except adamhd_dist.UnplacedTensorError as e:  # parameters compared slice for slice (same names, same shapes)
            after = dict(trainer.model_wrapped.module.named_parameters())
            return {"refused": str(e), "changed": max(float((after[n].detach() - before[n]).abs().max())
                                                       for n in before if after[n].shape == before[n].shape)}
        engine = trainer.model_wrapped
        return {"params": _tp_local(engine.module), "engine": type(engine).__name__, "counts": counts,
                "seen": seen, **_tp_info(), **_adamhd_result(trainer)}
    finally:
        _destroy_engines()
        shutil.rmtree(scratch, ignore_errors=True)


def accelerate_autotp(world: int, tp: int = 2, stage: int = 2, door: str = "engine", steps: int = STEPS):
    """``Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))`` with ``"tensor_parallel":
    {"autotp_size": tp}`` (Accelerate makes a "tp" device mesh; deepspeed.initialize applies AutoTP from the
    config), then ``attach(model)`` (door "engine": the prepared model is the engine) or ``attach(optimizer,
    module=model.module)`` (door "wrapper": Accelerate's prepared optimizer). The DataLoader's batch is the global
    batch over the data-parallel ranks; no train_batch_size in the config (DeepSpeed's batch check counts the
    tensor-parallel ranks as data-parallel)."""
    import adamhd_dist
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    _reset_accelerate()
    deepspeed_partial_state()
    dp = world // tp
    model = build_llama()
    seen = []
    _record_inputs(model, seen)
    opt = make_optimizer("adamhd", trainer_groups(model, HP["weight_decay"]))
    cfg = plain_ds_config(dp, stage)
    del cfg["train_batch_size"]
    cfg["tensor_parallel"] = {"autotp_size": tp}
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
    dl = torch.utils.data.DataLoader(TokenDataset(data(steps)), batch_size=GLOBAL_BATCH // dp, shuffle=False)
    pm, popt, pdl = accelerator.prepare(model, opt, dl)
    if door == "engine":
        adamhd_dist.deepspeed.attach(pm)
    else:
        adamhd_dist.deepspeed.attach(popt, module=pm.module)
    counts = {"reduce": 0}
    _count_reduces(adamhd_dist.optim.find_adamhd(popt), counts)
    pm.train()
    try:
        for batch in pdl:
            accelerator.backward(pm(**batch).loss)
            popt.step()
            popt.zero_grad()
    finally:
        _destroy_engines()
    return {"params": _tp_local(pm.module), "engine": type(pm).__name__, "counts": counts, "seen": seen,
            **_tp_info(), **_adamhd_result(popt)}


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
