# paced for GPU hosts: CUDA runtime, vLLM (the `vllm` extra) and `paced serve` by default.
# Not built in this repository's CI (no Docker engine there); see the README.
#   docker build -t paced .
#   docker run --gpus all -p 8000:8000 -e PACED_TOKEN=... -v /data/paced:/data paced
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    PACED_HOME=/data HF_HUB_OFFLINE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/paced
ENV PATH=/opt/paced/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY paced ./paced
# The vllm extra brings a CUDA build of torch that matches it.
RUN pip install --upgrade pip && pip install ".[train,vllm]"

VOLUME /data
EXPOSE 8000
# A non-loopback bind needs PACED_TOKEN: `paced serve` refuses to start without one.
CMD ["paced", "serve", "--host", "0.0.0.0", "--port", "8000"]
