"""The AdamHD-vs-AdamW study: runs arms of the pre-training app, analyses the weights and writes a report.
``launch/compare.py`` (or the ``adamhd-compare`` command) is its command line."""
