"""Evaluation: held-out perplexity and generation metrics, benchmarks, the gate's report, comparisons.

Its own package (not under ``train``) because serving and deployment use it too: the deploy step scores
the served model with the same benchmarks (:mod:`kubellm.evaluate.benchmarks`).
Public entry point: :func:`kubellm.evaluate.run.evaluate`, returning :class:`kubellm.evaluate.run.EvalResult`;
:mod:`~kubellm.evaluate.metrics` scores answers, :mod:`~kubellm.evaluate.report` writes the report and loss
curve, :mod:`~kubellm.evaluate.compare` ranks models against each other. Heavy dependencies (torch,
lm-eval, matplotlib) are imported inside functions, so importing this package is cheap.
"""
