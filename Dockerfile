# ccproxy container image: `docker build -t ccproxy .`. EXTRAS names the optional parts: `otel`
# (OpenTelemetry trace export, the default) and `embedded` (the in-process model runtime and the
# bundled demo model, about 1 GB more): `--build-arg EXTRAS="otel embedded"`.
#
# The config comes from a mounted file: CCPROXY_CONFIG (default /etc/ccproxy/ccproxy.yaml); its
# `listen` must be 0.0.0.0:8081 inside a container. Secrets go in through ${VAR} in that file.
# No container runtime runs on the machines ccproxy is developed on, so this file is checked by
# tests/unit/test_deploy.py (structure) and the same topology is tested with processes
# (tests/integration/test_fleet.py), not by building it there.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------- build: the locked venv
FROM python:${PYTHON_VERSION}-slim AS build
ARG EXTRAS="otel"
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/ccproxy
RUN pip install --no-cache-dir uv
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY src ./src
RUN uv sync --frozen --no-dev --no-editable $(for e in $EXTRAS; do printf -- '--extra %s ' "$e"; done)

# ---------------------------------------------------------------- runtime: slim, non-root
FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="ccproxy" \
      org.opencontainers.image.description="LLM gateway: one URL and one key in front of Ollama, OpenAI-compatible, Anthropic-compatible and embedded models"
RUN groupadd --system --gid 10001 ccproxy \
 && useradd --system --uid 10001 --gid ccproxy --home-dir /var/lib/ccproxy --create-home ccproxy
COPY --from=build /opt/ccproxy /opt/ccproxy
ENV PATH=/opt/ccproxy/bin:$PATH \
    CCPROXY_CONFIG=/etc/ccproxy/ccproxy.yaml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/ccproxy
USER 10001:10001
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8081/health', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["ccproxy"]
CMD ["serve"]
