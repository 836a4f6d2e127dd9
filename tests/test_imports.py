"""Imports follow the data flow: no cycle among ringattn's modules (a static check, no import executed).

Every ``import`` / ``from ... import`` of a ringattn module is an edge, at module level or inside a
function (or an ``if TYPE_CHECKING:`` block: type-only names count as lazy edges too). The only allowed
upward edges are the thin, lazily imported conveniences listed in ``LAZY_UPWARD``; with them removed the
graph must be acyclic, and no module-level import may be upward. docs/architecture.md shows the graph as a
table that must equal :func:`import_table` (``python -m tests.test_imports`` prints it).
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ringattn"

#: (importer, imported) edges that exist only inside a function, on purpose
LAZY_UPWARD = {
    # DocLayout.stats() / cp_stats(): conveniences for build_plan(layout).stats / plan.cp_stats (and the
    # type-only PlanStats / CPStats of their annotations)
    ("ringattn.layout", "ringattn.plan"),
    # strategy="auto": from_cu_seqlens hands the layout to the solver (which prices candidates with the plan's
    # accounting) and, without cost=, builds the default cost model
    ("ringattn.layout", "ringattn.solver"),
    ("ringattn.layout", "ringattn.cost"),  # (and the type-only CostModel of cost=)
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    if node.module is None:  # from . import x, y: each may be a module
        return [f"{base}.{a.name}" for a in node.names]
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(all edges, module-level edges)`` among ringattn modules."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    top: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        top_nodes = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(mod, path.name == "__init__.py", node)
            else:
                continue
            for t in targets:
                while t and t not in files:  # "ringattn.plan.build_plan" -> "ringattn.plan"
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges[mod].add(t)
                    if id(node) in top_nodes:
                        top[mod].add(t)
    return edges, top


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


DOC = PKG.parent / "docs" / "architecture.md"
TABLE_BEGIN, TABLE_END = "<!-- import-table:begin -->", "<!-- import-table:end -->"


def _short(module: str) -> str:
    return module.removeprefix("ringattn.") if module != "ringattn" else "ringattn (package)"


def import_table() -> str:
    """The import graph as docs/architecture.md shows it: modules by layer (a module imports only from lower
    layers, apart from the lazy upward edges of ``LAZY_UPWARD``), then what each imports."""
    edges, top = import_graph()
    acyclic = {m: {n for n in ns if (m, n) not in LAZY_UPWARD} for m, ns in edges.items()}
    layer: dict[str, int] = {}

    def depth(m: str) -> int:
        if m not in layer:
            layer[m] = 1 + max((depth(n) for n in acyclic[m]), default=-1)
        return layer[m]

    rows = sorted(edges, key=lambda m: (depth(m), m))
    lines = [f"{'layer':<6}{'module':<27}{'imports (module level)':<58}lazily, inside functions"]
    for m in rows:
        now = ", ".join(_short(n) for n in sorted(top[m])) or "-"
        later = ", ".join(_short(n) + (" (upward)" if (m, n) in LAZY_UPWARD else "") for n in sorted(edges[m] - top[m]))
        lines.append(f"{layer[m]:<6}{_short(m):<27}{now:<58}{later}".rstrip())
    return "\n".join(lines)


def test_architecture_doc_shows_the_real_import_graph():
    """docs/architecture.md's module table is the graph of the code (regenerate: python -m tests.test_imports)."""
    text = DOC.read_text()
    assert TABLE_BEGIN in text and TABLE_END in text, f"{DOC} lost its import-table markers"
    shown = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()
    shown = shown.removeprefix("```text").removesuffix("```").strip("\n")
    expected = import_table()
    assert shown == expected, f"{DOC.name}: the import table is stale; replace it with\n{expected}"


def test_no_import_cycle_among_ringattn_modules():
    edges, top = import_graph()
    assert len(edges) > 10, "the scan found too few modules"
    for a, b in LAZY_UPWARD:
        assert b in edges[a], f"listed lazy edge {a} -> {b} no longer exists: drop it from LAZY_UPWARD"
        assert b not in top[a], f"{a} -> {b} must stay a lazy (function-level) import"
    acyclic = {m: {n for n in ns if (m, n) not in LAZY_UPWARD} for m, ns in edges.items()}
    cycle = _cycle(acyclic)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_check_finds_a_cycle():
    """The detector is not vacuous: adding the lazy edge's reverse direction makes a cycle."""
    edges, _ = import_graph()
    assert _cycle(edges) is not None  # with the one lazy upward edge included: layout -> plan -> ... -> layout


if __name__ == "__main__":  # python -m tests.test_imports: the table for docs/architecture.md
    print(import_table())
