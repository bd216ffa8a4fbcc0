"""The library's shape: imports among src/dtr modules point one way (data at the bottom, no cycle), adapters
import only the data they return, and the library's tests need nothing outside src/ and tests/."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "dtr"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """For each module of src/dtr, the modules of src/dtr it imports (relative imports, resolved)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = [p for p in package if p]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + (node.module.split(".") if node.module else []))
                for alias in node.names:
                    for candidate in (f"{target}.{alias.name}".strip("."), target):
                        if candidate in modules and candidate != name:
                            edges[name].add(candidate)
                            break
    return edges


def find_cycle(edges):
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == "open":
                return stack[stack.index(v) :] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        state[u] = "done"
        stack.pop()
        return None

    for u in sorted(edges):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_the_import_graph_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_src_dtr_has_no_import_cycle():
    edges = imports()
    assert len(edges) > 10 and edges["api"]  # the graph was read
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_data_is_at_the_bottom_and_adapters_import_only_it():
    edges = imports()
    assert edges["spec"] <= {"validation"}
    for module, targets in edges.items():
        if module.startswith("adapters.") and module != "adapters":
            assert targets <= {"spec", "adapters"} | {m for m in edges if m.startswith("adapters.")}, (module, targets)
    assert edges["mechanism"] <= {"legacy"}, edges["mechanism"]  # the mechanism knows no behaviour
    assert not edges["legacy"] - {"spec", "validation"}, edges["legacy"]


def test_the_librarys_tests_import_nothing_from_the_examples():
    """Only tests/recipe and tests/examples put examples/ on the path; the rest run with src/ alone."""
    example_modules = {p.stem for p in (ROOT / "examples").rglob("*.py")}
    test_files = {p.stem for p in (ROOT / "tests").glob("*.py")}
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            )
            for name in names:
                top = name.split(".")[0]
                assert top not in example_modules, f"{path.name} imports {name} from examples/"
                assert not (top in test_files and top.startswith("test_")), f"{path.name} imports the test file {top}"
