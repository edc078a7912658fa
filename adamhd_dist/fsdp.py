"""``adamhd_dist.fsdp``: the public name of :mod:`adamhd_dist.distributed.fsdp` (the same module)."""

import sys

from .distributed import fsdp as _impl

sys.modules[__name__] = _impl
