"""User-facing errors.

Anything a user can fix (a bad config field, a malformed record, a missing file) raises a
:class:`KubellmError` subclass whose message is one line naming the file, field or record. The CLI prints
that line and exits non-zero without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class KubellmError(Exception):
    """An error the user can act on; ``str(err)`` is a single, self-contained line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, always: pod logs and CI summaries show the first line only.
        super().__init__(" ".join(str(message).split()))


class ConfigError(KubellmError):
    """An invalid run config (names the file and the dotted field path)."""


class DataError(KubellmError):
    """Malformed input data (names the file and, where it applies, the line or record)."""


class SourceError(KubellmError):
    """A data source that cannot be reached or read (missing path, unknown scheme, offline hub)."""


class TrainingError(KubellmError):
    """A training or evaluation run that cannot proceed (bad model directory, unsupported option)."""


class ServingError(KubellmError):
    """A model that cannot be served or deployed."""


class StorageError(KubellmError):
    """A file or folder that cannot be written or read: a full disk, a quota, a file-size limit, missing
    permission, a read-only volume (names the path and the cause)."""


class ClusterError(KubellmError):
    """A Kubernetes or Kubeflow API call that failed (unreachable host, rejected token, failed job)."""
