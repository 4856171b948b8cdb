"""MLflow tracking config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubellm.config.base import StrictModel
from kubellm.config.secrets import Uri


class TrackingConfig(StrictModel):
    """Where runs, metrics, artifacts and registered models go."""

    enabled: bool = True
    """Track runs in MLflow (``false`` logs nowhere)."""
    uri: Uri | None = None
    """MLflow tracking URI (credentials come from ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, never the URI). ``None``:
    ``$MLFLOW_TRACKING_URI`` if set, else a sqlite store at
    ``.kubellm/mlflow.db`` under the working directory."""
    experiment: str = "kubellm"
    """MLflow experiment of the parent runs."""
    registered_model: str = Field(default="kubellm", min_length=1, max_length=200)
    """Model Registry name; new versions get the ``candidate`` alias, ``champion`` after promotion."""
    register_merged: bool | None = None
    """What the register step stores for a LoRA fine-tune. ``false``: an *adapter version* (the adapter's
    files, megabytes, recording the base version it belongs to; the base is registered once, as a version
    of ``<registered_model>-base``); ``true``: the adapter merged into its base (a full copy per version),
    for runtimes that cannot load an adapter. ``None``: adapter versions, except where the deployment needs
    merged ones: ``deploy.runtime: huggingface``, and a cluster deploy with ``runtime: kubellm`` and no
    ``serve.base_model`` (the predictor pod has no registry access to fetch the base)."""
    when_unreachable: Literal["buffer", "fail"] = "buffer"
    """What a running stage does when the MLflow server stops answering. ``buffer``: training goes on; its
    metrics wait in memory (at most 100,000 points; more are dropped and counted) and are sent once the
    server answers again, with one warning line when tracking degrades and one when it recovers; the run
    is closed by the next run of the stage if the server is still away at the end. ``fail``: the stage
    stops with one error line, for teams whose audit needs every point."""
