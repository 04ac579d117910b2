"""Typed records read from plain mappings: a ledger line's JSON, a reply's metrics.

One reader for every frozen dataclass fedmed keeps on disk or sends between site and
coordinator, so no reader parses such a mapping by hand. Each field is taken by the kind its
annotation names (text, integer, number, JSON object); a missing required field, or a value of
another kind (``true`` is not a number, ``null`` is no value), is one ``RecordError`` that names
the field. Values are kept as read (an integer in a number field stays an integer), so a record
written back gives the same JSON. Keys the record does not know are handed back to the caller:
a record from a newer fedmed (schemas only grow) can be kept whole.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


class RecordError(ValueError):
    """A mapping is not the record it should be; the message names the field."""


# Metadata of a field that is not read from the mapping (e.g. the keys a record keeps whole).
UNREAD = types.MappingProxyType({"fedmed.records.read": False})


_KINDS: dict[type, str] = {
    str: "text",
    int: "an integer",
    float: "a number",
    dict: "a JSON object",
    bytes: "bytes",
}


def _kind(hint: Any) -> type:
    """The value type a field's annotation names, without ``| None`` (``dict[str, Any]``: dict)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, type, bool], ...]:
    """(name, kind, required) of every field of ``cls`` read from a mapping: those of a plain
    kind (a nested record is the caller's), unless marked ``UNREAD``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = _kind(hints[f.name])
        if kind in _KINDS and f.metadata.get("fedmed.records.read", True):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            out.append((f.name, kind, required))
    return tuple(out)


def field_names(cls: type) -> tuple[str, ...]:
    """The keys ``read_fields`` takes for ``cls``, in field order."""
    return tuple(name for name, _, _ in _fields(cls))


def _checked(what: str, name: str, value: Any, kind: type) -> Any:
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        shown = "null" if value is None else f"{value!r:.40}"
        raise RecordError(f"{what} field '{name}' is {shown}, not {_KINDS[kind]}")
    return value


def read_fields(cls: type, raw: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The values of ``cls``'s plain fields found in ``raw``, each checked against its kind.

    Absent optional fields are left out (the dataclass default applies); ``what`` starts
    every error ("entry", "fit report").
    """
    missing = [name for name, _, required in _fields(cls) if required and name not in raw]
    if missing:
        raise RecordError(f"{what} lacks {', '.join(missing)}")
    return {
        name: _checked(what, name, raw[name], kind)
        for name, kind, _ in _fields(cls)
        if name in raw
    }


def unknown_keys(raw: Mapping[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """The items of ``raw`` whose keys no record field names, in their order."""
    names = set(known)
    return {key: value for key, value in raw.items() if key not in names}
