"""The overview's chart (receiver/admin/chart.py): the scale and its grid."""

from __future__ import annotations

import pytest

from receiver.admin.chart import nice_ceiling, throughput_chart


def minutes(values: list[int]) -> list[dict[str, object]]:
    return [{"minute": f"2026-12-02T20:{i:02d}:00.000Z", "accepted": v, "delivered": 0, "retried": 0, "dead": 0}
            for i, v in enumerate(values)]


@pytest.mark.parametrize("value, ceiling", [(0, 1), (1, 1), (3, 5), (7, 10), (11, 20), (999, 1000), (4001, 5000)])
def test_the_scale_is_the_next_1_2_or_5(value: int, ceiling: int) -> None:
    assert nice_ceiling(value) == ceiling


@pytest.mark.parametrize("peak, labels", [(3, ["0", "1", "2", "3", "4", "5"]), (7, ["0", "2", "4", "6", "8", "10"]),
                                          (2, ["0", "1", "2"]), (0, ["0", "1"]),
                                          (4321, ["0", "1,000", "2,000", "3,000", "4,000", "5,000"])])
def test_grid_lines_are_whole_evenly_spaced_steps(peak: int, labels: list[str]) -> None:
    chart = throughput_chart(minutes([0] * 59 + [peak]))
    assert [label for _, label in chart.grid] == labels
    ys = [y for y, _ in chart.grid]
    gaps = {round(a - b, 1) for a, b in zip(ys, ys[1:])}
    assert max(gaps) - min(gaps) <= 0.2  # evenly spaced (rounding to 0.1 px aside)
    accepted = next(line for line in chart.lines if line.key == "accepted")
    assert accepted.total == peak and len(accepted.points.split()) == 60
