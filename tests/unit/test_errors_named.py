"""Errors a user needs are named, not swallowed (issue 20): a registry that refuses, a Hub that says 401."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_ALREADY_EXISTS

from kubellm.stages.train import hub_error
from kubellm.tracking.registry import _ensure_registered_model


class _Registry:
    def __init__(self, code: int | None) -> None:
        self.code, self.created = code, []

    def create_registered_model(self, name: str) -> None:
        if self.code is not None:
            raise MlflowException(f"registered model {name}: refused", error_code=self.code)
        self.created.append(name)


def test_creating_the_registered_model_only_tolerates_that_it_exists() -> None:
    fresh = _Registry(None)
    _ensure_registered_model(fresh, "m")
    assert fresh.created == ["m"]
    _ensure_registered_model(_Registry(RESOURCE_ALREADY_EXISTS), "m")  # the usual case: nothing to do
    with pytest.raises(MlflowException, match="refused"):  # before: swallowed, and a later call failed vaguely
        _ensure_registered_model(_Registry(PERMISSION_DENIED), "m")


class HfHubHTTPError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"{status} Client Error for url: https://huggingface.co/api/models/org/gated")
        self.response = SimpleNamespace(status_code=status)


class RepositoryNotFoundError(Exception):
    pass


@pytest.mark.parametrize(
    ("err", "says"),
    [
        (HfHubHTTPError(401), "401 unauthorized (HfHubHTTPError): a gated or private model needs HF_TOKEN"),
        (HfHubHTTPError(403), "403 forbidden (HfHubHTTPError): HF_TOKEN has no access"),
        (RepositoryNotFoundError("org/nope"), "not found on the Hub (RepositoryNotFoundError)"),
        (ConnectionError("Max retries exceeded"), "no network or HF_HUB_OFFLINE=1 (ConnectionError: Max retries"),
        (ValueError("bad revision\nmore"), "ValueError: bad revision"),
    ],
)
def test_a_hub_failure_says_what_it_means(err: Exception, says: str) -> None:
    assert hub_error(err).startswith(says) and "\n" not in hub_error(err)
