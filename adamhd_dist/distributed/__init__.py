"""What sharding changes for AdamHD, engine by engine's data structures but without their private APIs: the one
collective of a step (:mod:`.collectives`), the statistic over DTensor shards (:mod:`.dtensor`, FSDP2/HSDP),
layers inside flat per-rank buffers (:mod:`.layout`, ZeRO), and FSDP2's :func:`~.fsdp.apply_fsdp`."""

from .collectives import all_reduce_sums
from .dtensor import DTensorLayerStats
from .fsdp import apply_fsdp
from .layout import FlatLayout, Fragment

__all__ = ["all_reduce_sums", "DTensorLayerStats", "apply_fsdp", "FlatLayout", "Fragment"]
