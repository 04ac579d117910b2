"""What a saved matplotlib figure showed, for tests of the PNGs fedmed draws."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from matplotlib.figure import Figure


@dataclass
class Saved:
    """What a saved figure showed: each visible panel's title and line count, and whether
    the figure's legend overlaps any visible panel (measured as drawn, before it closes)."""

    titles: list[str]
    lines: list[int]
    axes: int
    legend_overlaps: list[str]


def spy_on_saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[Saved]:
    """Record every figure saved from now on, as it was drawn (fedmed closes it after)."""
    saved: list[Saved] = []
    savefig = Figure.savefig

    def spy(fig: Figure, *args: Any, **kwargs: Any) -> None:
        savefig(fig, *args, **kwargs)
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        shown = [ax for ax in fig.axes if ax.get_visible()]
        [legend] = fig.legends
        box = legend.get_window_extent(renderer)
        saved.append(
            Saved(
                titles=[ax.get_title() for ax in shown],
                lines=[len(ax.get_lines()) for ax in shown],
                axes=len(fig.axes),
                legend_overlaps=[
                    ax.get_title() for ax in shown if box.overlaps(ax.get_window_extent(renderer))
                ],
            )
        )

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def assert_one_clear_panel_per_site(saved: Saved, sites: list[str]) -> None:
    """One visible panel per site, titled with its name, with its own curves; the figure's
    legend lies outside every panel (it used to sit on the curves)."""
    assert saved.titles == sites
    assert all(saved.lines)
    assert saved.legend_overlaps == []
