"""``adamhd_dist.deepspeed``: the public name of :mod:`adamhd_dist.integrations.deepspeed`.

    import adamhd_dist.deepspeed as ads
    engine, optimizer, _, _ = ads.initialize(model=model, config="ds_configs/zero2_adamhd.json")
    python -m adamhd_dist.deepspeed export CHECKPOINT_DIR --out full.pt
"""

from .integrations.deepspeed import *  # noqa: F401,F403
from .integrations.deepspeed import __all__, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
