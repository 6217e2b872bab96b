# syntax=docker/dockerfile:1
# gcs-iap-proxy sidecar image.
#   build:   a virtual environment from requirements.lock (hashes required, wheels only),
#            then the project's own wheel with --no-deps
#   runtime: the slim base plus that environment; no compiler, no pip, no tests, non-root
# The same install steps run in CI without Docker: tests/test_deploy_install.py.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
        -r requirements.lock
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# Then bytecode that never consults source timestamps, so the sidecar starts without
# compiling anything whatever mtimes COPY --from keeps (the runtime stage cannot write it);
# -f: pip has already written timestamp-checked bytecode, which compileall would keep.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/dist . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/dist/gcs_iap_proxy-*.whl \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && /opt/venv/bin/python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash /opt/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="gcs-iap-proxy" \
      org.opencontainers.image.description="Identity-aware Cloud Storage sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
# Probes come from outside the container's loopback (Cloud Run and the kubelet alike),
# so the admin listener (/healthz, /readyz only) binds every interface; the data port
# stays on loopback, reachable only from containers sharing the instance or pod.
# frozenlist's compiled extension is C++ and maps libstdc++ (0.9 MiB resident) for the
# lists aiohttp keeps its application signals in, never touched per request: its own
# pure-Python class instead (measured: idle RSS -1.0 MiB, request path unchanged).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FROZENLIST_NO_EXTENSIONS=1 \
    PROXY_LISTEN=127.0.0.1:9180 \
    PROXY_ADMIN_LISTEN=0.0.0.0:9181
# The base image ships its standard library without bytecode, and PYTHONDONTWRITEBYTECODE
# plus a non-root user mean none is ever written: compiled once here, not at every start
# (measured: +0.6 s to import the sidecar and +3 MiB RSS without it).
RUN python -m pip uninstall --yes pip setuptools wheel \
    && rm -rf "$(python -c 'import ensurepip, os; print(os.path.dirname(ensurepip.__file__))')" \
    && python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash \
        -x '/(site-packages|test|tests|idle_test)/' \
        "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
COPY --from=build /opt/venv /opt/venv
USER 65532:65532
EXPOSE 9181
ENTRYPOINT ["gcs-iap-proxy", "serve"]
