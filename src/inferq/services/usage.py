"""UsageService (``GET /v1/usage``, ``inferq usage``) and UsageMeter (Prometheus counters).

- The totals per hour, owner, token and model are the database's (inferq.usage_hour, written
  by the completion's own transaction): exact, and counted once per task, by the attempt that
  completed it. A client sees its own owner's rows; an admin token sees every owner's, or
  one owner's with ``owner``.
- The counters ``inferq_prompt_tokens_total`` and ``inferq_completion_tokens_total`` are this
  replica's own, labelled by model and lane, never by owner (unbounded cardinality). They
  count the completions this replica made from workers' outcomes (a repeated outcome, or a
  stale attempt's refused one, counts nothing), read from the answer's ``usage``.
  The model label is the task's registry name (the answer's ``model`` for batched outcomes,
  whose rows are not read back), at most MAX_MODEL_LABELS per replica, then ``_other``; the
  lane label is the task's lane (three values).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import Counter

from inferq.db.usage import UsageRepository
from inferq.domain.quotas import UsageRow
from inferq.domain.records import ApiToken, Finished, Outcome
from inferq.domain.task import Task, TaskStatus
from inferq.errors import Forbidden, InvalidRequest
from inferq.metrics import Metrics

MAX_MODEL_LABELS = 100
OTHER_MODELS = "_other"
DEFAULT_LANE = "default"
MAX_ROWS = 10_000
MAX_RANGE = timedelta(days=366)


class UsageService:
    """The usage totals, scoped to the caller."""

    def __init__(self, usage: UsageRepository) -> None:
        self.usage = usage

    async def report(
        self,
        token: ApiToken,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        owner: str | None = None,
        limit: int = 1000,
    ) -> list[UsageRow]:
        """Rows of the hours in [start, end) (default: the last 24 hours), oldest first.
        Raises Forbidden when a client names another owner, InvalidRequest for a bad range."""
        if token.role != "admin":
            if owner not in (None, token.owner_id):
                raise Forbidden("only an admin token may read another owner's usage")
            owner = token.owner_id
        end = _utc(end) if end is not None else _next_hour(datetime.now(UTC))
        start = _utc(start) if start is not None else end - timedelta(hours=24)
        if not start < end or end - start > MAX_RANGE:
            raise InvalidRequest("`from` must be before `to`, at most 366 days apart", param="from")
        if not 1 <= limit <= MAX_ROWS:
            raise InvalidRequest(f"limit must be between 1 and {MAX_ROWS}", param="limit")
        return await self.usage.totals(owner, start, end, limit)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _next_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)


def _count(value: Any) -> int:
    """A usage count as the database reads it (inferq.usage_count): else 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return 0
    return min(int(value), 2**31 - 1)


def counted(result: Finished | Exception) -> bool:
    """Whether an outcome's result is a completion made by this call (not a repeat, not a
    refusal such as a stale attempt's LeaseLost)."""
    return isinstance(result, Finished) and result.status is TaskStatus.COMPLETED and result.fresh


class UsageMeter:
    """This replica's token counters; see the module docstring."""

    def __init__(self, metrics: Metrics) -> None:
        self.prompt = Counter(
            "inferq_prompt_tokens",
            "Prompt tokens of the tasks completed through this replica",
            ["model", "lane"],
            registry=metrics.registry,
        )
        self.completion = Counter(
            "inferq_completion_tokens",
            "Completion tokens of the tasks completed through this replica",
            ["model", "lane"],
            registry=metrics.registry,
        )
        self._models: set[str] = set()

    def record(self, model: str | None, usage: Any, lane: str = DEFAULT_LANE) -> None:
        """Count one completed task's ``usage`` (OpenAI's object; anything else counts 0)."""
        if not isinstance(usage, dict):
            return
        label = self._label(model or "")
        self.prompt.labels(label, lane).inc(_count(usage.get("prompt_tokens")))
        self.completion.labels(label, lane).inc(_count(usage.get("completion_tokens")))

    def completed(self, task: Task) -> None:
        """A task one worker call completed (its row as the database stored it)."""
        if task.status is TaskStatus.COMPLETED:
            usage = {"prompt_tokens": task.prompt_tokens or 0}
            usage["completion_tokens"] = task.completion_tokens or 0
            self.record(task.llm_name or task.model, usage, task.lane)

    def outcomes(self, items: Sequence[Outcome], results: Sequence[Finished | Exception]) -> None:
        """The outcomes of one batched call, with what the database made of each."""
        for item, result in zip(items, results, strict=False):
            if isinstance(result, Finished) and counted(result):
                response = item.response if isinstance(item.response, dict) else {}
                self.record(str(response.get("model") or ""), response.get("usage"), result.lane)

    def _label(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) < MAX_MODEL_LABELS:
            self._models.add(model)
            return model
        return OTHER_MODELS
