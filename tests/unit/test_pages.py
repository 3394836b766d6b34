"""The dashboard's rendering helpers: durations, charts, the text of a chunk or an answer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from inferq.api.dashboard import chunk_text, response_text
from inferq.api.pages import bar_heights, chart, duration, render
from inferq.domain.dashboard import MinuteSample


def test_durations_read_like_a_clock() -> None:
    assert [duration(s) for s in (None, 0.4, 59, 61, 3700, 90000)] == [
        "—", "0 s", "59 s", "1 m 1 s", "1 h 1 m", "1 d 1 h",
    ]  # fmt: skip


def test_a_chart_has_one_line_per_pool_and_zero_for_missing_minutes() -> None:
    now = datetime(2026, 1, 1, 12, 30, 20, tzinfo=UTC)
    minute = now.replace(second=0)
    samples = [
        MinuteSample(minute - timedelta(minutes=2), "a", 4, 0, 10, 0),
        MinuteSample(minute, "a", 8, 1, 20, 1),
        MinuteSample(minute, "b", 2, 0, 5, 0),
        MinuteSample(minute - timedelta(hours=2), "old", 99, 0, 0, 0),  # outside the hour
    ]
    c = chart("Pending", samples, "pending", now)
    assert [line.name for line in c.lines] == ["a", "b"]
    assert c.peak == 8 and [line.last for line in c.lines] == [8, 2]
    a_points = c.lines[0].points.split()
    assert len(a_points) == 60
    # The highest value touches the top margin, a missing minute sits on the axis.
    assert a_points[-1].endswith(",4.0") and a_points[-2].endswith(",156.0")


def test_bars_scale_to_the_tallest_hour() -> None:
    assert bar_heights([0, 5, 10]) == [0, 12, 24]
    assert bar_heights([0, 0]) == [0, 0]


def test_the_text_of_chunks_and_answers() -> None:
    assert chunk_text('{"choices": [{"index": 0, "delta": {"content": "hi"}}]}') == "hi"
    assert chunk_text('{"choices": [{"index": 0, "text": " there"}]}') == " there"
    assert chunk_text('{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}') == ""
    assert chunk_text("not json") == "not json"
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}
    assert response_text(answer) == "ok"
    assert response_text({"weird": 1}) == '{"weird":1}'


def test_templates_escape_what_users_wrote() -> None:
    html = render("live/tasks.html", data=[])
    assert "No task matches" in html
    login = render("login.html", error="<script>alert(1)</script>")
    assert "<script>alert" not in login and "&lt;script&gt;" in login
