"""The retry policy every task gets from `Context.configure` really retries: a task that fails once
succeeds on its second attempt, and the pipeline carries on.

No `from __future__ import annotations`: KFP reads the component annotations as types.
"""

from pathlib import Path

import pytest
from kfp import dsl, local

from kubellm.config import load_config
from kubellm.pipelines._common import Context

REPO = Path(__file__).resolve().parents[2]


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def flaky(marker: str) -> str:
    """Fails the first time it runs (as a preempted or OOM-killed pod would), succeeds after."""
    import os

    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("simulated node loss")
    return "ok"


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def downstream(value: str, out: str) -> None:
    with open(out, "w") as f:
        f.write(value)


@pytest.mark.slow
def test_a_task_that_fails_once_succeeds_on_retry(tmp_path: Path) -> None:
    ctx = Context(load_config(REPO / "configs" / "local.yaml"), "local")

    @dsl.pipeline(name="retry-check")
    def retry_check(marker: str, out: str) -> None:
        first = ctx.configure(flaky(marker=marker), "pretrain", "Flaky step", retry="train")
        ctx.configure(downstream(value=first.output, out=out), "evaluate", "After it")

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"), raise_on_error=True)
    retry_check(marker=str(tmp_path / "attempted"), out=str(tmp_path / "out.txt"))
    assert (tmp_path / "attempted").exists()
    assert (tmp_path / "out.txt").read_text() == "ok"
