"""Experiment tracking and the model registry.

Stages log through the :class:`Tracker` interface; :func:`stage_run` hands them an MLflow-backed one
(or a :class:`NullTracker` when tracking is off). Importing this package does not import mlflow.
"""

from kubellm.tracking.base import NullTracker, Tracker, TrackingError, flatten_params
from kubellm.tracking.connect import resolve_tracking_uri
from kubellm.tracking.mlflow_tracker import MlflowTracker
from kubellm.tracking.registry import (
    ModelVersionInfo,
    champion_info,
    promote,
    register_model,
    resolve_model_uri,
)
from kubellm.tracking.runs import attached_run, end_parent_run, find_parent_run, stage_run, start_parent_run

__all__ = [
    "MlflowTracker",
    "ModelVersionInfo",
    "attached_run",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "champion_info",
    "end_parent_run",
    "find_parent_run",
    "flatten_params",
    "promote",
    "register_model",
    "resolve_model_uri",
    "resolve_tracking_uri",
    "stage_run",
    "start_parent_run",
]
