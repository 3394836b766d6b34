"""What routes declare they need: the replica's services and the caller's token.

The dependencies are async on purpose: FastAPI runs a plain ``def`` dependency in its thread
pool, a thread hop on every request for an attribute read. The fast path
(inferq.api.fastpath) recognises these same dependencies and answers them without FastAPI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from starlette.types import Receive

from inferq.domain.records import ApiToken
from inferq.services import Services
from inferq.services.auth import ADMIN, CLIENT, WORKER, Role


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _token(role: Role) -> Callable[[Request], Awaitable[ApiToken]]:
    async def dependency(request: Request) -> ApiToken:
        auth = request.app.state.services.auth
        return await role.authorize(auth, request.headers.get("authorization"))

    dependency.__name__ = "requires_" + "_".join(sorted(role.allowed))
    dependency.role = role  # type: ignore[attr-defined]
    return dependency


client_token = _token(CLIENT)
worker_token = _token(WORKER)
admin_token = _token(ADMIN)

Svc = Annotated[Services, Depends(get_services)]
Client = Annotated[ApiToken, Depends(client_token)]
Worker = Annotated[ApiToken, Depends(worker_token)]
Admin = Annotated[ApiToken, Depends(admin_token)]


def disconnected(receive: Receive) -> Callable[[], Awaitable[None]]:
    """A coroutine function that returns once the client closed the connection (the request
    body was already read), for ``Drain.guarded(gone=...)``."""

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return gone


def hot(endpoint: Callable[..., Awaitable[object]]) -> Callable[..., Awaitable[object]]:
    """Mark a route to be answered by the fast path as well (see inferq.api.fastpath)."""
    endpoint.hot = True  # type: ignore[attr-defined]
    return endpoint
