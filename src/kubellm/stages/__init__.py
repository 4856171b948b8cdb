"""The lifecycle's steps, one module per component area — the single entrance of every step.

``components/<area>.py`` (the KFP component), the ``kubellm`` command of the same name and a training
job's pods all call the same function here, tracking included:

- :mod:`.data` — ``prep``, ``data_changed``
- :mod:`.train` — ``fetch_model``, ``pretrain``, ``finetune`` (in this process or as a training job)
- :mod:`.evaluate` — ``evaluate`` (and the gate), ``compare_to_champion``, ``select_best``
- :mod:`.registry` — ``register``, ``resolve_model``
- :mod:`.deploy` — ``deploy``: roll out → promote → playground
- :mod:`.tracking` — the pipeline's MLflow parent run (``start_run``, ``finish_run``)
- :mod:`.ray_train` — a training stage under Ray Train (the ``rayjob`` engine's entrypoint)

Each takes its config section typed (the CLI) or as the component's parameter dict, runs inside its
MLflow run (:class:`~kubellm.stages.base.StageContext`), and returns a
:class:`~kubellm.stages.base.StageOutput` — metrics and a Markdown report for the Kubeflow UI, values
for the next step. The work itself lives in ``kubellm.data``, ``kubellm.train``, ``kubellm.evaluate``,
``kubellm.tracking``, ``kubellm.serve`` and ``kubellm.k8s``. Importing this package imports none of the
heavy libraries.
"""

from kubellm.stages.base import KFP_RUN_ENV, STAGE_RUN_ENV, StageContext, StageOutput, publish, trial_stage

__all__ = ["KFP_RUN_ENV", "STAGE_RUN_ENV", "StageContext", "StageOutput", "publish", "trial_stage"]
