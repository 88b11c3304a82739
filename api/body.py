"""The JSON bodies of the text endpoints, parsed and validated in the offload pool.

A body may be up to ``INFERSTACK_MAX_BODY_BYTES`` (the app answers 413 beyond that
before reading it to the end); turning megabytes of JSON into models takes long
enough to stall every other client if it ran on the event loop. FastAPI does not see
these models as parameters, so :func:`install_schemas` adds them to the OpenAPI
document, and each route names its model with :func:`request_body`."""

from __future__ import annotations

from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


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
