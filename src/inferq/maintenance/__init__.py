"""Maintenance sweeps (GC, lease rescue, session reaping) and the loops that run them."""

from inferq.maintenance.collector import Collected, Collector
from inferq.maintenance.leadership import Leadership
from inferq.maintenance.reaper import SessionReaper
from inferq.maintenance.rescuer import Rescuer
from inferq.maintenance.rollup import QueueRollup
from inferq.maintenance.runner import Maintenance, SweepLoop

__all__ = [
    "Collected",
    "Collector",
    "Leadership",
    "Maintenance",
    "QueueRollup",
    "Rescuer",
    "SessionReaper",
    "SweepLoop",
]
