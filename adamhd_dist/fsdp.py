"""``adamhd_dist.fsdp``: the public name of :mod:`adamhd_dist.distributed.fsdp` (``apply_fsdp``)."""

from .distributed.fsdp import *  # noqa: F401,F403
from .distributed.fsdp import __all__  # noqa: F401
