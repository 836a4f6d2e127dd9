"""Imports follow the data flow, and no module writes into another module's objects (static checks, no import run).

Every ``import`` / ``from ... import`` of a ringattn module is an edge, at module level, inside a function or in
an ``if TYPE_CHECKING:`` block alike: the graph of all of them must be acyclic, so a lazy or type-only import
cannot hide a cycle. docs/architecture.md shows the graph as a table of layers that must equal
:func:`import_table` (``python -m tests.test_imports`` prints it).

State belongs to the module that uses it: ``object.__setattr__(x, ...)``, ``setattr(x, ...)`` and writes into
``x.__dict__`` are allowed only on ``self`` (a frozen dataclass normalising its own fields) or on the few objects a
module builds itself, listed with their reason in ``OWN_OBJECTS``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ringattn"

#: (module, name) of objects a module creates itself and then sets up through their attributes
OWN_OBJECTS = {
    # use_reset_position_rope: the module's own ResetRotaryEmbedding, initialised from megatron's RotaryEmbedding state
    ("ringattn.adapters.megatron", "new"),
    # the NPU backend's capability record (_Caps), created and kept by that module
    ("ringattn.kernels.npu", "caps"),
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


def _files() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(all edges, module-level edges)`` among ringattn modules."""
    files = _files()
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
                return stack[stack.index(n) :] + [n]
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
    layers), then what each imports at module level and inside functions."""
    edges, top = import_graph()
    layer: dict[str, int] = {}

    def depth(m: str) -> int:
        if m not in layer:
            layer[m] = 1 + max((depth(n) for n in edges[m]), default=-1)
        return layer[m]

    rows = sorted(edges, key=lambda m: (depth(m), m))
    lines = [f"{'layer':<6}{'module':<34}{'imports (module level)':<62}inside functions"]
    for m in rows:
        now = ", ".join(_short(n) for n in sorted(top[m])) or "-"
        later = ", ".join(_short(n) for n in sorted(edges[m] - top[m]))
        lines.append(f"{layer[m]:<6}{_short(m):<34}{now:<62}{later}".rstrip())
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
    """Lazy (function-level) and type-only imports count: the whole graph is acyclic."""
    edges, _ = import_graph()
    assert len(edges) > 30, "the scan found too few modules"
    cycle = _cycle(edges)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_check_finds_a_cycle():
    """The detector is not vacuous: one upward edge (the small value module importing attention) makes a cycle."""
    edges, _ = import_graph()
    assert "ringattn.attention" not in edges["ringattn.ranges"]
    edges["ringattn.ranges"].add("ringattn.attention")
    assert _cycle(edges) is not None


def _foreign_writes(mod: str, tree: ast.AST) -> list[str]:
    """``line: code`` of every write into an object's attributes that is neither ``self``'s nor in ``OWN_OBJECTS``."""
    found = []

    def target_ok(node: ast.expr) -> bool:
        return isinstance(node, ast.Name) and (node.id == "self" or (mod, node.id) in OWN_OBJECTS)

    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Call):
            f = node.func
            if (
                isinstance(f, ast.Attribute)
                and f.attr == "__setattr__"
                and isinstance(f.value, ast.Name)
                and f.value.id == "object"
            ) or (isinstance(f, ast.Name) and f.id == "setattr"):
                target = node.args[0] if node.args else None
            elif (
                isinstance(f, ast.Attribute)
                and f.attr in ("update", "setdefault", "__setitem__")
                and isinstance(f.value, ast.Attribute)
                and f.value.attr == "__dict__"
            ):
                target = f.value.value
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute) and t.value.attr == "__dict__":
                    target = t.value.value
        if target is not None and not target_ok(target):
            found.append(f"{mod}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_no_module_writes_into_another_modules_objects():
    """Caches live in the module that uses them (ringattn._memo.IdentityMemo), never in the objects they derive from."""
    writes = []
    for mod, path in _files().items():
        writes += _foreign_writes(mod, ast.parse(path.read_text()))
    assert not writes, "writes into objects that are not the writer's own:\n" + "\n".join(writes)


def test_the_write_check_finds_a_foreign_write():
    """Not vacuous: the write the planner used to make into a layout is found."""
    tree = ast.parse('object.__setattr__(layout, "_plan_cache", {})\nplan.__dict__["_exec"] = ex\n')
    assert len(_foreign_writes("ringattn.plan.build", tree)) == 2


if __name__ == "__main__":  # python -m tests.test_imports: the table for docs/architecture.md
    print(import_table())
