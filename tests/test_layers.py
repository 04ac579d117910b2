"""The package's layers import one way (ARCHITECTURE.md): a module imports only from its own
layer or the layers below, and nothing below the site/coordinator layer pulls Flower.

Read from the source (every ``import``, including those inside functions), so a lazy import
that would run upward only on some code path is caught as well as a module-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fedmed

PACKAGE = Path(fedmed.__file__).parent

# Lowest first. A module belongs to the first layer with a prefix it starts with.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("basics", ("fedmed.errors", "fedmed.metrics", "fedmed.operating_point", "fedmed.pages",
                "fedmed.plots", "fedmed.process_tree", "fedmed.records", "fedmed.terminal")),
    ("config/kits", ("fedmed.config", "fedmed.kits", "fedmed.provenance")),
    ("data/models", ("fedmed.data", "fedmed.models", "fedmed.train")),
    ("privacy/secure", ("fedmed.privacy", "fedmed.secure")),
    ("wire", ("fedmed.protocol",)),
    ("site/coordinator", ("fedmed.site", "fedmed.coordinator")),
    ("runs", ("fedmed.runs",)),
    ("audit/deploy/explain", ("fedmed.audit", "fedmed.deploy", "fedmed.explain")),
    ("cli", ("fedmed.cli",)),
)
# Same layer, still never each other: a site does not know the coordinator's code, nor the
# reverse (what they share is on the wire, in fedmed.protocol); the auditor's tools and the
# deployment launchers are independent, and so are the explanations and the audit.
APART = (
    ("fedmed.site", "fedmed.coordinator"),
    ("fedmed.audit", "fedmed.deploy"),
    ("fedmed.audit", "fedmed.explain"),
)
NO_FLOWER_BELOW = "wire"  # layers before this one must not import flwr


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int:
    """The index in LAYERS of ``module``'s layer; the bare package counts as basics."""
    if module == "fedmed":
        return 0
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(_within(module, prefix) for prefix in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and ARCHITECTURE.md")


def imports_of(module: str) -> set[str]:
    """Every module ``module``'s source imports (absolute names), wherever the import sits."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _fedmed_target(name: str) -> str | None:
    """The fedmed module an imported name refers to (``from x import func`` -> ``x``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_its_own_layer_or_below(module: str) -> None:
    own = layer_of(module)
    upward: list[str] = []
    for name in sorted(imports_of(module)):
        target = _fedmed_target(name) if _within(name, "fedmed") else None
        if target is None or target == module:
            continue
        if layer_of(target) > own:
            upward.append(f"{target} ({LAYERS[layer_of(target)][0]})")
        for left, right in APART:
            crossing = (_within(module, left) and _within(target, right)) or (
                _within(module, right) and _within(target, left)
            )
            if crossing:
                upward.append(f"{target} (apart from {module.split('.')[1]})")
    problems = ", ".join(sorted(set(upward)))
    assert not upward, f"{module} ({LAYERS[own][0]}) imports upward: {problems}"


def test_no_flower_below_the_wire() -> None:
    """Statically, no module below the wire layer names flwr; and importing every one of them
    together (what a site's privacy code or the auditor's accountant loads) leaves flwr out of
    ``sys.modules`` (nothing reaches Flower through a third-party package either)."""
    boundary = [name for name, _ in LAYERS].index(NO_FLOWER_BELOW)
    below = sorted(m for m in MODULES if layer_of(m) < boundary)
    naming = [m for m in below if any(_within(n, "flwr") for n in imports_of(m))]
    assert not naming, f"import flwr below the wire layer: {naming}"
    code = "import sys\n" + "".join(f"import {m}\n" for m in below)
    code += "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))"
    pulled = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert pulled == "[]", f"importing the layers below the wire pulls Flower: {pulled[:300]}"


def test_every_layer_is_named_in_architecture_md() -> None:
    """The map a newcomer reads lists the same layers this test enforces."""
    text = (Path(__file__).resolve().parents[1] / "ARCHITECTURE.md").read_text()
    missing = [p for _, prefixes in LAYERS for p in prefixes if p.split(".", 1)[1] not in text]
    assert not missing, f"ARCHITECTURE.md does not mention: {missing}"
