"""normswap's benchmark harness: ``python -m benchmarks`` (see ``benchmarks/__main__.py`` and docs/benchmarks.md).

Modules: ``timing`` (interleaved ratios, spread, the contamination check), ``profiles`` (sizes), one module per
section (``layers``, ``models``, ``tool``, ``accuracy``, ``claims``), ``targets`` (issues 13 and 14), ``report``
(the generated page and plots); ``threads`` (the OpenMP wait-policy table of docs/speed.md) and
``bench_calibration.py`` (the tables of docs/calibration.md) are separate scripts.
"""
