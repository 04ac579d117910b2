"""SYNTHETIC hospitals for scale tests (``dataset=synthetic_heart``): never real patients.

Each synthetic site resamples the pooled real records with replacement, then jitters the
continuous features and shifts them by an offset drawn for that site, so sites differ the
way hospitals do (case mix, measurement habits) while every value stays in a realistic range.
Missing values stay missing. Everything follows from the run seed and the site index.
"""

from __future__ import annotations

import numpy as np

from fedmed.config.schema import SyntheticTabularConfig
from fedmed.data.tabular import Table
from fedmed.errors import ConfigError

SYNTHETIC_PREFIX = "synthetic-"


def synthetic_site_name(index: int) -> str:
    return f"{SYNTHETIC_PREFIX}{index:04d}"


def pooled(tables: list[Table]) -> Table:
    """One table of every real record, for resampling."""
    return Table(
        np.concatenate([t.features for t in tables]),
        np.concatenate([t.labels for t in tables]),
        tables[0].feature_names,
    )


def synthetic_table(source: Table, ds: SyntheticTabularConfig, rng: np.random.Generator) -> Table:
    """``ds.records_per_site`` resampled, jittered and site-shifted records."""
    unknown = [f for f in ds.jitter_features if f not in source.feature_names]
    if unknown:
        raise ConfigError(
            "dataset.jitter_features", unknown, f"names among {', '.join(source.feature_names)}"
        )
    rows = rng.integers(0, len(source.labels), size=ds.records_per_site)
    features = source.features[rows].copy()
    for name in ds.jitter_features:
        column = source.feature_names.index(name)
        sd = float(np.nanstd(source.features[:, column]))
        shift = ds.site_shift * sd * rng.standard_normal()
        noise = ds.jitter * sd * rng.standard_normal(ds.records_per_site)
        features[:, column] += shift + noise  # NaN (missing) stays NaN
    return Table(features, source.labels[rows].copy(), source.feature_names)
