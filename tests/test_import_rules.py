"""Import rules, read from the source with ``ast`` (nothing is imported): layers only import downwards
(launch → app, cli → trainers → microworld → pipelines → adapters → models → core; see docs/architecture.md) and no
modules import each other, directly or round a longer loop.

Every import statement counts, the deferred ones inside functions too: a deferred import still ties the two modules
together, and a loop that only closes at call time is a loop all the same."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Top to bottom. A module may import its own package and the layers below its own; packages sharing a layer (the
# page and the commands) never import each other. ``launch`` (the entry point) sits on top.
LAYERS = (("launch",), ("app", "cli"), ("trainers",), ("microworld",), ("pipelines",), ("adapters",), ("models",),
          ("core",))
PACKAGES = tuple(name for layer in LAYERS for name in layer if name != "launch")


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # the project module it imports, dotted
    where: str  # file:line, for the failure message


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name → file for every module of the project under ``root`` (packages named by their ``__init__``)."""
    modules = {}
    files = [path for package in PACKAGES for path in sorted((root / package).rglob("*.py"))]
    if (root / "launch.py").exists():
        files.append(root / "launch.py")
    for path in files:
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a project module (``core.paths.ASSETS`` → ``core.paths``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def project_imports(root: Path) -> list[Import]:
    """Every import of a project module by a project module, top-level or inside a function, relative ones
    resolved."""
    modules = project_modules(root)
    found = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                # ``from pkg import sub`` imports the submodule when there is one, else a name from ``pkg`` itself
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names]
            else:
                continue
            where = f"{path.relative_to(root)}:{node.lineno}"
            for target in dict.fromkeys(_known(name, modules) for name in names):  # one per module per statement
                if target and target != module:
                    found.append(Import(module, target, where))
    return sorted(found, key=lambda item: (item.where.partition(":")[0], int(item.where.partition(":")[2])))


def layer_violations(imports: list[Import]) -> list[str]:
    """Imports that reach up a layer (e.g. ``pipelines`` importing ``trainers``) or sideways into another package of
    the same layer (``app`` importing ``cli``): a lower layer must work without the ones above it."""
    bad = []
    for item in imports:
        source, target = layer_of(item.source), layer_of(item.target)
        same_package = item.source.split(".")[0] == item.target.split(".")[0]
        if target < source or (target == source and not same_package):
            bad.append(f"{item.where}: {item.source} imports {item.target}")
    return bad


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative): each is a set of
    modules that all reach each other through imports, sorted by name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    nodes = sorted(set(graph) | {t for targets in graph.values() for t in targets})
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def _loop_through(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """One shortest loop from the component's first module back to itself, staying inside the component."""
    first = min(component)
    paths = {first: [first]}
    queue = [first]
    for node in queue:
        for child in sorted(graph.get(node, ())):
            if child == first:
                return paths[node]
            if child in component and child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    return sorted(component)  # unreachable for a strongly connected component


def import_graph(imports: list[Import]) -> dict[str, set[str]]:
    """Module → the project modules it imports (anywhere in its file)."""
    graph: dict[str, set[str]] = {}
    for item in imports:
        graph.setdefault(item.source, set()).add(item.target)
    return graph


def describe_cycles(imports: list[Import]) -> list[str]:
    """Each cycle by its modules, with one loop through them as ``a → b → a`` and the lines that make each step, so
    the message says where to cut."""
    lines = {}
    for item in imports:
        lines.setdefault((item.source, item.target), item.where)
    graph = import_graph(imports)
    out = []
    for component in import_cycles(graph):
        loop = _loop_through(set(component), graph)
        steps = list(zip(loop, [*loop[1:], loop[0]]))
        out.append(f"{', '.join(component)}: " + " → ".join([*loop, loop[0]])
                   + "  (" + ", ".join(lines[step] for step in steps) + ")")
    return out


# --- the project ---------------------------------------------------------------------------------------------------
def test_lower_layers_do_not_import_higher_ones():
    imports = project_imports(REPO)
    assert len(imports) > 100  # the walk found the project's imports at all
    bad = layer_violations(imports)
    assert not bad, "imports that reach up a layer:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = describe_cycles(project_imports(REPO))
    assert not cycles, "modules that import each other:\n" + "\n".join(cycles)


# --- the checker itself --------------------------------------------------------------------------------------------
def test_cycles_are_found_in_a_small_graph():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}, "g": {"g"}}
    assert import_cycles(graph) == [["a", "b", "c"], ["d", "e"]]  # a self-import is not a loop between modules
    assert _loop_through({"a", "b", "c"}, graph) == ["a", "b", "c"]
    assert import_cycles({"a": {"b"}, "b": {"c"}}) == []


def test_the_checker_catches_a_bad_import_in_a_source_tree(tmp_path):
    files = {
        "launch.py": "import app.studio\n",
        "app/__init__.py": "",
        "app/studio.py": "from .tab import build\n",
        "app/tab.py": "def build():\n    from app.studio import x  # deferred, still a loop\n",
        "cli/__init__.py": "",
        "cli/train.py": "import app.studio\nimport trainers.loop\n",
        "core/__init__.py": "",
        "core/paths.py": "ASSETS = 1\n",
        "pipelines/__init__.py": "",
        "pipelines/generation.py": "from core.paths import ASSETS\n",
        "pipelines/watermark/__init__.py": "",
        "pipelines/watermark/verify.py": "from .. import generation\n\ndef handle():\n    import trainers.loop\n",
        "trainers/__init__.py": "",
        "trainers/loop.py": "from core.paths import ASSETS\nfrom pipelines import watermark\nimport launch\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    imports = project_imports(tmp_path)
    assert Import("pipelines.watermark.verify", "pipelines.generation", "pipelines/watermark/verify.py:1") in imports
    assert Import("trainers.loop", "pipelines.watermark", "trainers/loop.py:2") in imports
    assert layer_violations(imports) == [
        "cli/train.py:1: cli.train imports app.studio",
        "pipelines/watermark/verify.py:4: pipelines.watermark.verify imports trainers.loop",
        "trainers/loop.py:3: trainers.loop imports launch",
    ]
    assert describe_cycles(imports) == [
        "app.studio, app.tab: app.studio → app.tab → app.studio  (app/studio.py:1, app/tab.py:2)"]
