"""kubellm: the whole life of a language model as Kubeflow Pipelines.

The library layer: plain Python, typed configs, no ``kfp`` import anywhere. The KFP components
(``kubellm.components``) and pipelines (``kubellm.pipelines``) call into it; so does the ``kubellm`` CLI.
Importing this package is cheap and has no side effects: heavy libraries (torch, transformers, mlflow)
are imported by the functions that need them.
"""

__version__ = "0.1.0"
