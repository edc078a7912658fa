"""The single-process reference of tests/test_launcher_tp.py: the launcher's own entry (``adamhd_train.cli.main``)
at --tp 1 on one process, with the GPT-2 blocks made linear before the engine wraps them (``on_model``), so that it
trains the very layers a --tp run trains (q, k and v separate, each with its own δ) on the whole model.

    python tests/launcher_tp_worker.py --fsdp --model nano ... --out-dir DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adamhd_train import cli  # noqa: E402
from adamhd_train.tp import linear_blocks  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(cli.main(sys.argv[1:], on_model=linear_blocks))
