"""Site data: bundled real datasets, generic CSV / MedMNIST loaders, site-local preprocessing."""

from fedmed.data.sources import (
    data_schema,
    load_site,
    model_columns,
    num_sites,
    resolve_path,
    site_kit,
    site_names,
)
from fedmed.data.types import DataSchema, SiteData

__all__ = [
    "DataSchema",
    "SiteData",
    "data_schema",
    "load_site",
    "model_columns",
    "num_sites",
    "resolve_path",
    "site_kit",
    "site_names",
]
