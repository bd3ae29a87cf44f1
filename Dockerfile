# The label-studio-sahi image: `ls-sahi serve` by default, `ls-sahi worker` for the training
# workers (docker-compose.yml). No model is baked in: models download on first use into
# HF_HOME (compose's shared models volume), or DETECTOR_MODEL / CLASSIFIER_MODEL name folders.
FROM python:3.11-slim

# torch from PyPI ships its CUDA libraries as wheels: on a GPU host this image needs only the
# NVIDIA driver and container toolkit, no CUDA base image. For a CPU-only image (much smaller):
#   docker compose build --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_EXTRA_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/models \
    HF_HOME=/models/hf-cache

WORKDIR /app

# Dependencies first, in their own layer: pip installs what pyproject.toml names and no code
# yet, so a code change rebuilds in seconds instead of downloading torch again.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt

COPY backend ./backend
COPY plugin ./plugin
RUN pip install --no-cache-dir --no-deps . && rm -rf build backend/*.egg-info plugin/*.egg-info

# Non-root. /models exists and belongs to that user, so a fresh named volume mounted there
# starts out writable (checkpoints, the hub cache).
RUN useradd --create-home --uid 1000 app && mkdir -p /models && chown app:app /models
USER app

# No HEALTHCHECK here: the workers share this image and serve no HTTP (compose checks
# the backend's /health).
EXPOSE 9090
CMD ["ls-sahi", "serve"]
