"""One site's explanations of its models on its own records, written into its own folder.

Everything here reads the site's records and writes files at the site; nothing is returned
to a caller that sends it. The report holds patient-level detail (individual patients'
attributions and images), so it says so and stays inside the hospital.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fedmed.data.tabular import InputColumn
from fedmed.data.types import SiteData
from fedmed.errors import FedMedError
from fedmed.explain import images as image_maps
from fedmed.explain.linear import MarginModel, by_feature, features_of, ranked
from fedmed.explain.outcomes import OUTCOMES, by_outcome
from fedmed.pages import md_table, png_data_uri, to_html
from fedmed.plots import image_grid, ranked_bars

REPORT = "explanation"
TOP_FEATURES = 10


@dataclass(frozen=True)
class SiteModels:
    """What a site explains: its data, the global model, its personal model (if any) and the
    operating point the run chose (the logit margin at which a patient is called positive)."""

    site: str
    data: SiteData
    models: dict[str, nn.Module]
    threshold: float
    origin: str  # where the global model came from, for the report
    records: tuple[int, ...] = ()  # test records to show (default: chosen by outcome)


@dataclass
class Written:
    """The report's Markdown parts and its figures (file name -> PNG bytes)."""

    parts: list[str]
    figures: dict[str, bytes]
    numbers: dict[str, Any]


def write_site_explanation(site: SiteModels, out: Path, per_outcome: int = 2) -> Path:
    """Explain every model of ``site`` and write ``explanation.md/.html/.json`` and the PNGs
    into ``out`` (the site's folder); returns the HTML report's path."""
    if site.data.preprocessing is not None:
        written = [_linear(site, name, model) for name, model in site.models.items()]
    else:
        written = [_images(site, name, model, per_outcome) for name, model in site.models.items()]
    head = [
        f"# Explanations at site {site.site}",
        f"Computed at **{site.site}** on its own {len(site.data.y_test)} test records, with "
        f"the model{'s' if len(site.models) > 1 else ''} {', '.join(site.models)} "
        f"(global model: `{site.origin}`). **Nothing here was sent anywhere**: these files "
        "describe individual patients and stay inside the hospital.",
        f"Operating point: a patient is called positive when logit[1] - logit[0] >= "
        f"{site.threshold:g} (the run's threshold).",
    ]
    out.mkdir(parents=True, exist_ok=True)
    figures = {k: v for w in written for k, v in w.figures.items()}
    for file, png in figures.items():
        (out / file).write_bytes(png)
    parts = [*head, *(p for w in written for p in w.parts)]
    markdown = "\n\n".join(parts) + "\n"
    (out / f"{REPORT}.md").write_text(markdown)
    inline = markdown
    for file, png in figures.items():
        inline = inline.replace(f"]({file})", f"]({png_data_uri(png)})")
    html = out / f"{REPORT}.html"
    html.write_text(to_html(inline, f"Explanations at site {site.site}"))
    numbers = {
        "site": site.site,
        "threshold": site.threshold,
        "test_records": len(site.data.y_test),
        "models": {w.numbers["model"]: w.numbers for w in written},
    }
    (out / f"{REPORT}.json").write_text(json.dumps(numbers, indent=2) + "\n")
    return html


def _requested(site: SiteModels) -> tuple[int, ...]:
    """The test records asked for, each checked against the site's test split."""
    count = len(site.data.y_test)
    bad = [r for r in site.records if not 0 <= r < count]
    if bad:
        raise FedMedError(f"--records {bad}: its test records are numbered 0..{count - 1}")
    return site.records


# ----------------------------------------------------------------------------- linear
def _linear(site: SiteModels, name: str, model: nn.Module) -> Written:
    data, prep = site.data, site.data.preprocessing
    assert prep is not None
    columns = prep.columns()
    margin = MarginModel.of(model)
    reference = data.x_train.astype(np.float64).mean(axis=0)  # the site's mean record
    x = data.x_test.astype(np.float64)
    attributions = margin.attributions(x, reference)
    change = margin.margins(x) - margin.margins(reference[None, :])
    completeness = float(np.abs(attributions.sum(axis=1) - change).max())
    per_feature = by_feature(attributions, columns)
    features = features_of(columns)
    importance = np.abs(per_feature).mean(axis=0)
    order = ranked(features, importance)
    chart_file = f"{name}_features.png"
    figures = {
        chart_file: _bars(
            order,
            f"{site.site}: {name} model",
            "mean |attribution| on the site's test patients (logit margin)",
        )
    }
    rows = [
        [str(rank), feature, f"{score:.3f}", _weight_summary(margin.weights, columns, feature)]
        for rank, feature, score in order
    ]
    parts = [
        f"## The {name} model: what drives its scores at {site.site}",
        "Each patient's score (logit margin) minus the score of the site's mean patient "
        "splits exactly into one attribution per feature: weight x (value - the site's mean "
        f"value), summed over the feature's columns. Largest error of that sum over the test "
        f"patients: {completeness:.2e}.",
        f"![{name} model: features at {site.site}]({chart_file})",
        md_table(
            ["rank", "feature", "mean abs attribution", "weights (per site SD / category)"], rows
        ),
    ]
    scores = margin.margins(x)
    chosen = by_outcome(scores, data.y_test, site.threshold, 1, _requested(site))
    patients = []
    for outcome, picked in chosen.items():
        for row in picked:
            file = f"{name}_patient_{row}.png"
            contributions = ranked(features, per_feature[row])
            figures[file] = _bars(
                contributions,
                f"test record {row}: {outcome}",
                "attribution to the logit margin",
                signed=True,
            )
            values = _recorded(prep, x[row], columns)
            parts += [
                f"### Test record {row} ({outcome}): score {scores[row]:+.3f}, site mean "
                f"patient {margin.margins(reference[None, :])[0]:+.3f}",
                f"![test record {row}]({file})",
                md_table(
                    ["feature", "recorded", "attribution"],
                    [[f, values[f], f"{a:+.3f}"] for _, f, a in contributions[:TOP_FEATURES]],
                ),
            ]
            patients.append(
                {
                    "record": row,
                    "outcome": outcome,
                    "score": float(scores[row]),
                    "attributions": dict(zip(features, per_feature[row].tolist(), strict=True)),
                }
            )
    numbers = {
        "model": name,
        "kind": "linear",
        "completeness_error": completeness,
        "feature_importance": {f: float(s) for _, f, s in order},
        "patients": patients,
    }
    return Written(parts, figures, numbers)


def _bars(
    items: list[tuple[int, str, float]], title: str, xlabel: str, signed: bool = False
) -> bytes:
    top = items[:TOP_FEATURES]
    return ranked_bars(
        [n for _, n, _ in top], [v for _, _, v in top], title=title, xlabel=xlabel, signed=signed
    )


def _weight_summary(weights: np.ndarray, columns: tuple[InputColumn, ...], feature: str) -> str:
    own = [(c, w) for c, w in zip(columns, weights, strict=True) if c.feature == feature]
    return ", ".join(
        f"{'per SD' if c.kind == 'value' else c.name.removeprefix(feature).strip(' :=')} {w:+.2f}"
        for c, w in own
    )


def _recorded(prep: Any, row: np.ndarray, columns: tuple[InputColumn, ...]) -> dict[str, str]:
    """Each feature's value as the site recorded it (a missing value says so)."""
    shown: dict[str, str] = {}
    for j, column in enumerate(columns):
        if column.kind == "value":
            shown.setdefault(column.feature, f"{round(prep.recorded_value(row, j), 6) + 0.0:.4g}")
        elif column.kind == "category" and row[j] > 0.5:
            shown[column.feature] = f"{column.category:g}"
    for j, column in enumerate(columns):
        if column.kind == "missing" and row[j] > 0.5:
            shown[column.feature] = "missing"
    return {c.feature: shown.get(c.feature, "none of its categories") for c in columns}


# ----------------------------------------------------------------------------- images
def _images(site: SiteModels, name: str, model: nn.Module, per_outcome: int) -> Written:
    data = site.data
    scores = image_maps.margins(model, data.x_test)
    chosen = by_outcome(scores, data.y_test, site.threshold, per_outcome, _requested(site))
    rows = [r for outcome in OUTCOMES for r in chosen[outcome]]
    if not rows:
        raise FedMedError("no test images to explain")
    images = data.x_test[rows]
    maps = image_maps.attribution_maps(model, images)
    stages = image_maps.randomisation_check(model, images, maps)
    randomised = image_maps.attribution_maps(
        image_maps.randomised(
            model, image_maps.trained_layers(model), image_maps.RANDOMISATION_SEED
        ),
        images,
    )
    labels = [f"{_short(o)} {scores[r]:+.1f}" for o in OUTCOMES for r in chosen[o]]
    grid_file, check_file = f"{name}_attributions.png", f"{name}_randomisation.png"
    figures = {
        grid_file: _overlay_grid(
            images,
            [maps.integrated_gradients, maps.saliency],
            ["Integrated Gradients", "saliency"],
            labels,
            f"{site.site}: {name} model",
        ),
        check_file: _overlay_grid(
            images,
            [maps.integrated_gradients, randomised.integrated_gradients],
            ["IG, trained", "IG, randomised"],
            labels,
            f"{site.site}: {name} model vs its weights re-initialised",
        ),
    }
    relative = maps.completeness_error / np.maximum(
        np.abs(scores[rows] - image_maps.margins(model, np.zeros_like(images))), 1e-12
    )
    stage_rows = [
        [
            ", ".join(s.randomised),
            f"{s.integrated_gradients[0]:.3f} ± {s.integrated_gradients[1]:.3f}",
            f"{s.saliency[0]:.3f} ± {s.saliency[1]:.3f}",
        ]
        for s in stages
    ]
    counts = {o: len(chosen[o]) for o in OUTCOMES}
    parts = [
        f"## The {name} model: attribution maps at {site.site}",
        "Columns: the site's test images by outcome at the operating point "
        f"({', '.join(f'{n} {o}' for o, n in counts.items())}), the most confident first; "
        "above each, the outcome and the score (logit margin). Rows: the X-ray, Integrated "
        "Gradients (from a black image; red pushes towards class 1, blue away) and the "
        "gradient's magnitude (saliency), over the image.",
        f"![{name} model attributions]({grid_file})",
        f"Integrated Gradients' completeness error (|sum of attributions - change of the "
        f"score from the black image|): mean {maps.completeness_error.mean():.2e}, largest "
        f"{maps.completeness_error.max():.2e} ({relative.max():.1%} of the score change), "
        f"{image_maps.IG_STEPS} steps.",
        "### Sanity check: model randomisation (Adebayo et al. 2018)",
        "The layers are re-initialised from the output back to the input; a map that "
        "explains the model must change. Rank correlation (Spearman, absolute values) of "
        "the trained model's maps with the randomised model's, mean ± sd over the images "
        "(1 = unchanged):",
        md_table(["re-initialised layers", "Integrated Gradients", "saliency"], stage_rows),
        f"![randomisation check]({check_file})",
    ]
    numbers = {
        "model": name,
        "kind": "image",
        "images": {o: chosen[o] for o in OUTCOMES},
        "ig_completeness_error": {
            "mean": float(maps.completeness_error.mean()),
            "max": float(maps.completeness_error.max()),
            "max_relative": float(relative.max()),
        },
        "randomisation": [asdict(s) for s in stages],
    }
    return Written(parts, figures, numbers)


def _short(outcome: str) -> str:
    return "".join(word[0].upper() for word in outcome.split())


def _overlay_grid(
    images: np.ndarray, maps: list[np.ndarray], names: list[str], labels: list[str], title: str
) -> bytes:
    """Row 0 the images; then one row per map, drawn over the image (symmetric colour scale
    per image for signed maps)."""
    buffer = io.BytesIO()
    with image_grid(buffer, 1 + len(maps), len(images), title=title) as grid:
        for i, image in enumerate(images):
            grey = image.mean(axis=0)
            grid[0][i].imshow(grey, cmap="gray", vmin=0, vmax=1)
            grid[0][i].set_title(labels[i], fontsize=7)
            for row, (attribution, name) in enumerate(zip(maps, names, strict=True), start=1):
                heat = attribution[i].sum(axis=0)
                signed = bool((heat < 0).any())
                scale = float(np.abs(heat).max()) or 1.0
                ax = grid[row][i]
                ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
                ax.imshow(
                    heat,
                    cmap="bwr" if signed else "hot",
                    alpha=0.6,
                    vmin=-scale if signed else 0,
                    vmax=scale,
                )
                if i == 0:
                    ax.set_ylabel(name, fontsize=7)
    return buffer.getvalue()
