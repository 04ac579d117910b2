"""Typed configuration schemas (Hydra ConfigStore) and the value checks Hydra cannot express.

YAML files under ``conf/`` only set values; every key and type is declared here, so a mistyped
key or a wrong type fails at composition time, before any data is read or any model trained.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fedmed.errors import ConfigError
from fedmed.metrics import margin_edges_problem
from fedmed.operating_point import parse_threshold

CLASS_WEIGHT_BALANCED = "balanced"
CLASS_WEIGHT_NONE = (None, "none")

# SecAgg+ masks and sums live modulo 2^32 (Flower's default modulus_range).
MODULUS_RANGE = 2**32


class Partition(Enum):
    """How a single data source is split across simulated sites."""

    iid = "iid"
    dirichlet = "dirichlet"


class ModelName(Enum):
    """Models a site can train (all Opacus-compatible)."""

    cnn = "cnn"
    dpcnn = "dpcnn"
    scatter = "scatter"
    svm = "svm"
    logreg = "logreg"


class PersonalizationName(Enum):
    """How a site gets a model of its own beside the global one (fedmed.site.personal)."""

    none = "none"
    finetune = "finetune"  # the final global model, trained further on the site's records
    mrmtl = "mrmtl"  # mean-regularised multi-task learning (Liu et al. 2022)
    fedper = "fedper"  # a shared body, a head each site keeps (Arivazhagan et al. 2019)


class StrategyName(Enum):
    """Flower legacy strategies the coordinator can aggregate with."""

    fedavg = "fedavg"
    fedprox = "fedprox"
    fedadam = "fedadam"
    fedyogi = "fedyogi"


class Accountant(Enum):
    """Opacus accountants. PRV is the tightest, RDP the classic; both are upper bounds on
    epsilon, the only kind a site's budget check may use. GDP (the central limit theorem's
    asymptotic approximation, which undercounts at a hospital's run sizes) stays a name so
    old ledger entries still read, but ``privacy.accountant=gdp`` is refused (validate)."""

    prv = "prv"
    rdp = "rdp"
    gdp = "gdp"


class ClippingMode(Enum):
    """How per-sample gradients are clipped (privacy accounting is identical for all): an
    Opacus grad_sample_mode, or fedmed's single-backward book-keeping
    (``fedmed.privacy.bookkeeping``; Opacus still samples, adds the noise and accounts)."""

    ghost = "ghost"
    hooks = "hooks"
    functorch = "functorch"
    bookkeeping = "bookkeeping"


class BaselineMode(Enum):
    """Non-federated reference trainings."""

    pooled = "pooled"
    local = "local"


# ----------------------------------------------------------------------------- dataset group
@dataclass
class DatasetConfig:
    """Fields every dataset shares."""

    name: str = MISSING
    test_fraction: float = 0.25
    partition: Partition = Partition.iid
    alpha: float = 0.5
    min_records_per_site: int = 8


@dataclass
class TabularConfig(DatasetConfig):
    """CSV data: one file per site (``paths``, or ``site_kits`` naming each hospital's kit YAML)
    or one file partitioned across sites (``path``).

    ``header`` names the columns of files without a header row. ``categorical`` declares the
    categories of each categorical column up front, so one-hot encoding needs no statistic
    from another site.
    """

    paths: list[str] = field(default_factory=list)
    path: str | None = None
    site_kits: list[str] = field(default_factory=list)
    site_names: list[str] = field(default_factory=list)
    label: str = MISSING
    header: list[str] | None = None
    features: list[str] | None = None
    categorical: dict[str, list[int]] = field(default_factory=dict)
    zero_as_missing: list[str] = field(default_factory=list)
    missing_values: list[str] = field(default_factory=lambda: ["?", ""])
    binarize_above: float | None = None
    classes: list[int] = field(default_factory=lambda: [0, 1])
    missing_indicators: bool = True


@dataclass
class SyntheticTabularConfig(TabularConfig):
    """SYNTHETIC sites for scale tests only: each of ``federation.num_sites`` sites draws
    ``records_per_site`` records with replacement from the pooled real files (``paths``),
    adds Gaussian jitter (``jitter`` x the feature's sd) to the ``jitter_features`` and shifts
    them by a site-specific offset (``site_shift`` x sd): realistic shapes, no real patient.
    """

    records_per_site: int = 100
    jitter_features: list[str] = field(default_factory=list)
    jitter: float = 0.1
    site_shift: float = 0.25


@dataclass
class SklearnConfig(DatasetConfig):
    """A dataset that ships inside scikit-learn (no download)."""

    loader: str = "load_breast_cancer"


@dataclass
class ImageConfig(DatasetConfig):
    """A MedMNIST-layout ``.npz`` partitioned across sites."""

    path: str = MISSING
    num_classes: int | None = None
    channels: int | None = None


# ----------------------------------------------------------------------------- other groups
@dataclass
class ModelConfig:
    """Model family and its local optimiser settings."""

    name: ModelName = MISSING
    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0
    # none | balanced | [w0, w1, ...]: each training record's loss times its class's weight
    # (fedmed.models.losses). Any: Hydra's structured configs have no str-or-list type.
    class_weight: Any = None


@dataclass
class StrategyConfig:
    """Aggregation rule; server-side optimiser settings only matter for fedadam/fedyogi.

    ``average_decay`` (null: off): the model the sites evaluate, and the one saved, is the
    exponential moving average of the rounds' global models (decay d: average = d x average
    + (1 - d) x global, from round 1's global model on), while training continues from the
    plain global model. Under DP it is post-processing of the released aggregates: it costs
    no privacy and averages out part of the rounds' noise.
    """

    name: StrategyName = StrategyName.fedavg
    proximal_mu: float = 0.0
    server_lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    average_decay: float | None = None


@dataclass
class PersonalizationConfig:
    """Each site's personal model (fedmed.site.personal): it stays at the site, and every
    step it takes on the site's records is DP-SGD under privacy=dp, in the same ledger.

    ``finetune``: after the last round the site trains the global model ``epochs`` more
    epochs on its records. ``mrmtl``: the site keeps its own model across rounds, trained
    with ``lam`` / 2 x ||w - global||^2 pulling it to the global mean, and shares it (as
    its update) in place of a fresh copy of the global model: no extra training steps.
    ``fedper``: the layers named by ``local_layers`` (state_dict key prefixes; null: the
    model's last layer, its head) stay at the site; only the rest is shared.
    """

    name: PersonalizationName = PersonalizationName.none
    epochs: int = 1
    lam: float = 0.1
    local_layers: list[str] | None = None


@dataclass
class FederationConfig:
    """How many sites, how many rounds, and how many sites each round needs."""

    rounds: int = 5
    num_sites: int | None = None
    fraction: float = 1.0
    evaluate_fraction: float = 1.0
    min_sites: int = 2
    local_epochs: int = 1
    # Evaluate the global model every this many rounds, and always after the last one; 0:
    # after the last round only. null: every round without DP; with DP the last round only,
    # since each evaluation spends the privacy of the sites' test records.
    evaluate_every: int | None = None
    # Seconds the coordinator waits for the sites' replies in a round (with SecAgg+: in each
    # stage). A site that crashes after taking its work may rejoin under the same node id,
    # and Flower then never reports the lost reply: without a limit the round waits forever.
    round_timeout: float | None = 600.0
    # Seconds the coordinator waits before round 1 for every site to connect; then it starts
    # with those connected. Flower sizes a round by the sites connected at that moment.
    connect_timeout: float = 60.0


@dataclass
class EngineConfig:
    """Where the simulated sites run: a Ray started for the run, or an existing Ray cluster."""

    # HOST:PORT of an existing Ray cluster's head (the address `ray start --head` prints);
    # null: RAY_ADDRESS when set, else a Ray of its own on this machine for the run.
    address: str | None = None
    # CPUs each site's Ray actor reserves: the engine runs (cluster CPUs / this) sites at once.
    num_cpus_per_site: float = 1.0


def evaluation_rounds(cfg: FedMedConfig) -> list[int]:
    """The rounds after which the sites evaluate the global model (the last one always)."""
    rounds, every = cfg.federation.rounds, cfg.federation.evaluate_every
    if every is None:
        every = 0 if isinstance(cfg.privacy, DpConfig) else 1
    return [r for r in range(1, rounds + 1) if r == rounds or (every and r % every == 0)]


def sites_per_round(fed: FederationConfig, total_sites: int) -> int:
    """Sites sampled per round: ``fraction`` of them rounded up, at least ``min_sites``."""
    return min(total_sites, max(fed.min_sites, math.ceil(fed.fraction * total_sites)))


@dataclass
class PrivacyConfig:
    """Differential privacy at each site: ``none`` (this schema) or ``dp`` (DpConfig)."""

    name: str = "none"


@dataclass
class DpConfig(PrivacyConfig):
    """DP-SGD at every site (Opacus: Poisson sampling, per-sample clipping, Gaussian noise).

    The noise comes from ``noise_multiplier`` or, when that is null, is calibrated once per
    run at each site so that the planned rounds x local epochs reach ``target_epsilon``.
    ``budget_epsilon``, ``delta`` and ``accountant`` belong to each site's kit: null (the
    default) lets the kit decide; a value other than the kit's makes the site refuse the
    run. Simulated sites without a kit take them from here (null: ``target_epsilon``, 1e-3,
    prv). Simulated ledgers go to ``ledger_dir`` (persisting budgets across runs) or, when
    null, to the run directory; a deployed site refuses ``ledger_dir``.
    """

    name: str = "dp"
    target_epsilon: float | None = 1.0
    delta: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    accountant: Accountant | None = None
    budget_epsilon: float | None = None
    ledger_dir: str | None = None
    clipping: ClippingMode = ClippingMode.ghost
    # Simulation only: seed each site's sampling and noise (reproducible experiments).
    # A deployed site refuses it: the coordinator could replay the noise.
    noise_seed: int | None = None
    # The epsilon this run's evaluations may spend on the sites' test records (their own
    # split: its noise is calibrated for the run's planned evaluations); null: target_epsilon
    # (with a fixed noise_multiplier: each site's budget).
    evaluation_epsilon: float | None = None
    # Binary tasks: the logit-margin bins whose counts per class an evaluation releases (0
    # must be an edge: the decision threshold). More bins: a finer AUC, more noise in sums.
    evaluation_margin_edges: list[float] = field(default_factory=lambda: [-1.0, 0.0, 1.0])


@dataclass
class SecAggConfig:
    """Secure aggregation of site updates: ``off`` (this schema) or ``secaggplus``."""

    name: str = "off"


@dataclass
class SecAggPlusConfig(SecAggConfig):
    """Flower's SecAgg+: the coordinator only ever sees the masked sum of the site updates.

    Each site splits its secret into ``num_shares`` shares (null: one per sampled site);
    ``reconstruction_threshold`` of them (null: two thirds, rounded up) rebuild a dropped
    site's mask, so the round survives while at least that many sites remain. Each update
    value times num_examples / ``max_weight`` must lie in [-clipping_range, clipping_range];
    it is quantized to ``quantization_range`` levels.
    """

    name: str = "secaggplus"
    num_shares: int | None = None
    reconstruction_threshold: int | None = None
    clipping_range: float = 8.0
    quantization_range: int = 4194304  # 2**22
    max_weight: float = 1000.0
    timeout: float | None = None


@dataclass
class EvaluationConfig:
    """The global model's operating point (``fedmed.operating_point``): ``threshold`` a logit
    margin, or ``youden`` / ``sensitivity:S`` chosen on validation splits that each site
    carves from its training records (``validation_fraction`` of them, stratified, seeded)."""

    threshold: str = "0"
    validation_fraction: float = 0.2


@dataclass
class AuditConfig:
    """``fedmed audit empirical``: one-run empirical privacy audit (Steinke, Nasr & Jagielski).

    ``canaries`` gradient canaries are drawn at ``site`` (null: the first site), each
    included in its training data with probability 1/2 (drawn from ``seed``). 0 = no audit
    (``fedmed audit empirical`` then uses 1000).
    ``disable_noise`` (simulation only) breaks the mechanism on purpose, so the audit's own
    ability to catch a broken DP-SGD can be shown: the sites record the claimed noise while
    adding none.
    """

    canaries: int = 0
    site: str | None = None
    confidence: float = 0.95
    # The bound and the formal epsilon are compared at this delta (the one-run bound loses
    # power as 2 x canaries x delta grows, so it is audited below the sites' delta).
    delta: float = 1e-5
    seed: int = 0
    disable_noise: bool = False


@dataclass
class FedMedConfig:
    """The whole run: one object handed to the coordinator, every site and the baselines."""

    seed: int = 0
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    strategy: StrategyConfig = MISSING
    federation: FederationConfig = MISSING
    privacy: PrivacyConfig = MISSING
    secagg: SecAggConfig = MISSING
    # Testing: ["SITE:STAGE:ROUND", ...] makes SITE fail at STAGE of ROUND, as if it had
    # dropped out (STAGE: fit, or a SecAgg+ stage), or its training diverge (nan_update,
    # nan_loss: the site's own checks must then keep the update from leaving).
    inject_faults: list[str] = field(default_factory=list)
    # Continue the run in the output folder from its last checkpoint (after a crash).
    resume: bool = False
    audit: AuditConfig = field(default_factory=AuditConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class BaselineConfig(FedMedConfig):
    """A federated configuration plus the baseline mode."""

    mode: BaselineMode = BaselineMode.pooled


def register_schemas() -> None:
    """Register every schema so YAML files can extend them (``defaults: [<schema>, _self_]``)."""
    store = ConfigStore.instance()
    store.store(name="fedmed_schema", node=FedMedConfig)
    store.store(name="baseline_schema", node=BaselineConfig)
    store.store(group="dataset", name="tabular_schema", node=TabularConfig)
    store.store(group="dataset", name="synthetic_tabular_schema", node=SyntheticTabularConfig)
    store.store(group="dataset", name="sklearn_schema", node=SklearnConfig)
    store.store(group="dataset", name="image_schema", node=ImageConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="strategy", name="strategy_schema", node=StrategyConfig)
    store.store(group="federation", name="federation_schema", node=FederationConfig)
    store.store(
        group="personalization", name="personalization_schema", node=PersonalizationConfig
    )
    store.store(group="engine", name="engine_schema", node=EngineConfig)
    store.store(group="privacy", name="privacy_schema", node=PrivacyConfig)
    store.store(group="privacy", name="dp_schema", node=DpConfig)
    store.store(group="secagg", name="secagg_schema", node=SecAggConfig)
    store.store(group="secagg", name="secaggplus_schema", node=SecAggPlusConfig)


# ----------------------------------------------------------------------------- value checks
def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def class_weight_problem(setting: Any, private: bool) -> str | None:
    """What ``model.class_weight`` must be instead of ``setting`` (None: it is fine)."""
    if setting in CLASS_WEIGHT_NONE:
        return None
    if setting == CLASS_WEIGHT_BALANCED:
        if private:
            return (
                "public weights under privacy=dp, e.g. model.class_weight=[w0,w1]: 'balanced' "
                "needs each site's class counts, which DP-SGD keeps private"
            )
        return None
    if isinstance(setting, str) or not isinstance(setting, Sequence):
        return "none, balanced, or a list of weights, one per class (e.g. [0.55,5.0])"
    try:
        values = [float(w) for w in setting]
    except (TypeError, ValueError):
        return "a list of numbers, one weight per class"
    if len(values) < 2 or not all(math.isfinite(w) and w > 0 for w in values):
        return "a list of finite weights > 0, one per class"
    return None


def validate(cfg: FedMedConfig) -> None:
    """Reject out-of-range values with one error naming the key and what is allowed."""
    fed = cfg.federation
    _require(fed.rounds >= 1, "federation.rounds", fed.rounds, "an integer >= 1")
    _require(
        fed.num_sites is None or fed.num_sites >= 1,
        "federation.num_sites",
        fed.num_sites,
        "an integer >= 1 (or null for the dataset's own number of sites)",
    )
    _require(0.0 < fed.fraction <= 1.0, "federation.fraction", fed.fraction, "a number in (0, 1]")
    _require(
        0.0 < fed.evaluate_fraction <= 1.0,
        "federation.evaluate_fraction",
        fed.evaluate_fraction,
        "a number in (0, 1]",
    )
    _require(
        fed.round_timeout is None or fed.round_timeout > 0,
        "federation.round_timeout",
        fed.round_timeout,
        "a number of seconds > 0 (or null: wait forever)",
    )
    _require(
        fed.connect_timeout >= 0,
        "federation.connect_timeout",
        fed.connect_timeout,
        "a number of seconds >= 0",
    )
    _require(fed.min_sites >= 1, "federation.min_sites", fed.min_sites, "an integer >= 1")
    _require(fed.local_epochs >= 1, "federation.local_epochs", fed.local_epochs, "an integer >= 1")
    _require(
        fed.evaluate_every is None or fed.evaluate_every >= 0,
        "federation.evaluate_every",
        fed.evaluate_every,
        "an integer >= 0 (0: after the last round only; null: every round, or the last "
        "round only with privacy=dp)",
    )
    _require(
        0.0 < cfg.engine.num_cpus_per_site < math.inf,
        "engine.num_cpus_per_site",
        cfg.engine.num_cpus_per_site,
        "a number of CPUs > 0 (fractions let several sites share a CPU)",
    )

    ds = cfg.dataset
    _require(
        0.0 < ds.test_fraction < 1.0,
        "dataset.test_fraction",
        ds.test_fraction,
        "a number in (0, 1)",
    )
    _require(ds.alpha > 0.0, "dataset.alpha", ds.alpha, "a number > 0")
    if isinstance(ds, TabularConfig):
        _require(
            sum([bool(ds.paths), bool(ds.site_kits), ds.path is not None]) == 1,
            "dataset.paths",
            ds.paths,
            "exactly one of: dataset.paths (one CSV per site), dataset.site_kits (one kit YAML "
            "per site) or dataset.path (one CSV partitioned across sites)",
        )
        _require(
            not ds.site_names or len(ds.site_names) == len(ds.paths),
            "dataset.site_names",
            ds.site_names,
            f"one name per entry of dataset.paths ({len(ds.paths)})",
        )
        _require(len(ds.classes) >= 2, "dataset.classes", ds.classes, "at least two classes")
    if isinstance(ds, SyntheticTabularConfig):
        _require(
            ds.records_per_site >= 20,
            "dataset.records_per_site",
            ds.records_per_site,
            "an integer >= 20 (each synthetic site needs both classes in train and test)",
        )
        for key, value in (("dataset.jitter", ds.jitter), ("dataset.site_shift", ds.site_shift)):
            _require(value >= 0.0, key, value, "a number >= 0")

    m = cfg.model
    _require(m.lr > 0.0 and math.isfinite(m.lr), "model.lr", m.lr, "a finite number > 0")
    _require(m.batch_size >= 1, "model.batch_size", m.batch_size, "an integer >= 1")
    _require(0.0 <= m.momentum < 1.0, "model.momentum", m.momentum, "a number in [0, 1)")
    _require(m.weight_decay >= 0.0, "model.weight_decay", m.weight_decay, "a number >= 0")
    problem = class_weight_problem(m.class_weight, private=isinstance(cfg.privacy, DpConfig))
    _require(problem is None, "model.class_weight", m.class_weight, problem or "")

    if isinstance(cfg.privacy, DpConfig):
        _validate_dp(cfg.privacy, kits_state_budgets=bool(getattr(cfg.dataset, "site_kits", None)))
    if isinstance(cfg.secagg, SecAggPlusConfig):
        _validate_secagg(cfg.secagg)
    for fault in cfg.inject_faults:
        parse_fault(fault)
    _validate_audit(cfg)
    try:
        rule = parse_threshold(cfg.evaluation.threshold)
    except ValueError as exc:
        raise ConfigError("evaluation.threshold", cfg.evaluation.threshold, str(exc)) from None
    fraction = cfg.evaluation.validation_fraction
    _require(0.0 < fraction < 1.0, "evaluation.validation_fraction", fraction, "a number in (0, 1)")
    if not rule.needs_validation and isinstance(cfg.privacy, DpConfig):
        edges = [float(e) for e in cfg.privacy.evaluation_margin_edges]
        _require(
            rule.value in edges,
            "evaluation.threshold",
            cfg.evaluation.threshold,
            f"under privacy=dp a fixed threshold among privacy.evaluation_margin_edges {edges}",
        )

    _validate_personalization(cfg)
    s = cfg.strategy
    _require(s.proximal_mu >= 0.0, "strategy.proximal_mu", s.proximal_mu, "a number >= 0")
    _require(s.server_lr > 0.0, "strategy.server_lr", s.server_lr, "a number > 0")
    _require(0.0 <= s.beta1 < 1.0, "strategy.beta1", s.beta1, "a number in [0, 1)")
    _require(0.0 <= s.beta2 < 1.0, "strategy.beta2", s.beta2, "a number in [0, 1)")
    _require(s.tau > 0.0, "strategy.tau", s.tau, "a number > 0")
    decay = s.average_decay
    _require(
        decay is None or 0.0 <= decay < 1.0, "strategy.average_decay", decay, "null or [0, 1)"
    )


def _validate_personalization(cfg: FedMedConfig) -> None:
    p = cfg.personalization
    _require(p.epochs >= 1, "personalization.epochs", p.epochs, "an integer >= 1")
    _require(
        p.lam >= 0.0 and math.isfinite(p.lam), "personalization.lam", p.lam, "a number >= 0"
    )
    if p.name is PersonalizationName.fedper:
        _require(
            cfg.model.name not in (ModelName.svm, ModelName.logreg),
            "personalization",
            p.name.value,
            "a model with a body and a head (cnn, dpcnn, scatter) for fedper: svm and logreg "
            "are one layer, whose FedPer is local-only training (personalization=mrmtl "
            "personalization.lam=0)",
        )
    if p.name is PersonalizationName.mrmtl:
        _require(
            cfg.strategy.proximal_mu == 0.0,
            "strategy.proximal_mu",
            cfg.strategy.proximal_mu,
            "0 with personalization=mrmtl (its personalization.lam is the proximal term)",
        )


def evaluates_personal_model(cfg: FedMedConfig, server_round: int) -> bool:
    """Whether this evaluation also reports each site's personal model on its test split:
    the final one, under finetune or mrmtl (FedPer's evaluation is of its personal models)."""
    personal = cfg.personalization.name in (
        PersonalizationName.finetune,
        PersonalizationName.mrmtl,
    )
    return personal and server_round == cfg.federation.rounds


def personal_epochs(cfg: FedMedConfig) -> int:
    """The training epochs a site adds, after the planned rounds, for its personal model."""
    p = cfg.personalization
    return p.epochs if p.name is PersonalizationName.finetune else 0


# privacy.target_epsilon, checked before any site trains. Below 0.1, PRV calibration slows
# down sharply (its mesh is relative to epsilon: 4.5 s per evaluation from noise 32 up, vs.
# 0.1-0.7 s at noise 1-16, on the bundled sites) and RDP cannot reach it at all for small
# deltas (its floor is 0.03 at delta 1e-3, 0.10 at 1e-5). Above 20 the guarantee bounds a
# likelihood ratio of e^20 (about 5e8): no protection worth the name (privacy=none says so
# honestly), and towards small noise PRV's arithmetic overflows (numpy warnings while
# calibrating 50-100; infinity from about 400). Within the range, on the heart and pneumonia
# sites, calibration took 1-3 s per site (20 s on a loaded machine) and PRV stayed within
# 0.32% of dp-accounting's PLD.
MIN_TARGET_EPSILON = 0.1
MAX_TARGET_EPSILON = 20.0


def _validate_dp(p: DpConfig, kits_state_budgets: bool) -> None:
    _require(
        p.accountant is not Accountant.gdp,
        "privacy.accountant",
        "gdp",
        "prv or rdp: gdp is an asymptotic approximation, not an upper bound on epsilon, so "
        "no site's budget check may use it",
    )
    both = p.target_epsilon is not None and p.noise_multiplier is not None
    _require(
        not both,
        "privacy.noise_multiplier",
        p.noise_multiplier,
        "null when privacy.target_epsilon is set (give one of the two; to fix the noise, "
        "add privacy.target_epsilon=null)",
    )
    _require(
        p.target_epsilon is not None or p.noise_multiplier is not None,
        "privacy.target_epsilon",
        p.target_epsilon,
        "a number > 0 (or set privacy.noise_multiplier)",
    )
    edges_problem = margin_edges_problem(p.evaluation_margin_edges)
    _require(
        edges_problem is None,
        "privacy.evaluation_margin_edges",
        list(p.evaluation_margin_edges),
        f"sorted logit margins including 0 ({edges_problem})",
    )
    _require(
        p.evaluation_epsilon is None
        or MIN_TARGET_EPSILON <= p.evaluation_epsilon <= MAX_TARGET_EPSILON,
        "privacy.evaluation_epsilon",
        p.evaluation_epsilon,
        f"a number in [{MIN_TARGET_EPSILON:g}, {MAX_TARGET_EPSILON:g}] (null: "
        "privacy.target_epsilon)",
    )
    for key, value in (
        ("privacy.target_epsilon", p.target_epsilon),
        ("privacy.budget_epsilon", p.budget_epsilon),
    ):
        _require(
            value is None or (value > 0.0 and math.isfinite(value)),
            key,
            value,
            "a finite number > 0",
        )
    _require(
        p.target_epsilon is None or MIN_TARGET_EPSILON <= p.target_epsilon <= MAX_TARGET_EPSILON,
        "privacy.target_epsilon",
        p.target_epsilon,
        f"a number in [{MIN_TARGET_EPSILON:g}, {MAX_TARGET_EPSILON:g}]: below "
        f"{MIN_TARGET_EPSILON:g} calibration is slow or unreachable, above "
        f"{MAX_TARGET_EPSILON:g} the guarantee means nothing (use privacy=none, or fix "
        "privacy.noise_multiplier with privacy.target_epsilon=null)",
    )
    _require(
        p.delta is None or 0.0 < p.delta < 1.0, "privacy.delta", p.delta, "a number in (0, 1)"
    )
    _require(
        p.noise_multiplier is None or p.noise_multiplier > 0.0,
        "privacy.noise_multiplier",
        p.noise_multiplier,
        "a number > 0",
    )
    _require(
        p.max_grad_norm > 0.0 and math.isfinite(p.max_grad_norm),
        "privacy.max_grad_norm",
        p.max_grad_norm,
        "a finite number > 0",
    )
    _require(
        p.target_epsilon is not None or p.budget_epsilon is not None or kits_state_budgets,
        "privacy.budget_epsilon",
        p.budget_epsilon,
        "a number > 0: with an explicit privacy.noise_multiplier each site needs a lifetime "
        "budget (or its kit's budget_epsilon)",
    )


def _validate_audit(cfg: FedMedConfig) -> None:
    a = cfg.audit
    _require(a.canaries >= 0, "audit.canaries", a.canaries, "an integer >= 0 (0: no audit)")
    _require(0.0 < a.confidence < 1.0, "audit.confidence", a.confidence, "a number in (0, 1)")
    _require(0.0 < a.delta < 1.0, "audit.delta", a.delta, "a number in (0, 1)")
    _require(
        not a.disable_noise or isinstance(cfg.privacy, DpConfig),
        "audit.disable_noise",
        a.disable_noise,
        "false unless privacy=dp (it is the empirical audit's self-test)",
    )


def _validate_secagg(sa: SecAggPlusConfig) -> None:
    _require(
        sa.num_shares is None or sa.num_shares >= 3,
        "secagg.num_shares",
        sa.num_shares,
        "an integer >= 3 (or null: one share per sampled site)",
    )
    _require(
        sa.reconstruction_threshold is None or sa.reconstruction_threshold >= 2,
        "secagg.reconstruction_threshold",
        sa.reconstruction_threshold,
        "an integer >= 2 (or null: two thirds of the shares)",
    )
    _require(
        sa.clipping_range > 0.0 and math.isfinite(sa.clipping_range),
        "secagg.clipping_range",
        sa.clipping_range,
        "a finite number > 0",
    )
    _require(
        2 <= sa.quantization_range < MODULUS_RANGE,
        "secagg.quantization_range",
        sa.quantization_range,
        f"an integer in [2, 2^32) (masks live modulo {MODULUS_RANGE})",
    )
    _require(
        sa.max_weight > 0.0 and math.isfinite(sa.max_weight),
        "secagg.max_weight",
        sa.max_weight,
        "a finite number > 0",
    )
    _require(
        sa.timeout is None or sa.timeout > 0,
        "secagg.timeout",
        sa.timeout,
        "seconds > 0 (or null: wait for every reply)",
    )


# Where a simulated fault strikes: a site failing at a stage (fit or a SecAgg+ stage), or a
# site whose local training diverges (its update or its loss becomes NaN) in that round.
FAULT_STAGES = (
    "fit",
    "setup",
    "share_keys",
    "collect_masked_vectors",
    "unmask",
    "nan_update",
    "nan_loss",
)


def parse_fault(fault: str) -> tuple[str, str, int]:
    """``"SITE:STAGE:ROUND"`` -> (site, stage, round)."""
    parts = fault.split(":")
    ok = len(parts) == 3 and parts[1] in FAULT_STAGES and parts[2].isdigit()
    _require(
        ok,
        "inject_faults",
        fault,
        f"entries SITE:STAGE:ROUND with STAGE one of {', '.join(FAULT_STAGES)}",
    )
    return parts[0], parts[1], int(parts[2])


def site_faults(cfg: FedMedConfig, site: str) -> tuple[tuple[str, int], ...]:
    """The (stage, round) faults ``inject_faults`` assigns to one site."""
    return tuple(
        (stage, server_round)
        for name, stage, server_round in map(parse_fault, cfg.inject_faults)
        if name == site
    )
