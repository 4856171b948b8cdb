"""The public pipeline API (kubellm.pipelines.api) and the own-data example built with it: compiled for a
cluster with placement on every step (the user's own included), mistakes caught when the pipeline is
built with one line naming them, and the example run end to end on the local runner from a folder
outside the repository."""

# No `from __future__ import annotations`: a pipeline defined here needs real annotations (see lifecycle.py).
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from importtime import heavy, modules

from kubellm import yamlio
from kubellm.errors import ConfigError
from kubellm.pipelines.api import Builder, load_file

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "own_data"
PIPELINE = str(EXAMPLE / "pipeline.py")
CONFIG = str(EXAMPLE / "config.yaml")


def _kubellm(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubellm.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def _builder(target: str = "cluster", overrides: tuple[str, ...] = ()) -> Builder:
    return Builder.load(CONFIG, ["tracking.uri=http://mlflow.kubellm.svc:5000", *overrides], target=target)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    b = _builder(
        overrides=(
            "platform.image=registry.example.com/team/kubellm:1.2",
            "platform.stages.evaluate.resources.memory_limit=12Gi",
        )
    )
    path = b.compile(load_file(PIPELINE, b), tmp_path_factory.mktemp("api") / "own-data.yaml")
    return yamlio.load_all(path.read_text(encoding="utf-8"))


def test_example_compiles_with_placement_on_every_step_including_the_users_own(compiled: list[dict]) -> None:
    spec, platform = compiled
    assert spec["pipelineInfo"]["name"] == "own-data"
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "run_name",
        "corpus_uri",
        "questions_uri",
        "finetune_config",
    }
    containers = spec["deploymentSpec"]["executors"]
    assert {
        "exec-prepare-data",
        "exec-pretrain",
        "exec-finetune",
        "exec-evaluate",
        "exec-report-card",
        "exec-register",
    } <= set(containers)
    # every step, the user's own component included, runs the configured image with its stage's resources
    assert {e["container"]["image"] for e in containers.values()} == {"registry.example.com/team/kubellm:1.2"}
    assert containers["exec-report-card"]["container"]["resources"]["resourceMemoryLimit"] == "12Gi"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    card = k8s["exec-report-card"]
    assert card["securityContext"]["runAsNonRoot"] is True
    assert card["podMetadata"]["labels"]["kubellm.io/stage"] == "evaluate"
    assert all("securityContext" in e for e in k8s.values())


def test_example_steps_get_their_config_tracking_and_parent_run(compiled: list[dict]) -> None:
    spec = compiled[0]
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    ft = inner["finetune"]["inputs"]["parameters"]
    assert ft["config"]["componentInputParameter"] == "pipelinechannel--finetune_config"
    assert ft["tracking"]["runtimeValue"]["constant"]["uri"] == "http://mlflow.kubellm.svc:5000"
    assert ft["platform"]["runtimeValue"]["constant"]["image"] == "registry.example.com/team/kubellm:1.2"
    pretrain_cfg = inner["pretrain"]["inputs"]["parameters"]["config"]["runtimeValue"]["constant"]
    assert pretrain_cfg["loop"]["max_steps"] == 60  # the config file's section, as a constant
    assert inner["prepare-data"]["dependentTasks"] == ["start-run"]  # the parent run exists first
    assert inner["pretrain"]["dependentTasks"] == ["prepare-data"]  # through its input: no extra edge
    gate = spec["components"]["comp-condition-2"]["dag"]["tasks"]["register"]["inputs"]["parameters"]
    assert gate["parent_run_id"] == {"componentInputParameter": "pipelinechannel--start-run-Output"}
    assert inner["finetune"]["cachingOptions"] == {"enableCache": True}
    assert inner["report-card"].get("cachingOptions", {}) == {}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda b, c: b.param("finetune", {"optim.lrr": 1e-3}),
            "finetune (pipeline overrides): invalid config: optim.lrr: unknown field",
        ),
        (lambda b, c: b.param("finetune", {"lora": {"r": "sixteen"}}), "lora.r: Input should be a valid integer"),
        (lambda b, c: b.param("serving"), "no config section 'serving'"),
        (
            lambda b, c: b.step(c.train.pretrain, data="x", epochs=3),
            "step pretrain: no argument epochs; its arguments are config, tracking, workdir, data, platform, run_name",
        ),
        (
            lambda b, c: b.step(c.data.prepare_data),
            "step prepare_data: missing source_uri (its inputs: source_uri, stage)",
        ),
        (
            lambda b, c: b.step(c.registry.register, model="m", base_model="b", evaluation="e", data_fingerprint="f"),
            "step register logs under the pipeline's MLflow parent run: add it inside `with builder.tracked():`",
        ),
        (
            lambda b, c: b.step(c.train.pretrain, config="pretrain.yaml", data="x"),
            "step pretrain: config must be a dict of overrides on the pretrain section or a pipeline parameter",
        ),
        (lambda b, c: b.place(object(), "evaluate", "x", retry="often"), "retry 'often': expected default, train"),
        (
            lambda b, c: b.step(c.tracking.start_run, run_config={}, pipeline_name="p", run_name="r", kfp_run_id="k"),
            "step start_run: Builder.tracked() adds the MLflow parent run's start and end",
        ),
    ],
)
def test_a_mistake_fails_when_the_pipeline_is_built_in_one_line(call, message: str) -> None:
    from kubellm import components
    from kubellm.components import data, registry, tracking, train  # noqa: F401 (the calls reach them as attributes)

    with pytest.raises(ConfigError) as err:
        call(_builder(), components)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_overrides_take_dotted_or_nested_keys_and_a_null_survives_compilation(tmp_path: Path) -> None:
    from kfp import dsl

    from kubellm.components import data, train

    b = _builder()
    doc = b.param("finetune", {"optim.grad_clip": None, "lora": {"r": 4}, "loop.max_steps": 7})
    assert doc["lora"] == {**doc["lora"], "r": 4, "alpha": 32}  # nested: merged, not replaced
    assert doc["loop"]["max_steps"] == 7 and "optim.grad_clip" in doc["__null__"]
    again = b.section("finetune", doc)  # a parameter dict given back as config: its nulls restored, validated
    assert again.optim.grad_clip is None and again.lora.r == 4 and again.loop.max_steps == 7

    @b.pipeline("nulls", "A step whose config turns gradient clipping off.")
    def nulls(base: str = "models:/m@champion") -> None:
        with b.tracked():
            fetched = b.step(train.fetch_model, ref=base)
            prep = b.step(data.prepare_instructions, source_uri="qa.csv", tokenizer_from=fetched.outputs["model"])
            b.step(
                train.finetune,
                config={"optim.grad_clip": None},
                data=prep.outputs["dataset"],
                base_model=fetched.outputs["model"],
            )

    path = b.compile(nulls, tmp_path / "nulls.yaml")  # KFP refuses None in a dict; the builder strips it
    spec = yamlio.load_all(path.read_text(encoding="utf-8"))[0]
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    constant = inner["finetune"]["inputs"]["parameters"]["config"]["runtimeValue"]["constant"]
    assert "optim.grad_clip" in constant["__null__"] and "grad_clip" not in constant["optim"]
    assert isinstance(nulls, dsl.base_component.BaseComponent)


def test_cli_names_a_wrong_parameter_and_a_failed_build_leaves_no_output(tmp_path: Path) -> None:
    run = _kubellm("run", "--config", CONFIG, "--pipeline", PIPELINE, "--param", "dataset_uri=x.csv", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: --param dataset_uri: own-data ({PIPELINE}) has no such parameter; its parameters are "
        "run_name, corpus_uri, questions_uri, finetune_config"
    ]
    broken = tmp_path / "broken.py"
    broken.write_text(
        Path(PIPELINE)
        .read_text(encoding="utf-8")
        .replace('b.param("finetune")', 'b.param("finetune", {"optim.lrr": 0.001})'),
        encoding="utf-8",
    )
    comp = _kubellm("compile", "--config", CONFIG, "--pipeline", str(broken), "--out", "dist", cwd=tmp_path)
    assert comp.returncode == 2 and "Traceback" not in comp.stderr
    assert "optim.lrr: unknown field" in comp.stderr
    assert not (tmp_path / "dist").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)  # a whole pipeline run: ~10 task processes, 60 s idle, 3x that beside a CPU hog
def test_example_runs_on_own_files_from_a_folder_outside_the_repository(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, str(EXAMPLE / "make_data.py"), str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert made.stdout.split() == [str(tmp_path / "corpus.parquet"), str(tmp_path / "qa.csv")]
    # every task process reports what it imports (python -X importtime) into its log
    proc = _kubellm(
        "run", "--config", CONFIG, "--pipeline", PIPELINE, cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (summary_path,) = (tmp_path / ".kubellm" / "runs").glob("own-data-*/summary.json")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert summary["pipeline"] == "own-data" and summary["status"] == "FINISHED"
    stages = {row["stage"]: row["status"] for row in summary["stages"]}
    assert {s: stages.get(s) for s in ("prep", "pretrain", "prep_instruct", "finetune", "evaluate")} == dict.fromkeys(
        ("prep", "pretrain", "prep_instruct", "finetune", "evaluate"), "FINISHED"
    )
    # the user's own columns were read: every CSV row is an instruction record
    (stats,) = (tmp_path / ".kubellm" / "pipeline-root").glob("own-data-*/prepare-instructions/dataset/stats.json")
    assert json.loads(stats.read_text(encoding="utf-8"))["records_in"] == 320
    assert summary["evaluation"]["metrics"]["perplexity_ratio"] < 1.0
    (card,) = (tmp_path / ".kubellm" / "pipeline-root").glob("own-data-*/report-card/report")
    assert card.read_text(encoding="utf-8").startswith("# Report card: gate ")
    assert ("register" in stages) == summary["evaluation"]["gate_passed"]
    # the own step is first-class: its row in the summary, its own nested MLflow run with its figures
    card_row = next(r for r in summary["stages"] if r["stage"] == "report_card")
    assert card_row["status"] == "FINISHED" and card_row["run_id"]
    import mlflow

    client = mlflow.MlflowClient(summary["mlflow"]["tracking_uri"])
    card_run = client.get_run(card_row["run_id"])
    assert card_run.data.tags["mlflow.parentRunId"] == summary["mlflow"]["parent_run_id"]
    assert card_run.data.metrics["card_perplexity"] == pytest.approx(summary["evaluation"]["metrics"]["perplexity"])
    _check_task_import_budgets(tmp_path / ".kubellm" / "runs")


#: Per task: the most modules its process may import (measured on the own-data run: start/finish 2,295,
#: prep 2,845, pretrain 4,985, finetune 5,222, register 5,130, evaluate 5,354; ~10 % headroom) and the
#: heavy libraries it must not import. The tracking-only tasks load MLflow (its client drags in pandas,
#: pyarrow, scipy) but never torch; data preparation needs tokenizers and transformers' tokenizer class,
#: not torch; a user's own component that logs its own MLflow run pays what the tracking tasks pay.
TASK_BUDGETS: dict[str, tuple[int, set[str]]] = {
    "start-run": (2_500, {"torch", "transformers", "peft", "datasets", "tokenizers"}),
    "finish-run": (2_500, {"torch", "transformers", "peft", "datasets", "tokenizers"}),
    "prepare-data": (3_100, {"torch", "peft"}),
    "prepare-instructions": (3_100, {"torch", "peft"}),
    "pretrain": (5_500, {"peft", "lm_eval"}),
    "finetune": (5_700, {"lm_eval"}),
    "register": (5_700, {"lm_eval"}),
    "evaluate": (5_900, set()),
    "report-card": (2_500, {"torch", "transformers", "peft", "datasets", "tokenizers"}),
}


def _check_task_import_budgets(runs: Path) -> None:
    (logs,) = runs.glob("own-data-*/logs")
    counted = {}
    for task, (budget, forbidden) in TASK_BUDGETS.items():
        mods = modules((logs / f"{task}.log").read_text(encoding="utf-8", errors="replace"))
        counted[task] = len(mods)
        assert len(mods) > 50, f"{task}: no import profile in its log"
        assert not heavy(mods) & forbidden, f"{task} imports {sorted(heavy(mods) & forbidden)}"
        assert len(mods) <= budget, f"{task} imports {len(mods)} modules (budget {budget})"


def test_every_kubellm_component_is_a_step_the_builder_knows() -> None:
    from kubellm.pipelines._runner import COMPONENTS
    from kubellm.pipelines.api import STEPS

    names = {c.python_func.__name__ for c in COMPONENTS.values()}
    assert names == set(STEPS)
    assert {n for n, s in STEPS.items() if s.parent_run} == {"start_run", "finish_run"}  # Builder.tracked's


PLAIN_STEP = """
from kfp import dsl

from kubellm.components import data
from kubellm.pipelines.api import Builder


@dsl.component
def count_rows(dataset: dsl.Input[dsl.Dataset]) -> int:
    return 1


def build(b: Builder):
    @b.pipeline("plain-step", "A kubellm step and a plain @dsl.component of the user's.")
    def plain_step() -> None:
        with b.tracked():
            prep = b.step(data.prepare_data, source_uri="builtin://stdlib")
            b.step(count_rows, placement="prep", dataset=prep.outputs["dataset"])

    return plain_step
"""


def test_own_steps_on_a_cluster_need_no_install_at_start_and_check_inspects_every_executor(tmp_path: Path) -> None:
    # the example's own step (kubellm.pipelines.api.component) compiles for a cluster and passes the check
    comp = _kubellm("compile", "--config", CONFIG, "--pipeline", PIPELINE, "--out", "dist", cwd=tmp_path)
    assert comp.returncode == 0, comp.stderr
    assert "FutureWarning" not in comp.stderr
    check = _kubellm("check", "dist/own-data.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout
    executors = len(
        yamlio.load_all((tmp_path / "dist" / "own-data.yaml").read_text())[0]["deploymentSpec"]["executors"]
    )
    assert f"{executors} pipeline executors: 0 findings" in check.stdout and executors >= 8
    # a plain @dsl.component pip-installs kfp when its pod starts: refused at compile, in one line
    plain = tmp_path / "plain.py"
    plain.write_text(PLAIN_STEP)
    refused = _kubellm("compile", "--config", CONFIG, "--pipeline", str(plain), "--out", "dist2", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
    assert "step count-rows: its component installs packages when its pod starts" in line
    assert "kubellm.pipelines.api.component" in line and not (tmp_path / "dist2").exists()
    # a pipeline compiled elsewhere with such a step is found by the check, executor by executor
    spec = yamlio.load_all((tmp_path / "dist" / "own-data.yaml").read_text())[0]  # without its platform spec
    spec["deploymentSpec"]["executors"]["exec-report-card"]["container"]["command"] = [
        "sh",
        "-c",
        "python3 -m pip install --quiet kfp==2.17.0 && python3 -m kfp.dsl.executor_main",
    ]
    (tmp_path / "elsewhere.yaml").write_text(yaml.safe_dump(spec))
    found = _kubellm("check", "elsewhere.yaml", cwd=tmp_path)
    assert found.returncode == 1
    assert "exec-report-card.command: installs packages when the pod starts" in found.stdout
    assert "platforms.kubernetes" in found.stdout  # no platform spec: no security context for any executor


def test_own_component_declares_what_it_imports_and_is_checked_now() -> None:
    from kubellm.pipelines.api import component

    def uses_numpy(x: int) -> int:
        return x

    assert component(packages=["numpy>=1"])(uses_numpy).component_spec.implementation.container.image == (
        "ghcr.io/kubellm/kubellm:0.1.0"
    )
    with pytest.raises(
        ConfigError,
        match=r"component uses_numpy: surely-not-installed not installed beside "
        r"kubellm, so not in its runtime image",
    ):
        component(packages=["surely-not-installed"])(uses_numpy)


def test_an_own_step_needs_a_placement_and_a_kubellm_step_keeps_its_own() -> None:
    from kubellm.components import data
    from kubellm.pipelines.api import component

    @component
    def mine(n: int) -> int:
        return n

    b = Builder.load(CONFIG, target="cluster")
    with pytest.raises(ConfigError, match="mine is not a kubellm component: say where your own step runs"):
        b.step(mine, n=1)
    with pytest.raises(ConfigError, match=r"step prepare_data: a kubellm component's placement is its own \(prep\)"):
        b.step(data.prepare_data, placement="evaluate", source_uri="x")
