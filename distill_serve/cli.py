"""`distill-serve` (also `python -m distill_serve`) and `serve`: a student behind an HTTP endpoint.

    distill-serve demo_out/export-int8 --port 8080 --max-batch 16
    distill-serve demo_out/runs/student          # a run directory serves its final/
    docker run -p 8080:8080 -v $PWD/export:/opt/ml/model IMAGE serve

MODEL_OR_EXPORT is a student-export directory (ONNX or PyTorch, fp32 or INT8), a model
directory, a student-train run, an alias or a hub id; logitstore.toolkit.inference loads it.
Endpoints (distill_serve/app.py): `GET /ping` (503 while loading, then 200 with the model's
kind), `POST /invocations` (a prompt or chat messages; text, token counts, timings),
`GET /metrics` (Prometheus). Concurrent requests are batched (distill_serve/batcher.py).

The arguments and the model's path are checked, and the port bound, before anything is
loaded; the model then loads in the background while the server already answers `/ping`.
SIGTERM (or Ctrl-C) stops accepting connections, lets every request already received finish,
queued ones included, then exits.

`serve` is the inference-container entry point: the model from $MODEL_DIR, else
$SM_MODEL_DIR, else /opt/ml/model; host $DISTILL_SERVE_HOST or 0.0.0.0; port
$SAGEMAKER_BIND_TO_PORT, else $DISTILL_SERVE_PORT, else 8080; every other flag from
$DISTILL_SERVE_<FLAG> (e.g. DISTILL_SERVE_MAX_BATCH=16) or from arguments after `serve`.

Test hooks (environment, logged as a warning when set): LOGITSTORE_SERVE_LOAD_DELAY_S=SECONDS
delays the start of the load, so that a test sees `/ping` answer 503;
LOGITSTORE_SERVE_STEP_DELAY_S=SECONDS sleeps before every forward of the model (the prompt's
and each new token's), so that a test's generation is still running when it sends SIGTERM,
on any machine.

Exit status (logitstore/exit_codes.py): 0 after a SIGTERM drain; 1 with a one-paragraph reason
for a wrong option, a model path that does not exist, a port that cannot be bound or a model
that fails to load; 2 for a usage error; 130 after Ctrl-C (requests drained first).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time

import click

from distill_serve.config import (FIELDS, LOAD_DELAY_ENV, SECTION, STEP_DELAY_ENV,
                                  delays_from_test_hooks, resolve_config)
from logitstore import exit_codes
from logitstore.errors import LogitStoreError
from logitstore.toolkit.options import tool_command, verbose_option

PROG = "distill-serve"
CONTAINER_MODEL_DIR = "/opt/ml/model"
ENV_PREFIX = "DISTILL_SERVE"
log = logging.getLogger("distill_serve")


@tool_command(PROG, FIELDS, SECTION)
@click.argument("model", metavar="MODEL_OR_EXPORT")
@verbose_option(" (libraries included; logs never include prompt text)")
def distill_serve(config_path: str | None, model: str, verbose: bool, **flags) -> None:
    """Serve a student (model or export directory, run, alias or hub id) over HTTP:
    GET /ping, POST /invocations, GET /metrics."""
    _setup_logging(verbose)
    prog = click.get_current_context().info_name or PROG  # `serve` in a container
    try:
        cfg = resolve_config(config_path, flags, model=model)
        delays = delays_from_test_hooks()
    except LogitStoreError as exc:
        exit_codes.fail(prog, str(exc))
    try:
        sock = bind_socket(cfg.host, cfg.port)
    except OSError as exc:
        exit_codes.fail(prog, f"cannot listen on {cfg.host}:{cfg.port} "
                              f"({exc.strerror or exc}); choose another --port or --host, or "
                              f"stop the process that holds this one")
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d; loading %s in the background (GET /ping answers "
             "200 once it is loaded)", host, port, cfg.model)
    failure = run_server(cfg, sock, *delays)
    if failure:
        exit_codes.fail(prog, failure)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), bound here so that a taken
    port is reported before the model loads."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def run_server(cfg, sock: socket.socket, load_delay: float = 0.0,
               step_delay: float = 0.0) -> str | None:
    """Serve on `sock` until SIGTERM/SIGINT (drained) or a failed load; the failure's
    message, or None. The delays are the test hooks' (module docstring)."""
    import uvicorn

    from distill_serve.app import create_app
    from logitstore.toolkit.inference import load_inference_model

    failures: list[str] = []

    def stop_on_failure(message: str) -> None:
        failures.append(message)
        server.should_exit = True

    def load():
        model = load_inference_model(cfg.model, threads=cfg.threads)
        return _slow_every_forward(model, step_delay) if step_delay else model

    for name, seconds in ((LOAD_DELAY_ENV, load_delay), (STEP_DELAY_ENV, step_delay)):
        if seconds:
            log.warning("test hook %s=%g is set: this server is slowed on purpose", name,
                        seconds)
    app = create_app(cfg, load, load_delay_s=load_delay, on_load_failure=stop_on_failure)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                           lifespan="on", timeout_graceful_shutdown=None))
    # uvicorn drains on SIGTERM, then restores the handler it found and raises the signal
    # again; with the default handler that would kill the process after a clean drain.
    previous = signal.signal(signal.SIGTERM, _drained)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failures[0] if failures else None


def _slow_every_forward(model, seconds: float):
    """`model` whose forward and prefill sleep `seconds` first (the STEP_DELAY_ENV test
    hook): the decode loop calls them through self, so instance attributes take their place."""
    for name in ("forward", "prefill"):
        setattr(model, name, _sleeping_first(getattr(model, name), seconds))
    return model


def _sleeping_first(method, seconds: float):
    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return method(*args, **kwargs)

    return slowed


def _drained(signum: int, _frame) -> None:
    log.info("%s: every request answered, exiting", signal.Signals(signum).name)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    # A progress bar per model load is noise in a server log; set before transformers and
    # huggingface_hub are imported (they read it then), without importing them here.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("transformers", "httpx", "urllib3", "filelock", "huggingface_hub",
                  "onnxruntime", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    distill_serve.main(args=argv, prog_name=PROG)


def serve_main(argv: list[str] | None = None) -> None:
    """`serve`: distill-serve configured by the container's environment (module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    model = os.environ.get("MODEL_DIR") or os.environ.get("SM_MODEL_DIR") or CONTAINER_MODEL_DIR
    host = os.environ.get(f"{ENV_PREFIX}_HOST") or "0.0.0.0"
    port = os.environ.get("SAGEMAKER_BIND_TO_PORT") or os.environ.get(f"{ENV_PREFIX}_PORT") \
        or "8080"
    # Flags after `serve` come last, so they override these (click keeps the last value).
    distill_serve.main(args=[model, "--host", host, "--port", port, *args], prog_name="serve",
                       auto_envvar_prefix=ENV_PREFIX)
