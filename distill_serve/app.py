"""The FastAPI app: `GET /ping`, `POST /invocations`, `GET /metrics` (schemas.py has the bodies).

`create_app(cfg, load)` returns an app whose lifespan starts loading the model (`load()`, on
the batcher's worker thread) in the background, so the server listens at once: `/ping` answers
503 until the model is loaded, then 200 with its kind; `/invocations` answers 503 meanwhile.
A load that fails calls `on_load_failure(message)` (the CLI stops the server and exits 1).

Every error answer is `{"error": "<what was wrong and how to fix it>"}`: 400 for a body that
is not JSON, 413 for one over MAX_BODY_BYTES (read no further), 422 for a request that is
JSON but not a valid invocation (unknown field, wrong type, empty prompt, too many tokens,
chat messages for a tokenizer without a chat template), 503 while loading or shutting down,
500 when generation itself failed. One log line per
invocation: status, token counts, batch size and milliseconds, never the prompt text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill_serve.batcher import Batcher, JobResult, ServerClosing
from distill_serve.metrics import CONTENT_TYPE, ServeMetrics
from distill_serve.schemas import (ErrorResponse, InvocationRequest, InvocationResponse,
                                   PingResponse, Timings, validation_message)
from logitstore.errors import LogitStoreError

log = logging.getLogger("distill_serve")
ENDPOINTS = "GET /ping, POST /invocations, GET /metrics"
# A prompt the model can take is at most max_length tokens (~4 bytes each, 128k at most);
# a bigger body is refused before it is buffered whole.
MAX_BODY_BYTES = 4 * 2**20


class ApiError(Exception):
    """An invocation answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ServeState:
    cfg: Any  # config.ServeConfig
    metrics: ServeMetrics
    batcher: Batcher
    model: Any = None  # the InferenceModel once loaded


def create_app(cfg, load: Callable[[], Any], *, load_delay_s: float = 0.0,
               on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The app serving the model `load()` returns (see the module docstring)."""
    metrics = ServeMetrics()
    state = ServeState(cfg, metrics, Batcher(max_batch=cfg.max_batch,
                                             wait_s=cfg.batch_wait_ms / 1000, metrics=metrics))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        loading = asyncio.create_task(_load(state, load, load_delay_s, on_load_failure))
        yield
        loading.cancel()  # a load still running finishes on its thread, unused
        await state.batcher.stop()
        if state.model is not None:
            state.model.close()

    app = FastAPI(title="distill-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    _add_error_handlers(app)
    _add_accounting(app, metrics)
    _add_routes(app, state)
    return app


async def _load(state: ServeState, load, delay_s: float, on_failure) -> None:
    """Load the model on the worker thread, then start batching; report a failure."""
    if delay_s:
        await asyncio.sleep(delay_s)
    started = time.perf_counter()
    try:
        model = await state.batcher.run_in_worker(load)
    except (LogitStoreError, OSError) as exc:
        message = str(exc)
    except Exception as exc:  # a library failure: still one paragraph, the traceback logged
        log.debug("model load failed", exc_info=True)
        message = f"unexpected {type(exc).__name__} while loading {state.cfg.model}: " \
                  f"{' '.join(str(exc).split())[:500]}"
    else:
        state.model = model
        state.batcher.start(model)
        state.metrics.model_loaded.set(1)
        log.info("model loaded in %.1f s: %s from %s, max_length %d",
                 time.perf_counter() - started, model.kind, model.source, model.max_length)
        return
    if on_failure is None:
        log.error("cannot load the model: %s", message)
    else:
        on_failure(message)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answer has the shape {"error": "..."}, FastAPI's own ones included."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        return _error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _error(404, f"no endpoint {request.url.path}; the endpoints are {ENDPOINTS}")
        if exc.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path}; the "
                               f"endpoints are {ENDPOINTS}")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError):
        return _error(422, f"invalid request: {exc.errors()[0].get('msg', exc)}")


def _add_accounting(app: FastAPI, metrics: ServeMetrics) -> None:
    """Count, time and log every POST /invocations, whatever its outcome."""

    @app.middleware("http")
    async def account(request: Request, call_next):
        if request.url.path != "/invocations":
            return await call_next(request)
        arrived = time.perf_counter()
        request.state.arrived = arrived
        response = await call_next(request)
        seconds = time.perf_counter() - arrived
        status = response.status_code
        metrics.record_response(status, seconds if status == 200 else None)
        done: JobResult | None = getattr(request.state, "result", None)
        if done is not None:
            log.info("POST /invocations %d prompt_tokens=%d completion_tokens=%d batch=%d "
                     "queue_ms=%.1f total_ms=%.1f", status, done.generation.prompt_tokens,
                     len(done.generation.token_ids), done.batch_size, done.queue_s * 1000,
                     seconds * 1000)
        else:
            log.info("POST /invocations %d total_ms=%.1f error=%s", status, seconds * 1000,
                     getattr(request.state, "error", "-"))
        return response


def _add_routes(app: FastAPI, state: ServeState) -> None:
    errors = {code: {"model": ErrorResponse} for code in (400, 413, 422, 500, 503)}

    @app.get("/ping", response_model=PingResponse, responses={503: {"model": ErrorResponse}})
    async def ping():
        model = state.model
        if model is None:
            return JSONResponse({"status": "loading", "error": "the model is still loading; "
                                 "retry when GET /ping answers 200"}, status_code=503)
        return PingResponse(status="ready", model=model.kind, max_length=model.max_length)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/invocations", response_model=InvocationResponse, responses=errors,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": InvocationRequest.model_json_schema()}}}})
    async def invocations(request: Request):
        try:
            return await _invoke(state, request)
        except ApiError as exc:
            request.state.error = exc.message
            raise


async def _invoke(state: ServeState, request: Request) -> InvocationResponse:
    """Parse, check, queue and answer one invocation (ApiError for what goes wrong)."""
    model = state.model
    if model is None:
        raise ApiError(503, "the model is still loading; retry when GET /ping answers 200")
    invocation = _parse(await _read_body(request))
    prompt_ids = _encode(model.tokenizer, invocation)
    settings = _settings(invocation, prompt_ids, model, state.cfg.max_new_tokens)
    try:
        result = await state.batcher.submit(prompt_ids, settings)
    except ServerClosing as exc:
        raise ApiError(503, str(exc)) from exc
    except Exception as exc:  # the batcher logged the traceback
        raise ApiError(500, f"generation failed ({type(exc).__name__}); see the server log, "
                            f"and retry") from exc
    request.state.result = result
    generation = result.generation
    text = model.tokenizer.decode(generation.token_ids, skip_special_tokens=True)
    total_ms = (time.perf_counter() - request.state.arrived) * 1000
    return InvocationResponse(
        text=text, prompt_tokens=generation.prompt_tokens,
        completion_tokens=len(generation.token_ids), finish_reason=generation.finish_reason,
        batch_size=result.batch_size,
        timings=Timings(queue_ms=round(result.queue_s * 1000, 3),
                        generate_ms=round(result.generate_s * 1000, 3),
                        total_ms=round(total_ms, 3)))


async def _read_body(request: Request) -> bytes:
    """The request body; ApiError 413 as soon as it is known to exceed MAX_BODY_BYTES."""
    too_big = ApiError(413, f"the body is over {MAX_BODY_BYTES // 2**20} MiB, more text than "
                            f"any prompt the model can take; send a shorter prompt")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_big
    return bytes(body)


def _parse(body: bytes) -> InvocationRequest:
    try:
        return InvocationRequest.model_validate_json(body)
    except ValidationError as exc:
        not_json = exc.errors()[0]["type"] == "json_invalid"
        raise ApiError(400 if not_json else 422, validation_message(exc)) from None


def _encode(tokenizer, invocation: InvocationRequest) -> list[int]:
    """Token ids of the prompt, or of the messages rendered by the chat template (which
    writes its own special tokens, as `apply_chat_template(tokenize=True)` assumes)."""
    if invocation.prompt is not None:
        return list(tokenizer(invocation.prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(422, "this model's tokenizer has no chat template, so 'messages' cannot "
                            "be rendered; send the conversation as one 'prompt' string")
    messages = [m.model_dump() for m in invocation.messages]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
    except Exception as exc:  # jinja's raise_exception, e.g. roles that must alternate
        raise ApiError(422, f"the model's chat template refused these messages "
                            f"({' '.join(str(exc).split())[:200]}); check the roles and "
                            f"their order") from None
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def _settings(invocation: InvocationRequest, prompt_ids: list[int], model, limit: int):
    """The request's GenerationSettings, checked against --max-new-tokens and the model."""
    from logitstore.toolkit.inference import GenerationSettings, InferenceInputError

    prompt_tokens = len(prompt_ids)
    room = model.max_length - prompt_tokens
    asked = invocation.max_new_tokens
    if asked is not None and asked > limit:
        raise ApiError(422, f"max_new_tokens is {asked}, over this server's limit of {limit} "
                            f"(--max-new-tokens); ask for at most {limit}")
    if room < 1:
        raise ApiError(422, f"the prompt has {prompt_tokens} tokens and the model takes at most "
                            f"{model.max_length} positions, leaving no room to generate; "
                            f"shorten the prompt")
    settings = GenerationSettings(
        max_new_tokens=asked if asked is not None else min(limit, room),
        temperature=invocation.temperature, top_p=invocation.top_p, seed=invocation.seed)
    try:
        model.check_request([prompt_ids], [settings])
    except InferenceInputError as exc:
        raise ApiError(422, str(exc)) from None
    return settings
