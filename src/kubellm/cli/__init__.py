"""Command-line interface (``kubellm …``)."""

from kubellm.cli.app import app, main

__all__ = ["app", "main"]
