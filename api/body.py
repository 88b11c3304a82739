"""Request bodies: a size limit on every one, and the JSON bodies of the text endpoints
parsed and validated in the offload pool.

:class:`BodyLimit` answers 413 for a body over ``INFERSTACK_MAX_BODY_BYTES`` before it
is read to the end: at once when Content-Length says so, else as soon as the bytes
read pass it. Below that, turning megabytes of JSON into models takes long enough to
stall every other client if it ran on the event loop, hence :func:`parse`. FastAPI
does not see those models as parameters, so :func:`install_schemas` adds them to the
OpenAPI document, and each route names its model with :func:`request_body`."""

from __future__ import annotations

from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import body_too_large

M = TypeVar("M", bound=BaseModel)


class BodyLimit:
    """ASGI middleware. (Starlette's own limit answers in plain text, over the app's
    OpenAI-shaped error, whenever Content-Length was given.)"""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await body_too_large(self.max_bytes).response()(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # an HTTPException: FastAPI's body parsing passes it on, and the app's
                # handler (api.errors) answers it in the OpenAI shape
                raise HTTPException(413)
            return message

        await self.app(scope, limited, send)


async def parse(request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        return await request.app.state.inferstack.offload(model.model_validate_json, raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def request_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` of a route whose body is ``model``."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def install_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Put ``models`` (and the models they use) into the app's OpenAPI components."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(doc.pop("$defs", {}))
                components[model.__name__] = doc
        return app.openapi_schema

    app.openapi = openapi
