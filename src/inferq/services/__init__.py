"""The use cases of a replica, between the HTTP layer and the repositories.

``Services`` is what the API is given: one instance of each service, built once per process
by the composition root (inferq.daemon) around the repositories it built.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferq.metrics import Metrics
from inferq.services.admin import AdminService
from inferq.services.auth import Authenticator
from inferq.services.batches import BatchService, FileService
from inferq.services.claims import ClaimService
from inferq.services.completions import CompletionService
from inferq.services.dashboard import DashboardService
from inferq.services.drain import Drain
from inferq.services.health import HealthService
from inferq.services.quotas import QuotaService
from inferq.services.tasks import TaskService
from inferq.services.usage import UsageService
from inferq.settings import Settings

__all__ = [
    "AdminService",
    "Authenticator",
    "BatchService",
    "ClaimService",
    "CompletionService",
    "DashboardService",
    "Drain",
    "FileService",
    "HealthService",
    "QuotaService",
    "Services",
    "TaskService",
    "UsageService",
]


@dataclass(frozen=True, slots=True)
class Services:
    """Everything a route may call."""

    settings: Settings
    metrics: Metrics
    drain: Drain
    auth: Authenticator
    tasks: TaskService
    completions: CompletionService
    claims: ClaimService
    admin: AdminService
    health: HealthService
    files: FileService
    batches: BatchService
    dashboard: DashboardService
    quotas: QuotaService
    usage: UsageService
