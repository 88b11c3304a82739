"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import re

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist or is not served here.",
                       param="model", code="model_not_found")


def body_too_large(max_bytes: int | None) -> OpenAIError:
    return OpenAIError(413, f"The request body is larger than {max_bytes} bytes (INFERSTACK_MAX_BODY_BYTES).",
                       code="request_too_large")


CUSTOM_CODES = ("unsupported_parameter", "unsupported_value", "invalid_json_schema")
"""Error types the request schemas raise themselves: the type is the OpenAI ``code`` and
the message is theirs (``api.schemas``)."""


# Pydantic puts union members and validators into error locations ("str",
# "list[ContentPart]", "function-after[...]"); our field names are never like these.
_NOT_A_FIELD = re.compile(r"^(str|int|float|bool|none|[A-Z]\w*|\w+-\w+|\w*\[.*\])$")


def param_path(loc) -> str | None:
    """Pydantic's error location as OpenAI writes a param: ``messages[1].content``."""
    out = ""
    for i, part in enumerate(loc):
        if i == 0 and part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _NOT_A_FIELD.match(str(part)):
            out += f".{part}" if out else str(part)
    return out or None


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    if not errors:
        return OpenAIError(400, "Invalid request body.")
    # A refused field says more than the union members that failed around it.
    first = next((e for e in errors if e.get("type") in CUSTOM_CODES + ("extra_forbidden",)), errors[0])
    kind = first.get("type")
    if kind == "json_invalid":
        return OpenAIError(400, "We could not parse the JSON body of your request: "
                           f"{first.get('ctx', {}).get('error', 'invalid JSON')}.", code="invalid_json")
    param = param_path(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if kind == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unsupported_parameter")
    if kind in CUSTOM_CODES:
        return OpenAIError(400, msg, param=param, code=kind)
    if param is None:
        return OpenAIError(400, f"Invalid request body: {msg}.", code="invalid_value")
    if kind == "missing":
        detail = f": {msg}" if msg and msg != "Field required" else ""
        return OpenAIError(400, f"Missing required parameter: '{param}'{detail}.", param=param,
                           code="missing_required_parameter")
    return OpenAIError(400, f"Invalid value for '{param}': {msg}.", param=param, code="invalid_value")


def install(app: FastAPI, max_body_bytes: int | None = None) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        if exc.status_code == 413:  # api.body.BodyLimit
            return body_too_large(max_body_bytes).response()
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return OpenAIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_unavailable(_: Request, exc: Exception):
        # Redis is restarting or unreachable (a stream already open rides that out instead).
        return OpenAIError(503, "The request queue (Redis) is unavailable right now; retry shortly.",
                           type="server_error", code="redis_unavailable", headers={"Retry-After": "2"}).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        return OpenAIError(500, f"Internal error: {type(exc).__name__}", type="server_error").response()
