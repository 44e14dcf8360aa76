"""The package's layers: imports go down only — base < model < data < training < inference <
programs — and no modules import each other in a circle, so engine/ reads from the bottom up and
no library module depends on a program. Read from the source with ast, function-level imports
included (nothing is imported)."""

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "engine"
PROGRAMS = ("pretrain", "finetune", "generate", "evaluate", "predict", "zeroshot", "paper")
# Where each part of engine/ stands; the package itself (engine/__init__.py) hands on the model.
LAYERS = {
    "cli": 0,
    "fileio": 0,
    "_build": 0,
    "_kernels": 0,
    "ops": 0,
    "": 1,
    "model": 1,
    "data": 2,
    "training": 3,
    "inference": 4,
    **{name: 5 for name in PROGRAMS},
}


def modules() -> dict[str, Path]:
    found = {}
    for path in ENGINE.rglob("*.py"):
        parts = path.relative_to(ENGINE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The engine modules `path` imports, wherever in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("engine")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engine"):
            out |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            }
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) & set(known) for name, path in known.items()}


def test_imports_go_down_only():
    upward = sorted(f"{src} -> {dst}" for src, dsts in graph().items() for dst in dsts if layer(dst) > layer(src))
    assert upward == [], "imports from a lower layer up to a higher one:\n" + "\n".join(upward)


def test_no_modules_import_each_other_in_a_circle():
    edges, done, circles = graph(), set(), []

    def visit(node: str, path: list[str]) -> None:
        path = path + [node]
        for nxt in sorted(edges[node] - {node}):
            if nxt in path:
                circles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in done:
                visit(nxt, path)
        done.add(node)

    for name in sorted(edges):
        if name not in done:
            visit(name, [])
    assert circles == [], "modules that import each other:\n" + "\n".join(circles)
