"""Regenerate the vendored CRD schemas from upstream CustomResourceDefinition YAML files.

    python src/kubellm/k8s/schemas/regenerate.py path/to/ray.io_rayjobs.yaml [more CRD files …]

Each file's CRD (matched by ``metadata.name``) must have an entry in ``SOURCES.json`` here (upstream
repository, path and commit: update the commit when you take a newer file). Writes
``<group>_<plural>.json.gz`` (each served version's ``openAPIV3Schema`` without description texts, see
:func:`kubellm.k8s.schema.extract_crd`) and rewrites ``README.md``'s table. The output is byte-for-byte
reproducible (sorted keys, gzip without a timestamp), so an unchanged input gives no diff.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

README_HEAD = """\
# Vendored CRD schemas

The `openAPIV3Schema` of every served version of the custom resources kubellm generates, taken from the
upstream CustomResourceDefinitions listed below, without their `description` texts, as gzipped JSON.
`kubellm.k8s.schema` validates PyTorchJobs, TrainJobs, RayJobs and InferenceServices against them offline
(`kubellm check`, the tests), so nothing outside the package is needed.

Regenerate (after updating the commit in `SOURCES.json`) with

    python src/kubellm/k8s/schemas/regenerate.py UPSTREAM-CRD.yaml [...]

| file | CRD | upstream repository | path | commit |
|---|---|---|---|---|
"""


def write_vendored(crd_file: Path, sources: dict[str, dict[str, str]], out_dir: Path) -> Path:
    import yaml

    from kubellm.k8s.schema import extract_crd

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with crd_file.open(encoding="utf-8") as fh:
        docs = [
            d
            for d in yaml.load_all(fh, Loader=loader)
            if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"
        ]
    if len(docs) != 1:
        raise SystemExit(f"{crd_file}: expected one CustomResourceDefinition, found {len(docs)}")
    name = docs[0]["metadata"]["name"]
    if name not in sources:
        raise SystemExit(
            f"{crd_file}: CRD {name} has no entry in {HERE / 'SOURCES.json'}; add its upstream "
            "repository, path and commit first"
        )
    crd = extract_crd(docs[0], sources[name])
    path = out_dir / f"{crd['group']}_{crd['plural']}.json.gz"
    blob = json.dumps(crd, sort_keys=True, separators=(",", ":")).encode()
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(blob)
    return path


def write_readme(sources: dict[str, dict[str, str]], out_dir: Path) -> None:
    rows = []
    for name, src in sorted(sources.items()):
        plural, _, group = name.partition(".")
        commit = src["commit"] + (f" ({src['branch']})" if src.get("branch") else "")
        rows.append(f"| {group}_{plural}.json.gz | {name} | {src['repository']} | `{src['path']}` | {commit} |")
    (out_dir / "README.md").write_text(README_HEAD + "\n".join(rows) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    sources = json.loads((HERE / "SOURCES.json").read_text(encoding="utf-8"))
    for arg in argv:
        print(write_vendored(Path(arg), sources, HERE))
    write_readme(sources, HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
