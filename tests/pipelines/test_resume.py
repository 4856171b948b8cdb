"""Resumable local runs and the quiet console, on KFP's local runner with tiny components (seconds, not
minutes): a cacheable step whose inputs are unchanged is answered from the resumed run's outputs and
does not run again; a changed input or changed upstream content runs it; every task's output lands in its
own log, and a failure shows its last lines and the log's path.

No `from __future__ import annotations`: KFP reads the component annotations as types.
"""

import io
import json
from pathlib import Path

import pytest
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from kubellm.pipelines._cache import content_fingerprint
from kubellm.pipelines._runner import run_pipeline

pytestmark = pytest.mark.slow


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def make(n: int, ran: str, out: Output[Dataset], metrics: Output[Metrics], note: str = "") -> str:
    """A pure step: writes ``n`` bytes (and says so on stdout); ``note`` changes its key, not its bytes.
    Its metrics have no file (the runner keeps them in metadata): that must not make it a miss."""
    metrics.log_metric("bytes", n)
    with open(ran, "a") as f:
        f.write("make\n")
    print(f"making {n} bytes", flush=True)
    with open(out.path, "w") as f:
        f.write("x" * n)
    return f"made-{n}"


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def use(data: Input[Dataset], ran: str) -> int:
    """A pure step downstream: depends on the content of ``data``."""
    with open(ran, "a") as f:
        f.write("use\n")
    return len(open(data.path).read())


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def release(size: int, label: str, broken: str, ran: str) -> None:
    """A side effect (never cached): fails while the file ``broken`` exists, as a failed rollout would."""
    import os

    with open(ran, "a") as f:
        f.write(f"release {label} {size}\n")
    if os.path.exists(broken):
        raise RuntimeError(f"rollout failed: {broken} exists")


def _pipeline():
    from kubellm.config import load_config
    from kubellm.pipelines._common import Context

    ctx = Context(load_config(None, []), "local")

    @dsl.pipeline(name="resume-check")
    def resume_check(n: int, ran: str, broken: str, note: str = "") -> None:
        m = ctx.configure(make(n=n, ran=ran, note=note), "prep", "Make", cache=True)
        u = ctx.configure(use(data=m.outputs["out"], ran=ran), "evaluate", "Use", cache=True)
        ctx.configure(release(size=u.output, label=m.outputs["Output"], broken=broken, ran=ran), "deploy", "Release")

    return resume_check


def _run(tmp_path: Path, run_id: str, *, n: int = 5, note: str = "", resume: str | None = None, broken: bool = False):
    (tmp_path / "runs" / run_id).mkdir(parents=True)
    marker = tmp_path / "broken"
    marker.write_text("") if broken else marker.unlink(missing_ok=True)
    out = io.StringIO()
    done = run_pipeline(
        _pipeline(),
        params={"n": n, "ran": str(tmp_path / "ran.txt"), "broken": str(marker), "note": note},
        run_id=run_id,
        runs_dir=tmp_path / "runs",
        pipeline_root=tmp_path / "root",
        resume=resume,
        output="lines",
        out=out,
    )
    ran = (tmp_path / "ran.txt").read_text().splitlines()
    (tmp_path / "ran.txt").unlink()
    return done, ran, out.getvalue()


def test_resume_after_a_failed_release_reruns_only_the_release(tmp_path: Path) -> None:
    first, ran, shown = _run(tmp_path, "run-1", broken=True)
    assert ran == ["make", "use"] + ["release made-5 5"] * 3  # the release was retried twice
    assert first.tasks == {"make": "done", "use": "done", "release": "FAILED"}
    # the failure: its last lines and the log's path, on the console and in the result
    assert "rollout failed:" in shown and f"full log: {first.logs / 'release.log'}" in shown
    assert any("rollout failed:" in line for line in first.failed[0]["last_lines"])
    # each task's own output is in its own log file, not on the console
    assert "making 5 bytes" in (first.logs / "make.log").read_text() and "making 5 bytes" not in shown
    assert '"inputs"' not in shown and len(shown.splitlines()) < 25  # no executor JSON: events, the error

    second, ran, shown = _run(tmp_path, "run-2", resume="run-1")
    assert ran == ["release made-5 5"]  # make and use did not run: their outputs are run-1's
    assert second.tasks == {"make": "cached (run-1)", "use": "cached (run-1)", "release": "done"}
    assert "cached: outputs of run-1" in shown

    third, ran, _ = _run(tmp_path, "run-3", resume="run-2")  # a resumed run can be resumed: same origin
    assert ran == ["release made-5 5"] and third.tasks["make"] == "cached (run-1)"


def test_a_changed_input_runs_again_and_unchanged_content_downstream_does_not(tmp_path: Path) -> None:
    _run(tmp_path, "run-1")
    # another input to make: it runs again, writes the same bytes to a new path; `use` is keyed by the
    # content of its input, not its path, so it is still answered from run-1
    second, ran, _ = _run(tmp_path, "run-2", note="again", resume="run-1")
    assert ran == ["make", "release made-5 5"] and second.tasks["use"] == "cached (run-1)"
    # other bytes: everything downstream runs
    _, ran, _ = _run(tmp_path, "run-3", n=6, resume="run-1")
    assert ran == ["make", "use", "release made-6 6"]
    origins = {json.loads(p.read_text())["origin"] for p in (tmp_path / "runs" / "run-3" / "cache").glob("*.json")}
    assert origins == {"run-3"}


def test_content_fingerprint_sees_names_and_bytes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"123")
    before = content_fingerprint(tmp_path / "a")
    (tmp_path / "a" / "w.bin").write_bytes(b"124")
    changed = content_fingerprint(tmp_path / "a")
    (tmp_path / "a" / "w.bin").rename(tmp_path / "a" / "v.bin")
    assert len({before, changed, content_fingerprint(tmp_path / "a")}) == 3


def test_resume_of_an_unknown_run_is_one_clear_error(tmp_path: Path) -> None:
    from kubellm.errors import ConfigError

    (tmp_path / "runs" / "run-1").mkdir(parents=True)
    with pytest.raises(ConfigError, match="--resume nope: no earlier run of that name"):
        run_pipeline(
            _pipeline(),
            params={},
            run_id="run-1",
            runs_dir=tmp_path / "runs",
            pipeline_root=tmp_path / "root",
            resume="nope",
        )
