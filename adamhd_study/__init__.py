"""The AdamHD-vs-AdamW study: runs arms of the pre-training app, analyses the weights and writes a report.
``launch/compare.py`` (or the ``adamhd-compare`` command) is its command line.

- :mod:`~adamhd_study.cli`: the options; :mod:`~adamhd_study.config`: :class:`CompareConfig` and the presets;
- :mod:`~adamhd_study.compare`: ``run_comparison``, the steps below in order;
- :mod:`~adamhd_study.plan`: the runs and their command lines; :mod:`~adamhd_study.execute`: running them;
  :mod:`~adamhd_study.compare_runner`: the launcher with outlier gradients injected;
- :mod:`~adamhd_study.collect`: reading runs back, final weights evaluated, pruned, histogrammed;
- :mod:`~adamhd_study.stats`: means and the paired t test; :mod:`~adamhd_study.summary`: the comparison's
  numbers and judgements; :mod:`~adamhd_study.verdict`: the verdict's sentences;
- :mod:`~adamhd_study.report` (with ``templates/``) and :mod:`~adamhd_study.plots`: ``report.md``, ``results.json``
  and the PNGs;
- :mod:`~adamhd_study.analysis`: pruning, histograms, steps-to-target, the outlier schedule (pure functions).
"""
