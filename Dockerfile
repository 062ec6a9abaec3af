# The inference container of a distilled student (distill_serve/cli.py, `serve`).
#
#   docker build -t logitstore-serve .
#   docker run --rm -p 8080:8080 -v "$PWD/demo_out/export-int8:/opt/ml/model:ro" logitstore-serve serve
#   curl localhost:8080/ping
#   curl localhost:8080/invocations -d '{"prompt": "The patient reports", "max_new_tokens": 32}'
#
# `serve` reads the model from $MODEL_DIR (else $SM_MODEL_DIR, else /opt/ml/model), listens on
# 0.0.0.0:$SAGEMAKER_BIND_TO_PORT (else 8080) and takes any other flag as DISTILL_SERVE_<FLAG>
# (e.g. -e DISTILL_SERVE_MAX_BATCH=16) or after `serve`. `docker stop` sends SIGTERM: the
# server answers every request already received, then exits 0; Docker sends SIGKILL after 10 s
# unless told to wait longer (`docker stop -t 120`, or the platform's grace period), and a
# 1B model on a CPU may need that long to drain its queue. The model directory is mounted,
# not baked in: a student-export output (ONNX or PyTorch, fp32 or INT8) or a model directory.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TQDM_DISABLE=1

WORKDIR /opt/logitstore

# PyTorch's CPU build first, from its CPU index: the project pins torch==2.13.0, which PyPI
# would otherwise satisfy with the much larger CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# Only what `pip install .` builds (pyproject.toml lists the packages; configs/ ships as
# logitstore.presets); no checkout state, virtual environment or demo output.
COPY pyproject.toml README.md LICENSE ./
COPY configs ./configs
COPY logitstore ./logitstore
COPY teacher_dump ./teacher_dump
COPY student_train ./student_train
COPY eval ./eval
COPY student_export ./student_export
COPY distill_serve ./distill_serve
RUN pip install . && rm -rf /opt/logitstore/build

RUN useradd --create-home --uid 10001 app
USER app
WORKDIR /home/app

EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ping' % (os.environ.get('SAGEMAKER_BIND_TO_PORT') or os.environ.get('DISTILL_SERVE_PORT') or '8080'), timeout=4)"

# No ENTRYPOINT: `docker run IMAGE serve` runs the `serve` script (the inference-container
# contract), and `docker run IMAGE distill-serve DIR --port 9000` runs the full command.
CMD ["serve"]
