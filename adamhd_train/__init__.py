"""The GPT-3 pre-training app built on adamhd_dist: settings, data, models, the recipe, the engine, the training
loop, checkpoints, metrics and run manifests. ``launch/pretrain_gpt3.py`` (or the ``adamhd-pretrain`` command)
is its command line."""
