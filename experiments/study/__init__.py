"""The multi-seed attention study of ``docs/results/protocol.md``.

``run.py`` is the command (``python -m experiments.study.run``); ``variants.py`` parses the
variants and seeds; ``runner.py`` drives one ``experiments.training.train`` run per
(variant, seed) and reads the finished ones back; ``provenance.py`` records the commit and
the CPU of every launch; ``localize.py`` scores the finished runs' checkpoints;
``report.py`` holds the statistics, tables and plots.
"""
