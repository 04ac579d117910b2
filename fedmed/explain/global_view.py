"""What the coordinator can explain from the global model alone, without any record.

A linear model's weights are a statement about features, not patients: each weight is the
change of the logit margin per site standard deviation of a value, for a missing value, or
for one category. An image model's weights explain no patient without images, so for a CNN
the coordinator's report says where the explanations are: at the sites.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from fedmed.explain.linear import MarginModel, feature_effects, features_of, ranked
from fedmed.models.card import ModelCard
from fedmed.pages import md_table, png_data_uri, to_html
from fedmed.plots import ranked_bars

GLOBAL_REPORT = "global_explanation"


def write_global_explanation(model: nn.Module, card: ModelCard, out: Path) -> Path:
    """``global_explanation.md/.html/.json`` (+ PNG for a linear model) in the run folder."""
    parts = [
        "# The global model, explained from its weights alone",
        f"model={card.model}, dataset={card.dataset}. The coordinator holds no patient "
        "record; nothing below describes a patient.",
    ]
    numbers: dict = {"model": card.model, "dataset": card.dataset}
    figure: bytes | None = None
    if card.columns is None:
        parts.append(
            "An image model's weights explain no patient without images: its attribution "
            "maps are computed at each site on that site's own images (`fedmed explain RUN` "
            "in a simulation, `fedmed site explain` at a hospital), and stay there."
        )
    else:
        margin = MarginModel.of(model)
        columns = card.columns
        features = features_of(columns)
        effects = ranked(features, feature_effects(margin.weights, columns))
        weights = ranked([c.name for c in columns], margin.weights)
        figure = ranked_bars(
            [f for _, f, _ in effects],
            [e for _, _, e in effects],
            signed=False,
            title="global model: features by effect",
            xlabel="effect on the logit margin (from the weights)",
        )
        parts += [
            "Each weight is the change of the logit margin (class 1 over class 0) per site "
            "standard deviation of a value (each site standardises with its own training "
            "records), for a missing value, or for a category. A feature's effect: its "
            "value weight's magnitude, or the spread of its category weights (largest minus "
            "smallest); missing-value indicators are listed with every weight below (an "
            "indicator that no site's records set keeps its initial weight).",
            f"![feature effects]({GLOBAL_REPORT}.png)",
            md_table(
                ["rank", "feature", "effect"], [[str(r), f, f"{e:.3f}"] for r, f, e in effects]
            ),
            "### Every weight",
            md_table(
                ["rank", "input column", "weight"],
                [[str(r), c, f"{w:+.3f}"] for r, c, w in weights],
            ),
        ]
        numbers |= {
            "bias": margin.bias,
            "weights": {c: w for _, c, w in weights},
            "feature_effects": {f: e for _, f, e in effects},
        }
    out.mkdir(parents=True, exist_ok=True)
    markdown = "\n\n".join(parts) + "\n"
    (out / f"{GLOBAL_REPORT}.md").write_text(markdown)
    if figure is not None:
        (out / f"{GLOBAL_REPORT}.png").write_bytes(figure)
        markdown = markdown.replace(f"]({GLOBAL_REPORT}.png)", f"]({png_data_uri(figure)})")
    html = out / f"{GLOBAL_REPORT}.html"
    html.write_text(to_html(markdown, "The global model, explained"))
    (out / f"{GLOBAL_REPORT}.json").write_text(json.dumps(numbers, indent=2) + "\n")
    return html
