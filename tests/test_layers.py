"""The house rules, checked over the import graph: the stages import only the stages below them, nothing imports in a
cycle (imports inside functions count), and the command line starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Lowest first: a module may import from its own stage and the stages before it in this list, never after.
LAYERS = ["core", "kernels", "data", "models", "calibration", "pruning", "inference", "checkpoint", "training",
          "moe", "evaluation", "workflows"]
# Entry points on top of every stage: the package's lazy API, the command line, and the kernel benchmarks.
TOP = {"llmsparse", "llmsparse.__main__", "llmsparse.cli", "llmsparse.kernels.bench", "llmsparse.kernels.bench_e2e",
       "llmsparse.kernels.acceptance", "llmsparse.kernels.inspect_kernels"}


def modules() -> dict[str, Path]:
    """Every module of the installed package: llmsparse/ and kernels/ (installed as llmsparse.kernels)."""
    found = {}
    for root, package in ((REPO / "llmsparse", "llmsparse"), (REPO / "kernels", "llmsparse.kernels")):
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (function-level imports included)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".") if is_package else name.split(".")[:-1]
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("llmsparse"):
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer(module: str) -> int | None:
    """The stage of a module (None for the entry points on top)."""
    if module in TOP:
        return None
    return LAYERS.index(module.split(".")[1])


def test_every_module_belongs_to_a_stage():
    unplaced = [m for m in modules() if m not in TOP and m.split(".")[1] not in LAYERS]
    assert unplaced == [], f"modules outside every stage: {unplaced}"


def test_imports_point_down_the_stages():
    upward = []
    for module, targets in graph().items():
        if layer(module) is None:
            continue
        for target in targets:
            if target == "llmsparse" or layer(target) is None or layer(target) > layer(module):
                upward.append(f"{module} -> {target}")
    assert upward == [], "imports pointing up the stages:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    edges = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w.startswith(v + "."):
                continue  # a package importing its own submodule is no cycle
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The graph is built from real import statements: a module of a lower stage that imports a higher one is
    reported (checked on a scratch copy of one module)."""
    path = tmp_path / "masks.py"
    path.write_text("from ..workflows.load import load\n\ndef f():\n    from .prune import prune\n")
    found = imports("llmsparse.pruning.masks", path, set(modules()))
    assert found == {"llmsparse.workflows.load", "llmsparse.pruning.prune"}
    assert layer("llmsparse.workflows.load") > layer("llmsparse.pruning.masks")


HEAVY = "print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'matplotlib', 'peft') if m in sys.modules))"


def test_command_line_help_does_not_import_torch():
    code = ("import sys\nfrom llmsparse.cli import main\n"
            "for command in ('prune', 'export', 'finetune', 'moefy', 'eval', 'ppl', 'inspect', 'run'):\n"
            "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n" + HEAVY)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "--device-map" in run.stdout and "--save-format" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_import_llmsparse_loads_no_heavy_dependency():
    code = "import sys, llmsparse\n" + HEAVY
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
