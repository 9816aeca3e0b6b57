"""The house rules of the package layout (docs/DESIGN.md): one-way imports, no private names across modules, no
import cycle, no module over 400 lines. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "perturbdiff"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of a perturbdiff module, lazy ones too."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("perturbdiff")]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.startswith("perturbdiff"):
                out.append((mod, [a.name for a in node.names], node.lineno))
    return out


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _package(mod: str) -> str:
    """The room a module lives in: perturbdiff.<room> (top-level modules are their own room)."""
    return ".".join(mod.split(".")[:2])


def test_no_private_name_is_imported_across_modules():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        for mod, names, line in _imports(name, path):
            for n in names:
                if _private(n) and f"{mod}.{n}" not in mods and mod != name:
                    bad.append(f"{path.relative_to(SRC)}:{line} imports {n} from {mod}")
    assert not bad, "\n".join(bad)


def test_rooms_import_each_other_through_their_public_face():
    """perturbdiff.<room>.<_module> is read only inside <room>; others import perturbdiff.<room> (or a top-level
    house module: _errors, _io, _logging, _version, config)."""
    mods = _modules()
    bad = []
    for name, path in mods.items():
        for mod, _, line in _imports(name, path):
            parts = mod.split(".")
            if len(parts) >= 3 and any(_private(p) for p in parts[2:]) and _package(mod) != _package(name):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_top_level_package():
    mods = _modules()
    bad = [f"{p.relative_to(SRC)}:{line}" for n, p in mods.items() if n != "perturbdiff"
           for mod, _, line in _imports(n, p) if mod == "perturbdiff"]
    assert not bad, "these import perturbdiff's __init__ (use perturbdiff._version and the rooms): " + ", ".join(bad)


def test_no_import_cycle_between_rooms():
    mods = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        for mod, _, _ in _imports(name, path):
            a, b = _package(name), _package(mod)
            if a != b and a != "perturbdiff" and b != "perturbdiff":
                edges.setdefault(a, set()).add(b)
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in trail:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif len(trail) < 12:
                visit(nxt, trail + [nxt])

    for start in sorted(edges):
        visit(start, [start])
    assert not cycles, "\n".join(sorted(set(cycles))[:10])


def test_no_module_is_longer_than_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
