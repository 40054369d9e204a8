"""The package layout's arrows run one way: entry and tools -> training -> stages -> methods -> core -> data.

Read from the source's own imports (``ast``), so a new import against the arrows fails here, not in
a reader's head. README's "Architecture" section draws the same picture.
"""

import ast
from pathlib import Path

import avglab

SRC = Path(avglab.__file__).parent

# Lowest first; a package may import its own modules and those of lower layers only.
LAYERS = [
    {"data", "eval"},  # shards, processor, templates, AnyRes geometry; metrics and tables
    {"core"},  # the shared LLaVA-NeXT core, the selector interface
    {"avg", "focus", "reduce"},  # the methods; reduce: the training-free baselines (FastV, VTW, PruMerge+)
    {"stages"},  # one LightningModule per stage
    {"training"},  # building a run, strategies, global batch
    {"tools", "lmms", "run", "cli", "__main__", "export", "report", "memory"},  # entry points
]
LAYER = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def package_of(module: str) -> str:
    return module.split(".")[1] if "." in module else "(top)"


def imports(top_level_only: bool = False) -> dict[str, set[str]]:
    """avglab module -> the avglab modules it imports (``top_level_only``: not inside functions)."""
    found = {}
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else ast.walk(tree)
        found[module] = {
            node.module
            for node in nodes
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("avglab.")
        }
    return found


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in imports()} - {"(top)"}
    assert packages <= set(LAYER), packages - set(LAYER)


def same_layer_neighbours(module: str, target: str) -> bool:
    """Two packages of one layer (avg and focus, data and eval) stay apart; the entry layer may share."""
    rank = LAYER[package_of(module)]
    return rank == LAYER[package_of(target)] < len(LAYERS) - 1 and package_of(target) != package_of(module)


def test_imports_follow_the_layers():
    against = [
        f"{module} -> {target}"
        for module, targets in imports().items()
        for target in targets
        if LAYER[package_of(target)] > LAYER[package_of(module)] or same_layer_neighbours(module, target)
    ]
    assert not against, "imports against the layers:\n" + "\n".join(sorted(against))


def test_no_module_import_cycle():
    graph = imports(top_level_only=True)
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, module, target]))
            if target in graph and not state.get(target):
                visit(target, [*path, module])
        state[module] = 2

    for module in graph:
        if not state.get(module):
            visit(module, [])


def test_old_command_names_still_run_the_tools():
    """``python -m avglab.export|report|memory`` (README before the layout) reach the same entry points."""
    import importlib

    for name in ("export", "report", "memory"):
        alias = importlib.import_module(f"avglab.{name}")
        assert alias.main is importlib.import_module(f"avglab.tools.{name}").main
