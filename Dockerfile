# proxycore container image. Deployment guide: docs/deploy.md
#
#   docker build -t proxycore .
#   docker run --rm -p 8080:8080 -p 9090:9090 --stop-timeout 45 \
#       -v "$PWD/examples/proxycore.toml:/etc/proxycore/proxycore.toml:ro" \
#       -v "$PWD/secrets/proxycore-inbound:/run/secrets/proxycore-inbound:ro" \
#       -e ANTHROPIC_API_KEY proxycore
#
# Needs BuildKit (the default builder since Docker 23) for the RUN --mount lines.
# .ci/docker-install-check replays the two pip commands below without Docker.

# ---------------------------------------------------------------- builder
# Builds wheels for proxycore and every dependency. Nothing from this stage but
# the wheels reaches the final image, and those only through a bind mount.
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

WORKDIR /src
# Only what the build needs: tests, docs and benchmarks don't invalidate this layer.
COPY pyproject.toml README.md ./
COPY proxycore ./proxycore

# One command builds the proxycore wheel and the wheels of its dependencies
# (the same as `pip wheel --no-deps -w /wheels .` followed by fetching the deps).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels . \
 && ls -l /wheels

# ---------------------------------------------------------------- runtime
FROM python:3.11-slim AS runtime

ARG VCS_REF=unknown
ARG SOURCE_URL=unknown
LABEL org.opencontainers.image.title="proxycore" \
      org.opencontainers.image.description="Trio + h11 streaming reverse proxy for LLM APIs, SSE chat backends and MCP servers" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${VCS_REF}"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install from the builder's wheels only (--no-index: nothing is fetched here).
# The wheels are bind-mounted for this one command, so no layer keeps them.
# setuptools/wheel are not needed at run time (pip stays, for inspection).
# The config directory is root-owned: the proxy can read its config, not change it.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels proxycore \
 && pip uninstall --yes --no-cache-dir setuptools wheel \
 && groupadd --system --gid 10001 proxycore \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin proxycore \
 && mkdir -p /etc/proxycore \
 && proxycore --help > /dev/null

# The config is mounted here (a file, or a ConfigMap directory); see docs/deploy.md.
# Secrets (inbound bearer file, token files) are mounted under /run/secrets.

# Numeric uid:gid of the `proxycore` user, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# 8080: the proxy ([server] listen); 9090: the admin listener ([admin] listen:
# /healthz, /readyz, /metrics). Both must bind 0.0.0.0 inside the container.
EXPOSE 8080 9090

# Liveness of the process via the admin listener. urllib (no curl in slim
# images), with proxies disabled so an HTTP_PROXY in the environment can't
# divert it; any error or non-2xx status exits 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:9090/healthz', timeout=4).read()"]

# SIGTERM drains: stop accepting, let in-flight streams finish for up to
# server.shutdown_grace seconds (default 30). Give the runtime more than that
# before it kills: `docker run --stop-timeout 45`, compose `stop_grace_period:
# 45s`, Kubernetes `terminationGracePeriodSeconds: 45`. SIGHUP reloads the config.
STOPSIGNAL SIGTERM

ENTRYPOINT ["proxycore"]
CMD ["serve", "--config", "/etc/proxycore/proxycore.toml"]
