"""The shape of the package: imports point one way, no module grows past one job, nothing shadows other libraries.

The import graph is read from the source (every ``import``, including those inside functions), so a lazy import
that closes a cycle is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
MAX_FLAT_MODULES = 12

# Which part of the package may import which (besides itself); ``hf_littlebit`` itself is the public facade and
# imports everything. ``kernels`` is the top-level folder shipped as hf_littlebit.kernels.
ALLOWED = {
    "errors": set(),
    "format": set(),
    "factorize": set(),
    "kernels": set(),
    "assets": set(),
    "backends": {"format", "kernels"},
    "nn": {"format", "factorize", "backends", "errors"},
    "config": {"format", "nn"},
    "eval": {"format", "nn"},
    "quantize": {"config", "errors", "format", "factorize", "nn", "eval", "assets"},
    "integrations": {"config", "errors", "format", "factorize", "nn", "eval", "quantize"},
    "training": {"config", "errors", "format", "factorize", "nn", "quantize"},
    "cli": {"config", "errors", "format", "factorize", "backends", "nn", "eval", "quantize", "integrations",
            "training", "assets"},
}


def _modules() -> dict[str, Path]:
    """Dotted module name → source file, with the top-level ``kernels/`` folder under ``hf_littlebit.kernels``."""
    found = {}
    for path in sorted((ROOT / "hf_littlebit").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        rel = list(path.relative_to(ROOT / "kernels").with_suffix("").parts)[1:]  # drop littlebit
        name = ".".join(["hf_littlebit", "kernels", *(rel if rel != ["__init__"] else [])])
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports (resolved to the longest existing module name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            # importing one's own parent package (e.g. ``import hf_littlebit`` to register) runs no new edge
            if candidate and candidate != name and not name.startswith(candidate + "."):
                targets.add(candidate)
    return targets


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "hf_littlebit"


def test_the_import_graph_has_no_cycle(graph):
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_imports_point_one_way(graph):
    wrong = []
    for module, targets in graph.items():
        area = _area(module)
        if area in ("hf_littlebit", "__main__"):
            continue
        wrong += [f"{module} imports {t}" for t in sorted(targets) if _area(t) not in ALLOWED[area] | {area}]
    assert not wrong, "\n".join(wrong)


def test_the_math_and_the_layer_know_nothing_of_transformers():
    for area in ("format", "factorize", "backends", "nn"):
        for path in (ROOT / "hf_littlebit" / area).rglob("*.py"):
            assert "transformers" not in path.read_text(), f"{path} mentions transformers"


def test_no_module_is_two_jobs_and_few_sit_flat():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _modules().values()}
    long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    flat = [p for p in (ROOT / "hf_littlebit").glob("*.py") if p.name != "__init__.py"]
    assert len(flat) <= MAX_FLAT_MODULES, [p.name for p in flat]
    for package in (ROOT / "hf_littlebit").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(package.read_text()))
        assert doc, f"{package} has no docstring saying what lives there"


def test_backend_names_in_the_config_match_the_dispatcher():
    from hf_littlebit.backends.dispatch import BACKENDS
    from hf_littlebit.config import BACKEND_CHOICES

    assert BACKEND_CHOICES == ("auto", *BACKENDS)


PROBE = """
import importlib.util, json
spec = importlib.util.find_spec("kernels")
print(json.dumps({"origin": spec.origin if spec else None, "regular": bool(spec and spec.origin)}))
"""


def test_the_kernels_folder_is_not_a_package_from_the_repository_root():
    """``python`` started in the checkout puts the root first on ``sys.path``: a ``kernels/__init__.py`` there would
    be found before the Hugging Face ``kernels`` library. Without one, an installed library always wins."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert not (found["regular"] and str(ROOT) in str(found["origin"])), found
    assert importlib.util.find_spec("hf_littlebit.kernels.binary_lowrank") is not None
