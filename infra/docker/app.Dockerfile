# The Python image for the control plane, the RQ worker, rq-scheduler, the migration and seed steps, the
# MLflow server and the Docker API gate; every Bento image (bento.Dockerfile) starts from it too.
# Build with BuildKit from the repository root (infra/docker/build-images.sh does):
#   DOCKER_BUILDKIT=1 docker build -f infra/docker/app.Dockerfile -t recsys-app:0.1.0 \
#     [--build-arg PYTHON_IMAGE=recsys-python:3.11] [--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt] .
# The CA bundle, where package downloads need one, is a build secret: never a layer of the image.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=true \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

WORKDIR /app

# Dependencies first, so that a code change does not reinstall them (nor a README change: an empty
# README stands in for it here). uv resolves and downloads in parallel (pip took 6-18 minutes here, cold)
# and compiles the bytecode pip would have;
# its cache is a BuildKit cache mount, kept between builds, never in the image. The [k8s] extra (the
# Kubernetes client, boto3 for MLflow's S3 store) lets the same image run the control plane on a cluster
# (docs/kubernetes.md); the [load] extra (Locust) lets a one-off container run `recsys demo` against the
# compose stack (make compose-demo). BentoML runs uv too when it builds a Bento (one per new version, in this image).
ARG UV_VERSION=0.13.9
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca; fi \
    && pip install -q "uv==${UV_VERSION}" \
    && touch README.md && mkdir -p control_plane bentos training load \
    && touch control_plane/__init__.py bentos/__init__.py training/__init__.py load/__init__.py \
    && UV_LINK_MODE=copy uv pip install -q --compile-bytecode --python "$(command -v python3)" ".[k8s,load]" "setuptools>=68" wheel \
    && uv pip uninstall -q --python "$(command -v python3)" recsys-canary \
    && rm -rf README.md control_plane bentos training load build *.egg-info

# MLflow imports GitPython, which warns at every start when there is no git binary.
ENV GIT_PYTHON_REFRESH=quiet
COPY README.md ./
COPY control_plane ./control_plane
COPY bentos ./bentos
COPY training ./training
COPY load ./load
COPY bentofile.yaml ./
# Editable, so that bentos.build finds bentofile.yaml and the Bento's sources in /app. Bytecode compiled
# here, as for the dependencies (uv's --compile-bytecode): the root filesystem is read-only at run time, so
# without it every process (each RQ job's forked horse too) compiled mlflow, pandas ... from source on
# every import; an evaluation took 30-120 s instead of about a second.
RUN pip install -q --no-deps --no-build-isolation -e . && rm -rf build \
    && python -m compileall -q control_plane bentos training load

# An unprivileged user; uid 10001 owns the shared state volumes (state-init chowns the state volumes).
RUN useradd --uid 10001 --create-home recsys \
    && mkdir -p /var/lib/recsys/traefik /mlartifacts /var/lib/mlflow-auth \
    && chown -R recsys:recsys /var/lib/recsys /mlartifacts /var/lib/mlflow-auth
USER recsys

EXPOSE 8090
CMD ["python", "-m", "control_plane.web.server", "--request-timeout=5", "--listen=0.0.0.0:8090", "--threads=8", "--connection-limit=1000", "--asyncore-use-poll", "--channel-timeout=120", "--cleanup-interval=10", "--max-request-body-size=1000000", "--call", "control_plane.web.app:create_app"]
