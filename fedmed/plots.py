"""The one chart set-up behind every PNG fedmed draws (accuracy, epsilon, audit statements).

matplotlib is imported only when a chart is drawn, with its headless Agg backend: a site's
process never pays for the import, and no chart needs a display.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
    try:
        yield ax
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title is not None:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(**(legend or {}))
        fig.tight_layout()
        fig.savefig(target, dpi=dpi, format="png")
    finally:
        plt.close(fig)
