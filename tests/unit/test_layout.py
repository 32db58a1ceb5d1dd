"""The package layout rules (docs/architecture.md, "Layers and who owns what").

import-linter (``.importlinter``, run by ``.ci/run``) enforces the layer contract on the whole
import graph; these tests keep the rules it can't express, and give the layer rule for
``TYPE_CHECKING`` imports a fast, local failure message:

- every module under ``proxycore/`` is at most ``MAX_LINES`` lines (one job per module);
- no module imports another module's underscore names: a name used elsewhere is public and
  listed in its module's ``__all__``;
- no ``TYPE_CHECKING``-only import reaches up into a higher layer: a cycle is broken by
  ownership (a callee returns a value, a Protocol is owned by the caller), not hidden.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
PACKAGE: Final = ROOT / "proxycore"
MAX_LINES: Final = 500

#: Layer ranks: a module may import only from its own rank or lower ones. ``tools`` sits to the
#: side (None): it may use the runtime, and import-linter forbids the reverse.
LAYERS: Final[dict[str, int | None]] = {
    "errors": 0,
    "config": 0,
    "http": 1,
    "net": 2,
    "upstreams": 3,
    "observe": 4,
    "store": 5,
    "security": 6,
    "tunnel": 7,
    "proxy": 8,
    "ops": 9,
    "cli": 10,
    "__main__": 10,
    "tools": None,
}


def _modules() -> Iterator[tuple[str, Path]]:
    """``(dotted name, path)`` of every module in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if _is_package(path) else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _type_checking_blocks(tree: ast.Module) -> Iterator[ast.If]:
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
            if name == "TYPE_CHECKING":
                yield node


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_module_is_at_most_500_lines() -> None:
    too_long = {
        name: count
        for name, path in _modules()
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines (split them by job): {too_long}"


def test_no_module_imports_another_modules_underscore_names() -> None:
    found: list[str] = []
    for module, path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(module, path, node)
                if not (source == "proxycore" or source.startswith("proxycore.")):
                    continue
                for alias in node.names:
                    if _is_private(alias.name):
                        found.append(f"{module}:{node.lineno} imports {source}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("proxycore.") and any(
                        _is_private(part) for part in alias.name.split(".")
                    ):
                        found.append(f"{module}:{node.lineno} imports {alias.name}")
    assert not found, "make these names public (and list them in __all__):\n" + "\n".join(found)


def test_no_type_checking_import_reaches_a_higher_layer() -> None:
    found: list[str] = []
    for module, path in _modules():
        own = _layer(module)
        if own is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for block in _type_checking_blocks(tree):
            for node in ast.walk(block):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                targets: list[str] = []
                if isinstance(node, ast.ImportFrom):
                    source = _resolve(module, path, node)
                    if source == "proxycore":  # from proxycore import <module>
                        targets = [f"proxycore.{alias.name}" for alias in node.names]
                    else:
                        targets = [source]
                else:
                    targets = [alias.name for alias in node.names]
                for target in targets:
                    if not target.startswith("proxycore."):
                        continue
                    rank = _layer(target)
                    if target.split(".")[1] == "tools" or (rank is not None and rank > own):
                        found.append(f"{module}:{node.lineno} imports {target} (higher layer)")
    assert not found, "break the cycle by ownership, not TYPE_CHECKING:\n" + "\n".join(found)


def test_layer_table_covers_every_subpackage() -> None:
    """A new top-level module or subpackage needs a layer here (and in .importlinter, whose
    exhaustive layers contract fails on it too)."""
    names = {
        path.stem if path.is_file() else path.name
        for path in PACKAGE.iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()
    }
    missing = sorted(names - LAYERS.keys())
    assert not missing, f"no layer for {missing}: add them to LAYERS and .importlinter"


def test_resolve_relative_imports() -> None:
    """The checks above resolve relative imports the way Python does."""
    node = ast.parse("from ..net.pool import Origin").body[0]
    assert isinstance(node, ast.ImportFrom)
    module_path = PACKAGE / "proxy" / "exchange.py"
    assert _resolve("proxycore.proxy.exchange", module_path, node) == "proxycore.net.pool"
    node = ast.parse("from .checks import x").body[0]
    assert isinstance(node, ast.ImportFrom)
    init_path = PACKAGE / "config" / "__init__.py"
    assert _resolve("proxycore.config", init_path, node) == "proxycore.config.checks"
    node = ast.parse("from .. import errors").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _resolve("proxycore.proxy.asgi", PACKAGE / "proxy" / "asgi.py", node) == "proxycore"
