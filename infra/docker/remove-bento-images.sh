#!/usr/bin/env bash
# Removes the Bento images (recsys-bento:v<N>) one compose project's DockerDeployer built: those the Docker
# gate labelled recsys.project=PROJECT, tagged or left untagged when a later build took their tag.
# Never forced: an image a container still runs stays. make compose-down and the compose tier call it.
set -euo pipefail
project="${1:?usage: remove-bento-images.sh PROJECT}"
docker="${DOCKER:-/usr/bin/docker}"
ids="$("$docker" image ls -q --filter "label=recsys.project=$project" | sort -u)"
[ -z "$ids" ] || "$docker" rmi $ids >/dev/null || echo "kept the Bento images above: still in use" >&2
