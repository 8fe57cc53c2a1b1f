"""The house's floors (DESIGN.md): imports only look down, and nothing imports in a circle, counting imports
inside functions. The checker reads every module's AST, so a lazy import counts as much as a top-level one."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# floor of each top-level package; a package imports only packages on lower floors, or itself
FLOORS = {"pipelines": 1, "video": 2, "dreamfusion": 2, "toyworld": 2, "fourd": 3, "evals": 4, "run": 5, "ui": 5, "bench": 6}  # bench drives run.py


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages in FLOORS."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[0] not in FLOORS:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (functions included)."""
    mods = modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]  # `from pkg import module` imports pkg.module
            else:
                continue
            found |= {m for m in map(resolve, targets) if m and m != name}
        graph[name] = found
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        top = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != top and FLOORS[other] >= FLOORS[top]:
                bad.append(f"{module} imports {target} (floor {FLOORS[other]} from floor {FLOORS[top]})")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), plus self-loops."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        out.setdefault(module.split(".")[0], set()).update(t.split(".")[0] for t in targets)
    return {k: v - {k} for k, v in out.items()}


def test_imports_only_look_down():
    assert upward_imports(import_graph(ROOT)) == []


def test_no_import_cycles_between_files_or_packages():
    graph = import_graph(ROOT)
    assert cycles(graph) == []
    assert cycles(package_graph(graph)) == []


def test_module_docstrings_stay_short():
    """Essays go to docs/: a module's docstring says what a reader needs, in at most 15 lines."""
    long = {name: len(doc.splitlines()) for name, path in modules(ROOT).items()
            if (doc := ast.get_docstring(ast.parse(path.read_text()), clean=False)) and len(doc.strip().splitlines()) > 15}
    assert long == {}


def test_the_checker_catches_an_upward_import_a_lazy_one_and_a_cycle(tmp_path):
    """The two tests above can fail: on a small tree with the faults they look for, they report them."""
    files = {
        "pipelines/__init__.py": "",
        "pipelines/a.py": "def f():\n    from video import clip  # a lazy import, upward\n",
        "video/__init__.py": "",
        "video/clip.py": "from . import other\n",
        "video/other.py": "from .clip import X\n",
        "toyworld/__init__.py": "",
        "toyworld/w.py": "import pipelines.a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == ["pipelines.a imports video (floor 2 from floor 1)",
                                     "pipelines.a imports video.clip (floor 2 from floor 1)"]
    assert cycles(graph) == [["video.clip", "video.other"]]
    assert graph["toyworld.w"] == {"pipelines.a"}
