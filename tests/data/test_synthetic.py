"""dataset=synthetic_heart: labelled synthetic, reproducible, realistic, and different per site."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest

from fedmed.config.schema import FedMedConfig
from fedmed.data import data_schema, load_site, num_sites, site_names
from fedmed.data.sources import _load_site_uncached, _pooled_table, tabular_spec
from fedmed.errors import FedMedError


def test_sites_are_named_synthetic_and_counted_by_federation_num_sites(
    compose: Callable[..., FedMedConfig],
) -> None:
    cfg = compose("dataset=synthetic_heart", "federation.num_sites=1000")
    assert num_sites(cfg) == 1000
    assert site_names(cfg)[:2] == ["synthetic-0000", "synthetic-0001"]
    site = load_site(cfg, 999)
    assert site.name == "synthetic-0999"
    assert len(site.y_train) + len(site.y_test) == 100
    assert set(site.y_train.tolist()) == {0, 1} and set(site.y_test.tolist()) == {0, 1}
    assert site.schema == data_schema(cfg)  # the real heart model fits it


def test_same_seed_same_site_and_sites_differ(compose: Callable[..., FedMedConfig]) -> None:
    cfg = compose("dataset=synthetic_heart", "federation.num_sites=3", "seed=7")
    other_seed = compose("dataset=synthetic_heart", "federation.num_sites=3", "seed=8")
    first = _load_site_uncached(cfg, 0)
    assert np.array_equal(_load_site_uncached(cfg, 0).x_train, first.x_train)
    assert not np.array_equal(_load_site_uncached(cfg, 1).x_train, first.x_train)
    assert not np.array_equal(_load_site_uncached(other_seed, 0).x_train, first.x_train)


def test_jitter_and_site_shift_stay_in_a_realistic_range(
    compose: Callable[..., FedMedConfig],
) -> None:
    from fedmed.data.synthetic import synthetic_table

    cfg = compose("dataset=synthetic_heart", "dataset.records_per_site=2000")
    ds = cfg.dataset
    source = _pooled_table(tuple(ds.paths), tabular_spec(ds))  # type: ignore[arg-type]
    age = source.feature_names.index("age")
    ages = [
        np.nanmean(synthetic_table(source, ds, np.random.default_rng([0, i])).features[:, age])  # type: ignore[arg-type]
        for i in range(20)
    ]
    real = float(np.nanmean(source.features[:, age]))
    sd = float(np.nanstd(source.features[:, age]))
    assert np.std(ages) > 0.1 * sd  # sites differ (shift 0.25 sd)
    assert all(abs(m - real) < sd for m in ages)  # but stay plausible
    sex = source.feature_names.index("sex")
    table = synthetic_table(source, ds, np.random.default_rng(0))  # type: ignore[arg-type]
    assert set(np.unique(table.features[:, sex])) <= {0.0, 1.0}  # categorical kept exact


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("dataset.records_per_site=5", "dataset.records_per_site"),
        ("dataset.jitter=-1", "dataset.jitter"),
    ],
)
def test_bad_synthetic_settings_name_the_key(
    compose: Callable[..., FedMedConfig], override: str, key: str
) -> None:
    with pytest.raises(FedMedError, match=re.escape(key)):
        compose("dataset=synthetic_heart", override)


def test_unknown_jitter_feature_names_the_key(compose: Callable[..., FedMedConfig]) -> None:
    cfg = compose("dataset=synthetic_heart", "dataset.jitter_features=[age,weight]")
    with pytest.raises(FedMedError, match=r"dataset\.jitter_features"):
        load_site(cfg, 0)
