"""The site registry: which registered node id is which hospital, as the operator said.

``fedmed server start`` registers the node keys of the server kit's ``sites`` (and no other)
with the SuperLink and writes this file in the state folder; the deployed coordinator reads
it. A site's name then comes from the key it authenticated with, never from what the node
says about itself: a node that claims another name is refused (coordinator/grid.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedmed.errors import FedMedError

REGISTRY_FILE = "site-registry.json"
FORMAT = 1


def write_registry(path: Path, nodes: dict[int, str]) -> None:
    """Write node id -> site name atomically (a run started meanwhile reads a whole file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": FORMAT, "nodes": {str(node): site for node, site in sorted(nodes.items())}}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(partial, path)


def read_registry(path: str | Path) -> dict[int, str]:
    """Node id -> site name; a missing or damaged file is one line saying how to rebuild it."""
    source = Path(path)
    hint = "restart `fedmed server start` to rebuild it from the server kit"
    try:
        body = json.loads(source.read_text())
        if body.get("format") != FORMAT:
            raise ValueError(f"format {body.get('format')!r}, expected {FORMAT}")
        nodes = {int(node): str(site) for node, site in body["nodes"].items()}
    except FileNotFoundError:
        raise FedMedError(f"site registry {source}: file not found; {hint}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FedMedError(f"site registry {source}: unreadable ({exc}); {hint}") from None
    if len(set(nodes.values())) != len(nodes):
        raise FedMedError(f"site registry {source}: a site name appears twice; {hint}")
    return nodes
