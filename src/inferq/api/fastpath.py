"""FastPath: the hot routes answered without FastAPI's routing and dependency solving, derived
from the same route declarations.

An open long-poll is mostly what the HTTP stack keeps alive for it: FastAPI's middleware,
routing and dependency layers held ~15 KB of frames, exit stacks and request objects per
request for as long as it waited, and cost ~130 us of CPU on every call. There is no second
table of routes here: the routes marked ``@hot`` (inferq.api.deps) are read from the routers at
startup, matched with Starlette's own ``route.matches``, and their endpoint — the very function
FastAPI calls — is called with arguments built from its signature:

- ``Request``; path parameters; ``Header()`` parameters (named as FastAPI names them);
- ``Query()`` parameters, validated by pydantic with the parameter's own constraints;
- the dependencies of inferq.api.deps: the services, and the caller's token for the role its
  dependency requires.

A parameter of any other kind makes the route ineligible (an error at startup, so a new hot
route cannot silently lose its fast path). A request the fast path cannot take as is — a
query it cannot validate, an unknown or repeated query parameter, a root path — goes to
FastAPI, which answers it with its own words. Errors are answered from the same error table
FastAPI's handlers use. tests/integration/test_fastpath.py runs every hot route both ways.
The routes are read from the routers themselves (FastAPI 0.16x keeps included routers as lazy
branches of its own, not as a flat list on the app).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, get_args, get_origin, get_type_hints
from urllib.parse import parse_qsl

import structlog
from fastapi import APIRouter
from fastapi.params import Depends, Header, Query
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from inferq.api.deps import get_services
from inferq.api.errors import error_response, log_failure
from inferq.services import Services
from inferq.services.auth import Role

log = structlog.get_logger("inferq.api")


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    kind: str  # request | services | token | path | header | query
    key: str = ""  # header name, query name
    role: Role | None = None
    adapter: TypeAdapter[Any] | None = None
    default: Any = None


@dataclass(frozen=True, slots=True)
class _Hot:
    route: APIRoute
    params: tuple[_Param, ...]
    queries: dict[str, TypeAdapter[Any]]


class FastPath:
    """The ``@hot`` routes of ``routers``, the routers the app includes as they are (without
    a prefix of the app's own; see the module docstring)."""

    def __init__(self, routers: Sequence[APIRouter], services: Services) -> None:
        self.services = services
        self.answered = 0  # requests this fast path answered (for tests and curious operators)
        self.routes = [
            _compile(r)
            for router in routers
            for r in router.routes
            if isinstance(r, APIRoute) and _is_hot(r.endpoint)
        ]

    def match(self, scope: Scope) -> tuple[_Hot, dict[str, Any]] | None:
        """The hot route for ``scope`` and its arguments so far, or None to leave the request
        to FastAPI. Sets ``scope["route"]`` (the metrics label) on a match."""
        if scope.get("root_path"):
            return None
        for hot in self.routes:
            found, child = hot.route.matches(scope)
            if found is not Match.FULL:
                continue
            queries = _queries(scope["query_string"], hot.queries)
            if queries is None:
                return None
            scope["route"] = hot.route
            return hot, {**child["path_params"], **queries}
        return None

    async def answer(
        self, scope: Scope, receive: Receive, send: Send, found: tuple[_Hot, dict[str, Any]]
    ) -> None:
        """Answer a matched request; an exception is answered from the error table, as
        FastAPI's handlers do (inferq.api.errors.install)."""
        hot, values = found
        self.answered += 1
        request = Request(scope, receive)
        response: Response
        try:
            kwargs = {p.name: await self._argument(p, request, values) for p in hot.params}
            response = await hot.route.endpoint(**kwargs)
        except Exception as exc:
            log_failure(exc, scope["method"], scope["path"])
            response = error_response(exc)
        await response(scope, receive, send)

    async def _argument(self, param: _Param, request: Request, values: dict[str, Any]) -> Any:
        kind = param.kind
        if kind == "request":
            return request
        if kind == "services":
            return self.services
        if kind == "token":
            assert param.role is not None
            return await param.role.authorize(
                self.services.auth, request.headers.get("authorization")
            )
        if kind == "header":
            return request.headers.get(param.key, param.default)
        return values.get(param.key, param.default)  # path, query


def _is_hot(endpoint: Callable[..., Any]) -> bool:
    return bool(getattr(endpoint, "hot", False))


def _compile(route: APIRoute) -> _Hot:
    hints = get_type_hints(route.endpoint, include_extras=True)
    params = []
    for name, parameter in inspect.signature(route.endpoint).parameters.items():
        params.append(_param(route, name, hints.get(name), parameter.default))
    queries = {p.key: p.adapter for p in params if p.kind == "query" and p.adapter is not None}
    return _Hot(route, tuple(params), queries)


def _param(route: APIRoute, name: str, hint: Any, default: Any) -> _Param:
    where = f"hot route {route.path}: parameter {name!r}"
    if hint is Request:
        return _Param(name, "request")
    marker, base = None, hint
    if get_origin(hint) is Annotated:
        base, *extras = get_args(hint)
        marker = extras[0] if extras else None
    if isinstance(marker, Depends):
        if marker.dependency is get_services:
            return _Param(name, "services")
        role = getattr(marker.dependency, "role", None)
        if isinstance(role, Role):
            return _Param(name, "token", role=role)
        raise TypeError(f"{where}: the fast path does not know this dependency")
    if name in route.param_convertors and base is str:
        return _Param(name, "path", key=name)
    if isinstance(marker, Header):
        header = marker.alias or name.replace("_", "-")
        return _Param(name, "header", key=header.lower(), default=_default(default))
    if isinstance(marker, Query):
        adapter: TypeAdapter[Any] = TypeAdapter(Annotated[base, marker])  # type: ignore[arg-type]
        return _Param(name, "query", key=marker.alias or name, adapter=adapter,
                      default=_default(default))  # fmt: skip
    raise TypeError(f"{where}: the fast path cannot supply it")


def _default(default: Any) -> Any:
    return None if default is inspect.Parameter.empty else default


def _queries(raw: bytes, adapters: dict[str, TypeAdapter[Any]]) -> dict[str, Any] | None:
    """The validated query parameters, or None when FastAPI should judge them (unknown,
    repeated or invalid ones)."""
    if not raw:
        return {}
    if not adapters:
        return None
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        return None
    values: dict[str, Any] = {}
    for key, value in pairs:
        adapter = adapters.get(key)
        if adapter is None or key in values:
            return None
        try:
            values[key] = adapter.validate_python(value)
        except ValidationError:
            return None
    return values
