#!/usr/bin/env bash
# The compose stack's secrets, created once (random, 0600) in the file given (default .recsys/compose.env)
# and passed to docker-compose with --env-file by the Makefile; an existing file is kept as it is, so the
# volumes' Postgres password and MLflow's admin user keep matching. docker-compose.yml names each secret.
set -euo pipefail
file="${1:-.recsys/compose.env}"
[ -s "$file" ] && exit 0
mkdir -p "$(dirname "$file")"
umask 077
tmp="$(mktemp "$file.XXXXXX")"
for name in POSTGRES_PASSWORD REDIS_PASSWORD RECSYS_API_TOKEN RECSYS_LABEL_TOKEN RECSYS_REQUEST_ID_KEY MLFLOW_SECRET_KEY; do
  printf '%s=%s\n' "$name" "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
done >"$tmp"
mv "$tmp" "$file"
echo "created the compose stack's secrets in $file"
