"""The optimizer library: :class:`AdamHD`, its functional core (:func:`adamhd`), the Huber step, the per-layer
statistic, param grouping and the fused kernels. Nothing here knows a sharding engine: what sharding changes
reaches the optimizer as a layer-statistic strategy (:mod:`adamhd_dist.optim.layer_stats`)."""

from .deltas import layer_deltas
from .functional import adamhd
from .grouping import check_param_groups, param_groups
from .huber import huber_clip_, huber_penalty, huber_prox_
from .optimizer import AdamHD

__all__ = ["AdamHD", "adamhd", "param_groups", "check_param_groups", "layer_deltas", "huber_penalty",
           "huber_prox_", "huber_clip_"]
