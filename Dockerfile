# imgdl as a container job. A first version: issue 7 builds and runs it for real.
#   podman build --build-arg BASE_IMAGE=... -t imgdl .
#   podman run -v ./out:/data -v ./imgdl.yaml:/config/imgdl.yaml:ro imgdl fetch /data/urls.txt
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
RUN python3 -m venv /opt/build-venv && /opt/build-venv/bin/pip install --no-cache-dir build wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY downloader ./downloader
RUN /opt/build-venv/bin/pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${BASE_IMAGE} AS runtime
RUN python3 -m venv /opt/imgdl \
 && useradd --create-home --uid 10001 imgdl \
 && mkdir -p /data /config && chown imgdl /data
COPY --from=build /wheels /wheels
RUN /opt/imgdl/bin/pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/imgdl.yaml /config/imgdl.yaml
ENV PATH=/opt/imgdl/bin:$PATH \
    IMGDL_CONFIG=/config/imgdl.yaml \
    IMGDL_OUTPUT_DIR=/data/images \
    PYTHONUNBUFFERED=1
USER imgdl
WORKDIR /data
VOLUME ["/data"]
# Exec form: imgdl is PID 1 and receives SIGTERM itself (exit code 143).
ENTRYPOINT ["imgdl"]
CMD ["--help"]
