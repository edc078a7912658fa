"""adamhd_dist: AdamHD (AdamW with decoupled Huber decay), exact under DeepSpeed ZeRO and PyTorch FSDP2.

    >>> import torch, adamhd_dist
    >>> model = torch.nn.Linear(16, 4)
    >>> opt = adamhd_dist.AdamHD(adamhd_dist.param_groups(model, weight_decay=0.1), lr=1e-3)
"""

from .deltas import layer_deltas, register_layer_deltas
from .functional import adamhd
from .grouping import check_param_groups, param_groups
from .huber import huber_clip_, huber_penalty, huber_prox_
from .optimizer import AdamHD

__version__ = "0.1.0"

__all__ = [
    "AdamHD",
    "adamhd",
    "param_groups",
    "check_param_groups",
    "layer_deltas",
    "register_layer_deltas",
    "huber_penalty",
    "huber_prox_",
    "huber_clip_",
    "__version__",
]
