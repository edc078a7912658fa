"""``adamhd_dist.deepspeed``: the public name of :mod:`adamhd_dist.integrations.deepspeed` (the same module).

    import adamhd_dist.deepspeed as ads
    engine, optimizer, _, _ = ads.initialize(model=model, config="ds_configs/zero2_adamhd.json")
    ads.attach(engine)      # after your own deepspeed.initialize(model=..., optimizer=AdamHD(...), ...)
    python -m adamhd_dist.deepspeed export CHECKPOINT_DIR --out full.pt
"""

import sys

from .integrations import deepspeed as _impl

if __name__ == "__main__":
    raise SystemExit(_impl.main())
sys.modules[__name__] = _impl
