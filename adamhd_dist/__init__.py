"""adamhd_dist: AdamHD (AdamW with decoupled Huber decay), exact under DeepSpeed ZeRO and PyTorch FSDP2.

    >>> import torch, adamhd_dist
    >>> model = torch.nn.Linear(16, 4)
    >>> opt = adamhd_dist.AdamHD(adamhd_dist.param_groups(model, weight_decay=0.1), lr=1e-3)

The package is layered; each layer imports only the ones below it, and importing ``adamhd_dist`` loads the core
alone (torch, nothing else):

- :mod:`adamhd_dist.optim`: the optimizer, its functional core, the Huber step, the layer statistic, param
  grouping and the fused kernels; it knows no engine;
- :mod:`adamhd_dist.distributed`: what sharding changes (the one collective, DTensor shards, flat layouts) and
  FSDP2's ``apply_fsdp``;
- :mod:`adamhd_dist.integrations`: DeepSpeed (``adamhd_dist.deepspeed``), transformers and Accelerate, each
  imported only when used.
"""

from __future__ import annotations

import importlib

from .optim.deltas import layer_deltas
from .optim.functional import adamhd
from .optim.grouping import check_param_groups, param_groups
from .optim.huber import huber_clip_, huber_penalty, huber_prox_
from .optim.layer_stats import UnplacedTensorError
from .optim.layer_stats import is_dtensor as _is_dtensor
from .optim.layer_stats import register_auto_strategy as _register_auto_strategy
from .optim.optimizer import AdamHD

__version__ = "0.1.0"

__all__ = [
    "AdamHD",
    "adamhd",
    "param_groups",
    "check_param_groups",
    "layer_deltas",
    "UnplacedTensorError",
    "huber_penalty",
    "huber_prox_",
    "huber_clip_",
    "__version__",
]



def _dtensor_strategy(optimizer):
    from .distributed.dtensor import DTensorLayerStats

    return DTensorLayerStats()


# The optimizer finds the DTensor strategy here when DTensor parameters appear (the core imports no distributed code).
_register_auto_strategy(_is_dtensor, _dtensor_strategy)

# Subpackages that import an engine (or torch.distributed): loaded on first attribute access, so that
# ``adamhd_dist.deepspeed.attach(engine)`` works after a plain ``import adamhd_dist``.
_LAZY = ("deepspeed", "fsdp", "distributed", "integrations")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
