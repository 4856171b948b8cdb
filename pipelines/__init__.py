"""KFP pipelines: composition only (installed as ``kubellm.pipelines``); ``api`` is the public API for
users' own pipelines, and the built-in pipelines are written with it.

A built-in pipeline is one file here: a public module with ``NAME`` and ``build(b: Builder)`` that
returns the function it decorates with ``@b.pipeline(NAME, description)`` — exactly what a pipeline file
of your own holds (``kubellm run --pipeline FILE.py``). Nothing lists them:
:func:`kubellm.pipeline_params.builtin_pipelines` finds them in this package's folders (its parameters
for ``kubellm run --help`` included) without importing kfp, ``kubellm compile`` compiles every one, and
the run summary's stages are those the builder recorded while building (``Builder.stages``). Each step's
display name, placement, retries, caching and MLflow stage come from ``api.STEPS``; ``_blocks`` holds the
pieces several built-ins share.

Importing this package imports nothing else (no kfp): the command line reads the pipelines' names and
parameters through it before deciding to build one.
"""
