"""The GPT-3 pre-training app built on adamhd_dist. ``launch/pretrain_gpt3.py`` (or the ``adamhd-pretrain``
command) is its command line.

- :mod:`~adamhd_train.cli`: the options, and ``main`` (parse, resolve, train; exit status 2 for bad options);
- :mod:`~adamhd_train.settings`: :class:`TrainSettings` (typed, validated) and the count parser;
- :mod:`~adamhd_train.resolve`: options -> settings, one function per concern, and the resume check;
- :mod:`~adamhd_train.ranks`: how the ranks were started, and the process group;
- :mod:`~adamhd_train.train`: the :class:`Trainer` (train_step, evaluate, log, save) and ``train``;
- :mod:`~adamhd_train.engine`: the one place that builds DeepSpeed or FSDP2 behind one interface;
- :mod:`~adamhd_train.data`, :mod:`~adamhd_train.models`, :mod:`~adamhd_train.recipe`: corpus and token cache,
  model sizes, GPT-3's batch plan and schedule;
- :mod:`~adamhd_train.checkpoints`, :mod:`~adamhd_train.metrics`, :mod:`~adamhd_train.manifest`,
  :mod:`~adamhd_train.describe`: the run directory's contents and what a run prints;
- :mod:`~adamhd_train.demo`, :mod:`~adamhd_train.ports`: a one-process demo, a free loopback port.
"""

import importlib.util as _util

TRAIN_EXTRA = ("deepspeed", "transformers", "datasets", "tokenizers", "numpy", "scipy", "tqdm", "matplotlib",
               "tensorboard")
"""What the app and the study import beyond torch: the ``[train]`` extra of the distribution (pyproject.toml)."""


class MissingExtraError(ModuleNotFoundError):
    """The app or the study was imported without the ``[train]`` extra; the message says what to install."""


def _check_train_extra() -> None:
    missing = [m for m in TRAIN_EXTRA if _util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"the pre-training app and the comparison study (adamhd_train, adamhd_study) need the [train] extra; "
            f"missing: {', '.join(missing)}. Install it with: pip install \"adamhd_dist[train]\" (in a checkout: "
            f"pip install -e \".[train]\", or make install)", name=missing[0])


_check_train_extra()
