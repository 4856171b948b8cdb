"""Promotion is a compare-and-set: ``champion`` only moves forward to the version a run registered,
however close together concurrent runs promote; a rollback is explicit (``--force``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kubellm.config.tracking import TrackingConfig
from kubellm.tracking import TrackingError, champion_info, promote, resolve_tracking_uri

# One promoting run in its own process: import everything, say "ready", wait for "go", sleep its delay,
# then promote the version it registered (kubellm's own promote, nothing stubbed).
_PROMOTER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from kubellm.config.tracking import TrackingConfig
    from kubellm.tracking.registry import promote
    uri, model, version, delay_ms, barrier = sys.argv[1:6]
    cfg = TrackingConfig(uri=uri, registered_model=model)
    Path(barrier, f"ready-{version}").touch()
    while not Path(barrier, "go").exists():
        time.sleep(0.001)
    time.sleep(int(delay_ms) / 1000)
    info = promote(cfg, ".", int(version))
    print(json.dumps({"version": info.version, "aliases": info.aliases}))
""")


def make_versions(uri: str, model: str, n: int) -> list[int]:
    """``n`` versions of ``model``, each from a run of its own with a real (small) artifact: what
    promotion is about is the alias, not the weights, so no model is logged here."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # Beside a sqlite store, never MLflow's default ./mlruns in whatever folder the tests run from.
    where = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" if uri.startswith("sqlite:///") else None
    exp = client.get_experiment_by_name("promotion") or client.create_experiment(
        "promotion", artifact_location=where.as_uri() if where else None
    )
    exp_id = exp if isinstance(exp, str) else exp.experiment_id
    if not client.search_registered_models(f"name = '{model}'"):
        client.create_registered_model(model)
    versions = []
    for _ in range(n):
        run = client.create_run(exp_id)
        client.log_text(run.info.run_id, "weights", "model/weights.txt")
        mv = client.create_model_version(model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        client.set_terminated(run.info.run_id)
        versions.append(int(mv.version))
    return versions


def test_promotion_never_moves_champion_back(workdir: Path) -> None:
    cfg = TrackingConfig(registered_model="seq-lm")
    v1, v2 = make_versions(resolve_tracking_uri(cfg, workdir), "seq-lm", 2)
    assert "champion" in promote(cfg, workdir, v2).aliases
    late = promote(cfg, workdir, v1)  # the older run finished its deploy later: it must not win
    assert "champion" not in late.aliases and champion_info(cfg, workdir).version == v2

    rolled = promote(cfg, workdir, v1, force=True)  # a deliberate rollback
    assert "champion" in rolled.aliases and champion_info(cfg, workdir).version == v1
    # a rollback withdraws the newer version's claim: the next promotion of an old run does not undo it
    assert champion_info(cfg, workdir).version == v1
    (v3,) = make_versions(resolve_tracking_uri(cfg, workdir), "seq-lm", 1)
    assert promote(cfg, workdir, v3).version == v3 and champion_info(cfg, workdir).version == v3


def test_promote_cli_refuses_a_silent_rollback(workdir: Path, tmp_path: Path) -> None:
    cfg = TrackingConfig(registered_model="cli-lm")
    uri = resolve_tracking_uri(cfg, workdir)
    v1, v2 = make_versions(uri, "cli-lm", 2)
    promote(cfg, workdir, v2)
    kubellm = [str(Path(sys.executable).with_name("kubellm"))]
    common = ["--set", f"tracking.uri={uri}", "--set", "tracking.registered_model=cli-lm"]
    out = subprocess.run(
        [*kubellm, "promote", "--version", str(v1), *common],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: cli-lm@champion is version {v2}, newer than {v1}: not moved back; "
        f"`kubellm promote --version {v1} --force` rolls it back"
    )
    assert champion_info(cfg, workdir).version == v2
    out = subprocess.run(
        [*kubellm, "promote", "--version", str(v1), "--force", *common],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert champion_info(cfg, workdir).version == v1


def test_promote_unknown_version(workdir: Path) -> None:
    cfg = TrackingConfig(registered_model="seq-lm")
    make_versions(resolve_tracking_uri(cfg, workdir), "seq-lm", 1)
    with pytest.raises(TrackingError, match="has no version 9"):
        promote(cfg, workdir, 9, force=True)


def promote_concurrently(uri: str, model: str, versions: list[int], gap_ms: int, tmp: Path) -> list[dict]:
    """Promote every version from a process of its own, newest first and ``gap_ms`` apart, so without
    a compare-and-set the oldest would land last (the race the issue measured at 13 ms)."""
    barrier = tmp / f"barrier-{model}"
    barrier.mkdir(parents=True)
    delays = {v: i * gap_ms for i, v in enumerate(sorted(versions, reverse=True))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROMOTER, uri, model, str(v), str(delays[v]), str(barrier)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in versions
    ]
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready-*"))) < len(versions):
        assert time.monotonic() < deadline, "promoters did not start"
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll()]
        time.sleep(0.05)
    (barrier / "go").touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.integration
@pytest.mark.slow
def test_concurrent_promotions_end_on_the_newest(mlflow_server: str, tmp_path: Path) -> None:
    cfg = TrackingConfig(uri=mlflow_server, registered_model="race-lm")
    versions = make_versions(mlflow_server, "race-lm", 4)
    for gap_ms in (13, 0):
        results = promote_concurrently(mlflow_server, "race-lm", versions, gap_ms, tmp_path / str(gap_ms))
        assert champion_info(cfg, tmp_path).version == max(versions), (gap_ms, results)
        # the newest run's answer says it holds the alias; an older run may truthfully have held it for a
        # moment before the newest claimed it (its answer is then stale, never wrong at the time)
        newest = next(r for r in results if r["version"] == max(versions))
        assert "champion" in newest["aliases"], (gap_ms, results)
