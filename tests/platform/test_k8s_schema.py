"""kubellm.k8s.schema: CRD validation catches what the API server would reject or silently prune."""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from kubellm.errors import KubellmError
from kubellm.k8s.schema import VENDORED, validate_against_crd, validate_custom_resources, vendored_crd

PYTORCHJOB = {
    "apiVersion": "kubeflow.org/v1",
    "kind": "PyTorchJob",
    "metadata": {"name": "t"},
    "spec": {
        "pytorchReplicaSpecs": {
            "Master": {
                "replicas": 1,
                "restartPolicy": "OnFailure",
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "pytorch",
                                "image": "img:1",
                                "resources": {"limits": {"cpu": 2, "memory": "1Gi"}},
                            }
                        ]
                    }
                },
            },
        },
    },
}

THING_CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
spec:
  group: example.com
  names: {kind: Thing}
  versions:
  - name: v1
    schema:
      openAPIV3Schema:
        type: object
        properties:
          apiVersion: {type: string}
          kind: {type: string}
          metadata: {type: object}
          spec:
            type: object
            properties:
              size: {x-kubernetes-int-or-string: true, anyOf: [{type: integer}, {type: string}]}
              note: {type: string, nullable: true}
              free: {type: object, properties: {a: {type: string}}, x-kubernetes-preserve-unknown-fields: true}
"""


@pytest.fixture()
def crd() -> Path:
    path = vendored_crd("kubeflow.org", "PyTorchJob")
    assert path is not None
    return path


def test_valid_object_has_no_errors(crd: Path) -> None:
    # cpu: 2 (int) and memory: "1Gi" (string) both pass the int-or-string quantity rule.
    assert validate_against_crd(PYTORCHJOB, crd) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda o: o["spec"].__setitem__("tolleration", []), "spec: Additional properties"),
        (
            lambda o: o["spec"]["pytorchReplicaSpecs"]["Master"].__setitem__("replicas", "one"),
            "spec.pytorchReplicaSpecs.Master.replicas: 'one' is not of type 'integer'",
        ),
        (
            lambda o: o["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].pop("name"),
            "containers[0]: 'name' is a required property",
        ),
        (
            lambda o: o["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"][
                "limits"
            ].__setitem__("cpu", [1]),
            "limits.cpu: [1] is not of type",
        ),
        (lambda o: o.__setitem__("kind", "TFJob"), "kind: 'TFJob' is not 'PyTorchJob'"),
        (lambda o: o.__setitem__("apiVersion", "kubeflow.org/v9"), "version 'v9' not served"),
    ],
)
def test_errors_name_the_field(crd: Path, mutate, expected: str) -> None:
    bad = copy.deepcopy(PYTORCHJOB)
    mutate(bad)
    errors = validate_against_crd(bad, crd)
    assert any(expected in e for e in errors), errors
    assert all("\n" not in e for e in errors)


def test_missing_crd_file_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(KubellmError, match="cannot read CRD file"):
        validate_against_crd(PYTORCHJOB, tmp_path / "absent.yaml")
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\n")
    with pytest.raises(KubellmError, match="no CustomResourceDefinition"):
        validate_against_crd(PYTORCHJOB, tmp_path / "cm.yaml")


def test_preserve_unknown_fields_allows_extra_keys(tmp_path: Path) -> None:
    crd = tmp_path / "crd.yaml"
    crd.write_text(THING_CRD)
    ok = {
        "apiVersion": "example.com/v1",
        "kind": "Thing",
        "metadata": {"name": "x"},
        "spec": {"size": "2Gi", "note": None, "free": {"a": "1", "anything": {"b": 2}}},
    }
    assert validate_against_crd(ok, crd) == []
    ok["spec"]["size"] = 3
    assert validate_against_crd(ok, crd) == []
    ok["spec"]["extra"] = 1
    assert validate_against_crd(ok, crd) == ["spec: Additional properties are not allowed ('extra' was unexpected)"]


def test_vendored_schemas_cover_every_kind_kubellm_generates() -> None:
    for group, kind in [
        ("kubeflow.org", "PyTorchJob"),
        ("trainer.kubeflow.org", "TrainJob"),
        ("ray.io", "RayJob"),
        ("serving.kserve.io", "InferenceService"),
    ]:
        path = vendored_crd(group, kind)
        assert path is not None and path.is_relative_to(VENDORED), kind
    # with no CRD given, the vendored one of the object's kind is used
    assert validate_against_crd(PYTORCHJOB) == []
    with pytest.raises(KubellmError, match="no vendored CRD schema for example.com/v1/Thing"):
        validate_against_crd({"apiVersion": "example.com/v1", "kind": "Thing"})


def test_every_vendored_file_records_its_upstream_source() -> None:
    sources = json.loads((VENDORED / "SOURCES.json").read_text())
    readme = (VENDORED / "README.md").read_text()
    for path in VENDORED.glob("*.json.gz"):
        with gzip.open(path, "rt") as fh:
            crd = json.load(fh)
        name = f"{crd['plural']}.{crd['group']}"
        assert crd["source"] == sources[name] and path.name in readme and crd["source"]["commit"] in readme
        assert len(crd["source"]["commit"]) == 40 and crd["source"]["repository"].startswith("https://github.com/")


def test_regenerate_script_vendors_a_crd_that_validates_like_the_yaml(tmp_path: Path) -> None:
    """The script a maintainer runs on a new upstream CRD: same verdicts as the YAML, reproducible bytes,
    no description texts, and a CRD without a recorded source is refused."""
    import subprocess
    import sys

    regenerate = VENDORED / "regenerate.py"
    spec = importlib.util.spec_from_file_location("regenerate", regenerate)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    crd = tmp_path / "crd.yaml"
    crd.write_text(
        THING_CRD.replace("spec:\n  group", "metadata: {name: things.example.com}\nspec:\n  group", 1)
        .replace("names: {kind: Thing}", "names: {kind: Thing, plural: things}")
        .replace("note: {type: string", "note: {description: a long text, type: string")
    )
    sources = {
        "things.example.com": {
            "repository": "https://github.com/example/things",
            "path": "crd.yaml",
            "commit": "0" * 40,
        }
    }
    out = module.write_vendored(crd, sources, tmp_path)
    assert out.name == "example.com_things.json.gz"
    first = out.read_bytes()
    assert module.write_vendored(crd, sources, tmp_path).read_bytes() == first
    assert b"a long text" not in gzip.decompress(first)
    good = {"apiVersion": "example.com/v1", "kind": "Thing", "spec": {"size": 3, "note": None}}
    bad = {"apiVersion": "example.com/v1", "kind": "Thing", "spec": {"size": [3], "extra": 1}}
    for obj in (good, bad):
        assert validate_against_crd(obj, out) == validate_against_crd(obj, crd)
    assert validate_against_crd(bad, out) != []
    proc = subprocess.run([sys.executable, str(regenerate), str(crd)], capture_output=True, text=True)
    assert proc.returncode != 0 and "no entry in" in proc.stderr


def test_custom_resources_of_a_file_are_checked_with_their_source() -> None:
    bad = copy.deepcopy(PYTORCHJOB)
    bad["spec"]["tolleration"] = []
    named = [
        ("a.yaml#0", PYTORCHJOB),
        ("a.yaml#1", bad),
        ("b.yaml#0", {"apiVersion": "v1", "kind": "Service"}),
        ("c.yaml#0", {"kind": "List", "items": [bad]}),
    ]
    found = validate_custom_resources(named)
    assert [f.split(":")[0] for f in found] == ["a.yaml#1 PyTorchJob/t", "c.yaml#0 PyTorchJob/t"]
    assert "'tolleration' was unexpected" in found[0]
