#!/usr/bin/env bash
# Build and push kubellm's runtime images (what `make images` runs), or refresh the dependency lock.
#
#   make images                                         # ghcr.io/kubellm/<image>:<version>
#   IMAGE_REGISTRY=registry.example.com/ml IMAGE_TAG=0.1.0-rc1 make images
#   PUSH=0 bash images/build.sh                         # build only
#   bash images/build.sh lock                           # rewrite images/constraints.txt from .venv
#
# Needs a Docker engine with BuildKit (Docker 23+). The image names match platform.image,
# platform.serving_image and platform.playground_image of the run config.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ "${1:-}" == "lock" ]]; then
  {
    sed -n '/^#/!q;p' images/constraints.txt   # keep the header comment
    # +cpu: the local CPU build's version suffix; an image on Linux x86_64 takes the CUDA build.
    .venv/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$//'
  } > images/constraints.txt.new
  mv images/constraints.txt.new images/constraints.txt
  echo "images/constraints.txt: $(grep -c '==' images/constraints.txt) pins"
  exit 0
fi

registry="${IMAGE_REGISTRY:-ghcr.io/kubellm}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)"
tag="${IMAGE_TAG:-$version}"
push="${PUSH:-1}"

if ! command -v docker >/dev/null 2>&1; then
  echo "error: docker not found: make images needs a Docker engine (install Docker, or build in CI)" >&2
  exit 1
fi
if ! docker info >/dev/null 2>&1; then
  echo "error: no Docker engine is running (docker info failed): start it, or build where one runs" >&2
  exit 1
fi

# target → image name
for pair in training:kubellm serving:kubellm-serve playground:kubellm-playground; do
  target="${pair%%:*}"
  image="${registry}/${pair#*:}:${tag}"
  echo "== ${image} (target ${target})"
  DOCKER_BUILDKIT=1 docker build --file images/Dockerfile --target "$target" \
    --label "org.opencontainers.image.version=${tag}" --tag "$image" .
  if [[ "$push" != "0" ]]; then
    docker push "$image"
  fi
done
