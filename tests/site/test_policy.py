"""A site's policy comes from its kit alone: a run that changes anything the kit owns is
refused by the site itself, before anything is trained or recorded.

Everything runs the real site code (``HospitalSite``, the ClientApp's gate and identifier) on
the real example kits (sites/*.yaml; copies only move the ledger into the test's folder) and
the bundled heart-disease data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from fedmed.audit.dry_run import dry_run
from fedmed.config.schema import FedMedConfig
from fedmed.data import load_site
from fedmed.errors import FedMedError, SiteError
from fedmed.kits.site import load_site_kit
from fedmed.models import build_model
from fedmed.site.app import make_client_fn, make_site_identifier
from fedmed.site.client import HospitalSite, SiteRuntime
from fedmed.site.gate import make_secure_aggregation_mod
from fedmed.train import get_weights
from tests.e2e import REPO

pytestmark = pytest.mark.cost(45)  # seconds, the file alone on 2 cores

SITES = ("cleveland", "hungary", "switzerland", "va")
BUDGETS = {"cleveland": 4.0, "hungary": 4.0, "switzerland": 2.0, "va": 3.0}  # sites/*.yaml
VA_FILE = "bundled:heart_disease/processed.va.data"


def _fit(site: HospitalSite, server_round: int = 1) -> tuple[list[np.ndarray], int, dict]:
    weights = get_weights(build_model(site.cfg.model.name, site.data.schema, 0))
    return site.fit(weights, {"server_round": server_round})


@pytest.mark.parametrize(
    ("overrides", "refusal"),
    [
        ([], r"privacy=none, but its kit requires differential privacy "
             r"\(privacy\.require_privacy: true\); run with privacy=dp"),
        (["privacy=dp", "privacy.budget_epsilon=100"],
         r"privacy\.budget_epsilon=100\.0 is set by the run, but the site's lifetime budget "
         r"belongs to its kit \(privacy\.budget_epsilon: {budget}\)"),
        (["privacy=dp", "privacy.delta=1e-4"],
         r"privacy\.delta=0\.0001 is set by the run, but the site's delta belongs to its kit "
         r"\(privacy\.delta: 0\.001\)"),
        (["privacy=dp", "privacy.accountant=rdp"],
         r"privacy\.accountant=rdp is set by the run, but the accountant of the site's budget "
         r"check belongs to its kit \(privacy\.accountant: prv\)"),
        (["privacy=dp", "dataset.label=age"], r"dataset\.label='age' differs .* label: 'num'"),
        (["privacy=dp", "dataset.classes=[0,1,2,3,4]"], r"dataset\.classes=\[0, 1, 2, 3, 4\]"),
        (["privacy=dp", "dataset.features=[age,sex]"], r"dataset\.features=\['age', 'sex'\]"),
        (["privacy=dp", "dataset.categorical.cp=[1,2,3]"], r"dataset\.categorical="),
        (["privacy=dp", "dataset.zero_as_missing=[]"], r"dataset\.zero_as_missing=\[\]"),
        (["privacy=dp", "dataset.binarize_above=1"], r"dataset\.binarize_above=1\.0"),
        (["privacy=dp", "dataset.missing_indicators=false"], r"dataset\.missing_indicators"),
        (["privacy=dp", "dataset.test_fraction=0.5"],
         r"dataset\.test_fraction=0\.5 differs from the site's reading rules, which belong to "
         r"its kit \(data\.dataset: heart has test_fraction: 0\.25\)"),
    ],
)  # fmt: skip
def test_a_run_changing_what_the_kits_own_is_refused_by_every_site(
    compose: Callable[..., FedMedConfig], tmp_path: Path, overrides: list[str], refusal: str
) -> None:
    cfg = compose("dataset=heart_kits", "model=svm", *overrides)
    for index, name in enumerate(SITES):
        expected = rf"^site '{name}': refuses the run: " + refusal.format(budget=BUDGETS[name])
        with pytest.raises(SiteError, match=expected):
            _fit(HospitalSite(cfg, index, SiteRuntime("run", tmp_path / "ledgers", False)))
    assert not (tmp_path / "ledgers").exists()  # nothing recorded, nothing trained


def test_the_example_kits_train_when_the_run_leaves_their_settings_alone(
    compose: Callable[..., FedMedConfig], tmp_path: Path
) -> None:
    """Setting a site-owned key to the kit's own value is no change, hence no refusal."""
    cfg = compose(
        "dataset=heart_kits", "model=svm", "privacy=dp", "privacy.delta=1e-3",
        "privacy.accountant=prv", "dataset.test_fraction=0.25",
    )  # fmt: skip
    site = HospitalSite(cfg, 3, SiteRuntime("run", tmp_path, False))
    _, n, metrics = _fit(site)
    assert n > 0 and "declined" not in metrics
    assert (metrics["budget_epsilon"], metrics["delta"], metrics["accountant"]) == (
        3.0,
        1e-3,
        "prv",
    )


def _deployed(kit: Path, run_id: str = "run") -> SiteRuntime:
    return SiteRuntime(
        run_id, Path("/nonexistent/coordinator-chose-this"), True, load_site_kit(kit)
    )


@pytest.mark.parametrize(
    ("overrides", "refusal"),
    [
        (["privacy.ledger_dir=/some/dir"],
         r"privacy\.ledger_dir=/some/dir is set by the run; a deployed site keeps its ledger "
         r"where its kit says \(privacy\.ledger\)"),
        (["privacy.budget_epsilon=100", "privacy.target_epsilon=10"],
         r"privacy\.budget_epsilon=100\.0 is set by the run"),
        (["privacy.noise_seed=7"], r"privacy\.noise_seed=7 is set by the run; reproducible"),
        (["audit.disable_noise=true"], r"audit\.disable_noise=true: it is a simulation"),
        (["audit.canaries=100"], r"audit\.canaries=100: canary records"),
    ],
)  # fmt: skip
def test_a_deployed_site_refuses_simulation_only_and_coordinator_chosen_settings(
    compose: Callable[..., FedMedConfig],
    tmp_path: Path,
    kit_copy: Callable[..., Path],
    overrides: list[str],
    refusal: str,
) -> None:
    # dataset=heart: the run does not even name the kits; the site has its own.
    cfg = compose("dataset=heart", "model=svm", "privacy=dp", *overrides)
    with pytest.raises(SiteError, match=r"^site 'va': refuses the run: " + refusal):
        _fit(HospitalSite(cfg, 0, _deployed(kit_copy("va"))))
    assert not (tmp_path / "ledgers").exists()


def test_a_deployed_site_needs_its_own_kit(compose: Callable[..., FedMedConfig]) -> None:
    cfg = compose("dataset=heart", "model=svm", "privacy=dp")
    with pytest.raises(SiteError, match=r"refuses the run: a deployed site needs its own kit"):
        HospitalSite(cfg, 3, SiteRuntime("run", Path("/nonexistent"), True))


def test_the_kit_floor_and_cap_bound_what_one_run_may_ask(
    compose: Callable[..., FedMedConfig], tmp_path: Path, kit_copy: Callable[..., Path]
) -> None:
    floor = kit_copy("va", min_noise_multiplier=3.0)
    explicit = compose(
        "dataset=heart_kits", "model=svm", "privacy=dp", "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
    )  # fmt: skip
    with pytest.raises(
        SiteError,
        match=r"privacy\.noise_multiplier=1\.0 is below the noise "
        r"floor of its kit \(privacy\.min_noise_multiplier: 3\.0\)",
    ):
        HospitalSite(explicit, 0, _deployed(floor))
    calibrated = compose("dataset=heart", "model=svm", "privacy=dp", "privacy.target_epsilon=1")
    site = HospitalSite(calibrated, 0, _deployed(floor))
    with pytest.raises(
        SiteError,
        match=r"refuses the run: privacy\.target_epsilon=1\.0 over "
        r"federation\.rounds=10 calibrates to noise_multiplier=",
    ):
        _fit(site)
    assert not (tmp_path / "ledgers").exists()

    capped = kit_copy("va", max_run_epsilon=0.5)
    aiming_high = compose("dataset=heart", "model=svm", "privacy=dp", "privacy.target_epsilon=2")
    with pytest.raises(
        SiteError,
        match=r"privacy\.target_epsilon=2\.0 is above what its kit "
        r"lets one run spend \(privacy\.max_run_epsilon: 0\.5\)",
    ):
        HospitalSite(aiming_high, 0, _deployed(capped))


def test_with_explicit_noise_the_site_declines_rounds_past_its_cap_for_one_run(
    compose: Callable[..., FedMedConfig], tmp_path: Path, kit_copy: Callable[..., Path]
) -> None:
    capped = kit_copy("switzerland", max_run_epsilon=1.0)
    cfg = compose(
        "dataset=heart_kits", "model=svm", "privacy=dp", "privacy.target_epsilon=null",
        "privacy.noise_multiplier=2.0",
    )  # fmt: skip
    site = HospitalSite(cfg, 0, _deployed(capped, run_id="run-1"))
    outcomes = [_fit(site, r)[2] for r in range(1, 6)]
    trained = [m for m in outcomes if "declined" not in m]
    declined = [m for m in outcomes if "declined" in m]
    assert trained and declined, outcomes
    assert len(trained) >= 2 and all(m["epsilon"] <= 1.0 for m in trained)
    assert (
        "above what the site's kit lets one run spend (privacy.max_run_epsilon: 1"
        in (declined[0]["declined"])
    )
    # The cap is per run: the next run may spend again, within the lifetime budget of 2.
    next_run = HospitalSite(cfg, 0, _deployed(capped, run_id="run-2"))
    _, n, metrics = _fit(next_run, 1)
    assert n > 0 and "declined" not in metrics
    assert metrics["epsilon"] > trained[-1]["epsilon"]  # lifetime epsilon kept growing


@pytest.fixture
def _inside_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built as a ServerApp builds them: inside a run."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _context(node_config: dict[str, Any]) -> Context:
    return Context(run_id=5, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _message(message_type: str, configs: dict | None = None) -> Message:
    content = RecordDict()
    if configs is not None:
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
    return Message(content=content, dst_node_id=7, message_type=message_type, group_id="1")


SETUP = {
    Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 4, Key.SHARE_NUMBER: 4, Key.THRESHOLD: 3,
    Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32,
    Key.MAX_WEIGHT: 1000.0,
}  # fmt: skip


@pytest.mark.usefixtures("_inside_a_run")
def test_the_gate_refuses_the_run_at_its_first_message_of_any_kind(
    compose: Callable[..., FedMedConfig], tmp_path: Path, kit_copy: Callable[..., Path]
) -> None:
    cfg = compose("dataset=heart_kits", "model=svm", "privacy=dp", "privacy.budget_epsilon=100")
    identify = make_site_identifier(lambda _c: cfg, lambda _c: tmp_path / "run", None)
    gate = make_secure_aggregation_mod(identify)
    reached = []

    def site(msg: Message, ctxt: Context) -> Message:
        reached.append(msg)
        return Message(RecordDict(), reply_to=msg)

    node = {"site": "va", "kit": str(kit_copy("va"))}
    for message in (
        _message(MessageType.TRAIN),  # plain training
        _message(MessageType.TRAIN, SETUP),  # SecAgg+ setup stage
        _message(MessageType.EVALUATE),
    ):
        with pytest.raises(SiteError, match=r"^site 'va': refuses the run: privacy\.budget"):
            gate(message, _context(node), site)
    assert reached == []


def test_a_deployed_site_reads_only_its_own_kit_and_data(
    compose: Callable[..., FedMedConfig], tmp_path: Path, kit_copy: Callable[..., Path]
) -> None:
    """The run lists kits that exist only on the coordinator's machine (VA's failure was
    ``site kit sites/cleveland.yaml: file not found``); VA needs its own kit alone."""
    elsewhere = ",".join(f"/coordinator/only/{s}.yaml" for s in SITES)
    cfg = compose("dataset=heart_kits", f"dataset.site_kits=[{elsewhere}]", "model=svm",
                  "privacy=dp", "federation.rounds=1")  # fmt: skip
    kit = kit_copy("va")
    node = {"site": "va", "kit": str(kit)}
    identity = make_site_identifier(lambda _c: cfg, lambda _c: tmp_path / "run", None)(
        _context(node)
    )
    assert identity.name == "va"
    client_fn = make_client_fn(lambda _c: cfg, lambda _c: tmp_path / "run", None)
    site = client_fn(_context(node)).numpy_client  # type: ignore[attr-defined]
    assert isinstance(site, HospitalSite) and site.runtime.deployed
    _, n, metrics = _fit(site)
    assert n == 150 and "declined" not in metrics  # VA's 200 records, 150 for training
    ledger = tmp_path / "ledgers" / "va.ledger.jsonl"  # where its kit says, not the run's
    assert metrics["ledger"] == str(ledger) and len(ledger.read_text().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    # Same records as the simulated VA of the four-hospital federation.
    simulated = load_site(compose("dataset=heart_kits"), 3)
    np.testing.assert_array_equal(site.data.x_train, simulated.x_train)
    np.testing.assert_array_equal(site.data.y_test, simulated.y_test)


@pytest.mark.parametrize(
    ("node", "problem"),
    [
        ({"site": "va"}, r"^site 'va': refuses the run: a deployed site needs its own kit"),
        ({"site": "va", "kit": "sites/va.yaml"}, r"kit='sites/va\.yaml' must be an absolute"),
        ({"site": "va", "kit": str(REPO / "sites" / "hungary.yaml")},
         r"node_config site='va' but its kit .*hungary\.yaml is site 'hungary'"),
        ({"site": "va", "kit": "/nonexistent/va.yaml"}, r"va\.yaml: file not found"),
    ],
)  # fmt: skip
def test_a_supernode_without_a_usable_kit_of_its_own_is_refused(
    compose: Callable[..., FedMedConfig], tmp_path: Path, node: dict[str, str], problem: str
) -> None:
    cfg = compose("dataset=heart_kits", "model=svm", "privacy=dp")
    identify = make_site_identifier(lambda _c: cfg, lambda _c: tmp_path, None)
    with pytest.raises(SiteError, match=problem):
        identify(_context(node))


def test_a_hospitals_split_does_not_depend_on_the_other_hospitals(
    compose: Callable[..., FedMedConfig],
) -> None:
    four = load_site(compose("dataset=heart"), 3)
    alone = load_site(compose("dataset=heart", f"dataset.paths=[{VA_FILE}]",
                              "dataset.site_names=[va]"), 0)  # fmt: skip
    assert four.name == alone.name == "va"
    np.testing.assert_array_equal(four.x_train, alone.x_train)
    np.testing.assert_array_equal(four.y_test, alone.y_test)


def test_dry_run_applies_the_same_kit_policy(
    compose: Callable[..., FedMedConfig], tmp_path: Path
) -> None:
    refused = compose("dataset=heart_kits", "privacy=dp", "privacy.budget_epsilon=100")
    assert dry_run(refused, tmp_path, deployed=False) == 1
    sites = json.loads((tmp_path / "dry_run.json").read_text())["sites"]
    assert [s["site"] for s in sites] == list(SITES)
    assert all("refuses the run: privacy.budget_epsilon=100.0" in s["refuses"] for s in sites)
    accepted = compose("dataset=heart_kits", "privacy=dp", "federation.rounds=2")
    assert dry_run(accepted, tmp_path, deployed=False) == 0
    sites = json.loads((tmp_path / "dry_run.json").read_text())["sites"]
    assert [s["budget_epsilon"] for s in sites] == [BUDGETS[s] for s in SITES]
    assert {s["accountant"] for s in sites} == {"prv"} and not any(s["refuses"] for s in sites)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("accountant", "gdp", r"key 'privacy\.accountant'.*gdp"),
        ("max_run_epsilon", -1, r"privacy\.max_run_epsilon=-1\.0: expected a finite number > 0"),
        ("min_noise_multiplier", 0, r"privacy\.min_noise_multiplier=0\.0: expected"),
        ("delta", 2, r"privacy\.delta=2\.0: expected \(0, 1\)"),
        ("require_privacy", "maybe", r"key 'privacy\.require_privacy': Value 'maybe' is not"),
    ],
)
def test_a_kit_with_an_unusable_policy_is_refused_naming_file_and_key(
    kit_copy: Callable[..., Path], key: str, value: object, problem: str
) -> None:
    kit = kit_copy("va", **{key: value})
    with pytest.raises(FedMedError, match=r"site kit .*va\.yaml: " + problem):
        load_site_kit(kit)


def test_dry_run_refuses_a_ledger_cut_short_as_the_site_does(
    compose: Callable[..., FedMedConfig], tmp_path: Path
) -> None:
    ledgers = tmp_path / "kept"
    cfg = compose("dataset=heart", "model=svm", "privacy=dp", f"privacy.ledger_dir={ledgers}")
    va = HospitalSite(cfg, SITES.index("va"), SiteRuntime("run-1", tmp_path / "unused", False))
    for server_round in (1, 2):
        _fit(va, server_round)
    ledger = ledgers / "va.ledger.jsonl"
    ledger.write_text(ledger.read_text().splitlines(keepends=True)[0])  # `head -n 1`
    assert dry_run(cfg, tmp_path, deployed=False) == 1
    sites = {s["site"]: s for s in json.loads((tmp_path / "dry_run.json").read_text())["sites"]}
    assert "holds 1 entries, but the site's high-water mark" in sites["va"]["refuses"]
    assert not sites["cleveland"]["refuses"]
