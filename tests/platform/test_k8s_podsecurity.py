"""The Pod Security checker: each violation class on bad fixtures, zero findings on what we ship/generate."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from kubellm.cli.app import main
from kubellm.config import RunConfig, load_config
from kubellm.errors import KubellmError
from kubellm.k8s import security
from kubellm.k8s.manifests import generated_manifests, shipped_manifests
from kubellm.k8s.podsecurity import check, load_manifests, pod_specs


def _good_container(name: str = "app") -> dict[str, Any]:
    return {
        "name": name,
        "image": "img:1",
        "securityContext": security.container_security_context(),
        "volumeMounts": security.writable_mounts(),
    }


def _good_pod_spec() -> dict[str, Any]:
    return {
        "securityContext": security.pod_security_context(),
        "containers": [_good_container()],
        "volumes": security.writable_volumes(),
    }


def _deployment() -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {"template": {"spec": _good_pod_spec()}},
    }


POD = "spec.template.spec"
C0 = f"{POD}.containers[0]"


def _set(obj: dict, path: str, value: Any) -> None:
    node: Any = obj
    keys = path.replace("[", ".").replace("]", "").split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[keys[-1]] = value


def _del(obj: dict, path: str) -> None:
    node: Any = obj
    keys = path.replace("[", ".").replace("]", "").split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    del node[keys[-1]]


VIOLATIONS = [
    # (rule, mutation, expected path)
    (
        "runAsNonRoot",
        lambda o: (_del(o, f"{POD}.securityContext.runAsNonRoot"), _del(o, f"{C0}.securityContext.runAsNonRoot")),
        f"{C0}.securityContext.runAsNonRoot",
    ),
    (
        "runAsNonRoot",
        lambda o: _set(o, f"{C0}.securityContext.runAsNonRoot", False),
        f"{C0}.securityContext.runAsNonRoot",
    ),
    ("runAsUser", lambda o: _set(o, f"{C0}.securityContext.runAsUser", 0), f"{C0}.securityContext.runAsUser"),
    ("runAsUser", lambda o: _set(o, f"{POD}.securityContext.runAsUser", 0), f"{POD}.securityContext.runAsUser"),
    ("privileged", lambda o: _set(o, f"{C0}.securityContext.privileged", True), f"{C0}.securityContext.privileged"),
    (
        "allowPrivilegeEscalation",
        lambda o: _set(o, f"{C0}.securityContext.allowPrivilegeEscalation", True),
        f"{C0}.securityContext.allowPrivilegeEscalation",
    ),
    (
        "allowPrivilegeEscalation",
        lambda o: _del(o, f"{C0}.securityContext.allowPrivilegeEscalation"),
        f"{C0}.securityContext.allowPrivilegeEscalation",
    ),
    (
        "capabilities-drop",
        lambda o: _set(o, f"{C0}.securityContext.capabilities", {"drop": ["NET_RAW"]}),
        f"{C0}.securityContext.capabilities.drop",
    ),
    (
        "capabilities-add",
        lambda o: _set(o, f"{C0}.securityContext.capabilities.add", ["SYS_ADMIN"]),
        f"{C0}.securityContext.capabilities.add",
    ),
    (
        "hostPath",
        lambda o: o["spec"]["template"]["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        f"{POD}.volumes[3].hostPath",
    ),
    (
        "volume-types",
        lambda o: o["spec"]["template"]["spec"]["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}),
        f"{POD}.volumes[3]",
    ),
    ("host-namespaces", lambda o: _set(o, f"{POD}.hostNetwork", True), f"{POD}.hostNetwork"),
    ("host-namespaces", lambda o: _set(o, f"{POD}.hostPID", True), f"{POD}.hostPID"),
    ("host-namespaces", lambda o: _set(o, f"{POD}.hostIPC", True), f"{POD}.hostIPC"),
    ("hostPorts", lambda o: _set(o, f"{C0}.ports", [{"containerPort": 80, "hostPort": 80}]), f"{C0}.ports[0].hostPort"),
    (
        "seccompProfile",
        lambda o: (_del(o, f"{POD}.securityContext.seccompProfile"), _del(o, f"{C0}.securityContext.seccompProfile")),
        f"{C0}.securityContext.seccompProfile",
    ),
    (
        "seccompProfile",
        lambda o: _set(o, f"{C0}.securityContext.seccompProfile", {"type": "Unconfined"}),
        f"{C0}.securityContext.seccompProfile",
    ),
    (
        "readOnlyRootFilesystem",
        lambda o: _set(o, f"{C0}.securityContext.readOnlyRootFilesystem", False),
        f"{C0}.securityContext.readOnlyRootFilesystem",
    ),
    (
        "writable-tmp",
        lambda o: _set(o, f"{C0}.volumeMounts", [{"name": "cache", "mountPath": "/cache"}]),
        f"{C0}.volumeMounts",
    ),
    (
        "sysctls",
        lambda o: _set(o, f"{POD}.securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
        f"{POD}.securityContext.sysctls[0]",
    ),
    ("procMount", lambda o: _set(o, f"{C0}.securityContext.procMount", "Unmasked"), f"{C0}.securityContext.procMount"),
    (
        "appArmor",
        lambda o: _set(o, f"{C0}.securityContext.appArmorProfile", {"type": "Unconfined"}),
        f"{C0}.securityContext.appArmorProfile",
    ),
    (
        "seLinux",
        lambda o: _set(o, f"{POD}.securityContext.seLinuxOptions", {"type": "spc_t"}),
        f"{POD}.securityContext.seLinuxOptions",
    ),
    (
        "privileged",
        lambda o: (
            o["spec"]["template"]["spec"]
            .setdefault("initContainers", [])
            .append(
                {
                    **_good_container("init"),
                    "securityContext": {**security.container_security_context(), "privileged": True},
                }
            )
        ),
        f"{POD}.initContainers[0].securityContext.privileged",
    ),
]


def test_good_deployment_has_no_findings() -> None:
    assert check(_deployment()) == []


@pytest.mark.parametrize(("rule", "mutate", "path"), VIOLATIONS, ids=[f"{v[0]}-{i}" for i, v in enumerate(VIOLATIONS)])
def test_each_violation_is_found_at_its_path(rule: str, mutate, path: str) -> None:
    bad = _deployment()
    mutate(bad)
    findings = check(bad)
    assert [(f.rule, f.path) for f in findings] == [(rule, path)], [str(f) for f in findings]
    assert findings[0].where == "Deployment/d"


def _pytorchjob(pod: dict) -> dict:
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "j"},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {"template": {"spec": _good_pod_spec()}},
                "Worker": {"template": {"spec": pod}},
            }
        },
    }


def _root_pod() -> dict:
    pod = _good_pod_spec()
    pod["containers"][0]["securityContext"]["runAsUser"] = 0
    return pod


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        (
            _pytorchjob(_root_pod()),
            "spec.pytorchReplicaSpecs.Worker.template.spec.containers[0].securityContext.runAsUser",
        ),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": _root_pod()},
            "spec.containers[0].securityContext.runAsUser",
        ),
        (
            {
                "apiVersion": "batch/v1",
                "kind": "CronJob",
                "metadata": {"name": "c"},
                "spec": {"jobTemplate": {"spec": {"template": {"spec": _root_pod()}}}},
            },
            "spec.jobTemplate.spec.template.spec.containers[0].securityContext.runAsUser",
        ),
        (
            {
                "apiVersion": "trainer.kubeflow.org/v1alpha1",
                "kind": "TrainJob",
                "metadata": {"name": "t"},
                "spec": {"podTemplateOverrides": [{"targetJobs": [{"name": "node"}], "spec": _root_pod()}]},
            },
            "spec.podTemplateOverrides[0].spec.containers[0].securityContext.runAsUser",
        ),
        (
            {
                "apiVersion": "serving.kserve.io/v1beta1",
                "kind": "InferenceService",
                "metadata": {"name": "i"},
                "spec": {
                    "predictor": {
                        **_good_pod_spec(),
                        "model": {
                            "modelFormat": {"name": "huggingface"},
                            "volumeMounts": security.writable_mounts(),
                            "securityContext": {**security.container_security_context(), "runAsUser": 0},
                        },
                    }
                },
            },
            "spec.predictor.model.securityContext.runAsUser",
        ),
        (
            {"apiVersion": "v1", "kind": "List", "items": [_deployment(), {"kind": "Pod", "spec": _root_pod()}]},
            "spec.containers[0].securityContext.runAsUser",
        ),
    ],
)
def test_pods_inside_custom_resources_are_checked(obj: dict, path: str) -> None:
    findings = check(obj)
    assert [(f.rule, f.path) for f in findings] == [("runAsUser", path)]


def test_trainjob_override_without_containers_is_checked_and_bare_trainjob_is_flagged() -> None:
    tj = {
        "kind": "TrainJob",
        "metadata": {"name": "t"},
        "spec": {
            "podSpecOverrides": [
                {"targetJobs": [{"name": "node"}], "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
            ]
        },
    }
    assert [f.rule for f in check(tj)] == ["hostPath"]
    assert [f.rule for f in check({"kind": "TrainJob", "spec": {"runtimeRef": {"name": "x"}}})] == [
        "runtime-pods-unchecked"
    ]


def test_isvc_predictor_without_security_context_is_caught() -> None:
    isvc = {
        "kind": "InferenceService",
        "metadata": {"name": "i"},
        "spec": {"predictor": {"model": {"modelFormat": {"name": "huggingface"}}}},
    }
    rules = {f.rule for f in check(isvc)}
    assert {
        "runAsNonRoot",
        "allowPrivilegeEscalation",
        "capabilities-drop",
        "seccompProfile",
        "readOnlyRootFilesystem",
    } <= rules
    isvc["spec"]["predictor"]["model"]["securityContext"] = security.container_security_context()
    assert [f.rule for f in check(isvc)] == ["writable-tmp"]
    assert len(pod_specs(isvc)) == 1


def test_objects_without_pods_have_no_findings() -> None:
    assert check({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": []}}) == []


def test_shipped_and_generated_manifests_are_clean(repo_root: Path, cluster_cfg: RunConfig) -> None:
    gpu = load_config(repo_root / "configs" / "cluster-gpu.yaml")
    named = shipped_manifests(repo_root / "configs") + generated_manifests(cluster_cfg) + generated_manifests(gpu)
    kinds = {obj["kind"] for _, obj in named}
    assert {"PyTorchJob", "TrainJob", "InferenceService", "Deployment", "Namespace", "Role"} <= kinds, kinds
    assert any(src == "generated playground deployment" for src, _ in named)
    findings = [f"{src}: {f}" for src, obj in named for f in check(obj)]
    assert findings == []
    assert sum(len(pod_specs(obj)) for _, obj in named) >= 5


def test_cli_check_reports_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    bad = _deployment()
    bad["spec"]["template"]["spec"]["hostNetwork"] = True
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "bad.yaml").write_text(yaml.safe_dump_all([{"kind": "Service", "metadata": {"name": "s"}}, bad]))
    (folder / "good.yml").write_text(yaml.safe_dump(_deployment()))
    with pytest.raises(SystemExit) as info:
        main(["check", str(folder)])
    out = capsys.readouterr().out
    assert info.value.code == 1
    assert f"{folder / 'bad.yaml'}#1 Deployment/d: {POD}.hostNetwork: shares the host's namespace" in out
    assert "checked 3 manifests, 2 pod specs, 0 pipeline executors: 1 findings" in out
    with pytest.raises(SystemExit) as info:
        main(["check", str(folder / "good.yml")])
    assert info.value.code == 0


def test_cli_check_defaults_to_shipped_and_generated(
    repo_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(repo_root)
    with pytest.raises(SystemExit) as info:
        main(["check"])
    out = capsys.readouterr().out
    assert info.value.code == 0, out
    assert ": 0 findings" in out


def test_bad_yaml_is_one_line_error(tmp_path: Path) -> None:
    p = tmp_path / "x.yaml"
    p.write_text("kind: Pod\nspec: [unclosed\n")
    with pytest.raises(KubellmError, match=r"x.yaml: line \d+ not valid YAML"):
        load_manifests(p)


def test_finding_str_is_one_line() -> None:
    bad = copy.deepcopy(_deployment())
    bad["spec"]["template"]["spec"]["hostPID"] = True
    (finding,) = check(bad)
    assert str(finding) == f"Deployment/d: {POD}.hostPID: shares the host's namespace [baseline/host-namespaces]"
