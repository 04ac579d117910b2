"""Per-site panels: sites whose curves coincide stay visible, and the legend covers no curve."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fedmed.plots import panels
from tests.figures import Saved, assert_one_clear_panel_per_site

SITES = ["cleveland", "hungary", "switzerland", "va"]


def test_identical_curves_get_a_panel_each_and_the_legend_stays_off_them(
    tmp_path: Path, saved_figures: list[Saved]
) -> None:
    target = tmp_path / "epsilon.png"
    with panels(target, SITES, xlabel="round", ylabel="epsilon", integer_x=True) as axes:
        for ax in axes:  # the same calibrated curve at every site
            ax.plot([1, 2, 3], [0.4, 0.7, 0.99], "o-", label="lifetime epsilon")
            ax.axhline(1.0, ls="--", label="budget")
    assert target.stat().st_size > 10_000
    [saved] = saved_figures
    assert_one_clear_panel_per_site(saved, SITES)


def test_an_odd_number_of_sites_leaves_the_spare_panel_hidden(
    saved_figures: list[Saved],
) -> None:
    with panels(io.BytesIO(), SITES[:3], xlabel="x", ylabel="y") as axes:
        assert len(axes) == 3
        for ax in axes:
            ax.plot([0, 1], [0, 1], label="curve")
    [saved] = saved_figures
    assert saved.axes == 4  # a 2 x 2 grid; the fourth panel hidden
    assert_one_clear_panel_per_site(saved, SITES[:3])


def test_a_failure_while_drawing_saves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "never.png"
    with pytest.raises(ZeroDivisionError), panels(target, SITES, xlabel="x", ylabel="y"):
        _ = 1 / 0
    assert not target.exists()
