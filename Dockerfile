# syntax=docker/dockerfile:1
# Two images from one build context:
#   docker build --target sidecar  -t llmroute-sidecar:dev  .   # the data plane: `pip install .[otel,tokenizer]`
#   docker build --target operator -t llmroute-operator:dev .   # the control plane: `pip install .[operator]`
# Both run as the numeric non-root user 65532 and write nothing outside /tmp, so they work with
# readOnlyRootFilesystem (bytecode is compiled at build time).

ARG PYTHON_IMAGE=python:3.11-slim

# -- shared base: the runtime user and quiet, unbuffered Python ----------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/llmroute/bin:$PATH
# A passwd entry for 65532: kopf names its peering identity after the user (getpass).
RUN groupadd --system --gid 65532 llmroute \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin llmroute

# -- build stages: one virtualenv per image, from the same sources --------------------------------
FROM base AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
COPY operator/ operator/

# pip compiles the installed modules, so nothing needs to write bytecode at run time.
FROM source AS build-sidecar
# The otel extra ships so spec.telemetry works in an injected sidecar; it is imported only when on.
# The tokenizer extra and its encodings ship for spec.tokens.promptCounting: tiktoken (the sidecar
# never downloads them at run time: pods often have no egress).
ENV TIKTOKEN_CACHE_DIR=/opt/llmroute/tiktoken
RUN python -m venv /opt/llmroute && /opt/llmroute/bin/pip install ".[otel,tokenizer]" \
    && /opt/llmroute/bin/python -c "import tiktoken; [tiktoken.get_encoding(n) for n in ('o200k_base', 'cl100k_base')]"

FROM source AS build-operator
RUN python -m venv /opt/llmroute && /opt/llmroute/bin/pip install ".[operator]"

# -- sidecar: injected next to the application; traffic 8080, admin 9090 --------------------------
FROM base AS sidecar
COPY --from=build-sidecar /opt/llmroute /opt/llmroute
ENV TIKTOKEN_CACHE_DIR=/opt/llmroute/tiktoken
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["llmroute-sidecar"]

# -- operator: webhooks 9443, metrics and /healthz 8080 --------------------------------------------
FROM base AS operator
COPY --from=build-operator /opt/llmroute /opt/llmroute
USER 65532:65532
# In a container, metrics and /healthz listen on every interface (local runs default to 127.0.0.1:8081).
ENV LLMROUTE_METRICS_LISTEN=0.0.0.0:8080
EXPOSE 8080 9443
ENTRYPOINT ["llmroute-operator"]
