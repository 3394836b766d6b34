"""Pure domain types: tasks, statuses and the transition table (no I/O)."""

from inferq.domain.task import TERMINAL, TRANSITIONS, Task, TaskStatus, transition_allowed

__all__ = ["TERMINAL", "TRANSITIONS", "Task", "TaskStatus", "transition_allowed"]
