"""The methods benchmark behind ``benchmarks/methods.py``, in four parts.

``runner``: one model's rows (quantize a copy, score it with ``diffquant.evaluation``, diagnose);
``store``: the persisted rows in ``benchmarks/results/methods.json`` (reuse of finished rows, merge per model);
``claims``: the papers' claims checked with paired intervals; ``report``: the generated docs page and figures.
``probes`` holds the two error diagnostics a row may carry (trajectory drift, activation clipping).
"""
