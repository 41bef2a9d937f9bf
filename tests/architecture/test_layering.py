"""The import rules of DESIGN.md, checked on the source: one-way imports between lowbit's packages,
no import cycle between its modules, passes that import no other pass, and an ``import lowbit``
that loads none of the heavy optional libraries until a function that needs them is called."""

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2] / "lowbit"

# package -> the lowbit packages it may import (besides itself); the order of the architecture:
# ir and kernels at the bottom, then passes, recipes, the core flow, lowering, reports, evaluation,
# training, and the command line on top.
ALLOWED = {
    "ir": set(),
    "kernels": set(),
    "models": set(),
    "passes": {"ir"},
    "recipes": {"ir", "passes"},
    "core": {"ir", "passes", "recipes"},
    "lowering": {"ir", "kernels", "passes", "recipes", "core"},
    "reports": {"ir", "recipes", "core"},
    "evaluation": {"ir", "models", "recipes", "core", "reports", "lowering"},
    "training": {"models", "evaluation"},
    "cli": {"ir", "passes", "recipes", "core", "lowering", "reports", "models", "evaluation"},
}
HEAVY = ("onnx", "onnxruntime", "onnxscript", "triton", "sklearn", "matplotlib")
PASS_INFRASTRUCTURE = {"lowbit.passes", "lowbit.passes.base", "lowbit.passes.pipeline", "lowbit.passes.registry"}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every lowbit module a file imports, at module level or inside a function. ``from P import m``
    of a submodule m depends on P.m, not on the names P's ``__init__`` exports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= submodules if len(submodules) == len(node.names) else {node.module} | submodules
    return {m for m in found if m.split(".")[0] == "lowbit"}


def _graph() -> nx.DiGraph:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for target in _imports(path, set(modules)):
            while target not in modules and "." in target:  # "lowbit.ir.ops.REFERENCES" -> "lowbit.ir.ops"
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                graph.add_edge(name, target)
    return graph


def _package(module: str) -> str:
    """The lowbit package of a module; "" for the top level (``lowbit``, ``lowbit.__main__``), which may import any."""
    return module.split(".")[1] if module.count(".") > 1 or module.rsplit(".", 1)[-1] in ALLOWED else ""


def test_every_top_level_module_is_in_a_package():
    loose = sorted(p.name for p in ROOT.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert loose == [], f"modules outside lowbit's packages: {loose}"
    assert set(ALLOWED) == {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}


def test_imports_point_one_way():
    wrong = [f"{a} -> {b}" for a, b in _graph().edges
             if _package(a) and _package(b) and _package(a) != _package(b) and _package(b) not in ALLOWED[_package(a)]]
    assert wrong == [], "imports against the layering of DESIGN.md:\n" + "\n".join(sorted(wrong))


def test_no_module_imports_the_top_level_package():
    wrong = [a for a, b in _graph().edges if b == "lowbit" and a != "lowbit"]
    assert wrong == [], f"import the module that defines a name, not `lowbit`: {wrong}"


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(_graph()))
    assert cycles == [], f"import cycles: {cycles[:5]}"


def test_passes_import_no_other_pass():
    graph = _graph()
    wrong = [f"{a} -> {b}" for a, b in graph.edges
             if a.startswith("lowbit.passes.") and b.startswith("lowbit.passes.") and a not in PASS_INFRASTRUCTURE
             and b not in PASS_INFRASTRUCTURE]
    assert wrong == [], f"passes share code through lowbit.ir, not through each other: {wrong}"


def test_import_lowbit_loads_no_heavy_library():
    code = ("import sys, lowbit; lowbit.quantize, lowbit.Recipe, lowbit.save, lowbit.load, lowbit.layer_report; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"`import lowbit` loaded {out}"
    # and they do load when asked for
    code = "import sys, lowbit; lowbit.export_onnx; print('onnx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"
