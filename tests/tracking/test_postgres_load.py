"""Tracking under concurrent load on the database production uses: an ``mlflow server`` on PostgreSQL,
several stage runs in processes of their own logging metrics and artifacts at once, each registering
and promoting a version. Afterwards every point and file is there, nothing is left RUNNING, and
``champion`` is on the newest promoted version.

Load: 4 runs × 150 steps × 2 metrics = 1,200 points in 600 requests, 20 files, 4 registrations and
promotions, all at once. The test prints the seconds it took: 37.7 s on a 2-core machine at load
average 15, 62 s with 300 steps at load average 25 (the clients' and the server's CPU, not the store).
Starting the server on a fresh database runs MLflow's migrations first (70-90 s that busy)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kubellm.config.tracking import TrackingConfig
from kubellm.tracking import champion_info, end_parent_run, start_parent_run

RUNS, STEPS, FILES = 4, 150, 5
MODEL, EXPERIMENT = "load-lm", "load"

# One pipeline step in its own process, through kubellm's own tracking code: a stage run logging a
# training curve step by step and its output files, then the version it registered, promoted.
_STAGE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from mlflow import MlflowClient
    from kubellm.config.tracking import TrackingConfig
    from kubellm.tracking import promote, stage_run
    uri, parent, idx, steps, files, barrier, model, experiment = sys.argv[1:9]
    idx, steps, files = int(idx), int(steps), int(files)
    cfg = TrackingConfig(uri=uri, experiment=experiment, registered_model=model)
    wd = Path(barrier, f"wd-{idx}")
    wd.mkdir()
    Path(barrier, f"ready-{idx}").touch()
    while not Path(barrier, "go").exists():
        time.sleep(0.005)
    with stage_run(cfg, wd, parent_run_id=parent, stage=f"train-{idx}", config={"worker": idx}) as tr:
        for step in range(steps):
            tr.log_metrics({"loss": idx + 1 / (step + 1), "lr": step * 1e-4}, step=step)
        for k in range(files):
            out = wd / f"shard-{k}.txt"
            out.write_text(f"worker {idx} shard {k}\\n" * (100 + k))
            tr.log_artifact(out, "outputs")
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        source = client.get_run(tr.run_id).info.artifact_uri + "/outputs"
        version = int(client.create_model_version(model, source=source, run_id=tr.run_id).version)
        run_id = tr.run_id
    info = promote(cfg, wd, version)
    print(json.dumps({"run_id": run_id, "version": version, "aliases": info.aliases}))
""")


def _run_stages(uri: str, parent: str, tmp: Path) -> tuple[list[dict], float]:
    barrier = tmp / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _STAGE,
                uri,
                parent,
                str(i),
                str(STEPS),
                str(FILES),
                str(barrier),
                MODEL,
                EXPERIMENT,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(RUNS)
    ]
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready-*"))) < RUNS:  # imports done everywhere: start them together
        assert time.monotonic() < deadline, "stage processes did not start"
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll()]
        time.sleep(0.05)
    t0 = time.perf_counter()
    (barrier / "go").touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results, time.perf_counter() - t0


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)  # MLflow's migrations on a fresh PostgreSQL database: 70-90 s on a busy machine
def test_concurrent_stage_runs_on_postgres(pg_mlflow_server: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = pg_mlflow_server
    cfg = TrackingConfig(uri=uri, experiment=EXPERIMENT, registered_model=MODEL)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(MODEL)
    parent = start_parent_run(cfg, tmp_path, pipeline="load", run_name="load", config={"runs": RUNS})
    results, seconds = _run_stages(uri, parent, tmp_path)
    end_parent_run(cfg, tmp_path, parent, "FINISHED")
    print(
        f"\nPostgreSQL-backed MLflow held {RUNS} concurrent runs × {STEPS * 2} points "
        f"({RUNS * STEPS * 2} points, {RUNS * FILES} files, {RUNS} promotions) in {seconds:.1f} s"
    )

    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=1000)}
    assert set(runs) == {parent, *(r["run_id"] for r in results)}  # no duplicate or stray run
    assert {r.info.status for r in runs.values()} == {"FINISHED"}  # none RUNNING, none marked KILLED
    for i, res in enumerate(sorted(results, key=lambda r: runs[r["run_id"]].data.tags["stage"])):
        loss = client.get_metric_history(res["run_id"], "loss")
        lr = client.get_metric_history(res["run_id"], "lr")
        assert sorted((m.step, m.value) for m in loss) == [(s, i + 1 / (s + 1)) for s in range(STEPS)]
        assert sorted(m.step for m in lr) == list(range(STEPS))
        files = client.list_artifacts(res["run_id"], "outputs")
        assert sorted((Path(f.path).name, f.file_size) for f in files) == [
            (f"shard-{k}.txt", len(f"worker {i} shard {k}\n") * (100 + k)) for k in range(FILES)
        ]
        assert [f.path for f in client.list_artifacts(res["run_id"])] == ["config.json", "outputs"]

    # every version registered once; champion ends where the newest successful promotion put it
    versions = sorted(r["version"] for r in results)
    assert versions == list(range(1, RUNS + 1))
    assert champion_info(cfg, tmp_path).version == max(versions)
