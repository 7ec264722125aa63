"""The import rules of ARCHITECTURE.md, read from the source with ``ast`` so they cannot regress.

- The core (``medssl/`` outside ``medssl/cli/``) imports no stage and not the command line.
- The stages never import each other, nor the command line.
- Nothing imports the app layer (``medssl.cli``) but itself and the ``__main__`` launcher shims
  (``python -m pretrain`` is ``medssl pretrain``).
- No import circles among medssl's own modules, counting every import (module level, inside
  functions, and under ``TYPE_CHECKING``): a circle means two modules are one concept.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("medssl", "pretrain", "finetune")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our own modules that ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # import a.b.c where only a.b is ours
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] in PACKAGES:
                found.add(target)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_core_imports_no_stage_and_no_command_line():
    bad = [(m, t) for m, targets in _graph().items()
           if _within(m, "medssl") and not _within(m, "medssl.cli") and not m.endswith(".__main__")
           for t in targets if _within(t, "pretrain") or _within(t, "finetune") or _within(t, "medssl.cli")]
    assert not bad, f"core modules importing a stage or the app layer: {bad}"


def test_stages_import_neither_each_other_nor_the_command_line():
    bad = []
    for m, targets in _graph().items():
        for stage, other in (("pretrain", "finetune"), ("finetune", "pretrain")):
            if not _within(m, stage):
                continue
            for t in targets:
                if _within(t, other) or (_within(t, "medssl.cli") and not m.endswith(".__main__")):
                    bad.append((m, t))
    assert not bad, f"stage modules importing the other stage or the app layer: {bad}"


def test_no_import_circles():
    graph = {m: {t for t in ts if not t.endswith("__main__")} for m, ts in _graph().items()
             if not m.endswith("__main__")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_rules_see_real_imports():
    # Guard against a test that passes because it reads nothing: known edges must be found.
    graph = _graph()
    assert "pretrain.trainer" in graph["medssl.cli.pretrain"]
    assert "medssl.errors" in graph["finetune.runner"]
    assert "medssl.cli.shard" in graph["medssl.cli"]
