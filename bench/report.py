"""Figures, their targets, and the one table ``bench`` prints (plain text or Markdown)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Target:
    """``ratio >= threshold`` (against the ceiling), or ``value >= / <= threshold``."""

    kind: str  # "ratio", "min" or "max"
    threshold: float
    unit: str = ""
    stretch: bool = False

    def text(self) -> str:
        label = "stretch " if self.stretch else ""
        if self.kind == "ratio":
            return f"{label}ratio >= {self.threshold:g}"
        sign = ">=" if self.kind == "min" else "<="
        return f"{label}{sign} {self.threshold:,g} {self.unit}".rstrip()


@dataclass
class Figure:
    backend: str
    name: str  # "R1"
    what: str  # what is measured, with its unit
    values: list[float] = field(default_factory=list)  # one per run
    ceilings: list[float] = field(default_factory=list)  # one per run, same order
    target: Target | None = None
    note: str = ""
    error: str = ""  # the figure could not be measured

    @property
    def value(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def ceiling(self) -> float | None:
        return statistics.median(self.ceilings) if self.ceilings else None

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.ceiling:
            return None
        return self.value / self.ceiling

    def verdict(self) -> str:
        if self.error:
            return "ERROR"
        if self.target is None:
            return "-"
        measured = self.ratio if self.target.kind == "ratio" else self.value
        if measured is None:
            return "ERROR"
        ok = measured >= self.target.threshold if self.target.kind in ("ratio", "min") \
            else measured <= self.target.threshold
        return "PASS" if ok else "FAIL"


COLUMNS = ("backend", "figure", "what", "value", "ceiling", "ratio", "target", "result", "runs / notes")


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"


def _runs(figure: Figure) -> str:
    parts = []
    if figure.values:
        runs = "/".join(_number(v) for v in figure.values)
        if figure.ceilings:
            runs += " vs " + "/".join(_number(c) for c in figure.ceilings)
        parts.append(runs)
    parts += [text for text in (figure.note, figure.error) if text]
    return "; ".join(parts)


def cells(figure: Figure) -> tuple[str, ...]:
    ratio = figure.ratio
    return (figure.backend, figure.name, figure.what, _number(figure.value), _number(figure.ceiling),
            "-" if ratio is None else f"{ratio:.2f}", figure.target.text() if figure.target else "-",
            figure.verdict(), _runs(figure))


def text_table(figures: Sequence[Figure]) -> str:
    rows = [COLUMNS, *(cells(f) for f in figures)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    numeric = {3, 4, 5}
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) if i in numeric and n else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(figures: Sequence[Figure]) -> str:
    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"

    align = ["---", "---", "---", "---:", "---:", "---:", "---", "---", "---"]
    return "\n".join([line(COLUMNS), line(align), *(line(cells(f)) for f in figures)])
