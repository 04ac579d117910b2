"""``fedmed explain RUN`` and ``fedmed site explain KIT --model FILE``.

``fedmed explain RUN`` writes the coordinator's view of the global model into the run folder
and, for a simulated run (its sites' data are on this machine), each site's explanations
into ``RUN/sites/<site>/``, computed from that site's records alone, as the site would. At a
hospital, ``fedmed site explain`` reads only its kit's data and writes only into its own
folder (beside its ledger, or ``--out``). Nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedmed.coordinator.app import GLOBAL_MODEL_FILE
from fedmed.data import SiteData, load_site, num_sites
from fedmed.errors import FedMedError, SiteError
from fedmed.explain import RECORDS_HELP
from fedmed.explain.global_view import write_global_explanation
from fedmed.explain.site_report import SiteModels, write_site_explanation
from fedmed.kits.site import SiteKit, load_site_kit
from fedmed.models.card import ModelCard, load_model, read_card
from fedmed.runs.compose import compose_config
from fedmed.runs.exact_evaluation import run_config, saved_threshold
from fedmed.site.personal import MODEL_FILE, personal_folder
from fedmed.site.policy import SiteRuntime, site_data_config, site_setup

log = logging.getLogger(__name__)

SITES_FOLDER = "sites"
EXPLAIN_SUFFIX = ".explain"


def explain_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedmed explain",
        description="Explain a run's global model: the coordinator's view from the weights "
        "alone, and (simulated runs) each site's explanations on its own records.",
    )
    parser.add_argument("run", type=Path, help="the run folder (holds global_model.pt)")
    parser.add_argument("--site", action="append", help="only these sites (repeatable)")
    parser.add_argument("--global-only", action="store_true", help="the coordinator's view only")
    parser.add_argument(
        "--per-outcome",
        type=int,
        default=2,
        help="images per outcome (TP/FP/TN/FN) in a CNN's grid",
    )
    parser.add_argument("--records", type=int, nargs="+", default=[], help=RECORDS_HELP)
    args = parser.parse_args(argv)
    return explain_run(args.run, args.site, args.global_only, args.per_outcome, args.records)


def explain_run(
    run: Path, only: list[str] | None, global_only: bool, per_outcome: int, records: list[int]
) -> int:
    model_path = run / GLOBAL_MODEL_FILE
    card = read_card(model_path)
    model = load_model(model_path, card)
    report = write_global_explanation(model, card, run)
    print(f"coordinator: the global model explained from its weights -> {report}", flush=True)
    if global_only:
        return 0
    if not card.simulated:
        print(
            "the run was deployed: each hospital explains on its own machine "
            "(fedmed site explain sites/NAME.yaml --model RUN/global_model.pt)"
        )
        return 0
    cfg = run_config(run)
    threshold = saved_threshold(run)
    sites = [load_site(cfg, i) for i in range(num_sites(cfg))]
    unknown = sorted(set(only or ()) - {s.name for s in sites})
    if unknown:
        raise FedMedError(
            f"--site {', '.join(unknown)}: not a site of {run} ({', '.join(s.name for s in sites)})"
        )
    failed = 0
    for index, data in enumerate(sites):
        if only and data.name not in only:
            continue
        try:
            check_columns(card, model_path, data)
            kit = site_setup(cfg, index, SiteRuntime("explain", run / "ledgers", False)).kit
            models = {"global": model, **_personal(kit, card)}
            site = SiteModels(data.name, data, models, threshold, str(model_path), tuple(records))
            html = write_site_explanation(site, run / SITES_FOLDER / data.name, per_outcome)
            print(
                f"site {data.name}: {len(data.y_test)} test records explained with "
                f"{', '.join(models)} -> {html}",
                flush=True,
            )
        except FedMedError as err:  # one site's problem does not stop the others
            failed += 1
            print(f"fedmed: {SiteError(data.name, str(err))}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def explain_deployed_site(
    kit_path: str, model_path: Path, out: Path | None, records: list[int]
) -> int:
    kit = load_site_kit(kit_path)
    card = read_card(model_path)
    if card.columns is None:
        raise FedMedError(f"{model_path}: an image model; a deployed site serves a CSV table")
    model = load_model(model_path, card)
    cfg = compose_config(
        [f"dataset={kit.data.dataset}", f"model={card.model}", f"seed={card.seed}"]
    )
    data = load_site(site_data_config(cfg, kit), 0)
    check_columns(card, model_path, data, kit.data.path)
    models = {"global": model, **_personal(kit, card)}
    folder = out or _site_folder(kit, Path(kit_path))
    threshold = saved_threshold(model_path.parent)
    site = SiteModels(kit.name, data, models, threshold, str(model_path), tuple(records))
    try:
        html = write_site_explanation(site, folder)
    except FedMedError as err:
        raise SiteError(kit.name, str(err)) from None
    print(
        f"site {kit.name}: {len(data.y_test)} test records explained with "
        f"{', '.join(models)} -> {html}"
    )
    return 0


def check_columns(card: ModelCard, model_path: Path, data: SiteData, source: str = "") -> None:
    """The model must read exactly the columns the site's preprocessing writes."""
    if card.columns is None or data.preprocessing is None:
        if (card.columns is None) != (data.preprocessing is None):
            raise FedMedError(
                f"{model_path} (dataset {card.dataset}) does not fit the site's "
                "data (one is images, the other a table)"
            )
        return
    model_columns = [c.name for c in card.columns]
    site_columns = [c.name for c in data.preprocessing.columns()]
    if model_columns != site_columns:
        missing = [c for c in model_columns if c not in site_columns]
        extra = [c for c in site_columns if c not in model_columns]
        order = "" if missing or extra else "; the same columns in another order"
        raise FedMedError(
            f"{model_path} was trained on dataset {card.dataset} with {len(model_columns)} "
            f"input columns; the site's data{f' ({source})' if source else ''} gives "
            f"{len(site_columns)} (the model's, not the data's: {missing or 'none'}; the "
            f"data's, not the model's: {extra or 'none'}{order})"
        )


def _personal(kit: SiteKit, card: ModelCard) -> dict:
    """The site's personal model of the run (personalization=finetune|mrmtl|fedper), if any."""
    try:
        path = personal_folder(kit) / MODEL_FILE
    except FedMedError:
        return {}
    return {"personal": load_model(path, card)} if path.is_file() else {}


def _site_folder(kit: SiteKit, kit_path: Path) -> Path:
    """Beside the site's ledger (its own folder), else beside its kit."""
    base = Path(kit.privacy.ledger).parent if kit.privacy.ledger else kit_path.parent
    return base / f"{kit.name}{EXPLAIN_SUFFIX}"
