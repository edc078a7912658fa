"""The optimizer library: :class:`AdamHD`, its functional core (:func:`adamhd`), the Huber step, the per-layer
statistic, param grouping and the fused kernels. Nothing here knows a sharding engine: what sharding changes
reaches the optimizer as a layer-statistic strategy (:mod:`adamhd_dist.optim.layer_stats`)."""

from .deltas import find_adamhd, layer_deltas
from .functional import adamhd
from .grouping import check_param_groups, param_groups
from .huber import huber_clip_, huber_penalty, huber_prox_
from .layer_stats import LayerStats, UnplacedTensorError
from .optimizer import AdamHD

__all__ = ["AdamHD", "LayerStats", "UnplacedTensorError", "adamhd", "param_groups", "check_param_groups",
           "layer_deltas", "find_adamhd", "huber_penalty", "huber_prox_", "huber_clip_"]
