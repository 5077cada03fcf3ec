"""The package's import rules, read from the source (imports inside functions included):

    kvbatch (CLI, public API) ──> jobs/ ──> runner/ ──> cache/        bench/ ──> runner/, cache/

runner/ never imports jobs/ (nor the CLI or bench); cache/ imports nothing of kvbatch outside itself; the one
module every layer may import is the leaf kvbatch.errors, which imports nothing of kvbatch. And no cycle between
modules anywhere, lazy imports included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvbatch

ROOT = Path(kvbatch.__file__).resolve().parent.parent
FOLDERS = {"kvbatch": "kvbatch", "cache": "kvbatch.cache", "runner": "kvbatch.runner", "jobs": "kvbatch.jobs"}
FOLDERS["bench"] = "kvbatch.bench"
LEAF = "kvbatch.errors"


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join([package, *parts])
            modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every kvbatch module `name` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    if module == LEAF:
        return "errors"
    for package in ("kvbatch.cache", "kvbatch.runner", "kvbatch.jobs", "kvbatch.bench"):
        if module == package or module.startswith(package + "."):
            return package.split(".")[1]
    return "kvbatch"


ALLOWED = {
    "errors": set(),
    "cache": {"cache"},
    "runner": {"runner", "cache", "errors"},
    "jobs": {"jobs", "runner", "cache", "errors"},
    "bench": {"bench", "runner", "cache", "errors"},
    "kvbatch": {"kvbatch", "jobs", "runner", "cache", "bench", "errors"},
}


def test_the_tree_is_found() -> None:
    assert {"kvbatch.cli", "kvbatch.errors", "kvbatch.jobs.pipeline", "kvbatch.runner.engine"} <= set(MODULES)
    assert "kvbatch.runner.config" in GRAPH["kvbatch.runner.engine"], "the walk sees the engine's own imports"


def test_imports_point_one_way() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if _layer(target) not in ALLOWED[_layer(module)]
    )
    assert wrong == []


def test_no_module_imports_itself_back() -> None:
    """No cycle, found by depth-first search over the whole graph."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_engine_folder_holds_the_engine_only() -> None:
    runner = [m for m in MODULES if _layer(m) == "runner" and m != "kvbatch.runner"]
    # The engine's own modules at the top; one engine over several GPUs (parallel/) and LoRA (lora/) in their own
    top = [m for m in runner if m.count(".") == 2 and m not in ("kvbatch.runner.parallel", "kvbatch.runner.lora")]
    assert len(top) <= 27, sorted(top)
    job_words = ("job", "plan", "progress", "signals", "bench", "cli", "ray", "data_parallel")
    assert [m for m in runner if any(w in m.rpartition(".")[2] for w in job_words)] == []
