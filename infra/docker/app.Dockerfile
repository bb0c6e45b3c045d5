# The Python image for the control plane, the RQ worker, rq-scheduler, the migration step and the MLflow
# server (docker-compose.yml). Bentos get their own images from `bentoml containerize`.
# Build from the repository root: docker build -f infra/docker/app.Dockerfile -t recsys-app:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=true

WORKDIR /app

# Dependencies first, so that a code change does not reinstall them. The [k8s] extra (the Kubernetes
# client, boto3 for MLflow's S3 store) lets the same image run the control plane on a cluster
# (docs/kubernetes.md).
COPY pyproject.toml README.md ./
RUN mkdir -p control_plane bentos training load \
    && touch control_plane/__init__.py bentos/__init__.py training/__init__.py load/__init__.py \
    && pip install '.[k8s]' \
    && pip uninstall -y recsys-canary

COPY control_plane ./control_plane
COPY bentos ./bentos
COPY training ./training
COPY load ./load
RUN pip install --no-deps .

# An unprivileged user; uid 10001 owns the shared state volumes (traefik-init chowns traefik-state).
RUN useradd --uid 10001 --create-home recsys \
    && mkdir -p /var/lib/recsys/traefik /mlartifacts \
    && chown -R recsys:recsys /var/lib/recsys /mlartifacts
USER recsys

EXPOSE 8090
CMD ["python", "-m", "control_plane.web.server", "--request-timeout=5", "--listen=0.0.0.0:8090", "--threads=8", "--connection-limit=1000", "--asyncore-use-poll", "--channel-timeout=120", "--cleanup-interval=10", "--max-request-body-size=1000000", "--call", "control_plane.web.app:create_app"]
