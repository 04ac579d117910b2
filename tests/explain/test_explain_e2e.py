"""``fedmed explain`` and ``fedmed site explain`` on real runs (issue 19).

One real heart-disease simulation (4 hospitals, svm, DP at epsilon 1, personal fine-tuned
models, the global models averaged over rounds: ``strategy.average_decay``) and one real
pneumonia simulation (4 sites, the scatter model), each explained once through the CLI; the
assertions share those runs.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmed.coordinator.checkpoint import CHECKPOINT_FILE
from fedmed.data import load_site
from fedmed.explain.linear import MarginModel
from fedmed.models.card import load_model, read_card
from fedmed.runs.compose import compose_config
from tests.browser import C0_BLUE, C3_RED, pixels_of, render
from tests.e2e import read_summary, run_fedmed

pytestmark = [pytest.mark.slow, pytest.mark.cost(40)]

SITES = ("cleveland", "hungary", "switzerland", "va")
HEART = [
    "dataset=heart",
    "model=svm",
    "federation.rounds=2",
    "privacy=dp",
    "privacy.target_epsilon=1",
    "privacy.delta=1e-3",
    "privacy.noise_seed=0",
    "personalization=finetune",
    "strategy.average_decay=0.5",
]
PNEUMONIA = ["dataset=pneumonia", "model=scatter", "federation.num_sites=4", "federation.rounds=2"]
CSV_HEADER = [
    "age",
    "sex",
    "cp",
    "trestbps",
    "chol",
    "fbs",
    "restecg",
    "thalach",
    "exang",
    "oldpeak",
    "slope",
    "ca",
    "thal",
]  # fmt: skip; conf/dataset_parts/heart.yaml
CATEGORIES = {"cp": [1, 2, 3, 4], "restecg": [0, 1, 2], "slope": [1, 2, 3], "thal": [3, 6, 7]}


def _files(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _explained(
    tmp_path_factory: pytest.TempPathFactory, name: str, overrides: list[str], *explain: str
) -> dict[str, Any]:
    run = tmp_path_factory.mktemp(name)
    proc = run_fedmed("simulate", *overrides, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["failures"] == [], summary["failures"]
    before = _files(run)
    proc = run_fedmed("explain", str(run), *explain)
    return {"run": run, "before": before, "after": _files(run), "proc": proc}


@pytest.fixture(scope="module")
def heart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _explained(tmp_path_factory, "heart", HEART)


@pytest.fixture(scope="module")
def pneumonia(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    explain = ("--site", "site-0", "--per-outcome", "1")
    return _explained(tmp_path_factory, "pneumonia", PNEUMONIA, *explain)


def _numbers(run: Path, site: str) -> dict[str, Any]:
    return json.loads((run / "sites" / site / "explanation.json").read_text())


def test_every_site_explains_the_global_and_its_personal_model(heart: dict[str, Any]) -> None:
    proc = heart["proc"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for site in SITES:
        assert f"site {site}: " in proc.stdout and "global, personal" in proc.stdout
        assert set(_numbers(heart["run"], site)["models"]) == {"global", "personal"}


def test_the_saved_model_is_the_moving_average_of_the_rounds(heart: dict[str, Any]) -> None:
    """strategy.average_decay=0.5: what the sites evaluated and the run saved is the average
    (kept in the checkpoint beside the plain global model training continued from)."""
    with (heart["run"] / CHECKPOINT_FILE).open("rb") as handle:
        state = pickle.load(handle)
    saved = [t.numpy() for t in torch.load(heart["run"] / "global_model.pt").values()]
    assert state.round == 2 and state.averaged_weights is not None
    assert all(np.allclose(s, a) for s, a in zip(saved, state.averaged_weights, strict=True))
    assert not all(np.allclose(s, g) for s, g in zip(saved, state.global_weights, strict=True))


def test_nothing_is_written_outside_the_sites_folders(heart: dict[str, Any]) -> None:
    before, after = heart["before"], heart["after"]
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed
    new = sorted(set(after) - set(before))
    assert new
    for path in new:
        parts = Path(path).parts
        coordinator = parts[0].startswith("global_explanation.")
        assert coordinator or (parts[0] == "sites" and parts[1] in SITES), path
    # the releases the coordinator recorded (the message inventory) are the run's only
    assert "releases.jsonl" in before and after["releases.jsonl"] == before["releases.jsonl"]


def test_linear_attributions_sum_to_the_logit_difference(heart: dict[str, Any]) -> None:
    run = heart["run"]
    cfg = compose_config(HEART)
    card = read_card(run / "global_model.pt")
    margin = MarginModel.of(load_model(run / "global_model.pt", card))
    for index, site in enumerate(SITES):
        for model in ("global", "personal"):
            assert _numbers(run, site)["models"][model]["completeness_error"] < 1e-5
        # recomputed here from the site's records: each patient's attributions (by feature)
        # add up to its margin minus the site's mean patient's
        data = load_site(cfg, index)
        reference = data.x_train.astype(np.float64).mean(axis=0)
        for patient in _numbers(run, site)["models"]["global"]["patients"]:
            x = data.x_test[patient["record"]].astype(np.float64)
            change = margin.margins(x[None])[0] - margin.margins(reference[None])[0]
            assert sum(patient["attributions"].values()) == pytest.approx(change, abs=1e-5)
            assert patient["score"] == pytest.approx(margin.margins(x[None])[0], abs=1e-5)


def test_feature_names_are_the_csv_columns_after_preprocessing(heart: dict[str, Any]) -> None:
    run = heart["run"]
    card = read_card(run / "global_model.pt")
    assert card.columns is not None and len(card.columns) == card.input_shape[0]
    names = [c.name for c in card.columns]
    assert names[: len(CSV_HEADER) - len(CATEGORIES)] == [
        f for f in CSV_HEADER if f not in CATEGORIES
    ]
    assert [n for n in names if n.endswith(": missing")] == [f"{f}: missing" for f in CSV_HEADER]
    for feature, categories in CATEGORIES.items():
        assert [n for n in names if n.startswith(f"{feature} = ")] == [
            f"{feature} = {c}" for c in categories
        ]
    for site in SITES:
        importance = _numbers(run, site)["models"]["global"]["feature_importance"]
        assert sorted(importance) == sorted(CSV_HEADER)
    global_view = json.loads((run / "global_explanation.json").read_text())
    assert list(global_view["weights"]) and set(global_view["weights"]) == set(names)
    assert sorted(global_view["feature_effects"]) == sorted(CSV_HEADER)


def test_the_report_renders_in_headless_chromium(heart: dict[str, Any], tmp_path: Path) -> None:
    page = heart["run"] / "sites" / "cleveland" / "explanation.html"
    html = page.read_text()
    assert html.count("data:image/png;base64,") >= 5  # the site's chart and 4 patients'
    assert "http" not in html.replace("https://", "")  # nothing fetched from elsewhere
    pixels, dom = render(page, tmp_path)
    assert "Nothing here was sent anywhere" in dom and "<table>" in dom
    assert "Explanations at site cleveland" in dom and "Test record" in dom
    assert pixels.std() > 10  # not a blank page
    # the charts' bars: blue (feature, lowers the score) and red (raises it)
    assert pixels_of(pixels, C0_BLUE) > 200 and pixels_of(pixels, C3_RED) > 100
    shutil.copy(next(tmp_path.glob("*.screenshot.png")), heart["run"] / "screenshot.png")


def test_a_deployed_site_explains_into_its_own_folder_only(
    heart: dict[str, Any], kit_copy: Any, tmp_path: Path
) -> None:
    kit = kit_copy("cleveland")
    model = heart["run"] / "global_model.pt"
    run_before = _files(heart["run"])
    proc = run_fedmed("site", "explain", str(kit), "--model", str(model))
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "ledgers" / "cleveland.explain"
    assert str(folder / "explanation.html") in proc.stdout
    new = [p for p in _files(tmp_path) if not p.startswith("kits/")]
    assert new and all(p.startswith("ledgers/cleveland.explain/") for p in new), new
    assert _files(heart["run"]) == run_before
    # the hospital's own machine draws the same split from the run's seed: the same numbers
    deployed = json.loads((folder / "explanation.json").read_text())["models"]["global"]
    simulated = _numbers(heart["run"], "cleveland")["models"]["global"]
    assert deployed["feature_importance"] == pytest.approx(simulated["feature_importance"])


def test_a_model_whose_columns_differ_from_the_sites_names_both(
    heart: dict[str, Any], kit_copy: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    model = Path(shutil.copy(heart["run"] / "global_model.pt", folder / "global_model.pt"))
    card = json.loads((heart["run"] / "global_model.json").read_text())
    for column in card["columns"]:
        if column["feature"] == "chol":
            column["feature"] = "cholesterol"
            column["name"] = column["name"].replace("chol", "cholesterol")
    (folder / "global_model.json").write_text(json.dumps(card))
    proc = run_fedmed("site", "explain", str(kit_copy("cleveland")), "--model", str(model))
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    # the model file and the site's data file, and the columns in which they differ
    assert str(model) in error and "processed.cleveland.data" in error, error
    assert "'cholesterol'" in error and "'chol'" in error, error


def test_explain_errors_name_the_file_or_site(heart: dict[str, Any], tmp_path: Path) -> None:
    missing = run_fedmed("explain", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert f"{tmp_path / 'nowhere' / 'global_model.pt'}: model file not found" in missing.stderr
    unknown = run_fedmed("explain", str(heart["run"]), "--site", "mayo")
    assert unknown.returncode == 2 and "--site mayo: not a site of" in unknown.stderr
    assert "cleveland, hungary, switzerland, va" in unknown.stderr
    records = run_fedmed("explain", str(heart["run"]), "--site", "va", "--records", "2", "50")
    assert records.returncode == 1  # the site's error, after the coordinator's view
    assert "site 'va': --records [50]: its test records are numbered 0..49" in records.stderr
    copied = tmp_path / "copied-run"
    copied.mkdir()
    for name in ("global_model.pt", "global_model.json"):
        shutil.copy(heart["run"] / name, copied / name)
    no_overrides = run_fedmed("explain", str(copied))
    assert no_overrides.returncode == 2
    assert f"{copied}: no .hydra/overrides.yaml (not the folder of a fedmed run)" in (
        no_overrides.stderr
    )
    no_card = tmp_path / "no-card"
    no_card.mkdir()
    shutil.copy(heart["run"] / "global_model.pt", no_card / "global_model.pt")
    proc = run_fedmed("explain", str(no_card))
    assert proc.returncode == 2 and f"{no_card / 'global_model.json'}: no model card" in proc.stderr


def test_weights_that_do_not_fit_the_card_are_refused(
    heart: dict[str, Any], pneumonia: dict[str, Any], tmp_path: Path
) -> None:
    shutil.copy(pneumonia["run"] / "global_model.pt", tmp_path / "global_model.pt")
    shutil.copy(heart["run"] / "global_model.json", tmp_path / "global_model.json")
    proc = run_fedmed("explain", str(tmp_path), "--global-only")
    assert proc.returncode == 2
    assert f"{tmp_path / 'global_model.pt'}: its weights do not fit model=svm" in proc.stderr


def test_cnn_attribution_maps_are_complete_and_fail_the_randomisation_test(
    pneumonia: dict[str, Any],
) -> None:
    proc, run = pneumonia["proc"], pneumonia["run"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in (run / "sites").iterdir()) == ["site-0"]
    [numbers] = _numbers(run, "site-0")["models"].values()
    assert sum(len(v) for v in numbers["images"].values()) >= 3  # one per outcome found
    # Integrated Gradients' completeness: the maps add up to the margin's change
    assert numbers["ig_completeness_error"]["max_relative"] < 1e-3
    # the maps explain the model: re-initialising its classifier changes them (a rank
    # correlation of 1 would mean they only show the image)
    for stage in numbers["randomisation"]:
        assert stage["integrated_gradients"][0] < 0.6 and stage["saliency"][0] < 0.6, stage
    for png in ("global_attributions.png", "global_randomisation.png"):
        assert (run / "sites" / "site-0" / png).stat().st_size > 10_000
    global_view = (run / "global_explanation.md").read_text()
    assert "explain no patient without images" in global_view
