#!/usr/bin/env bash
# Build a rayrlhf image from the repository root, tagged rayrlhf:<version>-<kind> with the version
# from pyproject.toml (the tag the manifests in deploy/ use).
#   bash docker/build.sh gpu             # docker/Dockerfile.gpu -> rayrlhf:0.1.0-gpu
#   bash docker/build.sh cpu --no-cache  # extra arguments go to `docker build`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
kind=${1:-gpu}
shift || true
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
export DOCKER_BUILDKIT=1   # for docker/Dockerfile.<kind>.dockerignore
docker build -f "docker/Dockerfile.$kind" --build-arg "RAYRLHF_VERSION=$version" \
    -t "rayrlhf:$version-$kind" "$@" .
