"""DashboardService: the browser sessions of admin tokens, the pages' data and their actions.

Design decisions:

- A login trades an admin token, typed once into the form, for a random cookie; only its
  SHA-256 is stored (``inferq.dashboard_session``), so every replica knows every session and
  a session dies with its token (revoked) or after ``INFERQ_DASHBOARD_SESSION_S``. The token
  itself is never put in a URL, a cookie or browser storage.
- CSRF: each session has its own random secret, rendered into the page; every request that
  changes state must echo it (header ``X-CSRF-Token`` or form field ``csrf``), compared in
  constant time. The cookie is SameSite=Strict as well, so a cross-site request carries no
  session at all; the check is the second lock.
- Actions go through the same repositories and services as the API (a task or batch is
  cancelled as its owner would cancel it; a token is revoked by AdminService, which tells the
  other replicas).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import AsyncIterator, Hashable
from typing import Any
from uuid import UUID

from inferq.db.batches import BatchRepository
from inferq.db.dashboard import DashboardRepository
from inferq.db.files import FileRepository
from inferq.db.tasks import TaskRepository
from inferq.domain.batch import Batch, StoredFile
from inferq.domain.dashboard import DashboardLogin, OwnersPage, TaskFilter
from inferq.domain.task import Task
from inferq.errors import BatchNotFound, FileNotFound, Forbidden, InvalidRequest, Unauthorized
from inferq.services.admin import AdminService
from inferq.services.auth import ADMIN, Authenticator
from inferq.services.feed import Feed
from inferq.services.waits import Event, WaitService


class CsrfRefused(Forbidden):
    """This request changes state and did not carry the page's CSRF token; reload the page."""


class NotLoggedIn(Unauthorized):
    """Log in to the dashboard first."""


PAGES = ("overview", "workers", "owners", "batches", "tasks")


class DashboardService:
    """One per replica; every method but ``login`` is for a live session."""

    def __init__(
        self,
        repo: DashboardRepository,
        *,
        auth: Authenticator,
        admin: AdminService,
        tasks: TaskRepository,
        batches: BatchRepository,
        files: FileRepository,
        waits: WaitService,
        session_s: float,
    ) -> None:
        self.repo = repo
        self.auth = auth
        self.admin = admin
        self.tasks = tasks
        self.batches = batches
        self.files = files
        self.waits = waits
        self.session_s = session_s
        self.feed = Feed(waits.hub, self.read)

    async def login(self, secret: str) -> tuple[str, DashboardLogin]:
        """A new session for an admin token's secret: (cookie, session). Raises Unauthorized
        for an unknown or revoked token, Forbidden for a token that is not an admin's."""
        token = await ADMIN.authorize(self.auth, f"Bearer {secret.strip()}")
        cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        expires_at = await self.repo.login(cookie, token.id, csrf, self.session_s)
        return cookie, DashboardLogin(token.id, token.owner_id, csrf, expires_at)

    async def session(self, cookie: str | None) -> DashboardLogin:
        """The live session of ``cookie``; raises NotLoggedIn."""
        login = await self.repo.session(cookie) if cookie else None
        if login is None:
            raise NotLoggedIn()
        return login

    async def changing(self, cookie: str | None, csrf: str | None) -> DashboardLogin:
        """The session of a request that changes state; raises NotLoggedIn, CsrfRefused."""
        login = await self.session(cookie)
        if not csrf or not hmac.compare_digest(csrf.encode(), login.csrf.encode()):
            raise CsrfRefused()
        return login

    async def logout(self, cookie: str | None) -> None:
        if cookie:
            await self.repo.logout(cookie)

    async def read(self, key: Hashable) -> Any:
        """The snapshot of a page's topic: a page name, or ("tasks", TaskFilter)."""
        if key == "overview":
            return await self.repo.overview()
        if key == "workers":
            return await self.repo.workers()
        if key == "owners":
            return OwnersPage(await self.repo.owners(), await self.repo.tokens())
        if key == "batches":
            return await self.repo.batches()
        if isinstance(key, tuple) and key[0] == "tasks" and isinstance(key[1], TaskFilter):
            return await self.repo.tasks(key[1])
        raise InvalidRequest(f"no such dashboard page: {key!r}")

    async def task(self, task_id: UUID) -> Task:
        """Any owner's task; raises TaskNotFound."""
        return await self.tasks.get(task_id)

    def task_events(self, task_id: UUID) -> AsyncIterator[Event]:
        """The task's status changes and chunks, live (see WaitService.events)."""
        return self.waits.events(task_id)

    async def cancel_task(self, task_id: UUID) -> Task:
        """Cancel any owner's task as its owner would; raises TaskNotFound,
        InvalidTransition (it ended otherwise)."""
        task = await self.tasks.get(task_id)
        return await self.tasks.cancel(task_id, task.owner_id, "cancelled from the dashboard")

    async def cancel_batch(self, batch_id: str) -> Batch:
        """Cancel any owner's batch as its owner would; raises BatchNotFound,
        InvalidTransition."""
        owner = await self.repo.owner_of("batch", batch_id)
        if owner is None:
            raise BatchNotFound(f"batch {batch_id!r} not found")
        return await self.batches.cancel(batch_id, owner)

    async def revoke_token(self, token_id: UUID) -> None:
        """Revoke through AdminService (every replica drops it); raises TokenNotFound."""
        await self.admin.revoke_token(token_id)

    async def file(self, file_id: str) -> tuple[StoredFile, AsyncIterator[bytes]]:
        """Any owner's file and its bytes; raises FileNotFound."""
        owner = await self.repo.owner_of("file", file_id)
        if owner is None:
            raise FileNotFound(f"file {file_id!r} not found")
        stored = await self.files.get(file_id, owner)
        return stored, self.files.content(stored.id)
