# The local build path's Python: Debian bookworm's python3 (3.11) in a virtualenv at /opt/venv, standing in
# for python:3.11-slim where no image registry is reachable. Built by infra/docker/build-images.sh.
ARG DEBIAN_IMAGE=recsys-debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    rm -f /etc/apt/apt.conf.d/docker-clean \
    && apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null \
    && python3 -m venv /opt/venv \
    && ln -s /opt/venv/bin/python /usr/local/bin/python \
    && rm -rf /usr/share/doc/* /usr/share/man/*
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
CMD ["python3"]
