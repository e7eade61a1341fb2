# syntax=docker/dockerfile:1
# mlserve's container image, referenced by `mlserve deploy k8s|kserve --image IMAGE`.
#
#   docker build -t registry.example/mlserve:0.1.0 .
#
# Two stages: the builder compiles llama-cpp-python (and wheels every dependency) once, with
# the compilers; the runtime installs those wheels into a slim image without them and runs as
# a non-root user. GGML_NATIVE=OFF: the image must run on any x86-64 node, not only on the
# CPU that built it. Behind a mirror, pass --build-arg PIP_INDEX_URL=https://mirror/simple.
# Pin the base by digest as well (python:3.11.14-slim-bookworm@sha256:...) once your registry mirrors it.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_INDEX_URL=${PIP_INDEX_URL} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY recipes ./recipes
COPY mlserve ./mlserve
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# libgomp1: llama.cpp's CPU backend is built with OpenMP.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mlserve \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/mlserve --shell /usr/sbin/nologin mlserve \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/mlserve
# The wheels are mounted, not copied: they never become a layer of the runtime image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels mlserve
ENV MLSERVE_HOME=/var/lib/mlserve \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/var/lib/mlserve"]
USER 10001:10001
WORKDIR /var/lib/mlserve
EXPOSE 8000
ENTRYPOINT ["mlserve"]
CMD ["--help"]
