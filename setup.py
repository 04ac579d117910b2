"""The one packaging rule pyproject.toml cannot state: the Hydra tree ``conf/`` (at the
repository's top) ships inside the wheel as the package ``fedmed.conf``, beside the packages
under ``fedmed/``.

Folders holding only data (``conf/dataset``, ``fedmed/data/bundled/heart_disease``, ...) are
listed as (namespace) packages too, as setuptools asks. Metadata, dependencies and which
files ship as package data are in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

CONF_PACKAGE, CONF_DIR = "fedmed.conf", "conf"
NO_CACHE = ["*__pycache__"]

setup(
    packages=[
        *find_namespace_packages(include=["fedmed", "fedmed.*"], exclude=NO_CACHE),
        CONF_PACKAGE,
        *(
            f"{CONF_PACKAGE}.{group}"
            for group in find_namespace_packages(where=CONF_DIR, exclude=NO_CACHE)
        ),
    ],
    package_dir={CONF_PACKAGE: CONF_DIR},
)
