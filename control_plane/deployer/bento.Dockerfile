# One image per model version: the app image (Python and every dependency) plus one built Bento, whose
# model version was pinned when the Bento was built. The DockerDeployer sends this file and the Bento as
# the build context (tagged recsys-bento:v<N>); the Docker gate builds nothing else.
ARG APP_IMAGE=recsys-app:0.1.0
FROM ${APP_IMAGE}
COPY bento /bento
ENV BENTOML_HOME=/tmp/bentoml \
    RECSYS_STATE_DIR=/tmp/recsys \
    BENTOML_DO_NOT_TRACK=true
USER 10001
EXPOSE 3000
CMD ["bentoml", "serve", "/bento", "--host", "0.0.0.0", "--port", "3000"]
