"""Request bodies: content type, size, JSON syntax, nesting depth and NUL checks, then pydantic.

Routes take their body through ``json_body(Model)`` instead of FastAPI's own body parsing, so
each refusal has its own status and code (415, 413, 400 invalid_json / json_too_deep /
nul_character, 422) and a NUL character is refused here rather than by jsonb at insert time.
The byte limit itself is enforced earlier, by RequestMiddleware, before the body is read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError

from inferq.api.errors import (
    InvalidBody,
    InvalidJson,
    JsonTooDeep,
    NulCharacter,
    UnsupportedMediaType,
)

M = TypeVar("M", bound=BaseModel)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def check_document(doc: Any, max_depth: int) -> None:
    """Raise JsonTooDeep past ``max_depth`` containers, NulCharacter for a NUL in any string.

    Iterative, so a hostile document cannot exhaust the Python stack.
    """
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > max_depth:
                raise JsonTooDeep(f"the JSON body nests deeper than {max_depth} levels")
            for key, item in value.items():
                if "\x00" in key:
                    raise NulCharacter()
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            if depth > max_depth:
                raise JsonTooDeep(f"the JSON body nests deeper than {max_depth} levels")
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str) and "\x00" in value:
            raise NulCharacter()


def parse_json(raw: bytes, content_type: str, max_depth: int) -> Any:
    """The checked JSON document of a request body (see check_document)."""
    if not _is_json(content_type):
        raise UnsupportedMediaType(
            f"the request body must be JSON (Content-Type: application/json), "
            f"not {content_type or 'nothing'!r}"
        )
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson refuses documents nested past 1024 levels as a decode error.
        if "depth" in str(exc).lower() or "recursion" in str(exc).lower():
            raise JsonTooDeep(f"the JSON body nests deeper than {max_depth} levels") from None
        raise InvalidJson(f"the request body is not valid JSON: {exc}") from None
    check_document(doc, max_depth)
    return doc


def validate(model: type[M], doc: Any) -> M:
    """``doc`` as ``model``; raises InvalidBody naming the first bad field."""
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        msg = f"{param}: {first['msg']}" if param else first["msg"]
        raise InvalidBody(msg, param=param) from None


async def read_document(request: Request) -> Any:
    """The request's checked JSON document, with the limits of the app's settings."""
    settings = request.app.state.services.settings
    raw = await request.body()
    return parse_json(raw, request.headers.get("content-type", ""), settings.max_json_depth)


# Every model a route reads through json_body, for the OpenAPI document (see app.py).
BODY_MODELS: dict[str, type[BaseModel]] = {}


def documented(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` naming ``model`` as the route's JSON request body.

    The body is parsed by json_body, not by FastAPI, so FastAPI cannot see its schema; the
    schema itself is added under components.schemas by create_app.
    """
    BODY_MODELS[model.__name__] = model
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def openapi_schemas() -> dict[str, Any]:
    """The JSON schemas of BODY_MODELS and of the models they nest, keyed by name."""
    schemas: dict[str, Any] = {}
    for name, model in BODY_MODELS.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    return schemas


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A FastAPI dependency that returns the request body as a checked ``model``."""

    async def dependency(request: Request) -> M:
        return validate(model, await read_document(request))

    dependency.__name__ = f"{model.__name__}_body"
    return dependency
