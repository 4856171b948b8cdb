"""kubellm.k8s.schema: CRD validation catches what the API server would reject or silently prune."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from kubellm.errors import KubellmError
from kubellm.k8s.schema import validate_against_crd

PYTORCHJOB = {
    "apiVersion": "kubeflow.org/v1",
    "kind": "PyTorchJob",
    "metadata": {"name": "t"},
    "spec": {
        "pytorchReplicaSpecs": {
            "Master": {
                "replicas": 1,
                "restartPolicy": "OnFailure",
                "template": {"spec": {"containers": [{
                    "name": "pytorch", "image": "img:1",
                    "resources": {"limits": {"cpu": 2, "memory": "1Gi"}},
                }]}},
            },
        },
    },
}


@pytest.fixture()
def crd(crd_schemas_dir: Path) -> Path:
    return crd_schemas_dir / "training-operator-pytorchjobs.crd.yaml"


def test_valid_object_has_no_errors(crd: Path) -> None:
    # cpu: 2 (int) and memory: "1Gi" (string) both pass the int-or-string quantity rule.
    assert validate_against_crd(PYTORCHJOB, crd) == []


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda o: o["spec"].__setitem__("tolleration", []), "spec: Additional properties"),
    (lambda o: o["spec"]["pytorchReplicaSpecs"]["Master"].__setitem__("replicas", "one"),
     "spec.pytorchReplicaSpecs.Master.replicas: 'one' is not of type 'integer'"),
    (lambda o: o["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
     .pop("name"), "containers[0]: 'name' is a required property"),
    (lambda o: o["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
     ["resources"]["limits"].__setitem__("cpu", [1]), "limits.cpu: [1] is not of type"),
    (lambda o: o.__setitem__("kind", "TFJob"), "kind: 'TFJob' is not 'PyTorchJob'"),
    (lambda o: o.__setitem__("apiVersion", "kubeflow.org/v9"), "version 'v9' not served"),
])
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
    crd.write_text("""\
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
""")
    ok = {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "x"},
          "spec": {"size": "2Gi", "note": None, "free": {"a": "1", "anything": {"b": 2}}}}
    assert validate_against_crd(ok, crd) == []
    ok["spec"]["size"] = 3
    assert validate_against_crd(ok, crd) == []
    ok["spec"]["extra"] = 1
    assert validate_against_crd(ok, crd) == ["spec: Additional properties are not allowed ('extra' was unexpected)"]
