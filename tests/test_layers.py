"""The project's imports point one way: layers, each importing only the layers below it.

  L0 library  model.py and taps.py, everything except their CLI (the target, the drafter, trees,
              verification, compositions, `generate`); they import nothing of the project above
              them -- no extras, no data, no scripts -- lazily or not.
  L1 extras   extras/*.py but the demo, and data/ (loaders, tokenizer, feature cache, distributed,
              calibration, reporting); they import L0 and each other, without cycles.
  L2 scripts  train.py, eval.py and the CLIs of model.py and taps.py (their `main` and their
              `if __name__ == "__main__":` block); they may import anything below them, and no
              module imports them but the demo.
  L3 demo     extras/demo.py (`make demo`, run as `python -m extras.demo`): it runs the scripts, and
              its estimates read train.py's own measurement (`auto_amp`), so it stands on them.

Read from the source, not from what an import happens to load: every `import` in the AST counts,
module level or inside a function, and `__import__("x")` too. There is no cycle (a strongly
connected component of more than one module, or a module importing itself) and no upward arrow
(into a higher layer, or from one script into another)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = {"model", "taps"}   # L0, less their CLI
SCRIPTS = {"train", "eval"}   # L2, with the CLI nodes "model:cli" and "taps:cli"
DEMO = "extras.demo"          # L3


def layer(node: str) -> int:
    if node == DEMO:
        return 3
    if node in SCRIPTS or node.endswith(":cli"):
        return 2
    return 0 if node in LIBRARY else 1


def project_modules(root: Path = ROOT) -> dict:
    """Module name -> file, for every module of the project (tests excluded)."""
    files = [root / f"{name}.py" for name in ("model", "taps", "train", "eval")]
    files += sorted((root / "extras").glob("*.py")) + sorted((root / "data").glob("*.py"))
    names = {}
    for f in files:
        parts = f.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return names


def is_cli(stmt: ast.stmt) -> bool:
    """A CLI statement of a library file: `def main` or the `if __name__ == "__main__":` block."""
    if isinstance(stmt, ast.FunctionDef):
        return stmt.name == "main"
    return isinstance(stmt, ast.If) and "__main__" in ast.unparse(stmt.test)


def imported(tree: ast.AST, modules: set) -> set:
    """The project modules a piece of source imports, at any depth of it."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from extras import speed` imports the module extras.speed; `from model import main`
            # imports model.py's CLI
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if node.module in LIBRARY and any(a.name == "main" for a in node.names):
                names.append(f"{node.module}:cli")
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) in ("__import__",
                                                                        "importlib.import_module")
              and node.args and isinstance(node.args[0], ast.Constant)):
            names = [node.args[0].value]
        else:
            continue
        out |= {n for n in names if n in modules or n.endswith(":cli")}
    return out


def import_graph(root: Path = ROOT) -> set:
    """Every import arrow (importer, imported) between project modules; the imports inside
    model.py's and taps.py's CLI start at "model:cli" and "taps:cli"."""
    files = project_modules(root)
    modules = set(files)
    edges = set()
    for name, path in files.items():
        body = ast.parse(path.read_text()).body
        for stmt in body:
            node = f"{name}:cli" if name in LIBRARY and is_cli(stmt) else name
            edges |= {(node, target) for target in imported(stmt, modules)}
    return edges


def cycles(edges: set) -> list:
    """Strongly connected components of more than one module, and modules importing themselves
    (Tarjan's algorithm), each as a sorted list."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def upward(edges: set, layer=layer) -> list:
    """Arrows into a higher layer, or from a script into another script."""
    return sorted((a, b) for a, b in edges if layer(b) > layer(a) or layer(a) == layer(b) >= 2)


def arrows_within(component: list, edges: set) -> list:
    return sorted((a, b) for a, b in edges if a in component and b in component)


def test_the_import_graph_has_no_cycle_and_no_upward_arrow():
    edges = import_graph()
    # the reader sees the real graph: the arrows every reader relies on are in it
    assert {("taps", "model"), ("extras.checkpoint", "model"), ("train", "taps")} <= edges
    assert {("model:cli", "extras.runtime"), ("taps:cli", "extras.trace"),
            ("extras.demo", "train")} <= edges
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(
        " <-> ".join(c) + ": " + ", ".join(f"{a} -> {b}" for a, b in arrows_within(c, edges))
        for c in found)
    up = upward(edges)
    assert not up, "upward arrows:\n" + "\n".join(f"{a} (L{layer(a)}) -> {b} (L{layer(b)})"
                                                 for a, b in up)


def test_every_project_module_has_a_layer():
    names = set(project_modules())
    assert {"model", "taps", "train", "eval", "data", "extras.demo", "extras.checkpoint"} <= names
    assert {n for n in names if layer(n) == 0} == LIBRARY
    assert {n for n in names if layer(n) >= 2} == SCRIPTS | {DEMO}


def test_the_checker_reports_cycles_and_upward_arrows():
    """Negative control: a graph with a cycle, a self-import and upward arrows is reported, edge by
    edge; the real graph's checks are these functions."""
    edges = {("taps", "model"), ("model", "extras.x"), ("extras.x", "extras.y"),
             ("extras.y", "extras.x"), ("extras.z", "extras.z"), ("extras.y", "train"),
             ("eval", "train"), ("eval", "extras.demo"), ("model:cli", "taps:cli")}
    assert cycles(edges) == [["extras.x", "extras.y"], ["extras.z"]]
    assert arrows_within(["extras.x", "extras.y"], edges) == [("extras.x", "extras.y"),
                                                              ("extras.y", "extras.x")]
    assert upward(edges) == [("eval", "extras.demo"), ("eval", "train"), ("extras.y", "train"),
                             ("model", "extras.x"), ("model:cli", "taps:cli")]
    # a chain back to the start is a cycle however long it is
    assert cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    assert upward({("taps", "model"), ("extras.x", "model"), ("train", "extras.x"),
                   ("taps:cli", "model"), ("extras.demo", "train")}) == []


def test_the_graph_reads_lazy_imports_and_the_cli(tmp_path):
    """Negative control of the reader: imports inside functions, `__import__` and a library file's
    CLI are all read, and the CLI's imports start at its own node."""
    (tmp_path / "extras").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("")
    (tmp_path / "extras" / "a.py").write_text("import model\n")
    (tmp_path / "model.py").write_text(
        "def load():\n    from extras.a import thing\n\n"
        "def main():\n    from extras import a\n\n"
        "if __name__ == '__main__':\n    __import__('model').main()\n")
    (tmp_path / "taps.py").write_text("import model\nfrom train import drafter_loss\n")
    (tmp_path / "train.py").write_text("import extras.a\nfrom taps import main\n")
    (tmp_path / "eval.py").write_text("")
    edges = import_graph(tmp_path)
    assert edges == {("extras.a", "model"), ("model", "extras.a"), ("model:cli", "extras.a"),
                     ("model:cli", "model"), ("taps", "model"), ("taps", "train"),
                     ("train", "extras.a"), ("train", "taps"), ("train", "taps:cli")}
    assert cycles(edges) == [["extras.a", "model"], ["taps", "train"]]
    assert upward(edges) == [("model", "extras.a"), ("taps", "train"), ("train", "taps:cli")]
