"""/dashboard: the live web view of the queue for admin tokens (login form, session cookie).

Every page is rendered whole on the server (Jinja2, inferq.api.pages) and then kept live by
one SSE connection, ``/dashboard/live/...``, whose frames carry the page's live region
rendered again from the replica's shared snapshot (inferq.services.feed). Actions are POSTs
with the page's CSRF token, confirmed in the page first (static/dashboard.js).

The session cookie is HttpOnly, SameSite=Strict, scoped to /dashboard, and Secure when the
request came over HTTPS (behind a TLS-terminating proxy, uvicorn trusts X-Forwarded-Proto from
the addresses in FORWARDED_ALLOW_IPS, 127.0.0.1 by default). Pages send a strict
Content-Security-Policy: no inline script or style, nothing from another origin.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode
from uuid import UUID

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from inferq.api import errors
from inferq.api.deps import Svc
from inferq.api.pages import STATIC, render
from inferq.api.render import json_response
from inferq.api.sse import EventStream
from inferq.domain.dashboard import DashboardLogin, TaskFilter
from inferq.domain.lanes import LANES
from inferq.domain.task import TaskStatus
from inferq.errors import InferqError, InvalidRequest, RouteNotFound
from inferq.jsontext import dumps
from inferq.services import Services
from inferq.services.dashboard import PAGES, NotLoggedIn
from inferq.services.waits import ChunkEvent, ResetEvent, StatusEvent

COOKIE = "inferq_session"
CSRF_HEADER = "x-csrf-token"
HEARTBEAT_S = 15.0

router = APIRouter(prefix="/dashboard", include_in_schema=False)


def _frame(event: str, data: Any) -> bytes:
    """One SSE frame; no ``id:``, since a page's stream restarts from a fresh snapshot."""
    return f"event: {event}\n".encode() + b"data: " + dumps(data) + b"\n\n"


async def logged_in(request: Request) -> DashboardLogin:
    services: Services = request.app.state.services
    return await services.dashboard.session(request.cookies.get(COOKIE))


async def changing(request: Request) -> DashboardLogin:
    """The session of a state-changing request, its CSRF token checked (header or form)."""
    services: Services = request.app.state.services
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        "application/x-www-form-urlencoded"
    ):
        sent = str((await request.form()).get("csrf") or "") or None
    return await services.dashboard.changing(request.cookies.get(COOKIE), sent)


Login = Annotated[DashboardLogin, Depends(logged_in)]
Change = Annotated[DashboardLogin, Depends(changing)]


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        body,
        status,
        headers={
            "Cache-Control": "no-store",
            # Everything is served from here: no CDN, no inline script.
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
            "style-src 'self'; frame-ancestors 'none'; form-action 'self'",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "same-origin",
        },
    )


def task_filter(
    owner: str | None = None,
    pool: str | None = None,
    status: str | None = None,
    since_min: int | None = Query(default=None, ge=1, le=7 * 24 * 60),
    lane: str | None = None,
) -> TaskFilter:
    """The tasks page's search, from its query string (empty fields are no filter)."""
    if status and status not in {s.value for s in TaskStatus}:
        raise InvalidRequest(f"status must be one of {', '.join(s.value for s in TaskStatus)}")
    if lane and lane not in LANES:
        raise InvalidRequest(f"lane must be one of {', '.join(LANES)}")
    # From the start of the minute: pages with the same search share one topic of the Feed.
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    since = now - timedelta(minutes=since_min) if since_min else None
    return TaskFilter(owner or None, pool or None, status or None, since, lane or None)


Search = Annotated[TaskFilter, Depends(task_filter)]


@router.get("")
async def home() -> Response:
    return RedirectResponse("/dashboard/overview", 303)


@router.get("/login")
async def login_form() -> Response:
    return _html(render("login.html"))


@router.post("/login")
async def login(svc: Svc, request: Request) -> Response:
    form = await request.form()
    try:
        cookie, _ = await svc.dashboard.login(str(form.get("token") or ""))
    except InferqError as exc:
        mapping = errors.lookup(exc)
        return _html(render("login.html", error=str(exc)), mapping.status)
    response = RedirectResponse("/dashboard/overview", 303)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(svc.settings.dashboard_session_s),
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(svc: Svc, request: Request, session: Change) -> Response:
    await svc.dashboard.logout(request.cookies.get(COOKIE))
    response = RedirectResponse("/dashboard/login", 303)
    response.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="strict")
    return response


def _page(name: str, session: DashboardLogin, data: Any, live: str, **extra: Any) -> Response:
    return _html(
        render(f"{name}.html", page=name, csrf=session.csrf, data=data, live=live, **extra)
    )


@router.get("/tasks")
async def tasks_page(svc: Svc, session: Login, search: Search, request: Request) -> Response:
    query = urlencode({k: v for k, v in request.query_params.items() if v})
    data = await svc.dashboard.read(("tasks", search))
    return _page(
        "tasks",
        session,
        data,
        f"/dashboard/live/tasks?{query}",
        search=search,
        statuses=[s.value for s in TaskStatus],
        lanes=LANES,
        query=dict(request.query_params),
    )


@router.get("/tasks/{task_id}")
async def task_page(svc: Svc, session: Login, task_id: UUID) -> Response:
    task = await svc.dashboard.task(task_id)
    return _page("task", session, task, f"/dashboard/live/task/{task_id}", task=task)


@router.get("/files/{file_id}")
async def download(svc: Svc, session: Login, file_id: str) -> Response:
    stored, content = await svc.dashboard.file(file_id)
    return StreamingResponse(
        content,
        media_type="application/jsonl",
        headers={"Content-Disposition": f'attachment; filename="{stored.id}.jsonl"'},
    )


@router.get("/{page}")
async def page(svc: Svc, session: Login, page: str) -> Response:
    if page not in PAGES:
        raise RouteNotFound(f"no dashboard page {page!r}")
    data = await svc.dashboard.read(page)
    return _page(page, session, data, f"/dashboard/live/{page}")


def _stream(svc: Services, session: DashboardLogin, frames: AsyncIterator[bytes]) -> EventStream:
    drain = svc.drain
    return EventStream(
        frames,
        heartbeat_s=HEARTBEAT_S,
        drain=drain.event,
        drain_frame=_frame("bye", {"reason": "draining"}),
        error_frame=_frame("bye", {"reason": "error"}),
        revoked=drain.revocation(session.token_id),
        revoked_frame=_frame("bye", {"reason": "revoked"}),
    )


async def _topic_frames(svc: Services, key: Hashable, template: str) -> AsyncIterator[bytes]:
    async with svc.dashboard.feed.subscribe(key) as sub:
        while True:
            html = render(template, data=await sub.next())
            yield _frame("html", {"html": html})


@router.get("/live/tasks")
async def live_tasks(svc: Svc, session: Login, search: Search) -> Response:
    frames = _topic_frames(svc, ("tasks", search), "live/tasks.html")
    return _stream(svc, session, frames)


@router.get("/live/task/{task_id}")
async def live_task(svc: Svc, session: Login, task_id: UUID) -> Response:
    await svc.dashboard.task(task_id)  # 404 before the stream starts
    return _stream(svc, session, _task_frames(svc, task_id))


async def _task_frames(svc: Services, task_id: UUID) -> AsyncIterator[bytes]:
    streamed = False
    async for event in svc.dashboard.task_events(task_id):
        if isinstance(event, StatusEvent):
            task = event.task
            if task.terminal and not streamed and task.response_body:
                # No chunks (a task that did not stream, or chunks already collected).
                yield _frame("output", {"text": response_text(task.response_body), "seq": 0})
            html = render("live/task.html", task=task)
            yield _frame("html", {"html": html, "status": task.status.value})
        elif isinstance(event, ChunkEvent):
            streamed = True
            yield _frame("output", {"text": chunk_text(event.data), "seq": event.seq})
        elif isinstance(event, ResetEvent):
            yield _frame("reset", {"attempt": event.attempt, "reason": event.reason})
    # Not a silent end: EventSource would reconnect and replay the task.
    yield _frame("bye", {"reason": "done"})


@router.get("/live/{page}")
async def live(svc: Svc, session: Login, page: str) -> Response:
    if page not in PAGES:
        raise RouteNotFound(f"no dashboard page {page!r}")
    return _stream(svc, session, _topic_frames(svc, page, f"live/{page}.html"))


def chunk_text(data: str) -> str:
    """The text of an OpenAI chunk (chat delta or completion text); the raw chunk otherwise."""
    try:
        chunk = orjson.loads(data)
        choice = chunk["choices"][0]
        text = choice.get("delta", {}).get("content") if "delta" in choice else choice["text"]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return data
    return text if isinstance(text, str) else ""


def response_text(response: Any) -> str:
    """The answer's text of an OpenAI response (chat or completion), else the JSON."""
    try:
        choice = response["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
    except (KeyError, IndexError, TypeError):
        text = None
    return text if isinstance(text, str) else orjson.dumps(response).decode()


@router.post("/tasks/{task_id}/cancel")
async def cancel_task(svc: Svc, session: Change, task_id: UUID) -> Response:
    task = await svc.dashboard.cancel_task(task_id)
    return json_response({"id": task.id, "status": task.status.value})


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(svc: Svc, session: Change, batch_id: str) -> Response:
    batch = await svc.dashboard.cancel_batch(batch_id)
    return json_response({"id": batch.id, "status": batch.status})


@router.post("/tokens/{token_id}/revoke")
async def revoke_token(svc: Svc, session: Change, token_id: UUID) -> Response:
    await svc.dashboard.revoke_token(token_id)
    return json_response({"revoked": token_id})


async def _not_logged_in(request: Request, exc: Exception) -> Response:
    # A page asks the browser to log in; a stream, an action or a script gets the JSON 401.
    if request.method == "GET" and not request.url.path.startswith("/dashboard/live/"):
        return RedirectResponse("/dashboard/login", 303)
    return errors.error_response(exc)


def install(app: FastAPI) -> None:
    """The routes, the static files (package data) and the login redirect."""
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=str(STATIC)), name="dashboard-static")
    app.add_exception_handler(NotLoggedIn, _not_logged_in)
