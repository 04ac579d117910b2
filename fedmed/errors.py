"""The project's own errors: each one names the file, site or config key and what to change."""

from __future__ import annotations

# A site's refusal of a run starts with this (after its name); the coordinator counts them.
REFUSES = "refuses the run"


class FedMedError(Exception):
    """Base class for user-facing errors; the CLI prints them as one line, without a traceback."""


class ConfigError(FedMedError):
    """A configuration value is out of range or inconsistent."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        super().__init__(f"config error: {key}={value!r} is not allowed; expected {allowed}")


class DataError(FedMedError):
    """A site's data file is missing or malformed."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        super().__init__(f"data error in {source}: {problem}")


class SiteError(FedMedError):
    """A site could not take part in a round; the message starts with the site's name."""

    def __init__(self, site: str, problem: str) -> None:
        self.site = site
        super().__init__(f"site '{site}': {problem}")
