"""A step that fails on its input is not retried slowly: one real `kubellm run` whose deploy fails on a
setting (``serve.max_prompt_tokens=4``, too small for the served benchmark gate's questions: refused at
the deploy stage's start, ``_BenchmarkGate.check_fits``). The deploy task's retry policy still runs its
attempts (KFP's policy has no error classes), but each retried attempt fails at once with the same line
and why it is not tried again (kubellm.stages.attempts); the attempts' times are read from the task's
log, where KFP's local runner stamps each attempt's start and end.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest
from localrun import kubellm_run, stage

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]

_STAMP = r"^(\d\d:\d\d:\d\d\.\d+) - \w+ - "


def _attempts(log: str) -> list[float]:
    """Seconds of each attempt of the task: from each ``Executing task`` line to the ``finished`` line after it."""
    starts = re.findall(_STAMP + r"Executing task 'deploy'", log, flags=re.M)
    ends = re.findall(_STAMP + r"Task 'deploy' finished with status", log, flags=re.M)
    t = [datetime.strptime(s, "%H:%M:%S.%f") for s in (*starts, *ends)]
    n = len(starts)
    return [(t[n + i] - t[i]).total_seconds() for i in range(min(n, len(ends)))]


def test_a_deploy_that_fails_on_a_setting_fails_its_retries_at_once(tmp_path: Path) -> None:
    code, s, out = kubellm_run(tmp_path, "--set", "serve.max_prompt_tokens=4")
    assert code == 1, out[-3000:]
    assert s is not None and s["status"] == "FAILED" and s["failed_stage"] == "deploy"
    assert "serve.max_prompt_tokens=4" in stage(s, "deploy")["error"]  # the stage run's: the first attempt's
    error = s["failed_tasks"][0]["error"]  # the task's last attempt
    assert "serve.max_prompt_tokens=4" in error and "(not retried: an earlier attempt of step 'deploy'" in error, error

    log = (tmp_path / "runs" / s["run_name"] / "logs" / "deploy.log").read_text(encoding="utf-8")
    seconds = _attempts(log)
    assert len(seconds) == 4, log[-3000:]  # the first attempt and deploy's 3 retries
    print(f"deploy attempts (s): {seconds}")
    assert log.count("not retried: an earlier attempt of step 'deploy'") >= 3
    # the first attempt checked the setting against the gate's questions (no model: no predictor); a retry
    # starts a process (imports, the parent run's lookup) and stops at the stage's entrance
    attempts = log.split("Executing task 'deploy'")[1:]
    assert "check_fits" in attempts[0] and "_smoke_locally" not in attempts[0]
    for later in attempts[1:]:
        assert "check_fits" not in later and "attempts.py" in later, later[-2000:]
    # the attempts' seconds are printed above, not asserted: what a retry does is checked by the events it logs
