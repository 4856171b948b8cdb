"""Models: build and load causal LMs, pick their precision, check their tensors, score their tokens.

Below ``train``, ``evaluate``, ``serve`` and ``tracking``, which all load models the same way
(:func:`kubellm.models.causal_lm.load_causal_lm`) and run them in the same precision
(:mod:`kubellm.models.precision`); the registry checks weights with :mod:`kubellm.models.tensors`
without importing the training package; training, evaluation and serving's log-probabilities share one
token loss (:mod:`kubellm.models.losses`). Heavy dependencies (torch, transformers, peft) are imported
inside functions, so importing this package is cheap.
"""
