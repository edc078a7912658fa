"""AdamHD in the transformers ``Trainer``: :class:`AdamHDCallback`.

    from adamhd_dist import AdamHD
    from adamhd_dist.integrations.transformers import AdamHDCallback

    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"),   # or fsdp=...
                      train_dataset=ds,
                      optimizer_cls_and_kwargs=(AdamHD, {"lr": 6e-4, "betas": (0.9, 0.95)}),
                      callbacks=[AdamHDCallback()])

The Trainer builds AdamHD (``optimizer_cls_and_kwargs``; its decay / no-decay groups come from
``TrainingArguments.weight_decay``) and hands it to DeepSpeed or FSDP2 through Accelerate. At the start of
training the callback:

- under DeepSpeed, attaches the layout of the engine's partitions (:func:`adamhd_dist.deepspeed.attach`), so each
  layer's δ is reduced over the ranks exactly, in one all-reduce per step (without the callback AdamHD refuses its
  first step under ZeRO);
- under FSDP2 there is nothing to attach (AdamHD reduces over the DTensor shards by itself); it names the layers;
- refuses, with the fix, a Trainer whose optimizer is not AdamHD (an instance passed as ``optimizers=(opt, None)``
  is replaced by the Trainer's own optimizer under DeepSpeed: use ``optimizer_cls_and_kwargs``).

Each log line then carries the per-layer δ summary: ``adamhd/delta_min``, ``adamhd/delta_median``,
``adamhd/delta_max`` (in ``trainer.state.log_history`` and the logs of callbacks after this one, e.g. the progress
printer). Trainer checkpoints keep μ: it is part of the optimizer state DeepSpeed or the Trainer saves (resume at
the same world size; a state saved at another one is refused at the start of training, see
``python -m adamhd_dist.deepspeed export`` to read it). ``adamhd_dist.layer_deltas(trainer)`` gives every layer's δ.
"""

from __future__ import annotations

import statistics

from transformers import TrainerCallback

from ..optim.deltas import find_adamhd, layer_deltas

__all__ = ["AdamHDCallback"]


def _is_deepspeed(optimizer) -> bool:
    """Whether DeepSpeed wraps the optimizer (an object of a ``deepspeed.*`` class in the ``.optimizer`` chain)."""
    seen, cur = set(), optimizer
    while cur is not None and id(cur) not in seen:
        if type(cur).__module__.split(".")[0] == "deepspeed":
            return True
        seen.add(id(cur))
        cur = getattr(cur, "optimizer", None)
    return False


class AdamHDCallback(TrainerCallback):
    """Makes AdamHD exact under the Trainer's DeepSpeed and FSDP2 settings and logs the per-layer δ summary.

    Args:
        log_deltas: add ``adamhd/delta_{min,median,max}`` to every log (default True).
    """

    def __init__(self, log_deltas: bool = True):
        self.log_deltas = log_deltas
        self.optimizer = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        try:
            opt = find_adamhd(optimizer)
        except TypeError:
            raise TypeError(
                f"AdamHDCallback: the Trainer's optimizer is {type(optimizer).__name__}, not AdamHD. Pass the class, "
                f"Trainer(..., optimizer_cls_and_kwargs=(adamhd_dist.AdamHD, {{...}})): under DeepSpeed the Trainer "
                f"replaces an optimizer instance given as optimizers=(opt, None) by its own") from None
        if _is_deepspeed(optimizer):
            from .deepspeed import attach

            attach(optimizer, module=model)
        elif model is not None:
            names = {id(p): n for n, p in model.named_parameters()}
            for group in opt.param_groups:
                if "param_names" not in group and all(id(p) in names for p in group["params"]):
                    group["param_names"] = [names[id(p)] for p in group["params"]]
        self.optimizer = opt

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_deltas or logs is None or self.optimizer is None:
            return
        deltas = list(layer_deltas(self.optimizer).values())
        if not deltas:
            return
        summary = {"adamhd/delta_min": min(deltas), "adamhd/delta_median": statistics.median(deltas),
                   "adamhd/delta_max": max(deltas)}
        logs.update(summary)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(summary)
