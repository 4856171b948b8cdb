"""`kubellm` commands of this area (registered on import)."""

from kubellm.cli.app import app  # noqa: F401
