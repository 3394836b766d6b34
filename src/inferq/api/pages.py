"""The dashboard's rendering: the Jinja2 environment of the package's templates, the filters
the templates use, and the charts, drawn as inline SVG on the server (no charting library,
nothing fetched by the browser but the page, one stylesheet and one script)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from typing import Any

import orjson
from jinja2 import Environment, PackageLoader, select_autoescape

from inferq.domain.dashboard import MinuteSample

STATIC = resources.files("inferq.api") / "static"

CHART_W, CHART_H = 600, 160
PALETTE_SIZE = 6


def duration(seconds: float | None) -> str:
    """A short human duration: 42 s, 3 m 5 s, 2 h 10 m, 3 d 4 h."""
    if seconds is None:
        return "—"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} m {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} m"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def clock(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "—"


def pretty_json(value: Any) -> str:
    if value is None:
        return ""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


@dataclass(frozen=True, slots=True)
class Line:
    name: str
    points: str  # the SVG polyline's points
    last: int
    css: str


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    lines: list[Line]
    peak: int
    width: int = CHART_W
    height: int = CHART_H


def chart(
    title: str, samples: Sequence[MinuteSample], field: str, now: datetime, minutes: int = 60
) -> Chart:
    """One line per pool of ``field`` over the last ``minutes`` (a missing minute is 0)."""
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    series: dict[str, list[int]] = {}
    for sample in samples:
        index = int((sample.minute - start).total_seconds() // 60)
        if 0 <= index < minutes:
            series.setdefault(sample.pool_name, [0] * minutes)[index] = getattr(sample, field)
    peak = max((max(v) for v in series.values()), default=0)
    top = max(1, peak)
    step = CHART_W / (minutes - 1)
    lines = []
    for n, (name, values) in enumerate(sorted(series.items())):
        points = " ".join(
            f"{i * step:.1f},{CHART_H - 4 - (CHART_H - 8) * v / top:.1f}"
            for i, v in enumerate(values)
        )
        lines.append(Line(name, points, values[-1], f"series-{n % PALETTE_SIZE}"))
    return Chart(title, lines, peak)


def bar_heights(values: Sequence[int], height: int = 24) -> list[int]:
    """Heights of a tiny bar chart (owners' hours), the tallest ``height``."""
    top = max(values, default=0)
    return [math.ceil(height * v / top) if top else 0 for v in values]


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("inferq.api", "templates"),
        autoescape=select_autoescape(("html",), default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(duration=duration, clock=clock, pretty_json=pretty_json)
    env.globals.update(chart=chart, bar_heights=bar_heights)
    return env


ENV = environment()


def render(name: str, **context: Any) -> str:
    """Render the template ``name`` with ``context``."""
    return ENV.get_template(name).render(**context)
