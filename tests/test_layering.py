"""The import graph of src/diffquant: no cycle (late imports inside functions count too), no upward import.

Layers, lowest first; a module may import its own layer or lower ones. The core (up to ``api``) never
imports the zoo: the zoo fills ``diffquant.registry`` (its models' defaults and prompt sets) when the
package root imports it. Command modules sit on top whatever folder they live in.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "diffquant"
MAX_LINES = 500

LAYERS: list[set[str]] = [
    {"io", "distributed", "tokenizers", "registry", "prompts", "plots", "determinism", "typed", "checkpoint", "outputs", "store", "lazy", "console", "stats"},
    {"quant"},
    {"nn"},
    {"models"},
    {"sampling"},
    {"config", "recipes"},
    {"wrap", "guard", "bits"},
    {"calibration"},
    {"learning"},
    {"methods"},
    {"api"},
    {"runtime"},
    {"serialization", "deployment", "pipelines", "inspect", "hf_quantizer", "lora"},
    {"zoo"},
    {"evaluation"},
    {"demo", "cli", "cli_common", ""},
]
# Command-line entry points: they assemble everything below, so they rank with the CLI.
COMMANDS = {"diffquant.calibration.record", "diffquant.evaluation.cli", "diffquant.zoo.cli"}


def _modules() -> dict[str, Path]:
    found = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = f
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (static, from the AST)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, f in modules.items():
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in modules and t != m}
    return graph


def _rank(module: str) -> int:
    if module in COMMANDS:
        return len(LAYERS) - 1
    top = module.split(".")[1] if "." in module else ""
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module} is in no layer; add its top-level name to LAYERS in tests/test_layering.py")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, ignoring a package re-exporting its own children."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return [c for c in found if not _only_reexports(c)]


def _only_reexports(comp: list[str]) -> bool:
    """``pkg/__init__`` importing ``pkg.x`` which imports ``pkg``: one package exposing its children."""
    packages = [c for c in comp if (_MODULES[c].name == "__init__.py")]
    return len(packages) == 1 and all(c == packages[0] or c.startswith(packages[0] + ".") for c in comp)


_MODULES = _modules()
_GRAPH = _imports(_MODULES)


def test_no_import_cycle():
    assert _cycles(_GRAPH) == []


def test_imports_only_go_down():
    # A module's own ancestor packages are loaded before it anyway (``from . import x`` names the parent).
    upward = sorted(f"{m} -> {t}" for m, targets in _GRAPH.items() for t in targets
                    if _rank(t) > _rank(m) and not m.startswith(t + "."))
    assert upward == []


def test_core_never_imports_the_zoo():
    core = {m for m in _MODULES if _rank(m) <= LAYERS.index({"api"})}
    assert sorted(m for m in core if any(t.startswith("diffquant.zoo") for t in _GRAPH[m])) == []


def test_no_source_file_over_the_line_limit():
    over = {str(f.relative_to(ROOT)): n for f in _MODULES.values() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert over == {}


def test_the_check_finds_a_cycle_and_an_upward_import():
    graph = {"diffquant.quant": {"diffquant.nn"}, "diffquant.nn": {"diffquant.quant"}}
    assert _cycles(graph) == [["diffquant.nn", "diffquant.quant"]]
    assert _rank("diffquant.quant") < _rank("diffquant.nn.layers") < _rank("diffquant.cli")
