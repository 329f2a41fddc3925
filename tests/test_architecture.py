"""The shape of the code (docs/architecture.md): arrows point one way, with no cycles, counting the imports
made inside functions; the training of the built-in models stays out of the runtime; marked copies match."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"

# From the bottom up: a module may import its own layer (without cycles) and the layers below it.
LAYERS = [
    ["pipeline.seeds", "pipeline.lazy"],
    ["pipeline.io", "pipeline.data"],
    ["pipeline.models"],
    ["pipeline.metrics"],
    ["pipeline.protect"],
    ["pipeline.cluster"],
    ["pipeline.batch", "pipeline.evaluate"],
    ["pipeline.study"],
    ["pipeline.commands", "pipeline.cli", "pipeline.train"],
]
# the scripts that trained the shipped weights: imported by nothing that protects, evaluates or studies
TRAINING = "pipeline.train"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: dict[str, Path], name: str | None = None) -> set[str]:
    """Every pipeline module `path` (module `name`) imports, at module level or inside a function (deferred
    imports count)."""
    found, name = set(), name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            # import_module(f"pipeline.commands.{name}"): each module under the prefix that the caller names
            prefix = dynamic_prefix(node.args[0], name) if node.args else ""
            found.update(m for m in known if prefix.startswith("pipeline.") and m.startswith(prefix)
                         and m[len(prefix):] in strings and m != name)
            continue
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in names:
            while target and target not in known:  # `from pipeline.a import b` of a name b: module pipeline.a
                target = target.rpartition(".")[0]
            if target.startswith("pipeline"):
                found.add(target)
    found.discard(name)
    return found


def dynamic_prefix(arg: ast.expr, name: str) -> str:
    """What an `import_module(...)` argument surely starts with: "pipeline.commands." for
    f"pipeline.commands.{x}", the package's name for f"{__name__}.{x}" (`name`: the calling module)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    prefix = ""
    for part in arg.values if isinstance(arg, ast.JoinedStr) else []:
        if isinstance(part, ast.Constant):
            prefix += part.value
        elif isinstance(part.value, ast.Name) and part.value.id == "__name__" and not prefix:
            prefix = name
        else:
            break
    return prefix


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def layer(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return -1  # pipeline/__init__.py


def test_every_module_has_a_layer():
    assert [name for name in modules() if layer(name) < 0 and name != "pipeline"] == []


def test_arrows_point_down():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in sorted(targets) if layer(b) > layer(a)]
    assert upward == [], "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges, cycles = graph(), []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == [], "import cycles (deferred imports included):\n" + "\n".join(cycles)


def test_runtime_never_imports_the_training_scripts():
    runtime = {a: b for a, b in graph().items() if not a.startswith(TRAINING)}
    offenders = [f"{a} -> {b}" for a, targets in runtime.items() for b in sorted(targets) if b.startswith(TRAINING)]
    assert offenders == []


def test_the_graph_sees_deferred_imports(tmp_path):
    """The checks above would pass vacuously if function-level imports were missed: one is seen here."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from pipeline.study.run import run_study\n    from . import grid\n"
                     "    return importlib.import_module(f'{__name__}.{x}')\nUNITS = ['jpeg']\n")
    seen = imports(probe, modules(), name="pipeline.study.purify")
    assert {"pipeline.study.run", "pipeline.study.grid", "pipeline.study.purify.jpeg"} <= seen


# ----------------------------------------------------------------------------- marked copies

COPIED = re.compile(r"#\s*Copied from (pipeline(?:\.\w+)+)")


def definition_source(path: Path, name: str) -> str | None:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.name == name:
            return ast.unparse(node)
    return None


def marked_copies() -> list[tuple[Path, str, str]]:
    """(file, copied definition's name, original's dotted path) for each `# Copied from pipeline.x.y.name`
    comment, placed on the line above the copy, in pipeline/, tests/ and benchmarks/."""
    found = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            match = COPIED.search(line)
            if match and i + 1 < len(lines):
                copy = re.match(r"\s*(?:async\s+)?(?:def|class)\s+(\w+)", lines[i + 1])
                if copy:
                    found.append((path, copy.group(1), match.group(1)))
    return found


def copy_problem(path: Path, name: str, original: str) -> str | None:
    """Why the copy `name` in `path` no longer matches `original` (pipeline.x.y.name); None when it does."""
    module, _, original_name = original.rpartition(".")
    original_path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not original_path.exists():
        original_path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    source = definition_source(original_path, original_name) if original_path.exists() else None
    if source is None:
        return f"{path}: `Copied from {original}` names nothing"
    copy = definition_source(path, name)  # the copy may rename the definition itself, nothing else
    if copy is None or copy.replace(f" {name}(", f" {original_name}(", 1) != source:
        return f"{path}:{name} drifted from {original}"
    return None


@pytest.mark.parametrize("path,name,original", marked_copies())
def test_marked_copies_match_their_original(path, name, original):
    assert copy_problem(path, name, original) is None


def test_the_copy_check_sees_a_drift(tmp_path):
    original = definition_source(PACKAGE / "seeds.py", "key_seed")
    same = tmp_path / "same.py"
    same.write_text("# Copied from pipeline.seeds.key_seed\n" + original.replace("def key_seed(", "def my_seed(") + "\n")
    drifted = tmp_path / "drifted.py"
    drifted.write_text("# Copied from pipeline.seeds.key_seed\n" + original.replace("[:8]", "[:4]") + "\n")
    assert copy_problem(same, "my_seed", "pipeline.seeds.key_seed") is None
    assert "drifted" in copy_problem(drifted, "key_seed", "pipeline.seeds.key_seed")
    assert "names nothing" in copy_problem(same, "my_seed", "pipeline.seeds.no_such_function")
