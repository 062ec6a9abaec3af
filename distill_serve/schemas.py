"""The JSON bodies of the endpoint (pydantic models) and the one-sentence error for a bad one.

    POST /invocations  {"prompt": "..."}  or  {"messages": [{"role": "user", "content": "..."}]}
                       + optional max_new_tokens, temperature, top_p, seed
    -> {"text", "prompt_tokens", "completion_tokens", "finish_reason", "batch_size",
        "timings": {"queue_ms", "generate_ms", "total_ms"}}

Requests are validated strictly: unknown fields are refused (a misspelt `max_tokens` must not
be silently ignored), and JSON types are not coerced ("5" is not an integer). Stop strings are
not supported: generation stops at the model's EOS tokens or max_new_tokens.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REQUEST_EXAMPLE = '{"prompt": "The patient reports", "max_new_tokens": 32}'
_SEED_MAX = 2**63 - 1


class Message(BaseModel):
    """One chat turn, rendered by the tokenizer's chat template."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: str = Field(min_length=1)
    content: str


class InvocationRequest(BaseModel):
    """The body of POST /invocations: exactly one of `prompt` and `messages`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str | None = Field(None, min_length=1, description="Text to continue.")
    messages: list[Message] | None = Field(
        None, min_length=1, description="Chat turns; the model answers as the assistant.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate (default: the server's "
                                "--max-new-tokens, or what fits the model).")
    temperature: float = Field(0.0, ge=0.0, le=100.0, allow_inf_nan=False,
                               description="0: greedy (deterministic).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=_SEED_MAX,
                             description="Seed of the sampler (temperature > 0).")

    @model_validator(mode="after")
    def _one_input(self) -> InvocationRequest:
        if (self.prompt is None) == (self.messages is None):
            found = "both" if self.prompt is not None else "neither"
            raise ValueError(f"give exactly one of 'prompt' and 'messages', found {found}")
        return self


class Timings(BaseModel):
    queue_ms: float  # waiting for the model (earlier batches, batching window)
    generate_ms: float  # the batch's generate call, shared by its requests
    total_ms: float  # from the request's arrival to its response


class InvocationResponse(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    batch_size: int  # requests generated together with this one (itself included)
    timings: Timings


class ErrorResponse(BaseModel):
    error: str


class PingResponse(BaseModel):
    status: Literal["ready", "loading"]
    model: str | None = None  # the model's kind (torch-fp32, onnx-int8...) once loaded
    max_length: int | None = None


def validation_message(exc: ValidationError) -> str:
    """One sentence naming the first problem of a request body, and how to fix it."""
    problem = exc.errors(include_url=False)[0]
    kind, loc = problem["type"], problem["loc"]
    field = ".".join(str(part) for part in loc)
    if kind == "json_invalid":
        return (f"the body is not valid JSON ({problem['ctx'].get('error', 'parse error')}); "
                f"send a JSON object such as {REQUEST_EXAMPLE}")
    if kind in ("model_type", "model_attributes_type") and not loc:
        return f"the body must be a JSON object such as {REQUEST_EXAMPLE}"
    if kind == "extra_forbidden":
        allowed = ", ".join(InvocationRequest.model_fields) if len(loc) == 1 else \
            ", ".join(Message.model_fields)
        return f"unknown field '{field}'; the fields allowed are {allowed}"
    if kind == "missing":
        return f"field '{field}' is missing; every message needs a role and a content"
    if kind == "value_error":
        return f"{problem['msg'].removeprefix('Value error, ')}; send {REQUEST_EXAMPLE}"
    if kind == "string_too_short" and field == "prompt":
        return "the prompt is empty; send at least one character of text"
    if kind == "too_short" and field == "messages":
        return "messages is empty; send at least one {\"role\", \"content\"} turn"
    return f"field '{field}': {problem['msg'][0].lower()}{problem['msg'][1:]}, found " \
           f"{_shown(problem.get('input'))}"


def _shown(value) -> str:
    """The offending value when it is a number, a boolean or null, else its JSON type: an
    error must not carry prompt text into the logs."""
    if value is None or isinstance(value, (bool, int, float)):
        return "null" if value is None else str(value).lower() if isinstance(value, bool) \
            else repr(value)
    names = {str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)
