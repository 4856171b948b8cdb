"""Serving, deployment and playground configs."""

from __future__ import annotations

from pydantic import Field

from kubellm.config.base import StrictModel


class ServeConfig(StrictModel):
    """``kubellm serve``: the local/KServe predictor."""

    host: str = "127.0.0.1"
    """Bind address; loopback by default, ``0.0.0.0`` only inside a container."""
    port: int = Field(default=8080, ge=1, le=65535)
    """HTTP port."""
    model_name: str = "kubellm"
    """Name under which the model is served (``/v1/models/<name>``, OpenAI ``model``)."""
    max_batch_size: int = Field(default=8, ge=1)
    """Concurrent requests generated together in one batch."""
    max_queue: int = Field(default=64, ge=1)
    """Requests waiting beyond this many get a 503."""
    max_prompt_tokens: int = Field(default=2048, ge=1)
    """Longer prompts get a 400."""
    max_new_tokens: int = Field(default=512, ge=1)
    """Upper bound of a request's ``max_tokens`` (larger gets a 400)."""
