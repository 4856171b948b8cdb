"""What every kubellm component shares: the runtime image and the lightweight-component settings.

Components are lightweight Python components (KFP's local runner runs only those) whose base image is
our runtime image with kubellm installed, so ``install_kfp_package=False`` and no
``packages_to_install``: nothing is pip-installed when a pod starts. The pipelines set each task's
image from the run config (``platform.image``) when compiling for a cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kfp import dsl

#: Default runtime image; equal to ``PlatformConfig().image`` (a test keeps them in step).
RUNTIME_IMAGE = "ghcr.io/kubellm/kubellm:0.1.0"


def component(func: Callable[..., Any]) -> Any:
    """``@dsl.component`` with kubellm's runtime image and no pip installs at start-up."""
    return dsl.component(func, base_image=RUNTIME_IMAGE, install_kfp_package=False)
