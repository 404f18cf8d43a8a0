"""The overview's chart: events per minute as an inline SVG drawn on the server, so it shows
with JavaScript off and needs no charting library."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 28
SERIES = (("accepted", "Accepted"), ("delivered", "Delivered"), ("failed", "Failed (retried or dead)"))


@dataclass(frozen=True)
class Line:
    key: str
    label: str
    points: str
    total: int


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    lines: list[Line]
    # (y, label) of the horizontal grid lines; (x, label) of the time ticks.
    grid: list[tuple[float, str]]
    ticks: list[tuple[float, str]]
    plot: tuple[float, float, float, float]  # left, top, right, bottom


def nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (at least 1)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def throughput_chart(minutes: list[dict[str, Any]]) -> Chart:
    rows = [{**m, "failed": m["retried"] + m["dead"]} for m in minutes]
    top = nice_ceiling(max([r[key] for r in rows for key, _ in SERIES] + [1]))
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM
    span = max(len(rows) - 1, 1)

    def x(i: int) -> float:
        return round(LEFT + (right - LEFT) * i / span, 1)

    def y(v: int) -> float:
        return round(bottom - (bottom - TOP) * v / top, 1)

    lines = [Line(key, label, " ".join(f"{x(i)},{y(r[key])}" for i, r in enumerate(rows)),
                  sum(r[key] for r in rows)) for key, label in SERIES]
    # Whole-number steps, evenly spaced: fifths of 5, 10, 20, 50...; ones under 5.
    steps = 5 if top >= 5 else top
    grid = [(y(top * k // steps), f"{top * k // steps:,}") for k in range(steps + 1)]
    every = max(1, len(rows) // 6)
    ticks = [(x(i), rows[i]["minute"][11:16]) for i in range(0, len(rows), every)]
    return Chart(WIDTH, HEIGHT, lines, grid, ticks, (LEFT, TOP, right, bottom))
