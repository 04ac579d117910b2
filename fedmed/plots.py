"""The one chart set-up behind every PNG fedmed draws (accuracy, epsilon, audit statements).

matplotlib is imported only when a chart is drawn, with its headless Agg backend: a site's
process never pays for the import, and no chart needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _new_figure(rows: int, columns: int, **options: Any) -> tuple[Figure, list[Axes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(rows, columns, squeeze=False, **options)
    return fig, list(grid.flat)


def _style(ax: Axes, integer_x: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _close(fig: Figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


@contextmanager
def chart(
    target: Path | IO[bytes],
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    integer_x: bool = False,
    figsize: tuple[float, float] = (6, 4),
    dpi: int = 120,
    legend: dict[str, Any] | None = None,
) -> Iterator[Axes]:
    """Yield fresh axes to draw on; afterwards label them, add a light grid and the legend
    (``legend``: its options) and save the figure as a PNG to ``target`` (a path or a binary
    buffer). ``integer_x``: rounds on the x axis, only whole ticks."""
    fig, [ax] = _new_figure(1, 1, figsize=figsize, dpi=dpi)
    try:
        yield ax
        _style(ax, integer_x)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title is not None:
            ax.set_title(title)
        ax.legend(**(legend or {}))
        fig.tight_layout()
        fig.savefig(target, dpi=dpi, format="png")
    finally:
        _close(fig)


@contextmanager
def panels(
    target: Path | IO[bytes],
    titles: Sequence[str],
    *,
    xlabel: str,
    ylabel: str,
    integer_x: bool = False,
    columns: int = 2,
    dpi: int = 110,
) -> Iterator[list[Axes]]:
    """Yield one small panel per title (same axes ranges), then save them as one PNG.

    For one curve family per site: on shared axes, sites calibrated to the same target draw
    the same curve and hide each other. The legend (the first panel's labels) goes once,
    above the panels, where it covers no curve.
    """
    columns = max(1, min(columns, len(titles)))
    rows = max(1, math.ceil(len(titles) / columns))
    height = 2.4 * rows + 0.9  # inches: the panels, the axis labels and the legend's row
    fig, axes = _new_figure(
        rows, columns, figsize=(4.2 * columns, height), dpi=dpi, sharex=True, sharey=True
    )
    try:
        yield axes[: len(titles)]
        for ax, title in zip(axes, titles, strict=False):
            _style(ax, integer_x)
            ax.set_title(title, fontsize=9)
        for ax in axes[len(titles) :]:
            ax.set_visible(False)
        fig.supxlabel(xlabel, fontsize=9)
        fig.supylabel(ylabel, fontsize=9)
        handles, labels = axes[0].get_legend_handles_labels()
        if labels:
            fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8,
                       frameon=False)  # fmt: skip
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))  # the legend's row stays free
        fig.savefig(target, dpi=dpi, format="png")
    finally:
        _close(fig)


@contextmanager
def image_grid(
    target: Path | IO[bytes],
    rows: int,
    columns: int,
    *,
    title: str | None = None,
    cell: float = 1.6,
    dpi: int = 110,
) -> Iterator[list[list[Axes]]]:
    """Yield a ``rows`` x ``columns`` grid of axes for images (no ticks, no frame), then save
    it as one PNG. Cells left empty are hidden."""
    height = cell * rows + (0.5 if title else 0.1)
    fig, flat = _new_figure(rows, columns, figsize=(cell * columns + 0.6, height), dpi=dpi)
    grid = [flat[r * columns : (r + 1) * columns] for r in range(rows)]
    try:
        yield grid
        for ax in flat:
            ax.set_xticks([])
            ax.set_yticks([])
            if not ax.has_data():
                ax.set_visible(False)
        if title is not None:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(target, dpi=dpi, format="png")
    finally:
        _close(fig)


def ranked_bars(
    names: Sequence[str], values: Sequence[float], *, title: str, xlabel: str, signed: bool
) -> bytes:
    """Horizontal bars, the first name on top, as PNG bytes; ``signed``: red bars raise the
    score, blue ones lower it."""
    import io

    buffer = io.BytesIO()
    names, values = list(names)[::-1], list(values)[::-1]
    with chart(buffer, xlabel=xlabel, ylabel="", title=title, figsize=(6.4, 1.2 + 0.3 * len(names)),
               legend={"loc": "lower right", "fontsize": 7}) as ax:  # fmt: skip
        if signed:
            for color, label, up in (("C3", "raises the score", True), ("C0", "lowers it", False)):
                shown = [v if (v > 0) == up else 0.0 for v in values]
                ax.barh(names, shown, color=color, label=label)
            ax.axvline(0, color="black", lw=0.8)
        else:
            ax.barh(names, values, color="C0", label="feature")
    return buffer.getvalue()
