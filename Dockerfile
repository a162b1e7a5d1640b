# imgdl as a container job.
#
#   podman build -t imgdl .            # or: docker build -t imgdl .
#   podman run --rm -v ./work:/data -v ./my.yaml:/config/imgdl.yaml:ro \
#       imgdl fetch /data/urls.txt -o /data/out
#
# BASE_IMAGE: any Debian-like image with python3 (3.11+) and its venv module, e.g. the
# official python:3.11-slim (the default) or the local Debian base that
# scripts/build-image.sh makes with debootstrap where no registry can be reached.
# Behind a TLS-intercepting proxy, give pip its CA as a build secret:
#   podman build --secret id=extra_ca,src=proxy-ca.pem -t imgdl .
# EXTRAS: optional dependencies of imgdl to install [default: s3,socks: s3:// outputs and
# input lists, SOCKS5 proxies], e.g. --build-arg EXTRAS=s3,socks,decode (decode: Pillow;
# dataset: pyarrow, for --output-format webdataset / parquet).
ARG BASE_IMAGE=python:3.11-slim

# ---- build: the wheels, then a venv installed from them alone ------------------------
FROM ${BASE_IMAGE} AS build
ARG EXTRAS="s3,socks"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/imgdl
# The dependencies first, from pyproject.toml alone: this layer (the only step that
# needs the network) stays cached while only the code changes.
COPY pyproject.toml ./
COPY scripts/requirements-from-pyproject.py /usr/local/lib/
RUN --mount=type=secret,id=extra_ca \
    set -eu; \
    if [ -s /run/secrets/extra_ca ]; then \
        bundle=$(/opt/imgdl/bin/python -c 'import pip._vendor.certifi as c; print(c.where())'); \
        cat "$bundle" /run/secrets/extra_ca > /tmp/ca.pem; \
        export PIP_CERT=/tmp/ca.pem; \
    fi; \
    python3 /usr/local/lib/requirements-from-pyproject.py "$EXTRAS" > /tmp/requirements.txt; \
    /opt/imgdl/bin/pip wheel --wheel-dir /wheels -r /tmp/requirements.txt
COPY README.md ./
COPY downloader ./downloader
# No network from here on: imgdl's wheel is built (setuptools from /wheels) and
# installed with its dependencies from /wheels only.
RUN set -eu; \
    /opt/imgdl/bin/pip wheel --no-index --find-links /wheels --no-deps --wheel-dir /wheels . ; \
    /opt/imgdl/bin/pip install --no-index --find-links /wheels "imgdl${EXTRAS:+[$EXTRAS]}"; \
    /opt/imgdl/bin/pip uninstall --yes --quiet setuptools pip; \
    /opt/imgdl/bin/imgdl --version

# ---- runtime: the base image, the venv, a non-root user -----------------------------
FROM ${BASE_IMAGE} AS runtime
# tini as PID 1, imgdl its child: the kernel drops a signal sent to PID 1 that has no
# handler, and imgdl installs its SIGTERM handler only once a run has started, so as
# PID 1 a `podman stop` during start-up (or after the run, while telemetry flushes)
# would be lost and end in SIGKILL after the stop timeout. tini passes SIGTERM on
# (imgdl exits 143 by itself), reaps any orphan, and exits with imgdl's code.
RUN set -eu; \
    if ! command -v tini > /dev/null; then \
        apt-get update; \
        apt-get install --yes --no-install-recommends tini; \
        apt-get clean; \
        rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log; \
    fi; \
    groupadd --gid 10001 imgdl; \
    useradd --uid 10001 --gid 10001 --create-home --home-dir /home/imgdl \
        --shell /usr/sbin/nologin imgdl; \
    mkdir -p /data /config; \
    chown 10001:10001 /data
COPY --from=build /opt/imgdl /opt/imgdl
# The documented defaults, so that IMGDL_CONFIG names a file even without a mount;
# mount your own over it: -v ./my.yaml:/config/imgdl.yaml:ro
COPY config/imgdl.yaml /config/imgdl.yaml
ENV PATH=/opt/imgdl/bin:$PATH \
    IMGDL_CONFIG=/config/imgdl.yaml \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8
LABEL org.opencontainers.image.title="imgdl" \
      org.opencontainers.image.description="Fast, polite, loss-free batch image downloader" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
# Relative output folders (the default output.dir is "images") land in the volume.
WORKDIR /data
VOLUME ["/data"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "imgdl"]
CMD ["--help"]
