"""From a dataset config to each site's preprocessed data, the site names and the data schema.

Natural federations (one CSV per hospital) keep their hospitals; single sources (one CSV,
scikit-learn's breast cancer data, a MedMNIST ``.npz``) are split into train/test and then
partitioned across ``federation.num_sites`` sites. Every statistic used in preprocessing is
computed inside one site. Results are cached per process so a site never reloads its data
between rounds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np

from fedmed.config.schema import (
    DatasetConfig,
    FedMedConfig,
    ImageConfig,
    SklearnConfig,
    SyntheticTabularConfig,
    TabularConfig,
)
from fedmed.data.canaries import with_canaries
from fedmed.data.images import ImageSplits, load_medmnist
from fedmed.data.partition import partition_train_test, stratified_split
from fedmed.data.synthetic import pooled, synthetic_site_name, synthetic_table
from fedmed.data.tabular import (
    InputColumn,
    SitePreprocessor,
    Table,
    TabularSpec,
    read_table,
    spec_columns,
)
from fedmed.data.types import DataSchema, SiteData
from fedmed.errors import ConfigError
from fedmed.kits.files import BUNDLED_PREFIX
from fedmed.kits.site import SiteKit, load_site_kit
from fedmed.operating_point import parse_threshold

DEFAULT_NUM_SITES = 4


def resolve_path(path: str) -> Path:
    """``bundled:NAME/FILE`` points into the package's own data; anything else is a file path."""
    if path.startswith(BUNDLED_PREFIX):
        root = resources.files("fedmed.data.bundled")
        return Path(str(root.joinpath(path[len(BUNDLED_PREFIX) :])))
    return Path(path).expanduser()


def _is_natural_federation(ds: DatasetConfig) -> bool:
    """One site per file or kit (synthetic sites only draw from the files)."""
    return (
        isinstance(ds, TabularConfig)
        and not isinstance(ds, SyntheticTabularConfig)
        and bool(ds.paths or ds.site_kits)
    )


@functools.cache
def _load_kits(kits: tuple[str, ...]) -> tuple[SiteKit, ...]:
    return tuple(load_site_kit(k) for k in kits)


def site_kit(cfg: FedMedConfig, index: int) -> SiteKit | None:
    """The hospital's kit when a simulated federation is read through site kits, else None.

    A deployed site never calls this: it reads only its own kit (node_config ``kit``).
    """
    ds = cfg.dataset
    if isinstance(ds, TabularConfig) and ds.site_kits:
        return _load_kits(tuple(ds.site_kits))[index]
    return None


def site_seed(name: str) -> int:
    """A stable number from a site's name: its data split must not depend on which other
    hospitals are in the run (or in what order), nor on Python's per-process hash seed."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def site_files(ds: TabularConfig) -> tuple[list[str], list[str]]:
    """(data path, site name) per hospital, from dataset.site_kits or dataset.paths."""
    if ds.site_kits:
        kits = _load_kits(tuple(ds.site_kits))
        return [k.data.path for k in kits], [k.name for k in kits]
    return list(ds.paths), list(ds.site_names) or [resolve_path(p).stem for p in ds.paths]


def num_sites(cfg: FedMedConfig) -> int:
    """Sites in the federation: one per file for natural federations, else federation.num_sites."""
    requested = cfg.federation.num_sites
    ds = cfg.dataset
    if _is_natural_federation(ds):
        assert isinstance(ds, TabularConfig)
        count = len(ds.site_kits or ds.paths)  # counted without reading any kit
        if requested is not None and requested != count:
            raise ConfigError(
                "federation.num_sites",
                requested,
                f"{count} (or null): dataset={ds.name} has one site per file "
                "(dataset.paths / dataset.site_kits)",
            )
        return count
    return requested if requested is not None else DEFAULT_NUM_SITES


def site_names(cfg: FedMedConfig) -> list[str]:
    """Hospital names for natural federations (kits, site_names or file names), else site-i."""
    ds = cfg.dataset
    if _is_natural_federation(ds):
        assert isinstance(ds, TabularConfig)
        return site_files(ds)[1]
    if isinstance(ds, SyntheticTabularConfig):
        return [synthetic_site_name(i) for i in range(num_sites(cfg))]
    return [f"site-{i}" for i in range(num_sites(cfg))]


def tabular_spec(ds: TabularConfig) -> TabularSpec:
    """The reading/preprocessing rules of a CSV dataset, as an immutable value."""
    return TabularSpec(
        label=ds.label,
        header=tuple(ds.header) if ds.header else None,
        features=tuple(ds.features) if ds.features else None,
        categorical=tuple((k, tuple(v)) for k, v in ds.categorical.items()),
        zero_as_missing=tuple(ds.zero_as_missing),
        missing_values=tuple(ds.missing_values),
        binarize_above=ds.binarize_above,
        classes=tuple(ds.classes),
        missing_indicators=ds.missing_indicators,
    )


def _tabular_site(
    name: str, table: Table, spec: TabularSpec, train: np.ndarray, test: np.ndarray
) -> SiteData:
    prep = SitePreprocessor.fit(table, spec, train)
    return SiteData(
        name=name,
        x_train=prep.transform_rows(table, train),
        y_train=table.labels[train],
        x_test=prep.transform_rows(table, test),
        y_test=table.labels[test],
        num_classes=len(spec.classes),
        preprocessing=prep,
    )


@functools.cache
def _read_table_cached(path: str, spec: TabularSpec) -> Table:
    return read_table(resolve_path(path), spec)


@functools.cache
def _sklearn_table(loader: str) -> Table:
    from sklearn import datasets

    bunch = getattr(datasets, loader)()
    return Table(
        bunch.data.astype(np.float64), bunch.target.astype(np.int64), tuple(bunch.feature_names)
    )


@functools.cache
def _partition(
    train_labels: bytes,
    test_labels: bytes,
    n: int,
    method: str,
    alpha: float,
    min_records: int,
    seed: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return partition_train_test(
        np.frombuffer(train_labels, dtype=np.int64),
        np.frombuffer(test_labels, dtype=np.int64),
        n,
        method,
        alpha,
        min_records,
        seed,
    )


def _partition_for(
    cfg: FedMedConfig, y_train: np.ndarray, y_test: np.ndarray, index: int
) -> tuple[np.ndarray, np.ndarray]:
    ds = cfg.dataset
    train_parts, test_parts = _partition(
        y_train.tobytes(),
        y_test.tobytes(),
        num_sites(cfg),
        ds.partition.value,
        ds.alpha,
        ds.min_records_per_site,
        cfg.seed,
    )
    return train_parts[index], test_parts[index]


def _load_partitioned_table(
    cfg: FedMedConfig, table: Table, spec: TabularSpec, index: int
) -> SiteData:
    train_all, test_all = stratified_split(
        table.labels, cfg.dataset.test_fraction, np.random.default_rng(cfg.seed)
    )
    train_part, test_part = _partition_for(
        cfg, table.labels[train_all], table.labels[test_all], index
    )
    return _tabular_site(f"site-{index}", table, spec, train_all[train_part], test_all[test_part])


@functools.cache
def _pooled_table(paths: tuple[str, ...], spec: TabularSpec) -> Table:
    return pooled([_read_table_cached(p, spec) for p in paths])


def _sklearn_spec(table: Table) -> TabularSpec:
    """A scikit-learn table: numeric features, no missing values, classes 0..K-1."""
    classes = tuple(range(int(table.labels.max()) + 1))
    return TabularSpec(label="target", classes=classes, missing_indicators=False)


def _load_site_uncached(cfg: FedMedConfig, index: int) -> SiteData:
    ds = cfg.dataset
    if isinstance(ds, SyntheticTabularConfig):
        spec = tabular_spec(ds)
        rng = np.random.default_rng([cfg.seed, index, 0x5E7])
        table = synthetic_table(_pooled_table(tuple(ds.paths), spec), ds, rng)
        train, test = stratified_split(table.labels, ds.test_fraction, rng)
        return _tabular_site(synthetic_site_name(index), table, spec, train, test)
    if isinstance(ds, TabularConfig):
        spec = tabular_spec(ds)
        if _is_natural_federation(ds):
            table = _read_table_cached(site_files(ds)[0][index], spec)
            name = site_names(cfg)[index]
            rng = np.random.default_rng([cfg.seed, site_seed(name)])
            train, test = stratified_split(table.labels, ds.test_fraction, rng)
            return _tabular_site(name, table, spec, train, test)
        assert ds.path is not None
        return _load_partitioned_table(cfg, _read_table_cached(ds.path, spec), spec, index)
    if isinstance(ds, SklearnConfig):
        table = _sklearn_table(ds.loader)
        return _load_partitioned_table(cfg, table, _sklearn_spec(table), index)
    if isinstance(ds, ImageConfig):
        images = _load_images_cached(ds.path, ds.num_classes, ds.channels)
        train, test = _partition_for(cfg, images.y_train, images.y_test, index)
        return SiteData(
            name=f"site-{index}",
            x_train=images.x_train[train],
            y_train=images.y_train[train],
            x_test=images.x_test[test],
            y_test=images.y_test[test],
            num_classes=images.num_classes,
        )
    raise ConfigError(
        "dataset", ds.name, "a dataset config of a known kind (tabular, sklearn, image)"
    )


@functools.cache
def _load_images_cached(path: str, num_classes: int | None, channels: int | None) -> ImageSplits:
    return load_medmnist(resolve_path(path), num_classes, channels)

def audited_site(cfg: FedMedConfig) -> str:
    """``audit.site``, or the first site."""
    names = site_names(cfg)
    site = cfg.audit.site or names[0]
    if site not in names:
        raise ConfigError("audit.site", site, f"one of the sites: {', '.join(names)}")
    return site



_site_cache: dict[tuple[str, int], SiteData] = {}


def with_validation(data: SiteData, fraction: float, seed: int) -> SiteData:
    """``data`` with a stratified ``fraction`` of its training records moved to a validation
    split, seeded by the run's seed and the site's name (not its position), as the test split
    is. The site's own preprocessing was fitted before the carve, on all its training records."""
    rng = np.random.default_rng([seed, site_seed(data.name), 0x7A1])
    train, val = stratified_split(data.y_train, fraction, rng)
    return dataclasses.replace(
        data,
        x_train=data.x_train[train],
        y_train=data.y_train[train],
        x_val=data.x_train[val],
        y_val=data.y_train[val],
    )


def load_site(cfg: FedMedConfig, index: int) -> SiteData:
    """One site's preprocessed data; loaded once per process and reused in every round."""
    total = num_sites(cfg)
    if not 0 <= index < total:
        raise ConfigError("site index", index, f"0..{total - 1}")
    rule = parse_threshold(cfg.evaluation.threshold)
    fraction = cfg.evaluation.validation_fraction if rule.needs_validation else None
    key = (repr((cfg.dataset, cfg.federation.num_sites, cfg.seed, cfg.audit, fraction)), index)
    if key not in _site_cache:
        data = _load_site_uncached(cfg, index)
        if (rule.needs_validation or rule.value != 0.0) and data.num_classes != 2:
            raise ConfigError(
                "evaluation.threshold",
                cfg.evaluation.threshold,
                f"0: {cfg.dataset.name} has {data.num_classes} classes, and a decision "
                "threshold on the logit margin needs a binary task",
            )
        if fraction is not None:
            data = with_validation(data, fraction, cfg.seed)
        if cfg.audit.canaries and data.name == audited_site(cfg):
            data = with_canaries(data, cfg)  # the empirical audit's site only
        _site_cache[key] = data
    return _site_cache[key]


def model_columns(cfg: FedMedConfig) -> tuple[InputColumn, ...] | None:
    """The names of the model's input columns for a table (from the reading rules and the
    first source's header); None for images."""
    ds = cfg.dataset
    if isinstance(ds, SklearnConfig):
        table = _sklearn_table(ds.loader)
        return spec_columns(_sklearn_spec(table), table.feature_names)
    if not isinstance(ds, TabularConfig):
        return None
    spec = tabular_spec(ds)
    first = site_files(ds)[0][0] if (ds.paths or ds.site_kits) else str(ds.path)
    return spec_columns(spec, _read_table_cached(first, spec).feature_names)


def data_schema(cfg: FedMedConfig) -> DataSchema:
    """Input shape and class count for building the global model (reads the first source only)."""
    ds = cfg.dataset
    if isinstance(ds, TabularConfig):
        return DataSchema((len(model_columns(cfg) or ()),), len(ds.classes))
    if isinstance(ds, SklearnConfig):
        table = _sklearn_table(ds.loader)
        return DataSchema((table.features.shape[1],), int(table.labels.max()) + 1)
    if isinstance(ds, ImageConfig):
        images = _load_images_cached(ds.path, ds.num_classes, ds.channels)
        return DataSchema(tuple(images.x_train.shape[1:]), images.num_classes)
    raise ConfigError(
        "dataset", ds.name, "a dataset config of a known kind (tabular, sklearn, image)"
    )
