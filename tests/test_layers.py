"""The module boundaries of docs/architecture.md hold: a module imports only from its own layer or those above it.

Checked on the source, function-level (lazy) imports included: a lazy import across a boundary is still a
dependency, only a cheaper one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "weightsync"

# Top to bottom, as docs/architecture.md lists them.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("errors", "config", "fsutil", "logs", "lazy", "testhooks", "__init__", "__main__"),
    "model": ("checksums", "signature", "layout", "hfcache", "manifest", "sources"),
    "transfer": ("retry", "resources", "resume", "partfile", "download", "fetch", "progress"),
    "orchestration": ("engine", "locking", "lockfile", "gc", "status", "mirror"),
    "edges": ("cli", "commands", "serve", "launch", "checks", "metrics"),
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}
# `python -m weightsync` starts the CLI: the one import that goes down, by definition of an entry point.
ENTRY_POINTS = {("__main__", "cli")}


def _top(module: str) -> str:
    """`sources.s3` -> `sources`; a module's layer is its top-level name's."""
    return module.split(".")[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == "weightsync":  # `from weightsync import config`, or `__version__` (the package)
                found += [(node.lineno, f"weightsync.{alias.name}" if _is_module(alias.name) else "weightsync.__init__")
                          for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, name.removeprefix("weightsync.")) for line, name in found
            if name.startswith("weightsync.")]


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()


def test_every_module_has_a_layer():
    modules = {_top(str(path.relative_to(PACKAGE).with_suffix("")).replace("/", "."))
               for path in PACKAGE.rglob("*.py")}
    assert modules - RANK.keys() == set(), "add the new module to a layer here and in docs/architecture.md"


def test_no_module_imports_from_a_layer_below_its_own():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _top(str(path.relative_to(PACKAGE).with_suffix("")).replace("/", "."))
        for line, imported in _imports(path):
            target = _top(imported)
            if RANK[target] > RANK[importer] and (importer, target) not in ENTRY_POINTS:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {importer} ({_layer(importer)}) imports "
                             f"{imported} ({_layer(target)})")
    assert not wrong, "\n".join(wrong)


def _layer(module: str) -> str:
    return next(name for name, modules in LAYERS.items() if module in modules)
